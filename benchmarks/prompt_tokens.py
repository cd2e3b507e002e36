"""Prompt tokens per record of the embedded model, by input family and defense, and by part.

    .venv/bin/python benchmarks/prompt_tokens.py [--model tiny] [--n 8]

Prefill is what generation, extraction and training pay for; this counts, for the inputs the
notebooks build (built-in instructions as text over a blank image and as FigStep images; from
the benchmark mirror, when present, MM-SafetyBench and MM-Vet), the prompt tokens of each
record under each text defense (none, the DAVSP prefix, AdaShield-S, UniGuard's suffix) with
:meth:`EmbeddedAdapter.prompt_ids`, the model's real prompt. Each total is split into parts
(tokenised apart, so the parts add up to the total up to a token at a seam): the chat
template's default system turn, the other template tokens, the border slots, the image block
(wrapper + the reader's transcription), the safety prompt, the query; and the total with
``system_turn=False`` (the embedded adapter's option that drops the default system turn).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from davsp_lib.data import datasets, prompts
from davsp_lib.data.records import Record
from davsp_lib.evaluation.generation import DEFENSES
from davsp_lib.models.adapters import load_adapter
from davsp_lib.models.embedded.model import IMAGE_TEXT_TEMPLATE
from davsp_lib.models.inputs import canvas_for, conversation_for

TEXT_DEFENSES = ("none", "davsp_prefix", "adashield_s", "uniguard")


def families(n: int) -> dict[str, list[Record]]:
    """The notebooks' input families, ``n`` records each (half malicious where both exist)."""
    text = datasets.load_builtin("text")
    half = [r for r in text if r.is_malicious][: n // 2]
    half += [r for r in text if not r.is_malicious][: n - n // 2]
    out = {
        "text over a blank image (01, 04)": half,
        "FigStep images (01-06)": list(datasets.as_image_attack(half, "figstep")),
    }
    root = datasets.data_root()
    try:
        out["MM-SafetyBench (03)"] = list(datasets.load_mmsafetybench(root))[:n]
        out["MM-Vet (02, 03, 06)"] = list(datasets.load_mmvet(root))[:n]
    except (FileNotFoundError, OSError, ValueError) as error:
        print(f"no mirror families ({error})")
    return out


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def parts(adapter, conversation, image_text: str | None) -> dict[str, int]:
    """Tokens of each part of one prompt; ``total`` is the exact length of the real prompt."""
    ids, slots = adapter.prompt_ids(conversation, image_text)
    tokenizer = adapter.tokenizer
    bare = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False
    )
    system = bare.split("<|im_start|>user")[0] if not conversation.system_prompt else ""
    safety = conversation.safety_prompt or ""
    query_copies = 2 if safety and conversation.safety_placement == "sandwich" else 1
    out = {
        "total": len(ids),
        "default system turn": count(tokenizer, system),
        "border slots": len(slots),
        "image block": count(tokenizer, adapter.image_block(image_text or "")),
        "safety prompt": count(tokenizer, safety),
        "query": query_copies * count(tokenizer, conversation.query),
    }
    out["template and seams"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    previous, adapter.system_turn = adapter.system_turn, False
    try:
        out["total without the default system turn"] = len(
            adapter.prompt_ids(conversation, image_text)[0]
        )
    finally:
        adapter.system_turn = previous
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=8, help="records per family")
    args = parser.parse_args(argv)
    adapter = load_adapter(args.model)
    table = {}
    for family, records in families(args.n).items():
        texts = []
        for record in records:  # text records get the blank image (no readable text)
            texts.append(adapter.read_text(canvas_for(adapter, record)) if record.has_image else "")
        for name in TEXT_DEFENSES:
            spec = DEFENSES[name]
            safety = prompts.text(spec.prompt) if spec.prompt else None
            rows = []
            for record, text in zip(records, texts, strict=True):
                conversation = conversation_for(
                    record, has_image=True, safety_prompt=safety, placement=spec.placement
                )
                rows.append(parts(adapter, conversation, text))
            table[f"{family} | {name}"] = {
                key: round(statistics.mean(r[key] for r in rows), 1) for key in rows[0]
            }
    print(f"{adapter.info()['model_id']}: mean prompt tokens per record ({args.n} per family)")
    print(f"image block template: {IMAGE_TEXT_TEMPLATE!r}; torch {torch.__version__}")
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
