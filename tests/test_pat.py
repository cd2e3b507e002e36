"""PAT: GCG parts, the alternating attack/defense training (resume) and the artifact/defense."""

from __future__ import annotations

import json

import pytest
import torch

from davsp_lib.data import datasets
from davsp_lib.evaluation import generation
from davsp_lib.evaluation.defenses import pat
from davsp_lib.method import training
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.tiny import build_tiny_llava, build_tiny_qwen2_vl
from davsp_lib.models.conversation import Conversation
from davsp_lib.runtime.errors import DataError

SMALL = dict(control_len=4, attack_len=3, candidates=4, topk=8, batch_size=1, eval_batch=4)


def records(n: int = 2):
    data = list(datasets.load_builtin("figstep"))
    return [r for r in data if r.is_malicious][:n], [r for r in data if not r.is_malicious][:n]


def training_data(adapter, n: int = 2) -> training.TrainingSet:
    malicious, benign = records(n)
    placement = VisualSafetyPrompt.for_adapter(adapter, "additive")  # images as usual
    return training.prepare_training_set(
        adapter, placement, malicious, benign, answer_tokens=3, progress=False
    )


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def setup(request):
    adapter = build_tiny_llava() if request.param == "llava" else build_tiny_qwen2_vl()
    return adapter, training_data(adapter)


# ------------------------------------------------------------------------------ pure parts


def test_config_is_validated():
    with pytest.raises(ValueError, match="candidates"):
        pat.PATConfig(candidates=0)
    with pytest.raises(ValueError, match="benign_weight"):
        pat.PATConfig(benign_weight=-0.1)
    with pytest.raises(ValueError, match="attack_target"):
        pat.PATConfig(attack_target=" ")
    assert pat.PATConfig().refusal_weight == 0.8 and pat.PATConfig().benign_weight == 0.2


def test_find_span_finds_the_first_exact_occurrence():
    row = torch.tensor([[0.0, 1], [2, 3], [4, 5], [2, 3], [4, 5]])
    assert pat.find_span(row, torch.tensor([[2.0, 3], [4, 5]])) == 1
    assert pat.find_span(row, torch.tensor([[4.0, 5], [0, 1]])) is None
    assert pat.find_span(row[:1], row[:2]) is None


def test_candidates_change_one_allowed_token_each():
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([5, 6, 7, 8])
    grad = torch.randn(4, 20, generator=generator)
    banned = torch.zeros(20, dtype=torch.bool)
    banned[:10] = True
    cands = pat.sample_candidates(grad, ids, 8, 5, banned, generator)
    assert cands.shape == (8, 4)
    for row in cands:
        changed = (row != ids).nonzero().flatten().tolist()
        assert len(changed) <= 1
        assert all(int(row[i]) >= 10 for i in changed)
    # positions are spread evenly: two candidates per position
    assert [int(i) for i in (torch.arange(8) * 4 // 8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_special_and_added_tokens_are_never_candidates(setup):
    adapter, _ = setup
    vocab = pat.embedding_layer(adapter).weight.shape[0]
    banned = pat.disallowed_tokens(adapter.tokenizer, vocab)
    added = [i for i in adapter.tokenizer.added_tokens_decoder if i < vocab]
    assert added and banned[added].all()
    (exclamation,) = adapter.tokenizer("!", add_special_tokens=False)["input_ids"]
    assert not banned[exclamation]


def test_initial_control_is_a_run_of_exclamation_marks(setup):
    adapter, _ = setup
    ids = pat.initial_ids(adapter, 4, lambda ids: True)
    assert len(ids) == 4
    assert set(pat.decode(adapter, ids)) <= {"!", " "} and "!" in pat.decode(adapter, ids)
    assert pat.round_trips(adapter, ids)
    # where the template breaks "!" runs apart, another single-token run is used
    letters = pat.initial_ids(adapter, 4, lambda ids: "!" not in pat.decode(adapter, ids))
    assert pat.decode(adapter, letters).replace(" ", "") == "xxxx"
    with pytest.raises(ValueError, match="survives"):
        pat.initial_ids(adapter, 4, lambda ids: False)


# ------------------------------------------------------------------------------ training


def test_training_keeps_a_valid_control_and_records_both_players(setup, tmp_path):
    adapter, data = setup
    config = pat.PATConfig(steps=2, **SMALL)
    result = pat.train(adapter, data, config, tmp_path / "run", progress=False)
    control = result.control
    assert control.ids.shape == (4,)
    assert control.text == pat.decode(adapter, control.ids.tolist())
    assert pat.round_trips(adapter, control.ids.tolist())
    banned = pat.disallowed_tokens(adapter.tokenizer, pat.embedding_layer(adapter).weight.shape[0])
    assert not banned[control.ids].any()
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(h["attack_loss"] is not None and h["loss"] < float("inf") for h in result.history)
    assert control.metadata["model"]["model_id"] == adapter.info()["model_id"]
    assert control.metadata["config"]["control_len"] == 4


def test_without_the_attacker_the_suffix_is_absent(tmp_path):
    adapter = build_tiny_llava()
    config = pat.PATConfig(steps=1, attack=False, **SMALL)
    result = pat.train(adapter, training_data(adapter), config, tmp_path, progress=False)
    assert result.history[0]["attack_loss"] is None
    assert result.control.metadata["attack_suffix"] is None


def test_resume_equals_an_uninterrupted_run(tmp_path):
    adapter = build_tiny_llava()
    data = training_data(adapter)
    config = pat.PATConfig(steps=2, checkpoint_every=1, **SMALL)
    whole = pat.train(adapter, data, config, tmp_path / "whole", progress=False)
    first = pat.train(adapter, data, config, tmp_path / "split", progress=False, stop_after=1)
    assert len(first.history) == 1
    rest = pat.train(adapter, data, config, tmp_path / "split", progress=False)
    assert rest.resumed_from == 1
    assert torch.equal(rest.control.ids, whole.control.ids)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in rest.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in whole.history]
    other = pat.PATConfig(steps=3, checkpoint_every=1, **SMALL)
    with pytest.raises(DataError, match="different PAT run"):
        pat.train(adapter, data, other, tmp_path / "split", progress=False)


def test_defense_candidates_come_from_the_refusal_gradient_alone(monkeypatch, tmp_path):
    # the reference's PromptManager.def_grad sums over the refusal prompts only
    adapter = build_tiny_llava()
    data = training_data(adapter)
    seen = []
    real = pat.token_gradient

    def spy(adapter, data, rows, ids):
        seen.append([(r.record_id, r.target, r.weight) for r in rows])
        return real(adapter, data, rows, ids)

    monkeypatch.setattr(pat, "token_gradient", spy)
    config = pat.PATConfig(steps=1, **{**SMALL, "batch_size": 2})
    result = pat.train(adapter, data, config, tmp_path, progress=False)
    attacker, defender = seen
    assert {target for _, target, _ in attacker} == {config.attack_target}
    malicious = {r.id for r in data.malicious}
    assert len(defender) == 2
    assert all(rid in malicious and target == training.REFUSAL_TARGET and weight == 1.0
               for rid, target, weight in defender)  # fmt: skip
    assert result.history[0]["loss_before"] > 0


def test_training_needs_both_classes(tmp_path):
    adapter = build_tiny_llava()
    data = training_data(adapter)
    data.benign = []
    with pytest.raises(ValueError, match="malicious and benign"):
        pat.train(adapter, data, pat.PATConfig(steps=1, **SMALL), tmp_path, progress=False)


# ------------------------------------------------------------------------------ artifact, defense


def control_for(adapter) -> pat.PATControl:
    ids = pat.initial_ids(adapter, 3, lambda ids: True)
    return pat.PATControl(torch.tensor(ids), pat.decode(adapter, ids), {"model": adapter.info()})


def test_artifact_round_trip_and_bad_files(tmp_path):
    adapter = build_tiny_llava()
    control = control_for(adapter)
    tensor_path, json_path = control.save(tmp_path / "pat")
    loaded = pat.PATControl.load(tmp_path / "pat", adapter)
    assert torch.equal(loaded.ids, control.ids) and loaded.text == control.text
    with pytest.raises(DataError, match="trained on"):
        pat.PATControl.load(tmp_path / "pat", build_tiny_qwen2_vl())
    data = tensor_path.read_bytes()
    tensor_path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(DataError, match="sha256"):
        pat.PATControl.load(tmp_path / "pat")
    json_path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a PAT control"):
        pat.PATControl.load(tmp_path / "pat")


def test_the_defense_is_the_control_as_a_prefix(setup, tmp_path):
    adapter, _ = setup
    chosen, skipped = generation.load_defenses(["pat"], training_dir=tmp_path, adapter=adapter)
    assert chosen == [] and "pat" in skipped
    control = control_for(adapter)
    control.save(tmp_path / "pat")
    defense = generation.make_defense("pat", training_dir=tmp_path, adapter=adapter)
    assert defense.safety_prompt == pat.prompt_text(control.text) and defense.placement == "prefix"
    # the reference's f"{def_control} {goal}": control, one space, request (LLaVA, Qwen2-VL)
    conv = Conversation("Q?", safety_prompt=defense.safety_prompt, safety_placement="prefix")
    assert conv.user_text(adapter.prefix_separator) == f"{control.text} Q?"
    assert defense.vsp is None and defense.trained.text == control.text
    assert defense.describe()["image"] is None
    malicious, benign = records(1)
    rows = generation.generate_responses(
        adapter, malicious + benign, defense, tmp_path / "p.jsonl", max_new_tokens=2,
        progress=False,
    )  # fmt: skip
    assert [r["defense"] for r in rows] == ["pat", "pat"]


def test_training_ids_are_listed_for_exclusion(tmp_path):
    adapter = build_tiny_llava()
    malicious, benign = records(1)
    control = control_for(adapter)
    control.metadata["data"] = {"ids": {"malicious": [malicious[0].id], "benign": [benign[0].id]}}
    control.save(tmp_path / "pat")
    defense = generation.make_defense("pat", training_dir=tmp_path, adapter=adapter)
    used = generation.artifact_ids(defense.trained.metadata)
    assert used == {malicious[0].id, benign[0].id}


def test_embedded_model_trains_a_control(tmp_path):
    from conftest import embedded_tiny_or_skip

    adapter = embedded_tiny_or_skip()
    data = training_data(adapter, n=1)
    config = pat.PATConfig(steps=1, **{**SMALL, "candidates": 2})
    result = pat.train(adapter, data, config, tmp_path / "run", progress=False)
    assert len(result.history) == 1 and result.history[0]["loss"] < float("inf")
    assert pat.round_trips(adapter, result.control.ids.tolist())
