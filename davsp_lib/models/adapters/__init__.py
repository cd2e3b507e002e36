"""Model adapters: one interface over LLaVA-1.5, Qwen2-VL and the embedded default."""

from davsp_lib.models.adapters.base import EncodedBatch, PreprocessingSpec, VLMAdapter, check_pixels
from davsp_lib.models.adapters.hooks import capture_hidden
from davsp_lib.models.adapters.registry import (
    REGISTRY,
    Architecture,
    adapter_for,
    is_embedded,
    load_adapter,
    supported,
)

__all__ = [
    "REGISTRY",
    "Architecture",
    "EncodedBatch",
    "PreprocessingSpec",
    "VLMAdapter",
    "adapter_for",
    "capture_hidden",
    "check_pixels",
    "is_embedded",
    "load_adapter",
    "supported",
]
