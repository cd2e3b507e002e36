"""LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf`` / ``-13b-hf``): CLIP ViT-L/14-336 + MLP + Vicuna."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from davsp_lib.models.adapters.hf import HFVisionLanguageAdapter, hf_sites
from davsp_lib.models.conversation import Conversation

#: the system sentence of LLaVA's ``llava_v1`` conversation (``conv_llava_v1`` in
#: llava/conversation.py, which the DAVSP reference uses for training and inference)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class LlavaAdapter(HFVisionLanguageAdapter):
    architecture = "llava"
    sites: ClassVar[Mapping[str, Sequence[str]]] = hf_sites(
        language_model=("model.language_model", "language_model.model"),
        vision_tower=("model.vision_tower", "vision_tower"),
        projector=("model.multi_modal_projector", "multi_modal_projector"),
        lm_head=("lm_head", "language_model.lm_head"),
    )
    # llava-hf's own template (Vicuna v1 style), used only if the processor carries none
    fallback_chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'][0]['text'] + ' ' }}{% else %}{{ message['role'].upper() + ': ' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
        "{{ ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )

    default_system_prompt = LLAVA_V1_SYSTEM
    image_placement = "{n} image tokens first in the user turn, then a newline"

    def resolve_image_size(
        self, processor, image_size: tuple[int, int] | str | None, *, model_id: str
    ) -> tuple[int, int]:
        """LLaVA-1.5 takes its CLIP size only: ``image_size``, if given, must be that size."""
        size = self.default_image_size(processor)
        if image_size is not None and tuple(image_size) != size:
            raise ValueError(
                f"{model_id}: LLaVA-1.5 takes {size} images (its CLIP size), not {image_size}"
            )
        return size

    def prompt_text(self, conversation: Conversation) -> str:
        """The ``llava_v1`` prompt, built as the reference's ``conv.get_prompt()`` builds it.

        ``{system} USER: <image>\n{prefix}{query} ASSISTANT:`` (separator style TWO, sep " ").
        Rendered here rather than by the processor's chat template, so the string does not
        depend on which template a checkpoint ships.
        """
        system = conversation.system_prompt
        if system is None:
            system = self.default_system_prompt
        message = conversation.user_text(self.prefix_separator)
        if conversation.has_image:
            message = f"{self.image_token}\n{message}"
        head = f"{system} " if system else ""
        return f"{head}USER: {message} ASSISTANT:"

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """Token ids as the reference's ``tokenizer_image_token`` makes them: the text before and
        after the image marker is tokenised separately (each with the tokenizer's own BOS, the
        second one dropped), so SentencePiece tokenizers see the text after the marker as the
        start of a text, as in the reference."""
        text = self.prompt_text(conversation)
        if not conversation.has_image:
            return self.tokenizer(text, add_special_tokens=True)["input_ids"]
        parts = text.split(self.image_token)
        if len(parts) != 2:
            raise ValueError(f"{self.model_id}: expected one image marker in prompt {text!r}")
        head = self.tokenizer(parts[0], add_special_tokens=True)["input_ids"]
        tail = self.tokenizer(parts[1], add_special_tokens=True)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and tail[:1] == [bos]:
            tail = tail[1:]
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        return [*head, *[image_id] * self.image_token_count, *tail]

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
