"""Training the connector: LLaVA stage-1 feature alignment on neutral synthetic captions.

The language model and the ViT are frozen; only the connector learns, by next-token
cross-entropy on the caption of each synthetic image (:mod:`davsp_lib.models.embedded.synthetic`)
given ``<144 visual tokens>\\nDescribe the image.`` in the chat template, with no OCR text in
the prompt (the caption must come from the visual tokens). This objective was fixed before any
DAVSP result on this channel was looked at.

ViT features are computed once per image (the ViT is frozen) and cached. The batch plan is a
pure function of the seed, and a checkpoint (connector, Adam state, step, history) is written
atomically every ``checkpoint_every`` steps, so a run that is killed and rerun on the same
folder resumes and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from davsp_lib.models.embedded.channel import Connector, embedding_rms
from davsp_lib.models.embedded.model import IMAGE_PLACEHOLDER, SLOT_TOKEN
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_bytes, atomic_write_json

PROMPT = "Describe the image."
CHECKPOINT = "connector_checkpoint.safetensors"


@dataclass(frozen=True)
class ConnectorConfig:
    steps: int = 40
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 5
    output_scale: str = "none"  # "none" | "embeddings": visual tokens at the text embeddings' RMS


def caption_ids(tokenizer, caption: str, num_tokens: int) -> tuple[list[int], int, int]:
    """Ids of prompt + caption, the first visual position and where the caption starts."""
    messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{PROMPT}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    where = ids.index(tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    (slot,) = tokenizer(SLOT_TOKEN, add_special_tokens=False)["input_ids"]
    prompt = ids[:where] + [slot] * num_tokens + ids[where + 1 :]
    answer = tokenizer(caption, add_special_tokens=False)["input_ids"]
    answer.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return prompt + answer, where, len(prompt)


def caption_loss(
    lm, tokenizer, connector: Connector, grids: torch.Tensor, captions: Sequence[str]
) -> tuple[torch.Tensor, int, int]:
    """Mean caption cross-entropy, correct and total caption tokens (greedy, teacher-forced)."""
    tokens = connector(grids)
    rows = [caption_ids(tokenizer, c, tokens.shape[1]) for c in captions]
    length = max(len(ids) for ids, _, _ in rows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for r, (ids, _, start) in enumerate(rows):  # right padding
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, start : len(ids)] = torch.tensor(ids[start:])
        mask[r, : len(ids)] = 1
    embeds = lm.get_input_embeddings()(input_ids)
    embeds = embeds.clone()
    for r, (_, where, _) in enumerate(rows):
        embeds[r, where : where + tokens.shape[1]] = tokens[r].to(embeds.dtype)
    hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    valid = target != -100
    # the vocabulary projection only where a caption token is predicted (most positions are
    # visual tokens and prompt: projecting them onto 150k logits would be most of the cost)
    logits = lm.get_output_embeddings()(hidden[:, :-1][valid]).float()
    loss = F.cross_entropy(logits, target[valid])
    correct = int((logits.argmax(-1) == target[valid]).sum())
    return loss, correct, int(valid.sum())


def batch_plan(n_train: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: shuffled epochs, a pure function of the arguments."""
    rng = random.Random(f"connector-plan/{seed}")
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n_train))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def _resume_key(config: ConnectorConfig) -> str:
    """What a checkpoint must have been trained with to be resumed (``steps`` may grow)."""
    return json.dumps({k: v for k, v in asdict(config).items() if k != "steps"}, sort_keys=True)


def _save(
    path: Path, connector: Connector, optimizer, step: int, history: list, resume_key: str
) -> None:
    from safetensors.torch import save

    tensors = {f"connector.{k}": v.detach().clone() for k, v in connector.state_dict().items()}
    names = dict(connector.named_parameters())
    for name, param in names.items():
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                tensors[f"adam.{name}.{key}"] = torch.as_tensor(state[key]).detach().clone()
    meta = {"step": str(step), "history": json.dumps(history), "config": resume_key}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _load(path: Path, connector: Connector, optimizer, key: str) -> tuple[int, list]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if meta.get("config", key) != key:
            raise DataError(
                path,
                f"checkpoint trained with {meta['config']}, this run asks for {key}; "
                "use another --work folder (or delete the checkpoint to start over)",
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    connector.load_state_dict(
        {k.removeprefix("connector."): v for k, v in tensors.items() if k.startswith("connector.")}
    )
    for name, param in connector.named_parameters():
        keys = [k for k in ("exp_avg", "exp_avg_sq", "step") if f"adam.{name}.{k}" in tensors]
        if keys:
            optimizer.state[param] = {k: tensors[f"adam.{name}.{k}"] for k in keys}
    return int(meta["step"]), json.loads(meta["history"])


def evaluate(lm, tokenizer, connector, grids: torch.Tensor, captions, batch_size: int = 4):
    """Held-out mean loss (token-weighted) and greedy teacher-forced token accuracy."""
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for a in range(0, len(captions), batch_size):
            loss, ok, n = caption_loss(
                lm, tokenizer, connector, grids[a : a + batch_size], captions[a : a + batch_size]
            )
            total_loss += float(loss) * n
            correct += ok
            count += n
    return {"loss": total_loss / count, "token_accuracy": correct / count, "tokens": count}


def train_connector(
    lm,
    tokenizer,
    grids: torch.Tensor,
    captions: Sequence[str],
    folder: str | Path,
    config: ConnectorConfig,
    *,
    log: Callable[[str], None] = print,
) -> tuple[Connector, dict[str, Any]]:
    """Train (or resume) a connector on precomputed ViT grids; returns it and the run record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    if config.output_scale not in ("none", "embeddings"):
        raise ValueError(
            f"output_scale must be 'none' or 'embeddings', not {config.output_scale!r}"
        )
    output_rms = embedding_rms(lm) if config.output_scale == "embeddings" else None
    connector = Connector(
        int(lm.config.hidden_size), vit_width=grids.shape[-1], output_rms=output_rms
    )
    lm.requires_grad_(False)
    optimizer = torch.optim.Adam(connector.parameters(), lr=config.lr)
    plan = batch_plan(len(captions), config.steps, config.batch_size, config.seed)
    path = folder / CHECKPOINT
    start, history = 0, []
    if path.is_file():
        start, history = _load(path, connector, optimizer, _resume_key(config))
        log(f"resumed from step {start} of {config.steps}")
    began = time.perf_counter()
    for step in range(start, config.steps):
        tick = time.perf_counter()
        batch = plan[step]
        loss, correct, count = caption_loss(
            lm, tokenizer, connector, grids[batch], [captions[i] for i in batch]
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: loss is {float(loss)}; kept {path}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        seconds = round(time.perf_counter() - tick, 2)
        history.append(
            {"step": step + 1, "loss": value, "accuracy": correct / count, "seconds": seconds}
        )
        log(
            f"step {step + 1}/{config.steps} loss {value:.4f} acc {correct / count:.3f} "
            f"({time.perf_counter() - began:.0f} s)"
        )
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save(path, connector, optimizer, step + 1, history, _resume_key(config))
    record = {
        "config": asdict(config),
        "history": history,
        "wall_seconds_this_run": round(time.perf_counter() - began, 1),
        "training_seconds_all_runs": round(sum(h["seconds"] for h in history), 1),
    }
    atomic_write_json(folder / "connector_run.json", record)
    return connector.eval().requires_grad_(False), record
