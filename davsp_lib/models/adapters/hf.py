"""Shared machinery for Hugging Face vision-language models (processor + model, no forks).

The processor's image pipeline (PIL/numpy) is not differentiable, so images are resized and
normalised here in torch; the processor is still the source of truth for the chat template,
the tokenizer and how many placeholder tokens one image takes (measured once on a blank image).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from davsp_lib.models.adapters.base import (
    PAD_AND_RESIZE,
    EncodedBatch,
    PreprocessingSpec,
    VLMAdapter,
    assemble_tokens,
    check_batch,
)
from davsp_lib.models.conversation import Conversation


def hf_sites(
    *,
    language_model: Sequence[str],
    vision_tower: Sequence[str],
    projector: Sequence[str],
    lm_head: Sequence[str],
) -> dict[str, tuple[str, ...]]:
    """An HF architecture's :attr:`~VLMAdapter.sites`: candidate module paths per site (newer
    ``transformers`` layout first); the decoder layers are ``<language_model>.layers``."""
    return {
        "language_model": tuple(language_model),
        "language_layers": tuple(f"{path}.layers" for path in language_model),
        "vision_tower": tuple(vision_tower),
        "projector": tuple(projector),
        "lm_head": tuple(lm_head),
    }


class HFVisionLanguageAdapter(VLMAdapter):
    """A ``transformers`` VLM + its processor. Subclasses supply pixel inputs and templates."""

    #: chat template used when the processor ships none (the architecture's documented format)
    fallback_chat_template: str | None = None
    #: between a safety prefix and the query: the DAVSP reference joins them with nothing
    #: (``apply_safety_prompt`` returns ``prefix + query``; the prefix ends in ": ")
    prefix_separator: ClassVar[str] = ""
    #: system prompt used when a conversation sets none (the model's own default)
    default_system_prompt: ClassVar[str | None] = None
    #: where the image's ``{n}`` tokens go in the prompt (:attr:`preprocessing`)
    image_placement: ClassVar[str] = "{n} image tokens"
    #: ``"fixed"``, or the ``"native:..."`` option the canvas was derived from (Qwen2-VL)
    canvas: str = "fixed"

    def __init__(
        self,
        model,
        processor,
        *,
        model_id: str,
        image_size: tuple[int, int] | str | None = None,
    ):
        """``image_size``: the canvas asked for, checked by :meth:`resolve_image_size`."""
        size = self.resolve_image_size(processor, image_size, model_id=model_id)
        super().__init__(model, model_id=model_id, image_size=size)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if getattr(processor, "chat_template", None) is None:
            processor.chat_template = self.fallback_chat_template
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def resolve_image_size(
        self, processor, image_size: tuple[int, int] | str | None, *, model_id: str
    ) -> tuple[int, int]:
        """The canvas the model takes for ``image_size`` (architectures with a default or
        ``"native:..."`` options override this)."""
        if image_size is None or isinstance(image_size, str):
            raise ValueError(f"{model_id}: {self.architecture} needs an image size (H, W)")
        return (int(image_size[0]), int(image_size[1]))

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "text_config", config).hidden_size)

    @property
    def preprocessing(self) -> PreprocessingSpec:
        return PreprocessingSpec(
            pad_fill=self.pad_fill,
            resize=PAD_AND_RESIZE,
            canvas=self.canvas,
            ring=0,
            system_prompt=self.default_system_prompt,
            image_tokens=self.image_placement.format(n=self.image_token_count),
        )

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    @functools.cached_property
    def image_token_count(self) -> int:
        """Placeholder tokens per image at ``image_size``, measured with the real processor."""
        blank = Image.fromarray(np.full((*self.image_size, 3), 255, dtype=np.uint8))
        encoded = self.processor(text=[self.image_token], images=[blank], return_tensors="pt")
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        return int((encoded["input_ids"] == image_token_id).sum())

    # -- text ----------------------------------------------------------------------------------
    def prompt_text(self, conversation: Conversation) -> str:
        """The templated prompt with one image marker (as a user would see it)."""
        messages = conversation.messages(self.prefix_separator, self.default_system_prompt)
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        text = self.prompt_text(conversation)
        if conversation.has_image:
            if text.count(self.image_token) != 1:
                raise ValueError(f"{self.model_id}: expected one image marker in prompt {text!r}")
            text = text.replace(self.image_token, self.image_token * self.image_token_count)
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    # -- pixels --------------------------------------------------------------------------------
    @functools.cached_property
    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        image_processor = self.processor.image_processor
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean_std
        return (images - mean.to(images.device)) / std.to(images.device)

    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model kwargs for a canvas batch already at ``image_size`` in [0, 1]."""
        raise NotImplementedError

    def token_type_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token model inputs derived from the ids (none unless the model needs them)."""
        return {}

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Positions that ignore left padding (None: the model derives them itself)."""
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    # -- batch ---------------------------------------------------------------------------------
    def encode(
        self,
        images: torch.Tensor | None,
        conversations: Sequence[Conversation],
        answers: Sequence[str] | None = None,
    ) -> EncodedBatch:
        check_batch(images, conversations, answers)
        prompts = [self.prompt_ids(conv) for conv in conversations]
        answer_ids = None if answers is None else [self.answer_ids(a) for a in answers]
        tokens = assemble_tokens(prompts, answer_ids, self.tokenizer.pad_token_id)
        input_ids, attention_mask = tokens.input_ids, tokens.attention_mask

        device = self.device
        inputs: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device),
        }
        positions = self.position_ids(attention_mask)
        if positions is not None:
            inputs["position_ids"] = positions.to(device)
        if images is not None:
            canvas = self.to_canvas(images.to(device=device, dtype=torch.float32))
            inputs.update(self.pixel_inputs(canvas))
            inputs.update(self.token_type_inputs(inputs["input_ids"]))
        return EncodedBatch(
            model_inputs=inputs,
            last_input_index=tokens.last_input_index.to(device),
            labels=None if tokens.labels is None else tokens.labels.to(device),
            prompt_lengths=[len(p) for p in prompts],
        )
