"""Transfer of a border between models: resampling, provenance, defenses, data, tiny code path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from davsp_lib.data import prompts
from davsp_lib.evaluation import generation, transfer
from davsp_lib.method.vsp import VisualSafetyPrompt, VSPMismatchError
from davsp_lib.models.adapters.tiny import build_tiny_llava, build_tiny_qwen2_vl
from davsp_lib.models.embedded import weights


def border_on(canvas: tuple[int, int], width: int) -> VisualSafetyPrompt:
    """A border with a horizontal gradient (so resampling shows) and model-A metadata."""
    prompt = VisualSafetyPrompt.blank(canvas, width, metadata={"model": {"model_id": "model-a"}})
    ramp = torch.linspace(0, 1, canvas[1])
    prompt.delta[:] = ramp.expand(3, canvas[0], canvas[1])
    return prompt


@pytest.fixture(scope="module")
def qwen():
    return build_tiny_qwen2_vl(image_size=84)


def test_transfer_resamples_to_the_target_canvas_with_provenance(qwen):
    source = border_on((56, 56), 8)
    before = source.delta.clone()
    moved = transfer.transfer(source, qwen)
    assert moved.canvas == (84, 84) and moved.width == 12  # 8 * 84 / 56
    expected = F.interpolate(before[None], size=(84, 84), mode="bilinear", antialias=True)[0]
    assert torch.allclose(moved.delta, expected.clamp(0, 1))
    assert torch.equal(source.delta, before) and "transfer" not in source.metadata
    info = moved.metadata["transfer"]
    assert info["from_model"] == {"model_id": "model-a"}
    assert info["to_model"]["model_id"] == "tiny-random-qwen2-vl"
    assert info["from"] == {"canvas": [56, 56], "width": 8}
    assert info["to"] == {"canvas": [84, 84], "width": 12}
    # the untransferred border does not fit the target
    with pytest.raises(VSPMismatchError, match="resample"):
        source.check_canvas(qwen)


def test_transfer_on_the_same_canvas_is_a_new_object():
    llava = build_tiny_llava()
    source = border_on(llava.image_size, 8)
    moved = transfer.transfer(source, llava)
    assert moved is not source and torch.equal(moved.delta, source.delta)
    assert moved.metadata["transfer"]["to"] == {"canvas": [56, 56], "width": 8}
    assert "transfer" not in source.metadata


def test_geometry_and_ring_match(qwen):
    source = border_on((336, 336), 30)
    moved = source.resampled((448, 448))
    found = transfer.geometry(source, moved, qwen)
    assert found["target_width"] == 40 and found["scale"] == pytest.approx(448 / 336)
    assert found["source_inner"] == [276, 276] and found["target_inner"] == [368, 368]
    assert found["model_ring"] is None and found["ring_matches"] is None

    class Ringed:  # geometry only reads border_width from the model
        border_width = 40

    assert transfer.geometry(source, moved, Ringed())["ring_matches"] is True
    Ringed.border_width = 30
    assert transfer.geometry(source, moved, Ringed())["ring_matches"] is False


def test_transfer_defenses_are_bs_rows(qwen):
    moved = transfer.transfer(border_on((56, 56), 8), qwen)
    rows = transfer.transfer_defenses(moved, source="somewhere/davsp")
    assert [d.name for d in rows] == ["none", "davsp_prefix", transfer.TRANSFER_NAME]
    none, prefix, border = rows
    assert none.vsp is None and none.safety_prompt is None
    assert prefix.vsp is None and prefix.safety_prompt == prompts.text("davsp_safety_prefix")
    assert border.safety_prompt == prefix.safety_prompt and border.placement == "prefix"
    assert border.vsp is moved and border.source == "somewhere/davsp"
    assert border.label == "border from model-a (resampled) + prefix"
    assert border.describe()["image"]["canvas"] == [84, 84]
    assert border.describe()["image"]["width"] == 12


def test_transferred_border_generates_on_the_target(qwen, tmp_path):
    from davsp_lib.data import datasets

    records = list(datasets.load_builtin("figstep"))[:2]
    moved = transfer.transfer(border_on((56, 56), 8), qwen)
    rows = generation.generate_responses(
        qwen, records, transfer.transferred_defense(moved), tmp_path / "r.jsonl",
        batch_size=2, max_new_tokens=3, progress=False,
    )  # fmt: skip
    assert [r["id"] for r in rows] == [r.id for r in records]
    header, _ = generation.load_responses(tmp_path / "r.jsonl")
    assert header["defense"]["image"]["canvas"] == [84, 84]
    # the canvas the model saw: the image inside the 12-px ring, the ring is the border
    from davsp_lib.data.images import record_image, to_tensor

    canvas = moved.compose(to_tensor(record_image(records[0])))
    assert torch.equal(canvas[:, :12, :], moved.delta[:, :12, :])
    assert canvas.shape == (3, 84, 84)


# ------------------------------------------------------------------------------ model B


def test_load_target_falls_back_when_parts_are_missing(monkeypatch):
    try:
        weights.SOURCES["tiny"].part_paths()
    except weights.MissingPartError as error:
        pytest.skip(f"embedded model not installed: {error}")
    missing = weights.GGUFSource(
        name="small", model="a model whose parts are not installed", packages=("no_such_part",),
        files=("data/part01.bin",), size=1, sha256="0" * 64, pip_spec="no-such-part",
    )  # fmt: skip
    monkeypatch.setitem(weights.SOURCES, "small", missing)
    adapter, note = transfer.load_target("small", fallback_canvas=448, fallback_width=40)
    assert note["fallback"] is True and "no_such_part" in note["reason"]
    assert note["loaded"] == "davsp-embedded-tiny" and note["canvas"] == [448, 448]
    assert adapter.image_size == (448, 448) and adapter.border_width == 40
    moved = transfer.transfer(border_on((336, 336), 30), adapter)
    assert transfer.geometry(border_on((336, 336), 30), moved, adapter)["ring_matches"] is True


# ------------------------------------------------------------------------------ data


def test_evaluation_sets_builtin_excludes_before_sampling():
    sets, notes = transfer.evaluation_sets(None, n_figstep=2, n_harmful_val=1, n_harmless_val=3)
    names = list(sets)
    assert names == ["built-in harmful (FigStep-style)", "built-in benign (FigStep-style)"]
    harmful, benign = sets[names[0]], sets[names[1]]
    assert len(harmful) == 3 and all(r.is_malicious and r.has_image for r in harmful)
    assert len(benign) == 3 and not any(r.is_malicious for r in benign)
    assert "built-in" in notes[0]
    again, _ = transfer.evaluation_sets(
        None, n_figstep=2, n_harmful_val=1, n_harmless_val=3, exclude=[harmful[0].id]
    )
    assert harmful[0].id not in {r.id for r in again[names[0]]}
    assert len(again[names[0]]) == 3  # still 3: excluded before sampling


def test_evaluation_sets_mirror(shared_data):
    sets, _ = transfer.evaluation_sets(
        shared_data, n_figstep=3, n_harmful_val=2, n_harmless_val=4, n_mmvet=2, seed=1
    )
    assert {k: len(v) for k, v in sets.items()} == {
        "FigStep": 3,
        "harmful_val (FigStep-style)": 2,
        "harmless_val (FigStep-style)": 4,
        "MM-Vet (ocr)": 2,
    }
    assert all(r.is_malicious for r in sets["FigStep"] + sets["harmful_val (FigStep-style)"])
    assert all(r.reference and "ocr" in r.meta["capability"] for r in sets["MM-Vet (ocr)"])
    same, _ = transfer.evaluation_sets(
        shared_data, n_figstep=3, n_harmful_val=2, n_harmless_val=4, n_mmvet=2, seed=1
    )
    assert {k: [r.id for r in v] for k, v in same.items()} == {
        k: [r.id for r in v] for k, v in sets.items()
    }
    none, _ = transfer.evaluation_sets(shared_data, n_figstep=1, n_harmful_val=0, n_harmless_val=1)
    assert list(none) == ["FigStep", "harmless_val (FigStep-style)"]  # empty sets left out


# ------------------------------------------------------------------------------ tiny code path


def test_tiny_llava_border_transfers_to_tiny_qwen2_vl():
    found = transfer.tiny_code_path(steps=2)
    assert found["source"]["architecture"] == "llava"
    assert found["target"]["architecture"] == "qwen2_vl"
    assert found["geometry"] == {
        "source_canvas": [56, 56],
        "source_width": 8,
        "target_canvas": [84, 84],
        "target_width": 12,
        "scale": 1.5,
        "source_inner": [40, 40],
        "target_inner": [60, 60],
        "model_ring": None,
        "ring_matches": None,
    }
    assert len(found["losses"]) == 2
    trained, moved = found["trained"], found["moved"]
    assert not torch.equal(trained.delta, torch.ones_like(trained.delta))  # training moved it
    ring = moved.mask()[0].bool()
    assert not torch.equal(moved.delta[:, ring], torch.ones_like(moved.delta[:, ring]))
    assert len(found["responses"]) == 8 and all(isinstance(t, str) for t in found["responses"])
    before, after = found["projections"]["undefended"], found["projections"]["transferred"]
    assert before.shape == after.shape == (8,) and np.isfinite(after).all()
    assert not np.allclose(before, after)  # border + prefix change the target's hidden states
