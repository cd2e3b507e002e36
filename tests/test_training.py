"""VSP training: batch plan, losses, resume exactness (also after a kill), NaN guard, variants."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from davsp_lib.data import datasets
from davsp_lib.method import training, vectors
from davsp_lib.method.training import TrainConfig, TrainingDiverged, batch_plan, hinge
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.tiny import build_tiny_llava
from davsp_lib.runtime.errors import DataError

LAYER = 2
WIDTH = 8


def setup(n: int = 4):
    """The tiny random LLaVA, 4 + 4 built-in FigStep records and a vector fitted on them."""
    adapter = build_tiny_llava()
    records = list(datasets.load_builtin("figstep"))
    malicious = [r for r in records if r.is_malicious][:n]
    benign = [r for r in records if not r.is_malicious][:n]
    acts = vectors.extract(adapter, malicious + benign, [LAYER], progress=False)
    vector = vectors.fit_vector(acts)
    scores = vector.project(acts, LAYER)
    margins = float(scores.max()) + 0.05, float(scores.min())
    prompt = VisualSafetyPrompt.blank(adapter.image_size, WIDTH)
    data = training.prepare_training_set(
        adapter, prompt, malicious, benign, answer_tokens=4, progress=False
    )
    return adapter, vector, data, margins


def config(margins, **overrides) -> TrainConfig:
    values = dict(
        layer=LAYER, mu_plus=margins[0], mu_minus=margins[1], steps=6, batch_size=2,
        width=WIDTH, checkpoint_every=2, lr=0.05,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def tiny():
    return setup()


def run_job(out_dir: str, steps: int = 6, pause: float = 0.0) -> None:
    """Entry point for the kill test's subprocess (one thread: bit-identical arithmetic)."""
    torch.set_num_threads(1)
    adapter, vector, data, margins = setup()
    training.train(
        adapter, data, config(margins, steps=steps, checkpoint_every=1), out_dir,
        vector=vector, progress=False,
        on_step=lambda step, _: (print(f"step {step}", flush=True), time.sleep(pause)),
    )  # fmt: skip


# ------------------------------------------------------------------------------ pure parts


def test_batch_plan_is_deterministic_and_covers_each_epoch():
    cfg = TrainConfig(layer=1, mu_plus=1, mu_minus=0, steps=8, batch_size=2)
    plan = batch_plan(cfg, 4, 4)
    assert plan == batch_plan(cfg, 4, 4)
    assert [bool(s.malicious) for s in plan] == [True, False] * 4  # alternate
    first_epoch = [i for s in plan[:4] for i in s.malicious]
    assert sorted(first_epoch) == [0, 1, 2, 3]
    mixed = batch_plan(TrainConfig(**{**cfg.to_json(), "schedule": "mix"}), 4, 4)
    assert all(len(s.malicious) == 1 and len(s.benign) == 1 for s in mixed)
    coin = batch_plan(TrainConfig(**{**cfg.to_json(), "schedule": "random", "steps": 200}), 4, 4)
    assert 70 < sum(bool(s.malicious) for s in coin) < 130
    uniguard = batch_plan(TrainConfig(**{**cfg.to_json(), "variant": "uniguard"}), 4, 4)
    assert all(s.malicious and not s.benign for s in uniguard)


def test_hinge_values():
    scores = torch.tensor([1.0, 5.0, 1.0, 5.0])
    malicious = torch.tensor([True, True, False, False])
    assert hinge(scores, malicious, 3.0, 2.0).tolist() == [2.0, 0.0, 0.0, 3.0]


def test_answer_loss_matches_cross_entropy_on_answer_tokens():
    logits = torch.randn(2, 6, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, -100, -100, 3, 5], [-100, -100, -100, -100, -100, 2]])
    # position t predicts token t + 1
    expected = F.cross_entropy(torch.cat([logits[0, 3:5], logits[1, 4:5]]), torch.tensor([3, 5, 2]))
    assert torch.allclose(training.answer_loss(logits[:, -3:], labels), expected, atol=1e-6)


def test_config_is_validated():
    with pytest.raises(ValueError, match="mu_plus"):
        TrainConfig(layer=1, mu_plus=0, mu_minus=1)
    with pytest.raises(ValueError, match="variant"):
        TrainConfig(layer=1, mu_plus=1, mu_minus=0, variant="magic")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(layer=1, mu_plus=1, mu_minus=0, lr=float("nan"))


# ------------------------------------------------------------------------------ training


def test_training_raises_malicious_projections_and_keeps_the_image(tiny, tmp_path):
    adapter, vector, data, margins = tiny
    before = training.projections(
        adapter,
        data.malicious,
        vector,
        LAYER,
        prompt=VisualSafetyPrompt.blank(adapter.image_size, WIDTH),
    )
    result = training.train(adapter, data, config(margins, steps=8, lr=0.2), tmp_path,
                            vector=vector, progress=False)  # fmt: skip
    after = training.projections(adapter, data.malicious, vector, LAYER, prompt=result.prompt)
    assert after.mean() > before.mean()
    assert float(result.prompt.delta.min()) >= 0.0 and float(result.prompt.delta.max()) <= 1.0
    assert float(result.prompt.delta[:, :WIDTH].min()) < 1.0  # the border moved
    placed = data.canvases[data.malicious[0].id][None]
    composed = result.prompt.apply(placed)
    inner = (slice(None), slice(None), slice(WIDTH, -WIDTH), slice(WIDTH, -WIDTH))
    assert torch.equal(composed[inner], placed[inner])
    assert len(result.history) == 8 and result.prompt.metadata["steps_done"] == 8
    assert sorted(result.snapshots) == [0, 8]


@pytest.mark.parametrize("optimizer", ["adam", "sign"])
def test_resume_equals_an_uninterrupted_run(tiny, tmp_path, optimizer):
    adapter, vector, data, margins = tiny
    cfg = config(margins, optimizer=optimizer, lr=0.05 if optimizer == "adam" else 2 / 255)
    full = training.train(adapter, data, cfg, tmp_path / "full", vector=vector, progress=False)
    part = training.train(adapter, data, cfg, tmp_path / "part", vector=vector, progress=False,
                          stop_after=3)  # fmt: skip
    assert len(part.history) == 3
    resumed = training.train(adapter, data, cfg, tmp_path / "part", vector=vector, progress=False)
    assert resumed.resumed_from == 3
    assert torch.equal(resumed.prompt.delta, full.prompt.delta)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    code = f"from test_training import run_job; run_job({str(out)!r}, pause=0.5)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("step 3"):
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_job(str(out))  # resumes from the last checkpoint
    run_job(str(tmp_path / "straight"))
    from safetensors.torch import load_file

    killed = load_file(out / training.CHECKPOINT_NAME)
    straight = load_file(tmp_path / "straight" / training.CHECKPOINT_NAME)
    assert 3 <= int(killed["optimizer.step"]) == int(straight["optimizer.step"]) == 6
    assert torch.equal(killed["delta"], straight["delta"])


def test_resume_checkpoint_none_then_state_then_refusal(tmp_path):
    path = tmp_path / training.CHECKPOINT_NAME
    assert training.resume_checkpoint(path, "f1", run="X ", changed="c") is None
    training.save_checkpoint(path, torch.ones(2), None, {"fingerprint": "f1", "step": 3}, {})
    tensors, state = training.resume_checkpoint(path, "f1", run="X ", changed="c")
    assert state == {"fingerprint": "f1", "step": 3} and tensors["delta"].tolist() == [1.0, 1.0]
    with pytest.raises(DataError, match=r"different X run \(c changed\)"):
        training.resume_checkpoint(path, "f2", run="X ", changed="c")


def test_checkpoint_of_another_run_is_refused(tiny, tmp_path):
    adapter, vector, data, margins = tiny
    training.train(adapter, data, config(margins, steps=2), tmp_path, vector=vector,
                   progress=False)  # fmt: skip
    with pytest.raises(DataError, match="different run"):
        training.train(adapter, data, config(margins, steps=2, lr=0.01), tmp_path,
                       vector=vector, progress=False)  # fmt: skip


def test_nan_stops_with_a_message_and_keeps_the_last_good_state(tiny, tmp_path):
    adapter, vector, data, margins = tiny
    cfg = config(margins, steps=6, checkpoint_every=100)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] > 3:  # the 4th forward (step index 3) goes NaN
            if isinstance(output, tuple):
                return (output[0] * float("nan"), *output[1:])
            return output * float("nan")
        return None

    handle = adapter.language_layers[0].register_forward_hook(poison)
    try:
        with pytest.raises(TrainingDiverged, match="step 3"):
            training.train(adapter, data, cfg, tmp_path, vector=vector, progress=False)
    finally:
        handle.remove()
    resumed = training.train(adapter, data, cfg, tmp_path, vector=vector, progress=False)
    assert resumed.resumed_from == 3 and len(resumed.history) == 6
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in resumed.history)


@pytest.mark.parametrize("variant", ["da_noise", "vsp_output", "uniguard"])
def test_variants_train_the_right_kind(tiny, tmp_path, variant):
    adapter, vector, data, margins = tiny
    cfg = config(margins, variant=variant, steps=2, epsilon=8 / 255)
    result = training.train(adapter, data, cfg, tmp_path, vector=vector, progress=False)
    assert result.prompt.kind == cfg.kind
    if cfg.kind == "additive":
        assert float(result.prompt.delta.abs().max()) <= 8 / 255 + 1e-7
        assert float(result.prompt.delta.abs().max()) > 0
    if not cfg.uses_projection:
        assert all(h["projection_malicious"] is None for h in result.history)
        assert result.history[0]["output_loss"] > 0


# ------------------------------------------------------------------------------ issue 16 items


def test_malicious_output_steps_are_drawn_with_p_in_the_seeded_plan():
    cfg = TrainConfig(
        layer=1, mu_plus=1.0, mu_minus=0.0, steps=4000, batch_size=2, schedule="random",
        malicious_output_p=0.05,
    )  # fmt: skip
    plan = batch_plan(cfg, 10, 10)
    coins = training.malicious_output_coins(cfg)
    flagged = [s.malicious_output for s in plan]
    assert flagged == [bool(s.malicious) and c < 0.05 for s, c in zip(plan, coins, strict=True)]
    assert not any(s.malicious_output for s in plan if not s.malicious)
    malicious_steps = sum(bool(s.malicious) for s in plan)
    assert 0.04 < sum(flagged) / malicious_steps < 0.06
    assert batch_plan(cfg, 10, 10) == plan  # resume replays the same draws
    # the draws do not move the batches
    plain = batch_plan(TrainConfig(**{**cfg.to_json(), "malicious_output_p": 0.0}), 10, 10)
    assert [(s.malicious, s.benign) for s in plain] == [(s.malicious, s.benign) for s in plan]
    assert not any(s.malicious_output for s in plain)
    # the output-only variants always train the refusal: no extra draw
    output_only = TrainConfig(**{**cfg.to_json(), "variant": "vsp_output"})
    assert not any(s.malicious_output for s in batch_plan(output_only, 10, 10))
    with pytest.raises(ValueError, match="malicious_output_p must be in"):
        TrainConfig(layer=1, mu_plus=1.0, mu_minus=0.0, malicious_output_p=1.5)


def test_drawn_malicious_output_adds_lam_times_the_refusal_loss(tiny):
    adapter, vector, data, margins = tiny
    cfg = config(margins, lam=0.5)
    direction = vector.direction(LAYER, dtype=torch.float32)
    records = data.malicious[:2]
    images = torch.stack([data.canvases[r.id] for r in records])
    args = (
        adapter, images, [data.conversations[r.id] for r in records], [True, True],
        [data.answers[r.id] for r in records], cfg, direction,
    )  # fmt: skip
    with torch.no_grad():
        plain = training.forward_losses(*args)
        drawn = training.forward_losses(*args, malicious_output=True)
        batch = adapter.encode(images, args[2], [training.REFUSAL_TARGET] * 2)
        logits = adapter.forward(batch, use_cache=False).logits
        ce = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )  # fmt: skip
    assert plain.output_loss == 0.0
    assert drawn.projection_loss == pytest.approx(plain.projection_loss, abs=1e-6)
    assert drawn.output_loss == pytest.approx(0.5 * float(ce), rel=1e-4)
    assert float(drawn.loss) == pytest.approx(plain.projection_loss + 0.5 * float(ce), rel=1e-4)


def test_targets_without_eos_drop_each_rows_last_supervised_token():
    labels = torch.tensor([[-100, 5, 6, 2], [-100, -100, 7, 2], [-100, -100, -100, -100]])
    assert training.drop_final_label(labels).tolist() == [
        [-100, 5, 6, -100],
        [-100, -100, 7, -100],
        [-100, -100, -100, -100],
    ]


def test_mmvet_scoring_markers_never_reach_a_target():
    assert training.target_text("1.25<OR>=1.25<OR>5/4") == "1.25"
    assert training.target_text("-1<AND>-5") == "-1, -5"
    assert training.target_text("a cat <AND> a dog<OR>two pets") == "a cat, a dog"
    assert training.target_text("A plain answer.") == "A plain answer."


def test_mmvet_references_are_stripped_in_the_training_set(shared_data):
    adapter = build_tiny_llava()
    mmvet = [r for r in datasets.load_mmvet(shared_data) if "<OR>" in (r.reference or "")][:2]
    prompt = VisualSafetyPrompt.blank(adapter.image_size, WIDTH)
    data = training.prepare_training_set(adapter, prompt, [], mmvet, progress=False)
    for record in mmvet:
        assert data.answers[record.id] == record.reference.split("<OR>")[0]
        assert "<" not in data.answers[record.id]


def _split_map(first: str, second: str) -> dict[str, str]:
    """The tiny LLaVA split in two: vision, projector and the first two layers on ``first``."""
    return {
        "model.vision_tower": first,
        "model.multi_modal_projector": first,
        "model.language_model.embed_tokens": first,
        "model.language_model.layers.0": first,
        "model.language_model.layers.1": first,
        "model.language_model.layers.2": second,
        "model.language_model.layers.3": second,
        "model.language_model.norm": second,
        "model.language_model.rotary_emb": second,
        "lm_head": second,
    }


DEVICE_PAIRS = [("cpu", "cpu")] + ([("cuda:0", "cuda:1")] if torch.cuda.device_count() >= 2 else [])


@pytest.mark.parametrize("devices", DEVICE_PAIRS, ids=lambda d: "+".join(d))
def test_losses_of_a_model_split_over_two_devices_land_on_one(tiny, tmp_path, devices):
    """A device_map dict splits the model (accelerate's hooks move activations between parts);
    on two GPUs the hidden state of layer 2 and the logits live on the second one. The loss
    terms must land on ``adapter.device`` and equal the unsplit model's."""
    from davsp_lib.models.adapters import load_adapter
    from davsp_lib.models.adapters.tiny import save_tiny

    adapter, vector, data, margins = tiny
    save_tiny(adapter, tmp_path / "tiny")
    split = load_adapter(str(tmp_path / "tiny"), dtype="float32", device_map=_split_map(*devices))
    assert {str(p.device) for p in split.model.parameters()} == set(devices)
    cfg = config(margins, lam=0.5)
    records = [data.malicious[0], data.benign[0]]
    images = torch.stack([data.canvases[r.id] for r in records])

    def losses(model):
        direction = vector.direction(LAYER, dtype=torch.float32, device=model.device)
        return training.forward_losses(
            model, images.to(model.device), [data.conversations[r.id] for r in records],
            [True, False], [data.answers[r.id] for r in records], cfg, direction,
            malicious_output=True,
        )  # fmt: skip

    with torch.no_grad():
        reference, out = losses(adapter), losses(split)
    assert out.loss.device == split.device
    assert out.projection_loss == pytest.approx(reference.projection_loss, rel=1e-4)
    assert out.output_loss == pytest.approx(reference.output_loss, rel=1e-4)
    assert out.output_loss > 0
