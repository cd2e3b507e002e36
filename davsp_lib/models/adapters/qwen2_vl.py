"""Qwen2-VL (``Qwen/Qwen2-VL-7B-Instruct``): ViT with 2x2 patch merging + Qwen2, M-RoPE."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from transformers import Qwen2VLProcessor

from davsp_lib.models.adapters.hf import HFVisionLanguageAdapter, hf_sites


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor.

    Video processors need torchvision, which has no CPU wheel here; transformers' type check
    then fails on ``video_processor=None``. DAVSP only uses still images.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def patchify(
    pixels: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> torch.Tensor:
    """Torch twin of ``Qwen2VLImageProcessor.patchify`` for a normalised ``[3, H, W]`` image.

    Returns ``[grid_h * grid_w, 3 * temporal_patch_size * patch_size**2]``, the still image
    repeated over the temporal patch, in the processor's (merge-grouped) patch order.
    """
    channels, height, width = pixels.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixels.reshape(
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.permute(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, C, ph, pw)
    patches = patches.unsqueeze(5).expand(
        *patches.shape[:5], temporal_patch_size, *patches.shape[5:]
    )
    return patches.reshape(
        grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size
    )


def native_size(image_processor, height: int, width: int) -> tuple[int, int]:
    """Qwen2-VL's native resize of a ``height x width`` image with this image processor's
    ``min_pixels`` / ``max_pixels`` (``size["shortest_edge"]`` / ``size["longest_edge"]``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    return smart_resize(
        int(height),
        int(width),
        factor=factor,
        min_pixels=int(get("shortest_edge")),
        max_pixels=int(get("longest_edge")),
    )


def canvas_option(image_processor, option: str) -> tuple[int, int]:
    """A canvas from ``"native:SIDE"`` or ``"native:HxW"``: the processor's native size for a
    ``SIDE x SIDE`` (or ``H x W``) image, e.g. ``native:1024`` -> ``(1036, 1036)`` with
    Qwen2-VL-7B-Instruct's min/max pixels (1369 visual tokens instead of 144 at 336 x 336)."""
    kind, _, dims = option.partition(":")
    parts = dims.lower().split("x")
    if kind != "native" or not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) > 2:
        raise ValueError(
            f"Qwen2-VL canvas option must be 'native:SIDE' or 'native:HxW', got {option!r}"
        )
    height, width = int(parts[0]), int(parts[-1])
    return native_size(image_processor, height, width)


class Qwen2VLAdapter(HFVisionLanguageAdapter):
    architecture = "qwen2_vl"
    sites: ClassVar[Mapping[str, Sequence[str]]] = hf_sites(
        language_model=("model.language_model", "model"),
        vision_tower=("model.visual", "visual"),
        projector=("model.visual.merger", "visual.merger"),
        lm_head=("lm_head",),
    )
    # Qwen2-VL-*-Instruct's shipped template (tokenizer_config.json), images and text only: a
    # first message that is not a system message gets "You are a helpful assistant." before it
    fallback_chat_template = (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
        "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif item['type'] == 'text' %}"
        "{{ item['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    #: the shipped template's default system prompt, passed explicitly so the prompt is the
    #: same whichever template a checkpoint carries
    default_system_prompt = "You are a helpful assistant."
    #: default canvas: a multiple of patch_size * merge_size (28), 144 visual tokens. Kept as the
    #: default (over the processor's native size, see :meth:`native_image_size`) because the
    #: border is one fixed tensor, the reference trains one 336 x 336 canvas, and notebook 05
    #: applies a border trained on LLaVA's 336 x 336 canvas to Qwen2-VL unchanged.
    default_canvas = (336, 336)

    image_placement = "<|vision_start|>, {n} image tokens, <|vision_end|>, first in the user turn"

    def resolve_image_size(
        self, processor, image_size: tuple[int, int] | str | None, *, model_id: str
    ) -> tuple[int, int]:
        """``image_size``: a canvas (multiple of 28), or ``"native:SIDE"`` /
        ``"native:HxW"`` (:func:`canvas_option`); default :attr:`default_canvas`."""
        image_processor = processor.image_processor
        if isinstance(image_size, str):
            self.canvas = image_size
            image_size = canvas_option(image_processor, image_size)
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        size = tuple(image_size or self.default_canvas)
        factor = self.patch_size * self.merge_size
        if size[0] % factor or size[1] % factor:
            raise ValueError(f"Qwen2-VL canvas {size} must be a multiple of {factor} on both sides")
        return size  # type: ignore[return-value]

    @property
    def image_token_count(self) -> int:  # type: ignore[override]
        """Merged visual tokens for our fixed canvas (the processor's resize policy is bypassed)."""
        height, width = self.image_size
        return (height // self.patch_size) * (width // self.patch_size) // self.merge_size**2

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def token_type_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mm_token_type_ids`` (0 text, 1 image), which Qwen2-VL's forward needs to place the
        image tokens on its 3-D (M-RoPE) grid; transformers 5 raises without it."""
        return {"mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int)}

    def native_image_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the processor's own resize (``smart_resize``) gives a ``height x width``
        image: sides rounded to multiples of 28, pixels within the processor's min/max."""
        return native_size(self.processor.image_processor, height, width)

    def position_ids(self, attention_mask: torch.Tensor) -> None:
        return None  # M-RoPE positions come from get_rope_index, which reads the mask

    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        normalised = self.normalize(images)
        patches = [
            patchify(image, self.patch_size, self.merge_size, self.temporal_patch_size)
            for image in normalised
        ]
        grid = [1, self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size]
        return {
            "pixel_values": torch.cat(patches).to(self.dtype),
            "image_grid_thw": torch.tensor([grid] * len(patches), device=images.device),
        }
