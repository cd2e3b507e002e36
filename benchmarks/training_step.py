"""One DAVSP training step: the reference recipe's cost model vs ours, same model, data and losses.

The reference step (re-implemented faithfully from its description in METHOD.md section 2):
a Python loop over the batch; per sample a full-depth forward with ``output_hidden_states=True``
for the projection loss; on output-loss steps a *separate* forward with the sequence padded to
1024 tokens for the cross-entropy; signed-gradient update. Ours (:func:`training.forward_losses`):
the batch in one forward, stopped after layer ``l`` when only the projection is needed, otherwise
one full forward serving both losses with logits only for the answer tokens.

Both run the same alternating malicious / benign steps on the same records with the same
border; the script prints seconds per step for each and the ratio (from this one run), the
losses of both (they must agree), and our step's FLOPs against this CPU's measured fp32 matmul
throughput.

    .venv/bin/python benchmarks/training_step.py --model tiny --steps 4 --batch-size 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from davsp_lib.data import datasets, prompts
from davsp_lib.method import training, vectors
from davsp_lib.method.vsp import VisualSafetyPrompt, default_width
from davsp_lib.models.adapters import load_adapter
from davsp_lib.models.adapters.base import IGNORE_INDEX

REFERENCE_LENGTH = 1024


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 matmul throughput of this machine (the roofline we compare against)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def pad_left(batch_inputs: dict, labels: torch.Tensor, length: int, pad_embedding: torch.Tensor):
    """Left-pad every sequence tensor to ``length`` (the reference pads to 1024 tokens)."""
    current = batch_inputs["attention_mask"].shape[1]
    extra = max(0, length - current)
    out = {}
    for key, value in batch_inputs.items():
        if key == "inputs_embeds":
            pad = pad_embedding.expand(value.shape[0], extra, -1).to(value.dtype)
            out[key] = torch.cat([pad, value], dim=1)
        elif key in ("attention_mask", "position_ids", "input_ids"):
            out[key] = F.pad(value, (extra, 0), value=0)
        else:
            out[key] = value
    return out, F.pad(labels, (extra, 0), value=IGNORE_INDEX)


def reference_step(adapter, compose, conversations, malicious, answers, config, direction, lam):
    """Per-sample loop; full-depth forward with all hidden states; separate padded output pass.

    ``compose(row)`` draws the border on sample ``row`` (a fresh graph per sample, as there).
    """
    losses = []
    for row in range(len(conversations)):
        images = compose(row)
        batch = adapter.encode(images, conversations[row : row + 1])
        out = adapter.forward(batch, use_cache=False, output_hidden_states=True)
        state = out.hidden_states[config.layer][0, -1].float()
        score = state @ direction
        loss = training.hinge(score[None], torch.tensor([malicious[row]]), config.mu_plus,
                              config.mu_minus).mean()  # fmt: skip
        if not malicious[row]:  # output loss on benign samples, its own padded forward
            batch = adapter.encode(images, conversations[row : row + 1], [answers[row]])
            pad = adapter.lm.get_input_embeddings().weight[adapter.pad_id][None, None]
            inputs, labels = pad_left(batch.model_inputs, batch.labels, REFERENCE_LENGTH, pad)
            logits = adapter.model(**inputs, use_cache=False).logits
            ce = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )  # fmt: skip
            loss = loss + lam * ce
        loss.backward()  # per sample, gradients accumulate on the border
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


def our_flops(adapter, images, conversations, malicious, answers, config) -> float:
    """Forward + input-gradient FLOPs of our step (frozen weights: backward ~ forward)."""
    wants = not any(malicious)
    batch = adapter.encode(images.detach(), conversations, answers if wants else None)
    batch_size, tokens = batch.model_inputs["attention_mask"].shape
    hidden = adapter.hidden_size
    depth = adapter.num_layers if wants else config.layer
    block_params = sum(p.numel() for p in adapter.language_layers[0].parameters())
    forward = 2 * block_params * tokens * batch_size * depth
    forward += 4 * tokens * tokens * hidden * batch_size * depth  # QK^T and AV
    if wants:
        answer_tokens = int((batch.labels != IGNORE_INDEX).sum(1).max()) + 1
        vocab = adapter.lm.get_output_embeddings().weight.shape[0]
        forward += 2 * hidden * vocab * answer_tokens * batch_size
    return 2.0 * forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (alternating)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layer", type=int, default=16)
    args = parser.parse_args(argv)

    adapter = load_adapter(args.model)
    root = datasets.data_root()
    harmful = list(datasets.load_text_prompts(root, "harmful_val"))[: args.batch_size]
    harmless = list(datasets.load_text_prompts(root, "harmless_val"))[: args.batch_size]
    malicious = list(datasets.as_image_attack(harmful))
    benign = list(datasets.as_image_attack(harmless))
    acts = vectors.extract(adapter, malicious + benign, [args.layer], progress=False)
    vector = vectors.fit_vector(acts)
    scores = vector.project(acts, args.layer)
    config = training.TrainConfig(
        layer=args.layer, mu_plus=float(scores.max()) + 1, mu_minus=float(scores.min()),
        batch_size=args.batch_size, optimizer="sign", lr=1 / 255,
    )  # fmt: skip
    prompt = VisualSafetyPrompt.blank(adapter.image_size, default_width(adapter))
    data = training.prepare_training_set(
        adapter, prompt, malicious, benign, safety_prompt=prompts.text("davsp_safety_prefix"),
        answer_tokens=32, progress=False,
    )  # fmt: skip
    direction = vector.direction(args.layer, dtype=torch.float32)

    def batch_of(step: int):
        records = data.malicious if step % 2 == 0 else data.benign
        canvases = torch.stack([data.canvases[r.id] for r in records])
        return (
            canvases,
            [data.conversations[r.id] for r in records],
            [r.is_malicious for r in records],
            [data.answers[r.id] for r in records],
        )

    results = {}
    for name in ("warm-up", "reference", "ours"):
        delta = prompt.delta.clone().requires_grad_(True)
        times, losses = [], []
        for step in range(2 if name == "warm-up" else args.steps):
            canvases, conversations, mal, answers = batch_of(step)
            start = time.perf_counter()
            if name == "reference":
                loss = reference_step(
                    adapter, lambda row, c=canvases, d=delta: prompt.apply(c[row : row + 1], d),
                    conversations, mal, answers, config, direction, config.lam,
                )  # fmt: skip
            else:
                images = prompt.apply(canvases, delta)
                out = training.forward_losses(adapter, images, conversations, mal, answers,
                                              config, direction)  # fmt: skip
                out.loss.backward()
                loss = float(out.loss.detach())
            with torch.no_grad():
                delta -= config.lr * delta.grad.sign() * prompt.mask()
                delta.clamp_(0, 1)
            delta.grad = None
            times.append(time.perf_counter() - start)
            losses.append(loss)
        results[name] = (times, losses)
        print(f"{name:>9}: s/step {[round(t, 2) for t in times]}, losses "
              f"{[round(x, 4) for x in losses]}")  # fmt: skip

    ref = statistics.mean(results["reference"][0])
    ours = statistics.mean(results["ours"][0])
    print(f"\nmodel {adapter.info()['model_id']}, batch {args.batch_size}, layer {args.layer}, "
          f"{args.steps} alternating steps (malicious, benign, ...)")  # fmt: skip
    print(f"reference recipe: {ref:.2f} s/step   ours: {ours:.2f} s/step   ratio {ref / ours:.2f}x")
    gflops = matmul_gflops()
    flops = statistics.mean(
        our_flops(adapter, prompt.apply(batch_of(s)[0]), *batch_of(s)[1:], config) for s in range(2)
    )
    per_step = statistics.mean(results["ours"][0][:2])
    print(
        f"our step: {flops / 1e9:.1f} GFLOP (fwd + input-grad bwd, mean of a malicious and a "
        f"benign step); {flops / 1e9 / per_step:.1f} GFLOP/s achieved vs {gflops:.1f} GFLOP/s "
        f"fp32 matmul peak measured here -> {flops / 1e9 / per_step / gflops:.0%} of roofline"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
