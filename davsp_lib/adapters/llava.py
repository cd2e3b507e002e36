"""LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf`` / ``-13b-hf``): CLIP ViT-L/14-336 + MLP + Vicuna."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from davsp_lib.adapters.hf import HFVisionLanguageAdapter


class LlavaAdapter(HFVisionLanguageAdapter):
    architecture = "llava"
    sites: ClassVar[Mapping[str, Sequence[str]]] = {
        "language_model": ("model.language_model", "language_model.model"),
        "language_layers": ("model.language_model.layers", "language_model.model.layers"),
        "vision_tower": ("model.vision_tower", "vision_tower"),
        "projector": ("model.multi_modal_projector", "multi_modal_projector"),
        "lm_head": ("lm_head", "language_model.lm_head"),
    }
    # llava-hf's own template (Vicuna v1 style), used only if the processor carries none
    fallback_chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'][0]['text'] + ' ' }}{% else %}{{ message['role'].upper() + ': ' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
        "{{ ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )

    @staticmethod
    def default_image_size(processor) -> tuple[int, int]:
        crop = getattr(processor.image_processor, "crop_size", None) or {}
        get = crop.get if isinstance(crop, dict) else lambda key: getattr(crop, key, None)
        height, width = get("height"), get("width")
        if height and width:
            return int(height), int(width)
        size = int(processor.image_processor.size["shortest_edge"])
        return size, size

    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.normalize(images).to(self.dtype)}
