"""The one table of supported models (davsp_lib.models.adapters.registry): lookups, errors.

The embedded loader is replaced by a recorder here, so these tests need no model weights; the
real embedded models are loaded in test_embedded_model.py and test_embedded_channel.py.
"""

from __future__ import annotations

import pytest
import torch

from davsp_lib.models.adapters import REGISTRY, adapter_for, is_embedded, load_adapter, supported
from davsp_lib.models.adapters.llava import LlavaAdapter
from davsp_lib.models.adapters.qwen2_vl import Qwen2VLAdapter
from davsp_lib.models.adapters.tiny import build_tiny_llava
from davsp_lib.runtime.errors import UnsupportedModelError

SUPPORTED = (
    "embedded models small, small-vit, tiny, tiny-vit; Hugging Face checkpoints whose "
    "config.model_type is llava, qwen2_vl"
)


def test_one_table_names_every_adapter():
    found = {key: entry.adapter_class().architecture for key, entry in REGISTRY.items()}
    assert found == {
        "llava": "llava",
        "qwen2_vl": "qwen2_vl",
        "tiny": "davsp-embedded",
        "small": "davsp-embedded",
        "tiny-vit": "davsp-embedded-vit",
        "small-vit": "davsp-embedded-vit",
    }
    assert REGISTRY["llava"].adapter_class() is LlavaAdapter
    assert REGISTRY["qwen2_vl"].adapter_class() is Qwen2VLAdapter
    embedded = ["tiny", "small", "tiny-vit", "small-vit"]
    assert [key for key in REGISTRY if is_embedded(key)] == embedded
    assert not is_embedded("llava-hf/llava-1.5-7b-hf") and not is_embedded("llava")
    assert supported() == SUPPORTED


@pytest.fixture
def embedded_calls(monkeypatch):
    """Record what the registry asks the embedded loader for (no weights needed)."""
    import davsp_lib.models.embedded.model as embedded

    calls: list[dict] = []
    monkeypatch.setattr(embedded, "load_embedded", lambda **kwargs: calls.append(kwargs) or "ok")
    return calls


def test_embedded_names_dispatch_once_with_their_options(embedded_calls):
    assert load_adapter("tiny") == "ok"
    assert load_adapter("small", dtype="float32", device_map="cpu") == "ok"
    load_adapter("tiny-vit", dtype="bf16", image_size=(448, 448), border_width=40)
    assert embedded_calls == [
        {"name": "tiny"},
        {"name": "small", "dtype": torch.float32, "device": "cpu"},
        {
            "name": "tiny",
            "vision": "vit",
            "image_size": (448, 448),
            "border_width": 40,
            "dtype": torch.bfloat16,
        },
    ]


def test_embedded_models_refuse_multi_device_options(embedded_calls):
    with pytest.raises(ValueError, match="tiny: the embedded model runs on one device"):
        load_adapter("tiny", max_memory={0: "1GiB"})
    assert embedded_calls == []


def test_border_width_is_for_embedded_models_only(tmp_path):
    with pytest.raises(ValueError, match=r"border_width is an embedded model's option"):
        load_adapter(tmp_path, border_width=30)


def test_unsupported_architecture_lists_what_is_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as error:
        load_adapter(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}: architecture 'gpt2' has no adapter; supported: {SUPPORTED}"
    )


def test_an_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load a model config") as error:
        load_adapter(tmp_path / "nowhere")
    assert str(error.value).endswith(f"supported: {SUPPORTED}")


def test_adapter_for_wraps_by_model_type_and_refuses_others():
    tiny = build_tiny_llava()
    wrapped = adapter_for(tiny.model, tiny.processor, model_id="again")
    assert type(wrapped) is LlavaAdapter and wrapped.image_size == tiny.image_size
    with pytest.raises(ValueError, match=r"LLaVA-1.5 takes \(56, 56\) images"):
        adapter_for(tiny.model, tiny.processor, model_id="again", image_size=(84, 84))
    tiny.model.config.model_type = "tiny"  # an embedded name is not a checkpoint architecture
    with pytest.raises(UnsupportedModelError, match=r"architecture 'tiny' has no adapter"):
        adapter_for(tiny.model, tiny.processor, model_id="again")
