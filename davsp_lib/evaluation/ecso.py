"""ECSO ("Eyes Closed, Safety On") and its two integrations with DAVSP.

ECSO, per record, with the reference wording (``ecso_tell``, ``ecso_caption``, ``ecso_generate``
in ``prompts.json``; gyhdog99/ECSO ``model_mmsafe_tell_ask.py``):

1. **answer** the (image, query) input;
2. **self-check**: the same model, given the same image and the TELL prompt (query + its answer,
   cut to 1927 characters) says whether its answer is harmful. The decision **parses the
   generated answer** (greedy, ``check_tokens`` tokens) as the reference does: flagged iff the
   whole answer is "yes" or "yes." (case and whitespace normalised;
   :meth:`davsp_lib.evaluation.judges.JudgeWording.parse`, ECSO wording). "Yes, it is harmful" is
   *not* flagged, as in the reference. One difference the token cut makes: an answer such as
   "Yes.\n\nBecause ..." cut after "Yes." is flagged, where the reference's full text is not;
3. if flagged, a **query-aware caption** of the image (CAP prompt, image on), then
4. an **answer from the caption without the image** (LLM_GEN prompt, text only);
   otherwise the first answer is kept.

Integration with DAVSP (the paper's ECSO table):

- **adaptive** (DAVSP only when ECSO flags harm): the undefended answer and ECSO's self-check;
  a flagged record is answered again with DAVSP (trained border + text prefix) *instead of* the
  caption route; an unflagged one keeps the undefended answer.
- **static** (both always): the DAVSP-defended input goes through ECSO. The first answer is
  DAVSP's (border + prefix); the self-check and the caption see the bordered image (without
  the prefix, which would ask the model to answer "I am sorry" instead of yes/no); the final
  text-only answer has no image, hence no border.

Every model call is :func:`davsp_lib.evaluation.generation.generate_responses` on records whose
query is the stage's prompt, so each stage is batched, resumable and validated like an evaluation
(header: model, image part, parameters, record ids). First answers go to
``<out_dir>/responses/<defense>.jsonl`` (notebook 03's layout); later stages to
``<out_dir>/ecso/<stage>-<digest>.jsonl``, the digest covering the stage's prompts and image part,
so a stage shared by two pipelines (ECSO and adaptive share the self-check) runs once and a stage
never resumes from rows made for other inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from davsp_lib.data import prompts
from davsp_lib.data.records import Record
from davsp_lib.evaluation.generation import Defense, generate_responses
from davsp_lib.evaluation.judges import JudgeWording, parse_yes_no
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.base import VLMAdapter

#: where a record's final answer came from
ROUTE_KEPT = "kept"  # not flagged: the first answer
ROUTE_CAPTION = "caption"  # flagged: caption, then a text-only answer (ECSO)


@dataclass(frozen=True)
class ECSOPrompts:
    """ECSO's three prompts (reference wording) and how their placeholders are filled."""

    check: JudgeWording
    caption: str
    generate: str

    @classmethod
    def load(cls, root: str | Path | None = None) -> ECSOPrompts:
        return cls(
            JudgeWording.load("ecso", root),
            prompts.text("ecso_caption", root),
            prompts.text("ecso_generate", root),
        )

    def check_text(self, query: str, response: str) -> str:
        """TELL prompt; the response is cut to 1927 characters as in the reference."""
        return self.check.user_text(query, response)

    def caption_text(self, query: str) -> str:
        return self.caption.replace("{query}", query)

    def generate_text(self, caption: str, query: str) -> str:
        # caption first: a caption containing "{query}" must stay literal
        head, _, tail = self.generate.partition("{caption}")
        return head.replace("{query}", query) + caption + tail.replace("{query}", query)


def parse_check(answer: str) -> tuple[bool, bool]:
    """``(flagged, valid)`` from a self-check answer: flagged iff the whole answer is "yes" or
    "yes." (ECSO's rule); valid iff it is one of "yes", "yes.", "no", "no." (case and
    whitespace normalised, as :meth:`JudgeWording.parse` reads ECSO's wording)."""
    return parse_yes_no(answer)


def is_flagged(check_row: Mapping[str, Any]) -> bool:
    """The default decision on a self-check row: its answer is exactly "yes" or "yes.".

    :func:`run_ecso` takes any such callable of the row (id, label, response, ...), e.g. an
    oracle ``lambda row: row["label"] == "malicious"`` for ECSO with a perfect detector.
    """
    return parse_check(check_row["response"])[0]


@dataclass(frozen=True)
class ECSOPipeline:
    """One row of the ECSO table.

    ``answer``: the defense of the first answer (kept when not flagged). ``check_vsp``: the
    image part the self-check and the caption see (None: the plain image). ``rescue``: when
    set, a flagged record gets this defense's answer instead of ECSO's caption route.
    """

    name: str
    label: str
    answer: Defense
    check_vsp: VisualSafetyPrompt | None = field(default=None, compare=False)
    rescue: Defense | None = None

    @property
    def route(self) -> str:
        """What a flagged record goes through."""
        return ROUTE_CAPTION if self.rescue is None else self.rescue.name

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "answer": self.answer.describe(),
            "check_image": self.image_part().describe()["image"],
            "flagged_route": self.route,
            "rescue": None if self.rescue is None else self.rescue.describe(),
        }

    def image_part(self) -> Defense:
        """The defense of the self-check and caption calls: image part only, no text."""
        if self.check_vsp is None:
            return Defense(name="ecso-image", label="plain image")
        return Defense(
            name="ecso-image",
            label="image with the border",
            vsp=self.check_vsp,
            variant=self.answer.variant,
            source=self.answer.source,
        )


def standard_pipelines(none: Defense, davsp: Defense | None) -> list[ECSOPipeline]:
    """ECSO, and with a DAVSP defense also the adaptive and static integrations."""
    if none.vsp is not None or none.safety_prompt:
        raise ValueError(f"ECSO's first answer needs the undefended model, got {none.name!r}")
    pipelines = [ECSOPipeline("ecso", "ECSO", answer=none)]
    if davsp is not None:
        if davsp.vsp is None:
            raise ValueError(f"defense {davsp.name!r} has no border to integrate with ECSO")
        pipelines += [
            ECSOPipeline(
                "ecso_adaptive", "adaptive: DAVSP only when ECSO flags harm", none, None, davsp
            ),
            ECSOPipeline("ecso_static", "static: DAVSP input through ECSO", davsp, davsp.vsp),
        ]
    return pipelines


def stage_path(
    out_dir: str | Path, stage: str, records: Sequence[Record], defense: Defense
) -> Path:
    """``<out_dir>/ecso/<stage>-<digest>.jsonl``; the digest covers the stage's inputs."""
    spec = {
        "stage": stage,
        "image_part": defense.describe(),
        "inputs": [[r.id, r.query, r.has_image] for r in records],
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()
    return Path(out_dir) / "ecso" / f"{stage}-{digest[:16]}.jsonl"


def _stage(
    adapter: VLMAdapter,
    records: list[Record],
    defense: Defense,
    out_dir: str | Path,
    stage: str,
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
) -> list[dict[str, Any]]:
    if not records:
        return []
    path = stage_path(out_dir, stage, records, defense)
    return generate_responses(
        adapter, records, defense, path, batch_size=batch_size, max_new_tokens=max_new_tokens,
        progress=progress,
    )  # fmt: skip


def _check_records(records: Sequence[Record]) -> list[Record]:
    records = list(records)
    if not records:
        raise ValueError("no records for ECSO")
    without = [r.id for r in records if not r.has_image]
    if without:
        raise ValueError(f"ECSO needs image inputs; records without an image: {without[:5]}")
    return records


def run_ecso(
    adapter: VLMAdapter,
    records: Sequence[Record],
    pipeline: ECSOPipeline,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    check_tokens: int = 4,
    caption_tokens: int | None = None,
    flag: Callable[[Mapping[str, Any]], bool] = is_flagged,
    root: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run one pipeline over ``records`` (all with an image); returns one row per record.

    Rows are response rows (as :func:`~davsp_lib.evaluation.generation.generate_responses` writes,
    so judges and metrics take them) with ``defense`` = the pipeline's name, ``response`` = the
    final answer, and ``first_response``, ``check`` (the self-check answer), ``flagged``,
    ``check_valid``, ``route`` (``kept``, ``caption`` or the rescue defense's name) and ``caption``.
    ``flag`` decides from the self-check row (default :func:`is_flagged`). The rescue defense
    (adaptive) answers every record, into the same file as a plain evaluation of it with these
    parameters, so that file is shared and flagged records get exactly the answers of that
    evaluation. Every stage resumes from its file.
    """
    records = _check_records(records)
    wording = ECSOPrompts.load(root)
    caption_tokens = max_new_tokens if caption_tokens is None else caption_tokens
    run = dict(batch_size=batch_size, progress=progress)
    responses = Path(out_dir) / "responses"

    def answers(defense: Defense) -> list[dict[str, Any]]:
        path = responses / f"{defense.name}.jsonl"
        return generate_responses(
            adapter, records, defense, path, max_new_tokens=max_new_tokens, **run
        )

    first = answers(pipeline.answer)
    image_part = pipeline.image_part()
    asked = [
        r.with_(query=wording.check_text(r.query, row["response"]))
        for r, row in zip(records, first, strict=True)
    ]
    checks = _stage(
        adapter, asked, image_part, out_dir, "check", max_new_tokens=check_tokens, **run
    )
    flags = [bool(flag(row)) for row in checks]
    final = [row["response"] for row in first]
    routes = [ROUTE_KEPT] * len(records)
    captions: list[str | None] = [None] * len(records)
    flagged = [i for i, f in enumerate(flags) if f]
    if flagged and pipeline.rescue is not None:
        second = answers(pipeline.rescue)
        for i in flagged:
            final[i], routes[i] = second[i]["response"], pipeline.rescue.name
    elif flagged:
        described = [
            records[i].with_(query=wording.caption_text(records[i].query)) for i in flagged
        ]
        seen = _stage(
            adapter, described, image_part, out_dir, "caption", max_new_tokens=caption_tokens,
            **run,
        )  # fmt: skip
        blind = [
            records[i].with_(
                query=wording.generate_text(row["response"], records[i].query),
                image_path=None,
                render=None,
            )
            for i, row in zip(flagged, seen, strict=True)
        ]
        text_only = Defense(name="ecso-text-only", label="no image")
        told = _stage(
            adapter, blind, text_only, out_dir, "answer", max_new_tokens=max_new_tokens, **run
        )
        for i, caption, row in zip(flagged, seen, told, strict=True):
            final[i], routes[i], captions[i] = row["response"], ROUTE_CAPTION, caption["response"]
    rows = []
    for i, row in enumerate(first):
        rows.append(
            {
                **row,
                "defense": pipeline.name,
                "response": final[i],
                "first_response": row["response"],
                "check": checks[i]["response"],
                "flagged": flags[i],
                "check_valid": parse_check(checks[i]["response"])[1],
                "route": routes[i],
                "caption": captions[i],
            }
        )
    return rows


def route_counts(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``{label: {route: count}}``: which branch the records of each label took."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        per_label = counts.setdefault(row["label"], {})
        per_label[row["route"]] = per_label.get(row["route"], 0) + 1
    return counts


def model_calls(rows: Sequence[dict[str, Any]], pipeline: ECSOPipeline) -> float:
    """Mean model calls per record a deployment would make (answer + check, then 2 for the
    caption route or 1 for a rescue answer when flagged)."""
    extra = 1 if pipeline.rescue is not None else 2
    return sum(2 + extra * bool(row["flagged"]) for row in rows) / len(rows)
