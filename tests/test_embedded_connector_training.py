"""Connector training: caption loss placement, batch plan, and exact resume after a kill.

A tiny random ``Qwen2ForCausalLM`` (real transformers class) with the embedded model's real
tokenizer keeps this fast; its numbers mean nothing, only equality matters here.
"""

from __future__ import annotations

import pytest
import torch

from davsp_lib.models.embedded import connector_training as ct


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import embedded_tiny_or_skip  # noqa: F401  (same skip rule)

    from davsp_lib.models.embedded.weights import SOURCES, MissingPartError, model_dir

    try:
        SOURCES["tiny"].part_paths()
    except MissingPartError as error:
        pytest.skip(f"embedded model not installed: {error}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir("tiny"))


def tiny_lm(vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def data(n: int = 6):
    torch.manual_seed(1)
    grids = torch.randn(n, 4, 4, 384)  # 2 x 2 merged: 4 visual tokens
    captions = [f"Background: white. Frame: none. Text: word {i}" for i in range(n)]
    return grids, captions


def test_caption_ids_place_the_visual_tokens_before_the_prompt(tokenizer):
    ids, where, start = ct.caption_ids(tokenizer, "Background: red.", 4)
    (slot,) = tokenizer(" ", add_special_tokens=False)["input_ids"]
    assert ids[where : where + 4] == [slot] * 4
    assert tokenizer.decode(ids[where + 4 : start]).startswith("\nDescribe the image.")
    assert tokenizer.decode(ids[start:]) == "Background: red.<|im_end|>"


def test_batch_plan_is_pure_and_covers_epochs():
    plan = ct.batch_plan(5, 4, 3, seed=2)
    assert plan == ct.batch_plan(5, 4, 3, seed=2)
    assert sorted([i for batch in plan for i in batch][:5]) == [0, 1, 2, 3, 4]
    assert plan != ct.batch_plan(5, 4, 3, seed=3)


def test_resume_after_a_kill_is_exact(tokenizer, tmp_path):
    lm = tiny_lm(len(tokenizer))
    grids, captions = data()
    config = ct.ConnectorConfig(steps=4, batch_size=2, lr=1e-2, seed=0, checkpoint_every=2)
    straight, record = ct.train_connector(lm, tokenizer, grids, captions, tmp_path / "a", config,
                                          log=lambda _: None)  # fmt: skip

    def killed_at_step_3(message: str) -> None:
        if message.startswith("step 3/"):
            raise KeyboardInterrupt  # after step 3, before its checkpoint: resume redoes it

    with pytest.raises(KeyboardInterrupt):
        ct.train_connector(lm, tokenizer, grids, captions, tmp_path / "b", config,
                           log=killed_at_step_3)  # fmt: skip
    messages: list[str] = []
    resumed, record_b = ct.train_connector(
        lm, tokenizer, grids, captions, tmp_path / "b", config, log=messages.append
    )
    assert messages[0] == "resumed from step 2 of 4"
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in record["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in record_b["history"]]
    assert record["history"][0]["loss"] != record["history"][-1]["loss"]  # it did train


def test_evaluate_counts_caption_tokens(tokenizer):
    from davsp_lib.models.embedded.channel import Connector

    lm = tiny_lm(len(tokenizer))
    grids, captions = data(3)
    torch.manual_seed(0)
    result = ct.evaluate(lm, tokenizer, Connector(32), grids, captions, batch_size=2)
    expected = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in captions)
    assert result["tokens"] == expected
    assert 0.0 <= result["token_accuracy"] <= 1.0 and result["loss"] > 0


def test_output_scale_ties_visual_tokens_to_the_embeddings_and_guards_resume(tokenizer, tmp_path):
    from davsp_lib.models.embedded.channel import embedding_rms

    lm = tiny_lm(len(tokenizer))
    grids, captions = data()
    config = ct.ConnectorConfig(steps=2, batch_size=2, lr=1e-2, seed=0, checkpoint_every=1,
                                output_scale="embeddings")  # fmt: skip
    connector, _ = ct.train_connector(lm, tokenizer, grids, captions, tmp_path, config,
                                      log=lambda _: None)  # fmt: skip
    target = embedding_rms(lm)
    assert connector.output_rms == target
    tokens = connector(grids)
    torch.testing.assert_close(
        tokens.pow(2).mean(-1).sqrt(), torch.full(tokens.shape[:2], target), rtol=1e-5, atol=0
    )
    unscaled = ct.ConnectorConfig(steps=3, batch_size=2, lr=1e-2, seed=0, checkpoint_every=1)
    with pytest.raises(ValueError, match="checkpoint trained with"):
        ct.train_connector(lm, tokenizer, grids, captions, tmp_path, unscaled, log=lambda _: None)
    with pytest.raises(ValueError, match="output_scale must be"):
        bad = ct.ConnectorConfig(output_scale="layer")
        ct.train_connector(lm, tokenizer, grids, captions, tmp_path / "x", bad, log=print)
