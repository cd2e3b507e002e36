"""The embedded default in float32 and in bfloat16: speed and whether decisions stay the same.

    .venv/bin/python benchmarks/bf16.py [--model tiny] [--n-vector 16] [--n-heldout 16]
                                        [--n-generate 16] [--max-new-tokens 24]
                                        [--train-steps 4] [--batch-size 8]

Both copies of the language model (float32 and bfloat16; the reader and the border path are
float32 in both) are loaded in one process and every workload runs on the same records in
both dtypes, alternating batch by batch (training: step by step), so each speed-up is a ratio
from this one run:

- **extraction** (:func:`davsp_lib.method.vectors.extract`, all layers, built-in text instructions
  over a blank image with the DAVSP safety prefix, as notebook 01 extracts): seconds; the vector is
  fitted on ``--n-vector`` records and the layer is chosen on ``--n-heldout`` others as notebook 01
  does (:func:`diagnostics.choose_layer`); the largest ``|s_bf16 - s_fp32|`` of a held-out
  projection on the float32 vector, relative to the distance between the two class means of
  ``s_fp32``, at the chosen layer and at the worst layer.
- **generation** (:func:`davsp_lib.evaluation.generation.generate_responses`, greedy, batched):
  built-in FigStep images (half harmful) under no defense and under the DAVSP prefix; seconds,
  identical answers, identical refusal verdicts (JailbreakBench refusal strings), the largest
  ``|delta projection|`` of the prompt's last token relative to the class-mean distance.
- **training** (:func:`davsp_lib.method.training.forward_losses` + backward, Adam, alternating
  malicious / benign steps, the same seed and batches, ``lam`` as the reference): seconds per
  step, the cosine between the float32 and bfloat16 border gradients at the first step (same
  border), and the loss curves of both runs.
- **profile**: one forward per dtype under ``torch.profiler``: seconds in matmuls and in all
  other ops, and the speed-up of each (what bounds the whole forward's speed-up).

The OCR cache is filled before any timing, so the timings measure the language model (the
reader and the border path are float32 in both). On a shared machine, read the ratios, not the
seconds; the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from davsp_lib.data import prompts
from davsp_lib.data.datasets import load_builtin
from davsp_lib.data.records import Record
from davsp_lib.evaluation.generation import generate_responses, make_defense
from davsp_lib.evaluation.judges import RefusalJudge
from davsp_lib.method import diagnostics, training, vectors
from davsp_lib.method.vsp import VisualSafetyPrompt, default_width
from davsp_lib.models.adapters import load_adapter
from davsp_lib.models.inputs import canvas_for

DTYPES = ("float32", "bfloat16")


def balanced(records: list[Record], n: int, skip: int = 0) -> list[Record]:
    """``n`` records, half malicious, after skipping ``skip`` of each class."""
    malicious = [r for r in records if r.is_malicious][skip : skip + n // 2]
    benign = [r for r in records if not r.is_malicious][skip : skip + n - n // 2]
    if len(malicious) + len(benign) != n:
        raise ValueError(f"the built-in data has fewer than {n} records after skipping {skip}")
    return malicious + benign


def relative_shift(fp32: np.ndarray, bf16: np.ndarray, labels: np.ndarray) -> float:
    """``max |s_bf16 - s_fp32|`` over the distance between the float32 class means."""
    gap = abs(fp32[labels].mean() - fp32[~labels].mean())
    return float(np.abs(bf16 - fp32).max() / gap)


class Clock:
    """Wall and CPU seconds per dtype (CPU time: all threads of this process; on a shared
    machine it counts only the cycles this process got, so its ratio is the steadier one)."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(DTYPES, 0.0)
        self.cpu = dict.fromkeys(DTYPES, 0.0)

    def run(self, name: str, function, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        out = function(*args, **kwargs)
        self.wall[name] += time.perf_counter() - wall
        self.cpu[name] += time.process_time() - cpu
        return out

    def summary(self, per: int = 1) -> dict:
        return {
            "wall_s": {name: round(self.wall[name] / per, 2) for name in DTYPES},
            "cpu_s": {name: round(self.cpu[name] / per, 2) for name in DTYPES},
            "speed_up_wall": round(self.wall["float32"] / self.wall["bfloat16"], 2),
            "speed_up_cpu": round(self.cpu["float32"] / self.cpu["bfloat16"], 2),
        }


def chunks(records: list, size: int) -> list[list]:
    return [records[i : i + size] for i in range(0, len(records), size)]


def extraction(models, text, batch_size, n_vector, n_heldout):
    """Vector on one part, layer choice on the other; dtypes alternate batch by batch."""
    safety = prompts.text("davsp_safety_prefix")
    fit = balanced(text, n_vector)
    heldout = balanced(text, n_heldout, skip=n_vector // 2)
    common = dict(safety_prompt=safety, blank_image=True, progress=False, batch_size=batch_size)
    clock = Clock()
    parts: dict[str, list] = {name: [] for name in DTYPES}
    for adapter in models.values():
        vectors.extract(adapter, fit[:2], [1], **common)  # warm-up: first forward allocates
    for chunk in chunks(fit + heldout, batch_size):
        for name, adapter in models.items():
            parts[name].append(clock.run(name, vectors.extract, adapter, chunk, None, **common))
    out = {}
    for name in DTYPES:
        acts = vectors.concat_activations(parts[name])
        acts_fit = acts.select(np.arange(len(fit)))
        acts_held = acts.select(np.arange(len(fit), len(acts)))
        vector = vectors.fit_vector(acts_fit)
        layer = diagnostics.choose_layer(diagnostics.layer_report(vector, acts_held), 0.01)
        out[name] = {"vector": vector, "heldout": acts_held, "layer": layer}
    reference = out["float32"]["vector"]
    labels = out["float32"]["heldout"].labels
    shifts = {
        layer: relative_shift(
            reference.project(out["float32"]["heldout"], layer).numpy(),
            reference.project(out["bfloat16"]["heldout"], layer).numpy(),
            labels,
        )
        for layer in reference.layers
        if layer > 0
    }
    chosen = out["float32"]["layer"]
    return (
        {
            "records": f"{len(fit)} for the vector + {len(heldout)} held-out, all layers, "
            f"batch {batch_size}",
            **clock.summary(),
            "chosen_layer": {name: out[name]["layer"] for name in DTYPES},
            "same_layer": out["float32"]["layer"] == out["bfloat16"]["layer"],
            "max_dprojection_over_class_gap_at_chosen": round(shifts[chosen], 4),
            "max_dprojection_over_class_gap_worst_layer": [
                max(shifts, key=shifts.get),
                round(max(shifts.values()), 4),
            ],
        },
        reference,
        chosen,
    )


def generation(models, figstep, vector, layer, batch_size, max_new_tokens, defenses, folder):
    """Responses of both dtypes under each defense, alternating batch by batch; agreement."""
    judge = RefusalJudge("jailbreakbench")
    rows: dict[str, list] = {name: [] for name in DTYPES}
    clock = Clock()
    kwargs = dict(vector=vector, layer=layer, progress=False, batch_size=batch_size)
    for name, adapter in models.items():
        for record in figstep:  # fill the OCR cache: the reader is float32 in both
            adapter.read_text(canvas_for(adapter, record))
        warm = Path(folder) / f"warm-{name}.jsonl"  # first generate call allocates
        generate_responses(adapter, figstep[:1], make_defense("none"), warm, max_new_tokens=1,
                           **kwargs)  # fmt: skip
    for defense_name in defenses:
        defense = make_defense(defense_name)
        for index, chunk in enumerate(chunks(figstep, batch_size)):
            for name, adapter in models.items():
                path = Path(folder) / f"{defense_name}-{index}-{name}.jsonl"
                rows[name] += clock.run(
                    name, generate_responses, adapter, chunk, defense, path,
                    max_new_tokens=max_new_tokens, **kwargs,
                )  # fmt: skip
    a, b = rows["float32"], rows["bfloat16"]
    same_answer = sum(x["response"] == y["response"] for x, y in zip(a, b, strict=True))
    refusals = {n: [judge.is_refusal(r["response"]) for r in rows[n]] for n in DTYPES}
    same_verdict = sum(x == y for x, y in zip(*refusals.values(), strict=True))
    labels = np.array([r["label"] == "malicious" for r in a])
    shift = relative_shift(
        np.array([r["projection"] for r in a]), np.array([r["projection"] for r in b]), labels
    )
    return {
        "records": f"{len(figstep)} FigStep images x defenses {list(defenses)}, "
        f"{max_new_tokens} new tokens, batch {batch_size}",
        **clock.summary(),
        "identical_answers": f"{same_answer}/{len(a)} ({same_answer / len(a):.0%})",
        "identical_refusal_verdicts": f"{same_verdict}/{len(a)} ({same_verdict / len(a):.0%})",
        "refusals": {name: int(sum(refusals[name])) for name in DTYPES},
        "max_dprojection_over_class_gap": round(shift, 4),
    }


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def op_profile(models, text, batch_size):
    """One full-depth forward per dtype under the profiler: matmul vs other ops (Amdahl)."""
    from torch.profiler import profile

    from davsp_lib.models.inputs import iter_batches

    records = balanced(text, batch_size)
    out = {}
    for name, adapter in models.items():
        _, images, conversations = next(iter_batches(adapter, records, batch_size,
                                                     blank_image=True))  # fmt: skip
        layers = [adapter.num_layers]
        with torch.no_grad():
            adapter.hidden_states(images, conversations, layers)  # warm-up
            with profile() as prof:
                adapter.hidden_states(images, conversations, layers)
        self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        matmul = sum(v for k, v in self_us.items() if k in MATMUL_OPS) / 1e6
        out[name] = {"matmul_s": matmul, "other_s": sum(self_us.values()) / 1e6 - matmul}
    return {
        "records": f"{len(records)} text records, one forward to layer {layers[0]}",
        **{f"{name}_s": {k: round(v, 2) for k, v in out[name].items()} for name in DTYPES},
        "matmul_speed_up": round(out["float32"]["matmul_s"] / out["bfloat16"]["matmul_s"], 2),
        "other_speed_up": round(out["float32"]["other_s"] / out["bfloat16"]["other_s"], 2),
        "matmul_share_bf16": round(out["bfloat16"]["matmul_s"] / sum(out["bfloat16"].values()), 3),
    }


class BorderRun:
    """One training run from the blank border: Adam, alternating steps of the batch plan."""

    def __init__(self, adapter, data, config, direction, prompt):
        self.adapter, self.data, self.config = adapter, data, config
        self.direction, self.prompt = direction, prompt
        self.delta = prompt.delta.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.delta], lr=config.lr)
        self.plan = training.batch_plan(config, len(data.malicious), len(data.benign))
        self.losses: list[float] = []
        self.first_grad: torch.Tensor | None = None

    def step(self, step: int) -> None:
        data, entry = self.data, self.plan[step]
        records = [data.malicious[i] for i in entry.malicious]
        records += [data.benign[i] for i in entry.benign]
        canvases = torch.stack([data.canvases[r.id] for r in records])
        with self.adapter.shared_border():
            out = training.forward_losses(
                self.adapter, self.prompt.apply(canvases, self.delta),
                [data.conversations[r.id] for r in records], [r.is_malicious for r in records],
                [data.answers[r.id] for r in records], self.config, self.direction,
            )  # fmt: skip
            out.loss.backward()
        with torch.no_grad():
            self.delta.grad.mul_(self.prompt.mask())
            if self.first_grad is None:
                self.first_grad = self.delta.grad.detach().clone()
            self.optimizer.step()
            self.delta.clamp_(0, 1)
        self.delta.grad = None
        self.losses.append(round(float(out.loss.detach()), 4))


def training_workload(models, figstep, vector, layer, steps, batch_size, answer_tokens, warm_up):
    reference = models["float32"]
    scores = vector.project(
        vectors.extract(reference, figstep, [layer], blank_image=True, progress=False), layer
    ).numpy()
    labels = np.array([r.is_malicious for r in figstep])
    config = training.TrainConfig(
        layer=layer, mu_plus=float(scores[labels].max()) + 1.0,
        mu_minus=float(scores[~labels].min()), batch_size=batch_size, lr=0.1, seed=0,
    )  # fmt: skip
    prompt = VisualSafetyPrompt.blank(reference.image_size, default_width(reference))
    malicious = [r for r in figstep if r.is_malicious]
    benign = [r for r in figstep if not r.is_malicious]
    # one training set (targets: the float32 model's own answers) for both dtypes
    data = training.prepare_training_set(
        reference, prompt, malicious, benign, safety_prompt=prompts.text("davsp_safety_prefix"),
        answer_tokens=answer_tokens, batch_size=batch_size, progress=False,
    )  # fmt: skip
    direction = vector.direction(layer, dtype=torch.float32)
    for adapter in models.values():  # warm-up: both step kinds, OCR cache filled
        warm = BorderRun(adapter, data, config, direction, prompt)
        for step in range(warm_up):
            warm.step(step)
    runs = {n: BorderRun(a, data, config, direction, prompt) for n, a in models.items()}
    clock = Clock()
    for step in range(steps):  # the dtypes alternate step by step
        for name, run in runs.items():
            clock.run(name, run.step, step)
    g32, g16 = runs["float32"].first_grad.flatten(), runs["bfloat16"].first_grad.flatten()
    cosine = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    return {
        "records": f"{len(malicious)} + {len(benign)} FigStep images, batch {batch_size}, "
        f"layer {layer}, {steps} alternating Adam steps (lr 0.1, lam {config.lam}); per step",
        **clock.summary(per=steps),
        "first_step_gradient_cosine": round(cosine, 4),
        "losses": {name: runs[name].losses for name in DTYPES},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n-vector", type=int, default=16)
    parser.add_argument("--n-heldout", type=int, default=16)
    parser.add_argument("--n-generate", type=int, default=8, help="FigStep records per defense")
    parser.add_argument("--defenses", default="none,davsp_prefix")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--train-records", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", default="extraction,generation,training,profile")
    parser.add_argument(
        "--layer", type=int, default=None,
        help="without 'extraction' in --only: the layer (float32 vector there only)",
    )  # fmt: skip
    parser.add_argument("--warm-up-steps", type=int, default=2)
    args = parser.parse_args(argv)
    wanted = args.only.split(",")

    load_before = os.getloadavg()
    models = {name: load_adapter(args.model, dtype=name) for name in DTYPES}
    for name, adapter in models.items():  # what each dtype actually runs in
        reader = {str(p.dtype) for p in adapter.reader.model.parameters()}
        print(f"{name}: language model {adapter.dtype}, reader {sorted(reader)}")
    text = load_builtin("text")
    figstep = load_builtin("figstep")
    summary: dict = {
        "model": models["float32"].info()["model_id"],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if "extraction" in wanted or args.layer is None:
        result, vector, layer = extraction(
            models, text, args.batch_size, args.n_vector, args.n_heldout
        )
        summary["extraction"] = result
        print(json.dumps({"extraction": result}))
    else:  # a float32 vector at the given layer only (truncated forwards: cheap)
        layer = args.layer
        acts = vectors.extract(
            models["float32"], balanced(text, args.n_vector), [layer],
            safety_prompt=prompts.text("davsp_safety_prefix"), blank_image=True, progress=False,
        )  # fmt: skip
        vector = vectors.fit_vector(acts)
    if "generation" in wanted:
        records = balanced(figstep, args.n_generate)
        with tempfile.TemporaryDirectory() as folder:
            summary["generation"] = generation(
                models, records, vector, layer, args.batch_size, args.max_new_tokens,
                args.defenses.split(","), folder,
            )  # fmt: skip
        print(json.dumps({"generation": summary["generation"]}))
    if "profile" in wanted:
        summary["profile"] = op_profile(models, text, args.batch_size)
        print(json.dumps({"profile": summary["profile"]}))
    if "training" in wanted:
        records = balanced(figstep, args.train_records, skip=args.n_generate // 2)
        summary["training"] = training_workload(
            models,
            records,
            vector,
            layer,
            args.train_steps,
            args.train_batch_size,
            16,
            args.warm_up_steps,
        )
        print(json.dumps({"training": summary["training"]}))
    summary["load_average_before_after"] = [
        [round(x, 2) for x in load_before],
        [round(x, 2) for x in os.getloadavg()],
    ]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
