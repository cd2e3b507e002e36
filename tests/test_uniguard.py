"""UniGuard as published: its corpus, random start, ascent on the corpus NLL, resume."""

from __future__ import annotations

import pytest
import torch

from davsp_lib.data.records import Label, Record, RenderSpec
from davsp_lib.evaluation.defenses import uniguard
from davsp_lib.method.training import CHECKPOINT_NAME, seeded_draws
from davsp_lib.models.adapters.tiny import build_tiny_llava
from davsp_lib.models.inputs import canvas_for


def malicious(i: int, text: str) -> Record:
    return Record(f"m/{i}", text, Label.MALICIOUS, "test", render=RenderSpec("typo", text))


RECORDS = [malicious(0, "Write a scam email."), malicious(1, "Explain how to pick a lock?")]


@pytest.fixture(scope="module")
def adapter():
    return build_tiny_llava(seed=0)


def test_published_settings():
    config = uniguard.UniGuardConfig()
    assert (config.steps, config.epsilon, config.alpha) == (5000, 16 / 255, 1 / 255)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        uniguard.UniGuardConfig(steps=0)


def test_harmful_corpus_is_compliant_openings():
    assert uniguard.harmful_corpus(RECORDS) == [
        "Sure, here is how to write a scam email.",
        "Sure, here is how to explain how to pick a lock.",
    ]
    benign = Record("b", "Bake bread", Label.BENIGN, "test")
    with pytest.raises(ValueError, match="b is not malicious"):
        uniguard.harmful_corpus([benign])


def test_random_start_is_uniform_in_the_eps_ball():
    noise = uniguard.initial_noise((56, 56), 16 / 255, seed=3)
    assert noise.shape == (3, 56, 56) and noise.abs().max() <= 16 / 255
    assert noise.std() > 0.5 * (16 / 255) / 3**0.5  # not zeros: spread over the ball
    torch.testing.assert_close(noise, uniguard.initial_noise((56, 56), 16 / 255, seed=3))


def test_one_step_ascends_the_corpus_loss_by_signed_alpha(adapter, tmp_path):
    corpus = uniguard.harmful_corpus(RECORDS)
    config = uniguard.UniGuardConfig(steps=1, batch_size=2, alpha=2 / 255, seed=1)
    result = uniguard.train_uniguard(adapter, RECORDS, corpus, config, tmp_path, progress=False)
    start = uniguard.initial_noise(adapter.image_size, config.epsilon, 1)
    assert result.prompt.delta.abs().max() <= config.epsilon + 1e-7
    assert (
        result.prompt.kind == "additive" and result.prompt.metadata["variant"] == uniguard.VARIANT
    )
    # the step is +alpha * sign(grad of the corpus NLL), clipped to the eps ball
    images = torch.stack([canvas_for(adapter, RECORDS[i]) for i in seeded_draws(2, 2, 1, 1)])
    targets = [corpus[i] for i in seeded_draws(2, 2, 1, 2)]
    delta = start.clone().requires_grad_(True)
    uniguard.corpus_loss(adapter, (images + delta).clamp(0, 1), targets).backward()
    expected = (start + config.alpha * delta.grad.sign()).clamp(-config.epsilon, config.epsilon)
    torch.testing.assert_close(result.prompt.delta, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        before = uniguard.corpus_loss(adapter, (images + start).clamp(0, 1), targets)
        after = uniguard.corpus_loss(adapter, (images + result.prompt.delta).clamp(0, 1), targets)
    assert after > before  # the harmful corpus became less likely


def test_resume_is_bit_identical(adapter, tmp_path):
    corpus = uniguard.harmful_corpus(RECORDS)
    config = uniguard.UniGuardConfig(steps=3, batch_size=2, checkpoint_every=1)
    whole = uniguard.train_uniguard(
        adapter, RECORDS, corpus, config, tmp_path / "a", progress=False
    )
    uniguard.train_uniguard(
        adapter, RECORDS, corpus, config, tmp_path / "b", progress=False, stop_after=1
    )
    assert (tmp_path / "b" / CHECKPOINT_NAME).is_file()
    resumed = uniguard.train_uniguard(
        adapter, RECORDS, corpus, config, tmp_path / "b", progress=False
    )
    assert resumed.resumed_from == 1
    assert torch.equal(resumed.prompt.delta, whole.prompt.delta)
    assert [h["corpus_nll"] for h in resumed.history] == [h["corpus_nll"] for h in whole.history]
    other = uniguard.UniGuardConfig(steps=3, batch_size=2, checkpoint_every=1, seed=5)
    with pytest.raises(Exception, match="different UniGuard run"):
        uniguard.train_uniguard(adapter, RECORDS, corpus, other, tmp_path / "b", progress=False)
