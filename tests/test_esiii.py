"""ESIII: texts file, the defensive image's training (PGD, bound, resume) and its defense."""

from __future__ import annotations

import json

import pytest
import torch

from davsp_lib.data import datasets
from davsp_lib.evaluation import generation
from davsp_lib.evaluation.defenses import esiii
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.tiny import build_tiny_llava, build_tiny_qwen2_vl
from davsp_lib.runtime.errors import DataError

EPS = 8 / 255


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def adapter(request):
    return build_tiny_llava() if request.param == "llava" else build_tiny_qwen2_vl()


def small_texts(n: int = 3) -> esiii.ESIIITexts:
    texts = esiii.load_texts()
    return esiii.ESIIITexts(texts.security_instructions[:n], texts.description_instruction,
                            texts.text_instruction, texts.source)  # fmt: skip


def records(n: int = 2):
    data = list(datasets.load_builtin("figstep"))
    return [r for r in data if r.is_malicious][:n] + [r for r in data if not r.is_malicious][:n]


# ------------------------------------------------------------------------------ texts


def test_the_shipped_texts_load():
    texts = esiii.load_texts()
    assert len(texts.security_instructions) == 12
    assert texts.description_instruction == "Describe the instructions shown in this image."
    assert texts.text_instruction.startswith("Safety first:")
    assert len(texts.sha256()) == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "not an ESIII texts file"),
        ({"security_instructions": []}, "non-empty list"),
        ({"security_instructions": ["ok", " "]}, "security_instructions[1]"),
        ({"text_instruction": ""}, "'text_instruction'"),
    ],
)
def test_a_bad_texts_file_is_named(tmp_path, change, message):
    data = json.loads(esiii.DEFAULT_TEXTS.read_text()) | change
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"texts\.json") as error:
        esiii.load_texts(path)
    assert message in str(error.value)


def test_the_training_set_is_the_corpus_on_a_blank_canvas(adapter):
    texts = small_texts()
    data = esiii.training_set(adapter, texts, blank=0.5)
    assert [data.answers[r.id] for r in data.malicious] == list(texts.security_instructions)
    assert data.benign == []
    canvas = data.canvases[data.malicious[0].id]
    assert canvas.shape == (3, *adapter.image_size)
    assert torch.allclose(canvas, torch.full_like(canvas, 0.5))
    assert {data.conversations[r.id].user_text() for r in data.malicious} == {
        texts.description_instruction
    }
    with pytest.raises(ValueError, match="blank value"):
        esiii.blank_canvas(adapter, 1.5)


# ------------------------------------------------------------------------------ training


def test_training_lowers_the_corpus_loss_within_the_bound(adapter, tmp_path):
    texts = small_texts()
    blank_prompt = VisualSafetyPrompt.zero_noise(adapter.image_size, EPS)
    before = esiii.instruction_likelihood(adapter, blank_prompt, texts)
    run = esiii.train_defensive_image(
        adapter, tmp_path / "run", texts=texts, steps=3, batch_size=3, epsilon=EPS,
        checkpoint_every=1, progress=False,
    )  # fmt: skip
    after = esiii.instruction_likelihood(adapter, run.prompt, texts)
    assert after < before
    assert run.prompt.kind == "additive" and run.prompt.epsilon == EPS
    assert float(run.prompt.delta.abs().max()) <= EPS + 1e-7
    assert float(run.prompt.delta.abs().max()) > 0
    assert len(run.history) == 3
    assert run.prompt.metadata["esiii"]["text_instruction"] == texts.text_instruction
    assert run.prompt.metadata["config"]["variant"] == "esiii"


def test_resume_equals_an_uninterrupted_run(tmp_path):
    adapter = build_tiny_llava()
    texts = small_texts()
    kwargs = dict(texts=texts, steps=3, batch_size=2, epsilon=EPS, checkpoint_every=1,
                  progress=False)  # fmt: skip
    whole = esiii.train_defensive_image(adapter, tmp_path / "whole", **kwargs)
    first = esiii.train_defensive_image(adapter, tmp_path / "split", stop_after=1, **kwargs)
    assert len(first.history) == 1
    rest = esiii.train_defensive_image(adapter, tmp_path / "split", **kwargs)
    assert rest.resumed_from == 1
    assert torch.equal(rest.prompt.delta, whole.prompt.delta)
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in whole.history]


# ------------------------------------------------------------------------------ the defense


def test_the_defense_fuses_the_image_and_adds_the_text(adapter, tmp_path):
    run = esiii.train_defensive_image(
        adapter, tmp_path / "run", texts=small_texts(2), steps=1, batch_size=2, epsilon=EPS,
        progress=False,
    )  # fmt: skip
    run.prompt.save(tmp_path / "esiii")
    defense = generation.make_defense("esiii", training_dir=tmp_path, adapter=adapter)
    assert defense.safety_prompt == esiii.load_texts().text_instruction
    assert defense.placement == "prefix"
    assert torch.equal(defense.vsp.delta, run.prompt.delta)
    canvas = torch.full((1, 3, *adapter.image_size), 0.5)
    assert torch.allclose(defense.apply(canvas), (canvas + run.prompt.delta).clamp(0, 1))
    assert defense.describe()["image"]["kind"] == "additive"
    rows = generation.generate_responses(
        adapter, records(1), defense, tmp_path / "esiii.jsonl", max_new_tokens=2, progress=False
    )
    assert [r["defense"] for r in rows] == ["esiii", "esiii"]


def test_a_missing_artifact_is_skipped_and_a_foreign_one_refused(tmp_path):
    adapter = build_tiny_llava()
    chosen, skipped = generation.load_defenses(["esiii"], training_dir=tmp_path, adapter=adapter)
    assert chosen == [] and "esiii" in skipped
    VisualSafetyPrompt.zero_noise(adapter.image_size, EPS).save(tmp_path / "esiii")
    with pytest.raises(DataError, match="not an ESIII artifact"):
        generation.make_defense("esiii", training_dir=tmp_path, adapter=adapter)


def test_embedded_model_trains_and_answers(tmp_path):
    from conftest import embedded_tiny_or_skip

    adapter = embedded_tiny_or_skip()
    run = esiii.train_defensive_image(
        adapter, tmp_path / "run", texts=small_texts(1), steps=1, batch_size=1, epsilon=EPS,
        progress=False,
    )  # fmt: skip
    # the ring feeds the border path, so the first signed step moves delta there
    assert float(run.prompt.delta.abs().max()) == pytest.approx(1 / 255)
    run.prompt.save(tmp_path / "esiii")
    defense = generation.make_defense("esiii", training_dir=tmp_path, adapter=adapter)
    rows = generation.generate_responses(
        adapter, records(1)[:1], defense, tmp_path / "e.jsonl", max_new_tokens=2, progress=False
    )
    assert len(rows) == 1 and isinstance(rows[0]["response"], str)
