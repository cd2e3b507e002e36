"""Sharded extraction / generation: N ranks give the bytes of one process (tiny random LLaVA).

Ranks are simulated in-process (``run_shard`` per rank, no collectives) for the cheap checks;
two tests launch the real scripts with ``torchrun --nproc_per_node 2`` (gloo) and compare their
files byte for byte with a single-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script, mixed_records

from davsp_lib.evaluation.generation import generate_responses, make_defense
from davsp_lib.method.vectors import extract
from davsp_lib.models.adapters import adapter_for
from davsp_lib.models.adapters.tiny import build_tiny_llava, save_tiny
from davsp_lib.models.conversation import Conversation
from davsp_lib.models.inputs import batch_ranges, iter_batches
from davsp_lib.runtime import distributed as D
from davsp_lib.runtime.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAYERS = [0, 2, 4]


@pytest.fixture(scope="module")
def records():
    """Text, text, image, image, image, text, text: batches cut where the kind changes."""
    malicious, benign, images = mixed_records(
        4, 3, [("malicious", 2), ("benign", 1), ("malicious", 3)]
    )
    return [malicious[0], benign[0], *images, malicious[1], benign[2]]


def simulate(records, run, work_dir, *, world, batch_size, blank_image):
    """What ``run_batches`` does on ``world`` ranks, one rank after the other in this process."""
    plan = D.make_plan(records, batch_size, blank_image, {})
    D.write_or_check_plan(work_dir, plan)
    spans = [tuple(span) for span in plan["spans"]]
    return [
        D.run_shard(records, spans, run, work_dir, ".safetensors", rank=rank, world_size=world)
        for rank in range(world)
    ]


# ------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("blank_image", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_batch_spans_are_the_single_process_batches(llava, records, batch_size, blank_image):
    spans = D.batch_spans(records, batch_size, blank_image=blank_image)
    chunks = [chunk for chunk, _, _ in iter_batches(llava, records, batch_size, blank_image=True)]
    if not blank_image:
        chunks = [chunk for chunk, _, _ in iter_batches(llava, records, batch_size)]
    assert [records[a:b] for a, b in spans] == chunks
    assert spans == [(c.start, c.stop) for c in batch_ranges(records, batch_size, blank_image)]


def test_batch_spans_cut_where_images_start_and_stop(records):
    assert D.batch_spans(records, 2, blank_image=False) == [(0, 2), (2, 4), (4, 5), (5, 7)]
    assert D.batch_spans(records, 3, blank_image=True) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError, match="positive int"):
        D.batch_spans(records, 0, blank_image=True)


def test_shard_is_strided_and_covers_every_index_once():
    assert [D.shard(7, rank, 3) for rank in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert D.shard(2, 1, 4) == [1] and D.shard(2, 3, 4) == []
    with pytest.raises(ValueError, match="outside world"):
        D.shard(5, 2, 2)


def test_dist_context_without_a_launcher_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = D.dist_context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    ctx.barrier()  # a no-op, not a hang
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"\$WORLD_SIZE must be an integer, got 'two'"):
        D.dist_context()
    with pytest.raises(ValueError, match="rank 2 outside world of size 2"):
        D.DistContext(rank=2, world_size=2)


def test_device_map_for_gives_each_rank_its_own_gpus():
    rank1 = D.DistContext(rank=1, world_size=4, local_rank=1)
    assert D.device_map_for(rank1, gpu_count=0) == {"device_map": "cpu"}
    assert D.device_map_for(rank1, gpu_count=8) == {"device_map": "cuda:1"}
    assert D.device_map_for(rank1, gpu_count=1) == {"device_map": "cuda:0"}  # its own GPU only
    split = D.device_map_for(rank1, gpus_per_process=2, max_memory_per_gpu="70GiB", gpu_count=8)
    assert split == {"device_map": "auto", "max_memory": {2: "70GiB", 3: "70GiB"}}
    offload = D.device_map_for(
        rank1, gpus_per_process=4, max_memory_per_gpu="1GiB", cpu_memory="9GiB", gpu_count=8
    )
    assert offload["max_memory"] == {4: "1GiB", 5: "1GiB", 6: "1GiB", 7: "1GiB", "cpu": "9GiB"}
    with pytest.raises(ValueError, match=r"needs GPUs \[6, 7, 8\].*at most 2 processes"):
        D.device_map_for(D.DistContext(2, 3, 2), gpus_per_process=3, gpu_count=8)


# ------------------------------------------------------------------------------ extraction


def test_two_ranks_give_the_bytes_of_one_process(llava, records, tmp_path):
    options = dict(safety_prompt="Be safe.", blank_image=True)
    expected = extract(llava, records, LAYERS, batch_size=3, progress=False, **options)

    def run(batch, path):
        D.save_activations(path, extract(llava, batch, LAYERS, batch_size=len(batch),
                                          progress=False, **options))  # fmt: skip

    one, two = tmp_path / "one", tmp_path / "two"
    assert simulate(records, run, one, world=1, batch_size=3, blank_image=True) == [[0, 1, 2]]
    assert simulate(records, run, two, world=2, batch_size=3, blank_image=True) == [[0, 2], [1]]
    for i in range(3):
        name = f"batch-{i:06d}.safetensors"
        assert (one / name).read_bytes() == (two / name).read_bytes()
    merged = D.merge_extraction(two)
    assert merged.ids == expected.ids and merged.layers == LAYERS
    assert merged.labels.tolist() == expected.labels.tolist()
    assert torch.equal(merged.states, expected.states)
    assert merged.meta == json.loads(json.dumps(expected.meta))


def test_sharded_extract_resumes_with_another_world_size(llava, records, tmp_path):
    work = tmp_path / "work"
    full = D.sharded_extract(llava, records, LAYERS, work_dir=work, ctx=D.DistContext(),
                             batch_size=2, progress=False)  # fmt: skip
    assert full is not None and full.ids == [r.id for r in records]
    kept = D.batch_file(work, 0, ".safetensors").stat().st_mtime_ns
    D.batch_file(work, 2, ".safetensors").unlink()  # "interrupted" before batch 2
    redone = []

    def run(batch, path):
        redone.append([r.id for r in batch])
        D.save_activations(path, extract(llava, batch, LAYERS, batch_size=len(batch),
                                          progress=False))  # fmt: skip

    spans = D.batch_spans(records, 2, blank_image=False)
    # now 3 ranks (batches 0,3 / 1 / 2): only the missing batch runs, on the rank that owns it
    ran = [D.run_shard(records, spans, run, work, ".safetensors", rank=r, world_size=3)
           for r in range(3)]  # fmt: skip
    assert ran == [[], [], [2]] and redone == [[r.id for r in records[4:5]]]
    assert D.batch_file(work, 0, ".safetensors").stat().st_mtime_ns == kept
    again = D.merge_extraction(work)
    assert torch.equal(again.states, full.states)


def test_a_work_folder_of_another_run_is_refused(llava, records, tmp_path):
    work = tmp_path / "work"
    D.sharded_extract(llava, records[:2], [1], work_dir=work, ctx=D.DistContext())
    with pytest.raises(DataError, match=r"plan.json: .*different run.*fingerprint.layers"):
        D.sharded_extract(llava, records[:2], [2], work_dir=work, ctx=D.DistContext())
    with pytest.raises(DataError, match=r"plan.json: .*differs in \['ids', 'spans'\]"):
        D.sharded_extract(llava, records[:3], [1], work_dir=work, ctx=D.DistContext())
    D.batch_file(work, 0, ".safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=r"batch-000000.safetensors: not a readable batch file"):
        D.merge_extraction(work)


def test_merge_names_the_missing_batch(llava, records, tmp_path):
    D.sharded_extract(llava, records[:3], [1], work_dir=tmp_path, ctx=D.DistContext(),
                      batch_size=1)  # fmt: skip
    D.batch_file(tmp_path, 1, ".safetensors").unlink()
    with pytest.raises(DataError, match=r"1 of 3 batches missing \(first: batch-000001"):
        D.merge_extraction(tmp_path)


def test_record_ids_must_be_unique(llava, records, tmp_path):
    with pytest.raises(ValueError, match=r"unique.*repeated"):
        D.sharded_extract(llava, [records[0], records[0]], [1], work_dir=tmp_path,
                          ctx=D.DistContext())  # fmt: skip


# ------------------------------------------------------------------------------ rows


def test_sharded_rows_in_record_order_and_checked(records, tmp_path):
    def process(batch):
        return [{"id": r.id, "chars": len(r.query), "batch": len(batch)} for r in batch]

    out = D.sharded_rows(records, process, tmp_path / "rows.jsonl", fingerprint={"v": 1},
                         ctx=D.DistContext(), batch_size=3)  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == [r.id for r in records]
    assert [row["batch"] for row in rows] == [2, 2, 3, 3, 3, 2, 2]  # single-process batches
    with pytest.raises(ValueError, match="one dict per record, in order, with 'id'"):
        D.sharded_rows(records, lambda batch: process(batch)[::-1], tmp_path / "bad.jsonl",
                       fingerprint={}, ctx=D.DistContext())  # fmt: skip


# ------------------------------------------------------------------------------ responses


def test_sharded_responses_are_the_bytes_of_generate_responses(llava, records, tmp_path):
    defense = make_defense("none")
    kwargs = dict(max_new_tokens=3, blank_image=True)
    direct = tmp_path / "direct.jsonl"
    generate_responses(llava, records, defense, direct, batch_size=3, progress=False, **kwargs)
    out = tmp_path / "sharded.jsonl"
    rows = D.sharded_responses(llava, records, defense, out, ctx=D.DistContext(), batch_size=3,
                               **kwargs)  # fmt: skip
    assert out.read_bytes() == direct.read_bytes()
    assert [row["id"] for row in rows] == [r.id for r in records]

    # a crash inside batch 1: its partial file holds the header, one row and a torn line
    parts = D.default_work_dir(out, "parts")
    batch1 = D.batch_file(parts, 1, ".jsonl")
    header, first_row = batch1.read_text().splitlines()[:2]
    partial = batch1.with_name(batch1.name + ".partial")
    partial.write_text(f'{header}\n{first_row}\n{{"kind": "row", "ind')
    batch1.unlink()
    out.unlink()
    D.sharded_responses(llava, records, defense, out, ctx=D.DistContext(), batch_size=3, **kwargs)
    assert out.read_bytes() == direct.read_bytes() and not partial.exists()


def test_responses_work_folder_of_other_settings_is_refused(llava, records, tmp_path):
    out = tmp_path / "r.jsonl"
    D.sharded_responses(llava, records[:2], make_defense("none"), out, ctx=D.DistContext(),
                        max_new_tokens=2)  # fmt: skip
    with pytest.raises(DataError, match=r"different run.*fingerprint.max_new_tokens"):
        D.sharded_responses(llava, records[:2], make_defense("none"), out, ctx=D.DistContext(),
                            max_new_tokens=3)  # fmt: skip


# ------------------------------------------------------------------------------ large models


def test_disk_offloaded_bf16_model_keeps_the_pixel_gradient(tmp_path):
    """device_map="auto" with a memory cap (accelerate's hooks, language model on disk) gives
    the same bf16 gradients at the pixels as the model in memory; the projection is fp32."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tmp_path / "llava"
    save_tiny(build_tiny_llava(seed=0), folder)

    def pixel_grad(**placement):
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=torch.bfloat16, local_files_only=True, **placement
        )
        adapter = adapter_for(model, AutoProcessor.from_pretrained(folder), model_id="x")
        images = torch.rand(2, 3, *adapter.image_size, generator=torch.Generator().manual_seed(0))
        images.requires_grad_(True)
        states = adapter.hidden_states(images, [Conversation("hi", has_image=True)] * 2, [2])
        direction = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(1))
        score = states[:, 0].float() @ direction
        assert states.dtype == torch.bfloat16 and score.dtype == torch.float32
        score.sum().backward()
        return images.grad, getattr(model, "hf_device_map", None)

    plain, _ = pixel_grad()
    split, device_map = pixel_grad(
        device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=str(tmp_path / "off")
    )
    assert "disk" in device_map.values()
    assert torch.equal(split, plain)
    assert bool((plain != 0).all())  # every pixel, border included


# ------------------------------------------------------------------------------ real launches


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llava"
    save_tiny(build_tiny_llava(seed=0), folder)
    return folder


def torchrun(script: str, args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2",
               str(ROOT / "scripts" / f"{script}.py"), *args]  # fmt: skip
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_processes_extract_the_same_vector(llava_folder, tmp_path):
    args = ["--model", str(llava_folder), "--data", "builtin", "--per-class", "4",
            "--batch-size", "3", "--layers", "all", "--no-mirror"]  # fmt: skip
    torchrun("sharded_extract", [*args, "--out", str(tmp_path / "two" / "vector")], tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: identical kernels, identical bits
    try:
        load_script("sharded_extract").main([*args, "--out", str(tmp_path / "one" / "vector")])
    finally:
        torch.set_num_threads(threads)
    for suffix in (".safetensors", ".json"):
        one = (tmp_path / "one" / "vector").with_suffix(suffix).read_bytes()
        assert one == (tmp_path / "two" / "vector").with_suffix(suffix).read_bytes()
    plan = json.loads((tmp_path / "two" / "vector.shards" / "plan.json").read_text())
    assert plan["spans"] == [[0, 3], [3, 6], [6, 8]]


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_responses(llava_folder, tmp_path):
    args = ["--model", str(llava_folder), "--data", "builtin-figstep", "--limit", "5",
            "--batch-size", "2", "--max-new-tokens", "4"]  # fmt: skip
    torchrun("sharded_evaluate", [*args, "--out", str(tmp_path / "two.jsonl")], tmp_path)
    load_script("sharded_evaluate").main([*args, "--out", str(tmp_path / "one.jsonl")])
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 1 + 5


def test_common_start_waits_for_every_rank(monkeypatch):
    ctx, calls = D.DistContext(), []
    monkeypatch.setattr(D.DistContext, "barrier", lambda self: calls.append("barrier"))
    monkeypatch.setattr(D.time, "perf_counter", lambda: calls.append("clock") or 7.5)
    assert D.common_start(ctx) == 7.5 and calls == ["barrier", "clock"]


def test_run_timing_and_write_timing(tmp_path):
    ctx = D.DistContext()
    timing = D.run_timing(ctx, 5, start=1.0, loaded=3.5, begin=4.0, done=10.25, step="extract",
                          batches=2)  # fmt: skip
    assert list(timing) == ["world_size", "records", "batches", "load_s", "extract_s", "total_s"]
    assert timing["world_size"] == ctx.world_size and timing["records"] == 5
    assert (timing["load_s"], timing["extract_s"], timing["batches"]) == (2.5, 6.25, 2)
    D.write_timing(None, timing)  # no path: nothing written
    D.write_timing(tmp_path / "t.json", timing)
    assert json.loads((tmp_path / "t.json").read_text()) == timing


def test_load_from_args_reads_launch_parser_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(D, "load_for_rank", lambda name, ctx, **kw: seen.update(name=name, **kw))
    args = D.launch_parser("x").parse_args(["--model", "m", "--dtype", "float32"])
    D.load_from_args(args, D.DistContext())
    assert seen == {"name": "m", "dtype": "float32", "gpus_per_process": 1,
                    "max_memory_per_gpu": None}  # fmt: skip
