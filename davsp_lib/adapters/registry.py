"""Load a model by hub id or local path and wrap it in the adapter for its architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from davsp_lib.adapters.base import VLMAdapter
from davsp_lib.adapters.llava import LlavaAdapter
from davsp_lib.adapters.qwen2_vl import ImageOnlyQwen2VLProcessor, Qwen2VLAdapter, canvas_option
from davsp_lib.errors import UnsupportedModelError

#: ``config.model_type`` -> adapter class
ADAPTERS: dict[str, type[VLMAdapter]] = {"llava": LlavaAdapter, "qwen2_vl": Qwen2VLAdapter}

#: names of the embedded default models (built from PyPI parts, no model hub needed)
EMBEDDED_NAMES = ("tiny", "small", "tiny-vit")


def supported() -> list[str]:
    return sorted(ADAPTERS)


def _dtype(value: str | torch.dtype | None) -> str | torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    try:
        return {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[value]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use float32, bfloat16 or float16") from None


def _load_processor(model_type: str, source: str, common: dict[str, Any]):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, **common)
    except (AttributeError, ImportError, TypeError, ValueError):
        if model_type != "qwen2_vl":
            raise
    # Without torchvision, Qwen2-VL's processor cannot build its video half: assemble it by hand.
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(source, **common)
    return ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def load_adapter(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
    revision: str | None = None,
    image_size: tuple[int, int] | str | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
) -> VLMAdapter:
    """Load a supported VLM (hub id or local folder) and return its adapter.

    ``trust_remote_code`` stays off unless the caller asks: only ``transformers``' own model
    classes are used. ``local_files_only`` defaults to True for an existing local folder.
    A model larger than one GPU: ``device_map="auto"`` with ``max_memory`` (e.g.
    ``{0: "70GiB", 1: "70GiB"}``, plus ``"cpu"`` to allow CPU offload) and ``offload_folder``
    for disk offload; gradients still reach the pixels through accelerate's hooks.
    Qwen2-VL also takes ``image_size="native:SIDE"`` (the processor's own resize of a square
    image of that side, see :func:`~davsp_lib.adapters.qwen2_vl.canvas_option`).

    ``dtype="auto"`` keeps a checkpoint's own dtype; for the embedded models it is their
    default, a bfloat16 language model (``"float32"`` reproduces earlier results exactly).
    """
    from transformers import AutoConfig

    source = str(name_or_path)
    if source in EMBEDDED_NAMES:
        if max_memory or offload_folder:
            raise ValueError(
                f"{source}: the embedded model runs on one device; max_memory and "
                "offload_folder are for Hugging Face models"
            )
        from davsp_lib.embedded.model import load_embedded

        kwargs: dict[str, Any] = {"image_size": image_size} if image_size else {}
        if dtype not in (None, "auto"):
            kwargs["dtype"] = _dtype(dtype)
        if isinstance(device_map, str) and device_map != "auto":
            kwargs["device"] = device_map
        return load_embedded(source, **kwargs)
    if local_files_only is None:
        local_files_only = Path(source).is_dir()
    common = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "local_files_only": local_files_only,
    }
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as exc:
        raise FileNotFoundError(f"{source}: cannot load a model config ({exc})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"{source}: architecture {model_type!r} has no adapter; supported: {supported()}"
        )
    from transformers import AutoModelForImageTextToText

    placement: dict[str, Any] = {}
    if max_memory is not None:
        placement["max_memory"] = max_memory
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=_dtype(dtype), device_map=device_map, **placement, **common
    )
    processor = _load_processor(model_type, source, common)
    return adapter_for(model, processor, model_id=source, image_size=image_size)


def adapter_for(
    model: torch.nn.Module,
    processor: Any,
    *,
    model_id: str,
    image_size: tuple[int, int] | str | None = None,
) -> VLMAdapter:
    """Wrap an already loaded ``transformers`` model + processor."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "llava":
        size = LlavaAdapter.default_image_size(processor)
        if image_size is not None and tuple(image_size) != size:
            raise ValueError(
                f"{model_id}: LLaVA-1.5 takes {size} images (its CLIP size), not {image_size}"
            )
        return LlavaAdapter(model, processor, model_id=model_id, image_size=size)
    if model_type == "qwen2_vl":
        if isinstance(image_size, str):
            image_size = canvas_option(processor.image_processor, image_size)
        return Qwen2VLAdapter(model, processor, model_id=model_id, image_size=image_size)
    raise UnsupportedModelError(
        f"{model_id}: architecture {model_type!r} ({type(model).__name__}) has no adapter; "
        f"supported: {supported()}"
    )
