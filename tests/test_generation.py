"""Defenses and resumable batched generation, on the tiny random LLaVA (real transformers)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from davsp_lib.data import datasets, prompts
from davsp_lib.data.records import Label, Record
from davsp_lib.evaluation import generation
from davsp_lib.method import vectors
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.tiny import build_tiny_llava
from davsp_lib.runtime.errors import DataError

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter():
    return build_tiny_llava()


@pytest.fixture(scope="module")
def records():
    """5 FigStep renders and 2 text-only records: chunks 3+2 (images), then 2 (text)."""
    figstep = datasets.load_builtin("figstep").records
    text = datasets.load_builtin("text").records
    return [figstep[0], figstep[1], figstep[40], figstep[41], figstep[2], text[3], text[43]]


def write_border(folder: Path, adapter, name: str = "davsp") -> VisualSafetyPrompt:
    vsp = VisualSafetyPrompt.blank(adapter.image_size, 8)
    vsp.delta[:, :8, :] = 0.0  # a black top bar: visibly not blank
    vsp.save(folder / name)
    return vsp


# ------------------------------------------------------------------------------ defenses


def test_standard_defenses_text_parts():
    none = generation.make_defense("none")
    assert none.safety_prompt is None and none.vsp is None
    ada = generation.make_defense("adashield_s")
    assert ada.safety_prompt == prompts.text("adashield_static") and ada.placement == "sandwich"
    uni_text = generation.DEFENSES["uniguard"]
    assert (uni_text.prompt, uni_text.placement, uni_text.variant) == (
        "uniguard_text_suffix",
        "suffix",
        "uniguard",
    )
    described = ada.describe()
    assert described["text"]["prompt"] == "adashield_static" and described["image"] is None
    with pytest.raises(ValueError, match="unknown defense"):
        generation.make_defense("nope")


def test_load_defenses_skips_missing_artifacts_with_reason(tmp_path, adapter):
    write_border(tmp_path, adapter)
    defenses, skipped = generation.load_defenses(
        ["none", "davsp", "da_only", "uniguard"], training_dir=tmp_path, adapter=adapter
    )
    assert [d.name for d in defenses] == ["none", "davsp"]
    assert set(skipped) == {"da_only", "uniguard"}
    assert "da_noise" in skipped["da_only"] and str(tmp_path) in skipped["da_only"]
    davsp = defenses[1]
    assert davsp.vsp.kind == "border" and davsp.placement == "prefix"
    assert davsp.safety_prompt == prompts.text("davsp_safety_prefix")
    (border_only,), _ = generation.load_defenses(
        ["davsp_border"], training_dir=tmp_path, adapter=adapter
    )  # the same border, no text
    assert border_only.safety_prompt is None and torch.equal(border_only.vsp.delta, davsp.vsp.delta)
    _, nothing = generation.load_defenses(["davsp"], training_dir=None)
    assert "no training_dir" in nothing["davsp"]
    # a present but corrupt artifact is an error, not a skip
    (tmp_path / "davsp.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="sha256"):
        generation.load_defenses(["davsp"], training_dir=tmp_path, adapter=adapter)


def test_defended_batches_apply_text_and_image_parts(tmp_path, adapter, records):
    vsp = write_border(tmp_path, adapter)
    defense = generation.make_defense("davsp", training_dir=tmp_path, adapter=adapter)
    (chunk, images, convs), *_ = generation.defended_batches(adapter, records, defense, 2)
    expected = vsp.apply(torch.stack([vsp.place(img) for img in _raw(adapter, chunk)]))
    assert torch.equal(images, expected)
    assert torch.all(images[:, :, :8, :] == 0)  # the border is on every image
    assert convs[0].safety_prompt == defense.safety_prompt and convs[0].safety_placement == "prefix"
    plain = generation.make_defense("none")
    (_, raw, _), *_ = generation.defended_batches(adapter, records, plain, 2)
    assert torch.equal(raw, torch.stack([adapter.prepare_image(i) for i in _raw(adapter, chunk)]))


def _raw(adapter, chunk):
    from davsp_lib.data.images import record_image, to_tensor

    return [to_tensor(record_image(r)) for r in chunk]


def test_stratified_sample_is_seeded_balanced_and_ordered():
    recs = [
        Record(f"x/{i}", "q", Label.MALICIOUS, "x", category="ab"[i % 2] if i < 8 else "c")
        for i in range(12)
    ]
    picked = generation.stratified_sample(recs, 6, seed=1)
    assert picked == generation.stratified_sample(recs, 6, seed=1)
    assert sorted(r.category for r in picked) == ["a", "a", "b", "b", "c", "c"]
    assert [recs.index(r) for r in picked] == sorted(recs.index(r) for r in picked)
    assert generation.stratified_sample(recs, 50) == recs


# ------------------------------------------------------------------------------ generation


def run(adapter, records, path, defense=None, **kwargs):
    kwargs = {"batch_size": 3, "max_new_tokens": 4, "progress": False, **kwargs}
    return generation.generate_responses(
        adapter, records, defense or generation.make_defense("adashield_s"), path, **kwargs
    )


def test_rows_header_and_order(tmp_path, adapter, records):
    rows = run(adapter, records, tmp_path / "r.jsonl")
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert [r["index"] for r in rows] == list(range(len(records)))
    assert {r["defense"] for r in rows} == {"adashield_s"}
    assert [r["label"] for r in rows] == [r.label.value for r in records]
    assert all(isinstance(r["response"], str) and r["projection"] is None for r in rows)
    header, again = generation.load_responses(tmp_path / "r.jsonl")
    assert again == rows
    assert header["model"]["model_id"] == "tiny-random-llava"
    assert header["params"]["max_new_tokens"] == 4 and header["params"]["batch_size"] == 3
    assert header["records"]["n"] == len(records)
    # the same answers as a direct batched call with the same composition
    defense = generation.make_defense("adashield_s")
    (_chunk, images, convs), *_ = generation.defended_batches(adapter, records, defense, 3)
    assert adapter.generate(images, convs, max_new_tokens=4) == [r["response"] for r in rows[:3]]


class Shout:
    """A query rewrite for the tests: upper case."""

    def records(self, records):
        return [r.with_(query=r.query.upper()) for r in records]

    def describe(self):
        return {"method": "shout"}


def test_a_rewrite_changes_what_the_model_reads_not_the_rows(
    tmp_path, adapter, records, monkeypatch
):
    plain = generation.make_defense("none")
    shout = dataclasses.replace(plain, name="shout", rewrite=Shout())
    read, generate = [], adapter.generate

    def spy(images, conversations, **kwargs):
        read.extend(c.query for c in conversations)
        return generate(images, conversations, **kwargs)

    monkeypatch.setattr(adapter, "generate", spy)
    rows = run(adapter, records[:4], tmp_path / "s.jsonl", defense=shout)
    assert read == [r.query.upper() for r in records[:4]] != [r.query for r in records[:4]]
    assert [(r["id"], r["label"]) for r in rows] == [(r.id, r.label.value) for r in records[:4]]
    assert shout.describe()["rewrite"] == {"method": "shout"} and "rewrite" not in plain.describe()
    other = type("Other", (Shout,), {"describe": lambda self: {"method": "other"}})()
    with pytest.raises(DataError, match="different defense"):  # the rewrite is part of it
        run(
            adapter,
            records[:4],
            tmp_path / "s.jsonl",
            defense=dataclasses.replace(shout, rewrite=other),
        )
    dropping = type("Drop", (Shout,), {"records": lambda self, recs: list(recs)[1:]})()
    with pytest.raises(ValueError, match="rewrite changed the records' ids"):
        run(
            adapter,
            records[:4],
            tmp_path / "d.jsonl",
            defense=dataclasses.replace(shout, rewrite=dropping),
        )


def test_rerun_of_a_finished_file_generates_nothing(tmp_path, adapter, records):
    path = tmp_path / "r.jsonl"
    run(adapter, records, path)
    before = path.read_bytes()
    calls = []
    run(adapter, records, path, on_batch=calls.append)
    assert calls == [] and path.read_bytes() == before


def test_resume_after_an_exception_is_byte_identical(tmp_path, adapter, records):
    reference = tmp_path / "full.jsonl"
    run(adapter, records, reference)

    def stop_after_first(rows):
        raise KeyboardInterrupt("interrupted")

    path = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(adapter, records, path, on_batch=stop_after_first)
    assert len(path.read_bytes().splitlines()) == 1 + 3  # header + the first batch
    resumed_batches = []
    run(adapter, records, path, on_batch=lambda rows: resumed_batches.append(len(rows)))
    assert resumed_batches == [2, 2]
    assert path.read_bytes() == reference.read_bytes()


def test_torn_last_line_is_dropped_and_its_batch_rerun(tmp_path, adapter, records):
    reference = tmp_path / "full.jsonl"
    run(adapter, records, reference)
    lines = reference.read_bytes().splitlines(keepends=True)
    path = tmp_path / "torn.jsonl"
    # header, rows 0-1 of the first batch, half of row 2 (a crash in the middle of a write)
    path.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    written = []
    run(adapter, records, path, on_batch=lambda rows: written.append([r["index"] for r in rows]))
    assert written == [[2], [3, 4], [5, 6]]
    assert path.read_bytes() == reference.read_bytes()
    with pytest.raises(DataError, match="incomplete"):
        path.write_bytes(b"".join(lines[:3]) + b'{"kind": "ro')
        generation.load_responses(path)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from davsp_lib.data import datasets
    from davsp_lib.evaluation import generation
    from davsp_lib.models.adapters.tiny import build_tiny_llava

    figstep = datasets.load_builtin("figstep").records
    text = datasets.load_builtin("text").records
    records = [figstep[0], figstep[1], figstep[40], figstep[41], figstep[2], text[3], text[43]]
    batches = []

    def maybe_die(rows):
        batches.append(rows)
        if len(batches) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a crash or an OOM kill

    generation.generate_responses(
        build_tiny_llava(), records, generation.make_defense("adashield_s"), sys.argv[1],
        batch_size=3, max_new_tokens=4, progress=False, on_batch=maybe_die,
    )
    """
)


def test_killed_process_resumes_to_the_same_file(tmp_path, adapter, records):
    reference = tmp_path / "full.jsonl"
    run(adapter, records, reference)
    path = tmp_path / "killed.jsonl"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}
    done = subprocess.run(
        [sys.executable, str(script), str(path), "2"], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert len(path.read_bytes().splitlines()) == 1 + 5  # header + two batches
    run(adapter, records, path)
    assert path.read_bytes() == reference.read_bytes()


def test_mismatched_or_corrupt_files_are_named_errors(tmp_path, adapter, records):
    path = tmp_path / "r.jsonl"
    run(adapter, records[:3], path)
    with pytest.raises(DataError, match=r"r\.jsonl.*different defense"):
        run(adapter, records[:3], path, defense=generation.make_defense("none"))
    with pytest.raises(DataError, match="different params"):
        run(adapter, records[:3], path, max_new_tokens=5)
    with pytest.raises(DataError, match="different records"):
        run(adapter, records[:4], path)
    header, *rows = path.read_bytes().splitlines(keepends=True)

    def rewrite(*lines):
        path.write_bytes(b"".join([header, *lines]))

    stranger = json.loads(rows[1]) | {"id": "builtin/zz/figstep"}
    rewrite(rows[0], json.dumps(stranger).encode() + b"\n")
    with pytest.raises(DataError, match=r"zz/figstep\]: line 3: row for unknown record id"):
        run(adapter, records[:3], path)
    rewrite(rows[0], rows[0])
    with pytest.raises(DataError, match="duplicate row"):
        run(adapter, records[:3], path)
    rewrite(rows[1])
    with pytest.raises(DataError, match="out of order"):
        run(adapter, records[:3], path)
    rewrite(b"not json\n", rows[1])
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        run(adapter, records[:3], path)
    path.write_bytes(b'{"kind": "something else"}\n')
    with pytest.raises(DataError, match="not a davsp-responses/1 header"):
        run(adapter, records[:3], path)


def test_projection_from_the_prefill_matches_hidden_states(tmp_path, adapter, records):
    acts = vectors.extract(adapter, records, [2, 3], batch_size=4, blank_image=True, progress=False)
    vector = vectors.fit_vector(acts, metadata={"diagnostics": {"chosen_layer": 3}})
    defense = generation.make_defense(
        "davsp", training_dir=_border_dir(tmp_path, adapter), adapter=adapter
    )
    rows = run(adapter, records[:5], tmp_path / "p.jsonl", defense=defense, vector=vector)
    (_chunk, images, convs), *_ = generation.defended_batches(adapter, records[:5], defense, 3)
    with torch.no_grad():
        direct = vector.project(adapter.hidden_states(images, convs, [3])[:, 0], 3)
    assert [r["projection"] for r in rows[:3]] == pytest.approx(direct.tolist(), abs=1e-4)
    header, _ = generation.load_responses(tmp_path / "p.jsonl")
    assert header["params"]["projection"]["layer"] == 3


def _border_dir(tmp_path, adapter):
    folder = tmp_path / "training"
    write_border(folder, adapter)
    return folder


def test_additive_noise_on_the_whole_canvas(tmp_path, adapter, records):
    noise = VisualSafetyPrompt.zero_noise(adapter.image_size, 16 / 255)
    noise.save(tmp_path / "uniguard")
    defense = generation.make_defense("uniguard", training_dir=tmp_path, adapter=adapter)
    image = _raw(adapter, records[:1])[0]
    assert defense.placer(adapter)(image).equal(noise.place(image))
    assert noise.place(image).equal(adapter.prepare_image(image))  # the same for LLaVA
    (_, images, convs), *_ = generation.defended_batches(adapter, records[:2], defense, 2)
    (_, plain, _), *_ = generation.defended_batches(
        adapter, records[:2], generation.make_defense("none"), 2
    )
    assert torch.equal(images, plain)  # zero noise changes nothing
    assert convs[0].safety_placement == "suffix"
    assert convs[0].user_text().endswith(prompts.text("uniguard_text_suffix"))


def test_training_ids_are_excluded(records):
    metadata = {
        "steps": 3,
        "data": {"data_ids": {"malicious": [records[0].id], "benign": ["text-prompts/x/1"]}},
    }
    used = generation.artifact_ids(metadata)
    assert used == {records[0].id, "text-prompts/x/1"}
    rendered = records[5].with_(id="t/1/figstep", meta={"rendered_from": "text-prompts/x/1"})
    kept, dropped = generation.exclude_used([records[0], records[1], rendered], used)
    assert kept == [records[1]] and dropped == [records[0].id, "t/1/figstep"]


def test_pool_benchmarks_keeps_order_and_origin(records):
    pooled = generation.pool_benchmarks({"a": records[:3], "b": records[3:5], "empty": []})
    assert [r.id for r in pooled.records] == [r.id for r in records[:5]]
    assert pooled.benchmark_of[records[4].id] == "b" and pooled.sizes == {
        "a": 3,
        "b": 2,
        "empty": 0,
    }
    assert pooled.n_malicious == sum(r.is_malicious for r in records[:5])
    assert pooled.n_malicious + pooled.n_benign == 5
    assert pooled.describe() == (
        f"{pooled.sizes} -> {pooled.n_malicious} malicious + {pooled.n_benign} benign"
    )
    benign = [r for r in records if not r.is_malicious]
    with pytest.raises(ValueError, match=r"need malicious and benign records, got 0 and"):
        generation.pool_benchmarks({"b": benign}, need_both=True)
    assert generation.pool_benchmarks({"b": benign}).n_malicious == 0
