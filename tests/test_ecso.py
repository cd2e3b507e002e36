"""ECSO and its DAVSP integrations on the tiny random LLaVA: prompts, branches, resumability."""

from __future__ import annotations

import json

import pytest
import torch

from davsp_lib.data import datasets, prompts
from davsp_lib.data.images import record_image, to_tensor
from davsp_lib.evaluation import ecso, generation
from davsp_lib.evaluation.generation import Defense
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.tiny import build_tiny_llava
from davsp_lib.models.conversation import Conversation
from davsp_lib.models.inputs import canvas_for

TOKENS = dict(batch_size=4, max_new_tokens=5, check_tokens=3, progress=False)


def malicious(row) -> bool:
    """An oracle self-check: flags exactly the malicious records."""
    return row["label"] == "malicious"


@pytest.fixture(scope="module")
def adapter():
    return build_tiny_llava(seed=1)  # seed 1: its answers differ between inputs


@pytest.fixture(scope="module")
def records():
    """3 malicious + 2 benign built-in FigStep renders, interleaved."""
    figstep = datasets.load_builtin("figstep").records
    return [figstep[0], figstep[40], figstep[1], figstep[41], figstep[2]]


@pytest.fixture(scope="module")
def defenses(adapter):
    border = VisualSafetyPrompt.blank(adapter.image_size, 8)
    border.delta[:, :8, :] = 0.0  # a black top bar: the bordered image differs
    davsp = generation.make_defense("davsp_prefix")
    davsp = Defense(
        name="davsp", label="DAVSP", safety_prompt=davsp.safety_prompt, placement="prefix",
        prompt_name="davsp_safety_prefix", vsp=border, variant="davsp",
    )  # fmt: skip
    return generation.make_defense("none"), davsp


@pytest.fixture(scope="module")
def pipelines(defenses):
    return {p.name: p for p in ecso.standard_pipelines(*defenses)}


def generate(adapter, images, queries, tokens=TOKENS["max_new_tokens"]):
    convs = [Conversation(q, has_image=images is not None) for q in queries]
    return adapter.generate(images, convs, max_new_tokens=tokens)


# ------------------------------------------------------------------------------ prompts


def test_prompts_fill_the_reference_wording():
    wording = ecso.ECSOPrompts.load()
    tell = prompts.text("ecso_tell")
    assert wording.check_text("Q?", "x" * 3000) == tell.replace("{query}", "Q?").replace(
        "{response}", "x" * 1927
    )
    assert (
        wording.caption_text("Do it")
        == "REQUEST:\nDo it.\n\nBased on the REQUEST, describe the image."
    )
    text = wording.generate_text("a {query} sign", "What?")
    assert 'Hints: "Answer: a {query} sign"' in text and text.endswith("ETHICAL way.\n\nWhat?")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", (True, True)),
        (" yes.", (True, True)),
        ("Yes, the response", (False, False)),  # ECSO: the whole reply must be "yes"/"yes."
        ("No", (False, True)),
        ("no.", (False, True)),
        ("I think so", (False, False)),
        ("", (False, False)),
    ],
)
def test_parse_check(answer, expected):
    assert ecso.parse_check(answer) == expected
    assert ecso.is_flagged({"response": answer}) is expected[0]


def test_standard_pipelines(defenses):
    none, davsp = defenses
    names = [p.name for p in ecso.standard_pipelines(none, davsp)]
    assert names == ["ecso", "ecso_adaptive", "ecso_static"]
    only = ecso.standard_pipelines(none, None)
    assert [p.name for p in only] == ["ecso"] and only[0].route == ecso.ROUTE_CAPTION
    adaptive, static = ecso.standard_pipelines(none, davsp)[1:]
    assert adaptive.route == "davsp" and adaptive.answer is none and adaptive.check_vsp is None
    assert static.answer is davsp and static.check_vsp is davsp.vsp and static.rescue is None
    assert static.describe()["check_image"]["canvas"] == list(davsp.vsp.canvas)
    with pytest.raises(ValueError, match="undefended"):
        ecso.standard_pipelines(davsp, davsp)
    with pytest.raises(ValueError, match="no border"):
        ecso.standard_pipelines(none, generation.make_defense("davsp_prefix"))


def test_records_without_image_are_refused(adapter, pipelines, tmp_path):
    text = datasets.load_builtin("text").records[:1]
    with pytest.raises(ValueError, match="needs image inputs"):
        ecso.run_ecso(adapter, text, pipelines["ecso"], tmp_path, **TOKENS)


# ------------------------------------------------------------------------------ branches


def test_ecso_caption_route_for_flagged_records_only(adapter, records, pipelines, tmp_path):
    rows = ecso.run_ecso(adapter, records, pipelines["ecso"], tmp_path, flag=malicious, **TOKENS)
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert [r["route"] for r in rows] == ["caption", "kept", "caption", "kept", "caption"]
    assert [r["flagged"] for r in rows] == [r.is_malicious for r in records]
    first = generation.load_responses(tmp_path / "responses" / "none.jsonl")[1]
    wording = ecso.ECSOPrompts.load()
    flagged = [r for r in records if r.is_malicious]
    # the caption: the plain image with the caption prompt, one batch of the 3 flagged records
    images = torch.stack([canvas_for(adapter, r) for r in flagged])
    captions = generate(adapter, images, [wording.caption_text(r.query) for r in flagged])
    answers = generate(
        adapter,
        None,
        [wording.generate_text(c, r.query) for c, r in zip(captions, flagged, strict=True)],
    )
    got = [r for r in rows if r["flagged"]]
    assert [r["caption"] for r in got] == captions
    assert [r["response"] for r in got] == answers
    for row, before in zip(rows, first, strict=True):
        assert row["first_response"] == before["response"]
        assert row["defense"] == "ecso" and row["label"] == before["label"]
        if not row["flagged"]:
            assert row["response"] == before["response"] and row["caption"] is None
    # the self-check saw the image and ECSO's TELL prompt with the first answer
    checks = generate(
        adapter,
        torch.stack([canvas_for(adapter, r) for r in records[:4]]),
        [
            wording.check_text(r.query, b["response"])
            for r, b in zip(records[:4], first[:4], strict=True)
        ],
        tokens=TOKENS["check_tokens"],
    )
    assert [r["check"] for r in rows[:4]] == checks
    assert ecso.route_counts(rows) == {"malicious": {"caption": 3}, "benign": {"kept": 2}}
    assert ecso.model_calls(rows, pipelines["ecso"]) == pytest.approx((5 * 2 + 3 * 2) / 5)


def test_adaptive_takes_davsp_answers_when_flagged(adapter, records, pipelines, tmp_path):
    rows = ecso.run_ecso(
        adapter, records, pipelines["ecso_adaptive"], tmp_path, flag=malicious, **TOKENS
    )
    none = generation.load_responses(tmp_path / "responses" / "none.jsonl")[1]
    davsp = generation.load_responses(tmp_path / "responses" / "davsp.jsonl")[1]
    for row, plain, defended in zip(rows, none, davsp, strict=True):
        expected = defended if row["flagged"] else plain
        assert row["response"] == expected["response"]
        assert row["route"] == ("davsp" if row["flagged"] else "kept")
        assert row["caption"] is None
    assert not list((tmp_path / "ecso").glob("caption-*"))  # no caption route at all
    assert ecso.model_calls(rows, pipelines["ecso_adaptive"]) == pytest.approx((10 + 3) / 5)
    nothing = ecso.run_ecso(
        adapter, records, pipelines["ecso_adaptive"], tmp_path, flag=lambda row: False, **TOKENS
    )
    assert [r["response"] for r in nothing] == [r["response"] for r in none]


def test_static_puts_the_defended_input_through_ecso(
    adapter, records, pipelines, defenses, tmp_path
):
    _, davsp = defenses
    rows = ecso.run_ecso(
        adapter, records, pipelines["ecso_static"], tmp_path, flag=lambda row: True, **TOKENS
    )
    first = generation.load_responses(tmp_path / "responses" / "davsp.jsonl")[1]
    assert [r["first_response"] for r in rows] == [r["response"] for r in first]
    (check_file,) = (tmp_path / "ecso").glob("check-*.jsonl")
    header, _ = generation.load_responses(check_file)
    assert header["defense"]["image"]["canvas"] == list(davsp.vsp.canvas)
    assert header["defense"]["text"] is None  # the border, not the prefix, on the self-check
    (caption_file,) = (tmp_path / "ecso").glob("caption-*.jsonl")
    assert generation.load_responses(caption_file)[0]["defense"]["image"] is not None
    wording = ecso.ECSOPrompts.load()
    images = torch.stack([davsp.vsp.compose(_raw(r)) for r in records[:4]])
    captions = generate(adapter, images, [wording.caption_text(r.query) for r in records[:4]])
    assert [r["caption"] for r in rows[:4]] == captions
    assert all(r["route"] == "caption" for r in rows)


def _raw(record):
    return to_tensor(record_image(record))


# ------------------------------------------------------------------------------ resuming


def test_stages_are_shared_resumed_and_never_stale(adapter, records, pipelines, tmp_path):
    ecso_rows = ecso.run_ecso(
        adapter, records, pipelines["ecso"], tmp_path, flag=malicious, **TOKENS
    )
    stages = sorted(p.name for p in (tmp_path / "ecso").iterdir())
    assert [s.split("-")[0] for s in stages] == ["answer", "caption", "check"]
    # adaptive shares ECSO's first answers and self-check: no new check file
    ecso.run_ecso(adapter, records, pipelines["ecso_adaptive"], tmp_path, flag=malicious, **TOKENS)
    assert sorted(p.name for p in (tmp_path / "ecso").iterdir()) == stages
    # an interrupted caption stage (last row lost, torn tail) resumes to the same bytes
    (caption,) = (tmp_path / "ecso").glob("caption-*.jsonl")
    complete = caption.read_bytes()
    lines = complete.splitlines(keepends=True)
    caption.write_bytes(b"".join(lines[:-1]) + lines[-1][:10])
    again = ecso.run_ecso(adapter, records, pipelines["ecso"], tmp_path, flag=malicious, **TOKENS)
    assert caption.read_bytes() == complete
    assert again == ecso_rows
    # other first answers (a longer generation) give other check prompts: a new check file
    longer = {**TOKENS, "max_new_tokens": 7}
    ecso.run_ecso(adapter, records, pipelines["ecso"], tmp_path / "other", flag=malicious, **longer)
    a = {p.name for p in (tmp_path / "ecso").glob("check-*")}
    b = {p.name for p in (tmp_path / "other" / "ecso").glob("check-*")}
    assert a and b and a.isdisjoint(b)


def test_stage_path_digest_covers_prompts_and_image_part(records, defenses):
    none, davsp = defenses
    plain = ecso.ECSOPipeline("x", "x", none).image_part()
    bordered = ecso.ECSOPipeline("y", "y", davsp, davsp.vsp).image_part()
    base = ecso.stage_path("out", "check", records, plain)
    assert base.parent.as_posix() == "out/ecso" and base.name.startswith("check-")
    assert base == ecso.stage_path("out", "check", list(records), plain)
    assert base != ecso.stage_path("out", "check", records, bordered)
    changed = [records[0].with_(query="other"), *records[1:]]
    assert base != ecso.stage_path("out", "check", changed, plain)


def test_a_changed_model_is_refused_on_resume(records, pipelines, tmp_path):
    from davsp_lib.runtime.errors import DataError

    ecso.run_ecso(build_tiny_llava(seed=1), records[:2], pipelines["ecso"], tmp_path, **TOKENS)
    header = json.loads((tmp_path / "responses" / "none.jsonl").read_text().splitlines()[0])
    header["model"]["model_id"] = "someone-else"
    path = tmp_path / "responses" / "none.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(DataError, match="different model"):
        ecso.run_ecso(build_tiny_llava(seed=1), records[:2], pipelines["ecso"], tmp_path, **TOKENS)
