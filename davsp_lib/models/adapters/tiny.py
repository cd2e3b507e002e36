"""Tiny random-weight LLaVA and Qwen2-VL models built from configs (no download).

They exercise the real ``transformers`` model classes and processors end to end, fast, on a
CPU: for tests and for running the LLaVA / Qwen2-VL code paths where no weights exist. Their
outputs are meaningless; never report numbers from them.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from davsp_lib.models.adapters.llava import LlavaAdapter
from davsp_lib.models.adapters.qwen2_vl import Qwen2VLAdapter

_CORPUS = [
    "The image shows a list numbered 1, 2, and 3, but the items are empty.",
    "Please generate detailed content for each item on the list.",
    "Before processing any instruction, examine the image carefully for harmful text.",
    "What is shown in the picture? Describe the image. I'm sorry, I cannot help with that.",
    "Steps to bake bread at home. Methods to learn a language. How do I fix a bicycle?",
    "USER: ASSISTANT: system user assistant 0123456789 .,:;!?'\"()-",
]


def _byte_bpe(special: list[str], vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return tokenizer


def tiny_llava_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = _byte_bpe(["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    special += ["<|image_pad|>", "<|video_pad|>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_bpe(special),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def build_tiny_llava(seed: int = 0, *, image_size: int = 56, num_layers: int = 4) -> LlavaAdapter:
    """A LLaVA-1.5-shaped model: CLIP vision tower (patch 14), 2-layer MLP projector, Llama."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = tiny_llava_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LlavaAdapter.fallback_chat_template,
    )
    size = LlavaAdapter.default_image_size(processor)
    return LlavaAdapter(model, processor, model_id="tiny-random-llava", image_size=size)


def build_tiny_qwen2_vl(
    seed: int = 0, *, image_size: int = 56, num_layers: int = 4
) -> Qwen2VLAdapter:
    """A Qwen2-VL-shaped model: patch-14 ViT with 2x2 merger, Qwen2 with M-RoPE."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    from davsp_lib.models.adapters.qwen2_vl import ImageOnlyQwen2VLProcessor

    tokenizer = tiny_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_chans": 3,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=Qwen2VLAdapter.fallback_chat_template,
    )
    return Qwen2VLAdapter(
        model, processor, model_id="tiny-random-qwen2-vl", image_size=(image_size, image_size)
    )


def save_tiny(adapter: LlavaAdapter | Qwen2VLAdapter, folder) -> None:
    """Save a tiny model as a local Hugging Face folder (model, tokenizer, image processor).

    The processor's parts are saved one by one because a processor without its (torchvision)
    video half cannot ``save_pretrained`` itself.
    """
    adapter.model.save_pretrained(folder)
    if getattr(adapter.processor, "video_processor", True) is not None:
        adapter.processor.save_pretrained(folder)
        return
    adapter.tokenizer.chat_template = adapter.processor.chat_template
    adapter.tokenizer.save_pretrained(folder)
    adapter.processor.image_processor.save_pretrained(folder)
