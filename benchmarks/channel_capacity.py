"""Capacity of the embedded model's visual channel: a border through pixels vs free embeddings.

For each channel (``ocr``: the ring's 16 character slots; ``vit``: 144 ViT visual tokens, the
44 centred on the ring being the border's positions) and on the same data, steps, batch plan and
optimiser (the workbook's :func:`davsp_lib.method.training.train` machinery, DA hinge only):

- **pixels**: the border (30-pixel ring, white at start) trained through the channel;
- **free**: free vectors added to the input embeddings at the border's token positions (zero at
  start), trained by the same loss, batch plan and Adam: the most any border could write there.

It prints how far each moves held-out malicious and benign projections and how much it
separates them; ``capacity = separation gained by pixels / separation gained by free``.
Each channel gets its own harmfulness vector (extracted on a small text split over a blank
image, as notebook 01 does) and margins from that split (``suggest_margins``), or, with
``--margins unbounded``, margins no projection reaches, so that both classes' hinges push at
every step (with text margins a class whose images already sit beyond its margin gives no
gradient at all, and the benchmark then measures nothing).

    PYTHONPATH=$PWD python benchmarks/channel_capacity.py --channels ocr vit --steps 12

Numbers are the embedded model's, with this small data; not the paper's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from davsp_lib.method.diagnostics import study_data, suggest_margins
from davsp_lib.method.training import (
    TrainConfig,
    TrainingSet,
    batch_plan,
    forward_losses,
    projections,
    train,
    training_records,
)
from davsp_lib.method.vectors import extract, fit_vector
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.embedded.model import EmbeddedAdapter
from davsp_lib.models.inputs import canvas_for, conversation_for

UNBOUNDED = 1e4  # margins no projection reaches: both hinges stay active (a linear push)


@contextlib.contextmanager
def free_embeddings(adapter: EmbeddedAdapter, free: torch.Tensor) -> Iterator[None]:
    """Add ``free`` ``[k, D]`` at the border's token positions of every row (then restore)."""
    original = adapter.place_image_tokens
    index = torch.tensor(adapter.border_token_indices())

    def placed(embeds, canvases, positions):
        out = original(embeds, canvases, positions)
        additions = torch.zeros_like(out)
        for row, where in enumerate(positions):
            additions[row, where[index]] = free.to(out.dtype)
        return out + additions

    adapter.place_image_tokens = placed
    try:
        yield
    finally:
        del adapter.place_image_tokens


def train_free(adapter, data: TrainingSet, config: TrainConfig, direction) -> torch.Tensor:
    """The free-embedding upper bound: same plan, loss and Adam as :func:`train`."""
    free = torch.zeros(len(adapter.border_token_indices()), adapter.hidden_size, requires_grad=True)
    optimizer = torch.optim.Adam([free], lr=config.lr)
    for step in batch_plan(config, len(data.malicious), len(data.benign)):
        records = [data.malicious[i] for i in step.malicious] + [
            data.benign[i] for i in step.benign
        ]
        images = torch.stack([data.canvases[r.id] for r in records])
        with free_embeddings(adapter, free):
            out = forward_losses(
                adapter, images, [data.conversations[r.id] for r in records],
                [r.is_malicious for r in records], [None] * len(records), config, direction,
            )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return free.detach()


def summary(before: dict, after: dict) -> dict[str, float]:
    moved = {c: float(np.mean(after[c]) - np.mean(before[c])) for c in ("malicious", "benign")}
    sep_before = float(np.mean(before["malicious"]) - np.mean(before["benign"]))
    sep_after = float(np.mean(after["malicious"]) - np.mean(after["benign"]))
    return {
        "malicious_before": float(np.mean(before["malicious"])),
        "malicious_after": float(np.mean(after["malicious"])),
        "benign_before": float(np.mean(before["benign"])),
        "benign_after": float(np.mean(after["benign"])),
        "moved_malicious": moved["malicious"],
        "moved_benign": moved["benign"],
        "separation_before": sep_before,
        "separation_after": sep_after,
        "separation_gained": sep_after - sep_before,
    }


def held_out(adapter, records, vector, layer, prompt=None) -> dict[str, list[float]]:
    return {
        name: projections(adapter, recs, vector, layer, prompt=prompt).tolist()
        for name, recs in records.items()
    }


def measure(adapter: EmbeddedAdapter, args, log=print) -> dict:
    """Vector, margins, then pixels vs free for one channel."""
    began = time.perf_counter()
    root = args.data_root
    study = study_data(root, n_vector=args.n_vector, n_heldout=2, n_gap=2, seed=args.seed)
    acts = extract(adapter, study.vector, [args.layer], blank_image=True, progress=False)
    vector = fit_vector(acts, {"note": "channel_capacity benchmark"})
    scores = acts.states[:, 0].float() @ vector.direction(args.layer, dtype=torch.float32)
    labels = torch.tensor(acts.labels)
    mu_plus, mu_minus = suggest_margins(scores[labels].numpy(), scores[~labels].numpy())
    if args.margins == "unbounded":  # every hinge active at every step: DA as a linear push
        mu_plus, mu_minus = UNBOUNDED, -UNBOUNDED
    log(f"  vector on {len(study.vector)} text records; margins {mu_plus:.3f} / {mu_minus:.3f}")
    chosen = training_records(
        root, n_train=args.n_train, n_heldout=args.n_heldout, seed=args.seed,
        exclude=[r.id for r in study.vector],
    )  # fmt: skip
    heldout = {"malicious": chosen.heldout_malicious, "benign": chosen.heldout_benign}
    config = TrainConfig(
        layer=args.layer,
        mu_plus=mu_plus,
        mu_minus=mu_minus,
        variant="davsp",
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lam=0.0,
        schedule="alternate",
        checkpoint_every=args.steps,
        seed=args.seed,
    )  # lam = 0: the DA hinge alone
    blank = VisualSafetyPrompt.for_adapter(adapter, "border", width=adapter.border_width)
    canvases, conversations = {}, {}
    for record in [*chosen.malicious, *chosen.benign]:
        canvases[record.id] = canvas_for(adapter, record)  # white ring = the blank border
        conversations[record.id] = conversation_for(record, has_image=True)
    data = TrainingSet(chosen.malicious, chosen.benign, canvases, conversations, {})
    before = held_out(adapter, heldout, vector, args.layer)
    means = {k: round(float(np.mean(v)), 3) for k, v in before.items()}
    log(f"  held-out before: {json.dumps(means)}")
    folder = Path(args.work) / adapter.model_id
    result = train(adapter, data, config, folder, vector=vector, init=blank, progress=False)
    pixels = held_out(adapter, heldout, vector, args.layer, prompt=result.prompt)
    log(f"  pixels trained ({time.perf_counter() - began:.0f} s)")
    direction = vector.direction(args.layer, dtype=torch.float32, device=adapter.device)
    free = train_free(adapter, data, config, direction)
    with free_embeddings(adapter, free):
        freed = held_out(adapter, heldout, vector, args.layer)
    out = {
        "model": adapter.model_id,
        "border_tokens": len(adapter.border_token_indices()),
        "layer": args.layer,
        "margins": [mu_plus, mu_minus],
        "sizes": {"vector": len(study.vector), **chosen.sizes()},
        "pixels": summary(before, pixels),
        "free": summary(before, freed),
        "free_vector_norms": free.norm(dim=-1).quantile(torch.tensor([0.0, 0.5, 1.0])).tolist(),
        "seconds": round(time.perf_counter() - began, 1),
    }
    gained_free = out["free"]["separation_gained"]
    out["capacity"] = out["pixels"]["separation_gained"] / gained_free if gained_free else None
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", nargs="+", default=["ocr", "vit"], choices=["ocr", "vit"])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data-root", default=os.environ.get("DAVSP_DATA_ROOT"))
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--n-vector", type=int, default=12, help="per class, text records")
    parser.add_argument("--n-train", type=int, default=4, help="per class, FigStep images")
    parser.add_argument("--n-heldout", type=int, default=6, help="per class, FigStep images")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--margins",
        choices=["vector", "unbounded"],
        default="vector",
        help="vector: suggest_margins on the vector's text split (can leave a class's hinge "
        "inactive on images from the start); unbounded: mu+ = -mu- = 1e4, every hinge active",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/channel_capacity")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    from davsp_lib.models.embedded.channel import DATA_DIR, load_connector, with_vision
    from davsp_lib.models.embedded.model import load_embedded
    from davsp_lib.models.embedded.vision import load_vit

    base = load_embedded(args.model)
    results = []
    for channel in args.channels:
        adapter = base
        if channel == "vit":
            connector, _ = load_connector(DATA_DIR / f"connector_{args.model}.safetensors",
                                          hidden_size=base.hidden_size)  # fmt: skip
            adapter = with_vision(base, load_vit(), connector)
        print(f"channel {channel} ({adapter.model_id}):", flush=True)
        result = {"channel": channel, **measure(adapter, args)}
        results.append(result)
        for route in ("pixels", "free"):
            r = result[route]
            print(
                f"  {route:6s} malicious {r['malicious_before']:.3f} -> {r['malicious_after']:.3f}"
                f"  benign {r['benign_before']:.3f} -> {r['benign_after']:.3f}"
                f"  separation gained {r['separation_gained']:+.3f}",
                flush=True,
            )
        capacity = result["capacity"]
        print(f"  capacity (pixels / free): {capacity if capacity is None else round(capacity, 3)}")
    if args.out:
        from davsp_lib.runtime.io import atomic_write_json

        atomic_write_json(
            args.out, {"args": vars(args) | {"out": str(args.out)}, "results": results}
        )


if __name__ == "__main__":
    main()
