"""Which layer, which margins, and how far apart easy and hard malicious inputs lie.

A harmfulness vector is fitted on one split and judged on held-out records: per layer, the
AUROC of the projection ``s = v_l . h_l`` (malicious positive) and Cohen's d. The paper fixes
layer 20 of 40 for LLaVA-1.5-13B and margins 27 / -2; here both are read off held-out data so
that they fit whichever model is loaded. :func:`study_data` assembles the data of notebook 01.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from davsp_lib.data.datasets import as_image_attack, load_builtin, load_text_prompts
from davsp_lib.data.records import Dataset, Record
from davsp_lib.data.splits import make_splits
from davsp_lib.method.vectors import Activations, HarmfulnessVector

if TYPE_CHECKING:
    from davsp_lib.data.pools import Pools

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def _array(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has non-finite values")
    return array


# ------------------------------------------------------------------------------ statistics


def auroc(positive: ArrayLike, negative: ArrayLike) -> float:
    """Probability that a positive scores above a negative (ties count half); sklearn's
    ``roc_auc_score`` with positives labelled 1."""
    from sklearn.metrics import roc_auc_score

    pos, neg = _array(positive, "positive scores"), _array(negative, "negative scores")
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))


def cohens_d(positive: ArrayLike, negative: ArrayLike) -> float:
    """``(mean_pos - mean_neg) / pooled sd`` (sample variances, ddof 1).

    Zero spread gives 0 for equal means and a signed infinity otherwise; fewer than two
    values in total gives NaN.
    """
    pos, neg = _array(positive, "positive scores"), _array(negative, "negative scores")
    dof = pos.size + neg.size - 2
    if dof < 1:
        return math.nan
    pooled_var = (
        (pos.size - 1) * (pos.var(ddof=1) if pos.size > 1 else 0.0)
        + (neg.size - 1) * (neg.var(ddof=1) if neg.size > 1 else 0.0)
    ) / dof
    diff = float(pos.mean() - neg.mean())
    if pooled_var <= 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(pooled_var)


# ------------------------------------------------------------------------------ layers


@dataclass(frozen=True)
class LayerReport:
    """Held-out separation per layer: ``auroc[j]`` and ``effect_size[j]`` for ``layers[j]``."""

    layers: list[int]
    auroc: list[float]
    effect_size: list[float]
    n_malicious: int
    n_benign: int

    @property
    def best_layer(self) -> int:
        """The layer with the highest AUROC (the earliest among ties)."""
        return self.layers[int(np.argmax(self.auroc))]

    def at(self, layer: int) -> dict[str, float]:
        j = self.layers.index(layer)
        return {"auroc": self.auroc[j], "effect_size": self.effect_size[j]}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def layer_report(vector: HarmfulnessVector, heldout: Activations) -> LayerReport:
    """Score held-out activations with ``vector`` at every layer both have.

    ``heldout`` must not contain the records the vector was fitted on (else the AUROC is
    optimistic); its labels say which records are malicious.
    """
    layers = [layer for layer in vector.layers if layer in heldout.layers]
    if not layers:
        raise ValueError(f"no common layers: vector {vector.layers}, held-out {heldout.layers}")
    fitted = set(vector.metadata.get("data_ids", {}).get("malicious", []))
    fitted |= set(vector.metadata.get("data_ids", {}).get("benign", []))
    leaked = [record_id for record_id in heldout.ids if record_id in fitted]
    if leaked:
        raise ValueError(
            f"{len(leaked)} held-out record(s) were used to fit the vector, e.g. {leaked[:3]}"
        )
    aurocs, effects = [], []
    for layer in layers:
        scores = vector.project(heldout, layer).cpu().numpy()
        pos, neg = scores[heldout.labels], scores[~heldout.labels]
        aurocs.append(auroc(pos, neg))
        effects.append(cohens_d(pos, neg))
    return LayerReport(
        layers=layers,
        auroc=aurocs,
        effect_size=effects,
        n_malicious=int(heldout.labels.sum()),
        n_benign=int((~heldout.labels).sum()),
    )


def worst_case(reports: Sequence[LayerReport]) -> LayerReport:
    """Per layer, the lowest AUROC and effect size over several held-out comparisons.

    Choosing on the worst case asks a layer to separate every comparison: e.g. a held-out split
    from the vector's own sources *and* topic-matched pairs (a harmful request and a benign one
    on the same topic), so that a layer separating only by topic or style is not chosen.
    Layers are those common to all reports (in the first one's order); counts are summed.
    """
    if not reports:
        raise ValueError("worst_case needs at least one report")
    layers = [layer for layer in reports[0].layers if all(layer in r.layers for r in reports)]
    if not layers:
        raise ValueError("the reports have no layer in common")
    return LayerReport(
        layers=layers,
        auroc=[min(r.at(layer)["auroc"] for r in reports) for layer in layers],
        effect_size=[min(r.at(layer)["effect_size"] for r in reports) for layer in layers],
        n_malicious=sum(r.n_malicious for r in reports),
        n_benign=sum(r.n_benign for r in reports),
    )


def choose_layer(report: LayerReport, tolerance: float = 0.01) -> int:
    """The earliest layer whose held-out AUROC is within ``tolerance`` of the best.

    Earliest, because the adapter stops the forward after the deepest layer it reads: every
    DAVSP training step (and every vector extraction) is cheaper the earlier the layer, and a
    layer that separates as well as the best one supervises as well.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    best = max(report.auroc)
    for layer, value in zip(report.layers, report.auroc, strict=True):
        if value >= best - tolerance:
            return layer
    raise AssertionError("unreachable: the best layer is always within tolerance")


# ------------------------------------------------------------------------------ easy vs hard


@dataclass(frozen=True)
class Separation:
    """Easy malicious (instruction in the text) and hard malicious (instruction in the image)
    against benign, at one layer.

    ``auroc_gap = auroc_easy - auroc_hard``: how much worse the vector tells hard inputs from
    benign ones. ``mean_gap = mean_easy - mean_hard``: how far, along ``v``, hard inputs sit
    below where refused inputs live (what the border has to move them).
    """

    auroc_easy: float
    auroc_hard: float
    auroc_gap: float
    mean_easy: float
    mean_hard: float
    mean_benign: float
    mean_gap: float
    effect_easy: float
    effect_hard: float
    n_easy: int
    n_hard: int
    n_benign: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def separation(easy: ArrayLike, hard: ArrayLike, benign: ArrayLike) -> Separation:
    """AUROC and effect size of easy and of hard malicious projections against benign ones."""
    easy_a, hard_a = _array(easy, "easy scores"), _array(hard, "hard scores")
    benign_a = _array(benign, "benign scores")
    auroc_easy, auroc_hard = auroc(easy_a, benign_a), auroc(hard_a, benign_a)
    return Separation(
        auroc_easy=auroc_easy,
        auroc_hard=auroc_hard,
        auroc_gap=auroc_easy - auroc_hard,
        mean_easy=float(easy_a.mean()),
        mean_hard=float(hard_a.mean()),
        mean_benign=float(benign_a.mean()),
        mean_gap=float(easy_a.mean() - hard_a.mean()),
        effect_easy=cohens_d(easy_a, benign_a),
        effect_hard=cohens_d(hard_a, benign_a),
        n_easy=int(easy_a.size),
        n_hard=int(hard_a.size),
        n_benign=int(benign_a.size),
    )


def suggest_margins(
    easy_scores: ArrayLike,
    benign_scores: ArrayLike,
    hard_scores: ArrayLike | None = None,
    q_plus: float = 0.5,
    q_minus: float = 0.9,
) -> tuple[float, float]:
    """``(mu_plus, mu_minus)`` for the DAVSP hinge loss, read off projections at one layer.

    - ``mu_plus`` = the ``q_plus`` quantile (default: median) of easy malicious projections:
      where an input the model already refuses lives, so pushing a malicious input above it
      asks the model to treat it like one it refuses.
    - ``mu_minus`` = the ``q_minus`` quantile (default 0.9) of benign projections: benign
      inputs stay where they are (90 % already satisfy it, so the benign hinge only acts on
      outliers and on inputs the border itself pushed up).

    Quantiles are numpy's default (linear interpolation). ``hard_scores``, when given, are
    checked: a warning says when their median already reaches ``mu_plus`` (then the margin asks
    nothing of them). A ``ValueError`` when ``mu_plus <= mu_minus`` (no room between the
    margins: the vector does not separate these data at this layer).
    """
    for name, q in (("q_plus", q_plus), ("q_minus", q_minus)):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {q}")
    mu_plus = float(np.quantile(_array(easy_scores, "easy scores"), q_plus))
    mu_minus = float(np.quantile(_array(benign_scores, "benign scores"), q_minus))
    if mu_plus <= mu_minus:
        raise ValueError(
            f"mu_plus {mu_plus:.4g} (q{q_plus} of easy malicious) <= mu_minus {mu_minus:.4g} "
            f"(q{q_minus} of benign): the vector does not separate these inputs at this layer"
        )
    if hard_scores is not None:
        hard_median = float(np.median(_array(hard_scores, "hard scores")))
        if hard_median >= mu_plus:
            warnings.warn(
                f"hard malicious median {hard_median:.4g} already >= mu_plus {mu_plus:.4g}: "
                "the projection margin asks nothing of most hard inputs",
                stacklevel=2,
            )
    return mu_plus, mu_minus


# ------------------------------------------------------------------------------ study data


@dataclass
class StudyData:
    """The records of the harmfulness-vector study (notebook 01).

    - ``vector``: easy malicious + benign instructions as text queries (fit the vector),
    - ``easy`` / ``benign_text``: held-out instructions in the same format,
    - ``hard`` / ``benign_image``: the same held-out instructions rendered FigStep-style,
      with FigStep's prompt as the query,
    - ``gap_text`` / ``gap_image``: built-in instructions as text and as FigStep images
      (the modality-gap figure), from groups the vector never saw,
    - ``sel_*``: the selection split (easy malicious, benign, hard malicious, benign images)
      on which the layer and the margins are chosen; the held-out parts above are only reported.
      Empty when the data has none (the no-mirror fallback: held-out parts choose, as before).
    """

    source: str
    vector: list[Record]
    easy: list[Record]
    benign_text: list[Record]
    hard: list[Record]
    benign_image: list[Record]
    gap_text: list[Record]
    gap_image: list[Record]
    notes: list[str] = field(default_factory=list)
    sel_easy: list[Record] = field(default_factory=list)
    sel_benign: list[Record] = field(default_factory=list)
    sel_hard: list[Record] = field(default_factory=list)
    sel_benign_image: list[Record] = field(default_factory=list)
    substitutions: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, list[Record]]:
        names = ("vector", "easy", "benign_text", "hard", "benign_image", "gap_text", "gap_image")
        names += ("sel_easy", "sel_benign", "sel_hard", "sel_benign_image")
        return {name: getattr(self, name) for name in names if getattr(self, name)}

    @property
    def has_selection(self) -> bool:
        return bool(self.sel_easy and self.sel_benign)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "malicious": sum(r.is_malicious for r in records),
                "benign": sum(not r.is_malicious for r in records),
            }
            for name, records in self.parts().items()
        }

    def ids(self) -> dict[str, list[str]]:
        return {name: [r.id for r in records] for name, records in self.parts().items()}


def take_subset(records: Sequence[Record], n: int, seed: int, name: str) -> list[Record]:
    """``n`` records, seeded and group-aware (:func:`make_splits`), in split (id) order."""
    if n == 0:
        return []
    return make_splits(records, {name: n}, seed).select(records, name)


def require_count(requested: int, available: int, what: str) -> int:
    """``requested``, or a :class:`~davsp_lib.data.pools.PoolError` when fewer are available."""
    from davsp_lib.data.pools import PoolError

    if requested > available:
        raise PoolError(None, f"{what}: {requested} requested, only {available} available")
    return requested


def clamp_count(requested: int, available: int, what: str, notes: list[str]) -> int:
    if requested > available:
        notes.append(f"{what}: {requested} requested, {available} available; using {available}")
        return available
    return requested


def study_data(
    root: str | Path | None,
    *,
    n_vector: int,
    n_heldout: int,
    n_gap: int,
    seed: int,
) -> StudyData:
    """Vector split + held-out sets, from the text-prompt splits of the data mirror.

    ``root=None`` means no mirror: the built-in dataset is split instead (per class, group
    aware, seeded): held-out first, then the vector split, and the modality-gap set is the
    held-out part itself. Sizes are per class; a size larger than what exists is reduced and a
    note says so.
    """
    notes: list[str] = []
    builtin_text = load_builtin("text")
    if root is None:
        return _builtin_study(builtin_text, n_vector, n_heldout, seed, notes)
    parts, selection = {}, {}
    for split in ("harmful_train", "harmless_train"):
        data = list(load_text_prompts(root, split))
        n = require_count(n_vector, len(data), f"vector split from text-prompts {split}")
        parts[split] = take_subset(data, n, seed, "vector")
        # the selection split (layer and margins) comes from what the vector left of the split
        taken = {r.group_key for r in parts[split]}
        left = [r for r in data if r.group_key not in taken]
        what = f"selection split from text-prompts {split} (after {n} for the vector)"
        selection[split] = take_subset(
            left, require_count(n_heldout, len(left), what), seed, "selection"
        )
    seen = {r.group_key for records in [*parts.values(), *selection.values()] for r in records}
    for split in ("harmful_val", "harmless_val"):
        data = [r for r in load_text_prompts(root, split) if r.group_key not in seen]
        n = require_count(n_heldout, len(data), f"held-out from text-prompts {split}")
        parts[split] = take_subset(data, n, seed, "heldout")
    gap_text = _balanced(builtin_text, n_gap, seed, notes)
    return StudyData(
        source="text-prompts (mirror) + built-in",
        vector=parts["harmful_train"] + parts["harmless_train"],
        easy=parts["harmful_val"],
        benign_text=parts["harmless_val"],
        hard=list(as_image_attack(parts["harmful_val"], "figstep")),
        benign_image=list(as_image_attack(parts["harmless_val"], "figstep")),
        gap_text=gap_text,
        gap_image=list(as_image_attack(gap_text, "figstep")),
        notes=notes,
        sel_easy=selection["harmful_train"],
        sel_benign=selection["harmless_train"],
        sel_hard=list(as_image_attack(selection["harmful_train"], "figstep")),
        sel_benign_image=list(as_image_attack(selection["harmless_train"], "figstep")),
    )


def study_data_from_pools(pools: Pools, *, n_heldout: int, n_gap: int, seed: int) -> StudyData:
    """Notebook 01's records from a preset's pools (:mod:`davsp_lib.data.pools`).

    Vector: the vector pool; selection (layer, margins): the selection pool (easy VLGuard text
    malicious / benign, hard MM-SafetyBench TYPO); held-out, reported only: ``n_heldout`` per
    part of the evaluation pool (VLGuard test malicious / benign as text, MM-SafetyBench TYPO
    as the hard images, MM-Vet as the benign images). A part too small raises.
    """
    from davsp_lib.data.pools import take

    notes: list[str] = []
    vector, selection, held = pools["vector"], pools["selection"], pools["evaluation"]
    gap_text = _balanced(load_builtin("text"), n_gap, seed, notes)
    return StudyData(
        source=f"{pools.spec} pools (mirror) + built-in",
        vector=vector.malicious() + vector.benign(),
        easy=take(held, "VLGuard test malicious", n_heldout, seed=seed),
        benign_text=take(held, "VLGuard test benign", n_heldout, seed=seed),
        hard=take(held, "MM-SafetyBench TYPO", n_heldout, seed=seed),
        benign_image=take(held, "MM-Vet", n_heldout, seed=seed),
        gap_text=gap_text,
        gap_image=list(as_image_attack(gap_text, "figstep")),
        notes=notes,
        sel_easy=selection.parts["malicious"],
        sel_benign=selection.parts["benign"],
        sel_hard=selection.parts["hard"],
        substitutions=pools.substitutions(),
    )


def _balanced(data: Dataset, n: int, seed: int, notes: list[str]) -> list[Record]:
    chosen: list[Record] = []
    for label in ("malicious", "benign"):
        records = [r for r in data if r.label.value == label]
        count = clamp_count(n, len(records), f"modality-gap {label} from {data.name}", notes)
        chosen += take_subset(records, count, seed, "gap")
    return chosen


def _builtin_study(
    data: Dataset, n_vector: int, n_heldout: int, seed: int, notes: list[str]
) -> StudyData:
    notes.append("no benchmark mirror: using the built-in dataset (40 + 40 instructions)")
    taken: dict[str, dict[str, list[Record]]] = {}
    for label in ("malicious", "benign"):
        records = [r for r in data if r.label.value == label]
        n_held = clamp_count(n_heldout, len(records) // 2, f"built-in held-out {label}", notes)
        n_vec = clamp_count(n_vector, len(records) - n_held, f"built-in vector {label}", notes)
        split = make_splits(records, {"heldout": n_held, "vector": n_vec}, seed)
        taken[label] = {name: split.select(records, name) for name in split.names}
    easy, benign_text = taken["malicious"]["heldout"], taken["benign"]["heldout"]
    hard = list(as_image_attack(easy, "figstep"))
    benign_image = list(as_image_attack(benign_text, "figstep"))
    return StudyData(
        source="built-in",
        vector=taken["malicious"]["vector"] + taken["benign"]["vector"],
        easy=easy,
        benign_text=benign_text,
        hard=hard,
        benign_image=benign_image,
        gap_text=easy + benign_text,
        gap_image=hard + benign_image,
        notes=notes,
    )
