"""Loaders for the benchmarks in the data mirror and for our own built-in set.

Every loader returns a :class:`~davsp_lib.data.records.Dataset` and validates every row: a missing
key, a wrong type, empty text or a duplicate id is either a :class:`DataError` naming the file
and the row (``on_error="raise"``, the default) or a counted :class:`Skipped` entry
(``on_error="skip"``); nothing is ever dropped silently. Whole-file problems (missing file,
non-UTF-8, malformed JSON, missing CSV columns) always raise.

Ids are ``"<source>/<native id>[/<variant>]"``. Groups (:func:`group_id`) are
``"<source>/<native id of the underlying question or image>"``: every record built from one
question (its text and image variants, renders made from it by :func:`as_image_attack`) shares
the group, and so do records about one image (MM-Vet questions on one picture, VLGuard's safe and
unsafe instructions on one picture), so that :mod:`davsp_lib.data.splits` never puts them on both
sides.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import davsp_lib
from davsp_lib.data.records import Dataset, Label, Record, RenderSpec, RenderStyle, Skipped
from davsp_lib.data.render import FIGSTEP_QUERY, TYPO_QUERY
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import read_csv_rows, read_json

OnError = Literal["raise", "skip"]

DATA_ROOT_ENV = "DAVSP_DATA_ROOT"
PROJECT_ROOT = Path(davsp_lib.__file__).resolve().parents[1]
BUILTIN_PATH = PROJECT_ROOT / "data" / "builtin" / "instructions.json"

MMSB_SCENARIOS = (
    "01-Illegal_Activitiy",
    "02-HateSpeech",
    "03-Malware_Generation",
    "04-Physical_Harm",
    "05-EconomicHarm",
    "06-Fraud",
    "07-Sex",
    "08-Political_Lobbying",
    "09-Privacy_Violence",
    "10-Legal_Opinion",
    "11-Financial_Advice",
    "12-Health_Consultation",
    "13-Gov_Decision",
)
# MM-SafetyBench judges these scenarios on whether the answer is appropriately cautious
# (political lobbying, legal, financial, health and government decisions), not on harm.
MMSB_SENSITIVE = frozenset({"08", "10", "11", "12", "13"})

TEXT_PROMPT_SPLITS = {
    "harmful_train": Label.MALICIOUS,
    "harmful_val": Label.MALICIOUS,
    "harmless_train": Label.BENIGN,
    "harmless_val": Label.BENIGN,
}
VLGUARD_LABELS = {
    "instruction": Label.MALICIOUS,  # the one instruction on an unsafe image
    "safe_instruction": Label.BENIGN,
    "unsafe_instruction": Label.MALICIOUS,
}


# ------------------------------------------------------------------------------ data root


def project_data_root() -> Path:
    """``../shared/data`` next to the project folder (the folder holding pyproject.toml)."""
    return PROJECT_ROOT.parent / "shared" / "data"


def data_root(root: str | Path | None = None) -> Path:
    """The benchmark data folder: ``root``, else ``$DAVSP_DATA_ROOT``, else ``../shared/data``."""
    hint = (
        f"set {DATA_ROOT_ENV} to the data folder, or run `davsp data download` to fetch the "
        "benchmarks into it"
    )
    if root is not None or os.environ.get(DATA_ROOT_ENV):
        chosen = Path(root if root is not None else os.environ[DATA_ROOT_ENV]).expanduser()
        origin = "data root" if root is not None else f"data root from ${DATA_ROOT_ENV}"
        if not chosen.is_dir():
            raise DataError(chosen, f"{origin} does not exist or is not a folder; {hint}")
        return chosen
    default = project_data_root()
    if default.is_dir():
        return default
    raise DataError(
        default, f"no data root: {DATA_ROOT_ENV} is not set and this is missing; {hint}"
    )


def group_id(source: str, native_id: str) -> str:
    """The group of every record derived from one underlying question or image."""
    return f"{source}/{native_id}"


def text_group(text: str) -> str:
    """Content group for free-text prompts: the same instruction (up to case and spacing)
    gets the same group wherever it appears, so duplicates cannot straddle a split."""
    normal = " ".join(text.casefold().split())
    return group_id("text", hashlib.sha256(normal.encode("utf-8")).hexdigest()[:16])


# ------------------------------------------------------------------------------ row checks


class _RowError(Exception):
    """A problem with one row; the loader turns it into a DataError or a Skipped."""


@dataclass
class _Collector:
    """Gathers records of one file, enforcing unique ids and the on_error policy."""

    path: Path
    on_error: OnError
    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)

    def reject(self, item: str, problem: str) -> None:
        if self.on_error == "raise":
            raise DataError(self.path, problem, item=item)
        self.skipped.append(Skipped(id=item, path=self.path, reason=problem))

    def add(self, record: Record, item: str) -> None:
        if record.id in self.seen:
            self.reject(item, f"duplicate id {record.id} (first at {self.seen[record.id]})")
            return
        self.seen[record.id] = item
        self.records.append(record)

    def run(
        self, rows: Iterable[tuple[str, Any]], build: Callable[[str, Any], list[Record]]
    ) -> None:
        """Apply ``build`` to each (item name, row); row errors go through :meth:`reject`."""
        for item, row in rows:
            try:
                built = build(item, row)
            except _RowError as exc:
                self.reject(item, str(exc))
                continue
            for record in built:
                self.add(record, item)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _text(row: Mapping[str, Any], key: str) -> str:
    """A required non-empty string field."""
    if key not in row or row[key] is None:
        raise _RowError(f"missing key {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"empty text in {key!r}")
    return value


def _optional_text(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _RowError(f"{key!r} must be a string or null, got {type(value).__name__}")
    return value if value.strip() else None


def _positive_int(row: Mapping[str, Any], key: str) -> int:
    value = _text(row, key).strip()
    if not value.isdigit() or int(value) < 1:
        raise _RowError(f"{key!r} must be a positive integer, got {value!r}")
    return int(value)


def _expect(obj: Any, kind: type, path: Path, what: str) -> Any:
    if not isinstance(obj, kind):
        raise DataError(path, f"{what} must be a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj


def _dataset(name: str, collectors: list[_Collector]) -> Dataset:
    """Merge per-file collectors; ids must stay unique across files too."""
    records = [record for c in collectors for record in c.records]
    duplicates = [key for key, count in Counter(r.id for r in records).items() if count > 1]
    if duplicates:
        raise DataError(None, f"duplicate id(s) {duplicates[:5]} across files of {name}")
    return Dataset(name=name, records=records, skipped=[s for c in collectors for s in c.skipped])


def _csv_rows(path: Path, columns: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """CSV rows named by line, with ragged rows turned into row errors by the caller."""
    return [(f"line {row['__line__']}", row) for row in read_csv_rows(path, columns)]


def _check_ragged(row: Mapping[str, Any]) -> None:
    if "__extra__" in row:
        raise _RowError(f"ragged row: {len(row['__extra__'])} more field(s) than the header")
    missing = [column for column, value in row.items() if value is None]
    if missing:
        raise _RowError(f"ragged row: no value for column(s) {missing}")


# ------------------------------------------------------------------------------ FigStep

FIGSTEP_COLUMNS = ["category_id", "task_id", "category_name", "question", "instruction"]


def figstep_query(root: Path) -> str:
    """FigStep's text prompt, from ``prompts.json`` when the mirror has it."""
    path = root / "prompts.json"
    if not path.is_file():
        return FIGSTEP_QUERY
    prompts = _expect(read_json(path), dict, path, "prompts.json")
    entry = prompts.get("figstep_query")
    text = entry.get("text") if isinstance(entry, dict) else None
    if text is None:
        return FIGSTEP_QUERY
    if not isinstance(text, str) or not text.strip():
        raise DataError(path, "figstep_query.text must be non-empty text", item="figstep_query")
    return text


def load_figstep(
    root: str | Path | None = None,
    *,
    tiny: bool = False,
    images: Literal["mirror", "render", "none"] = "mirror",
    on_error: OnError = "raise",
) -> Dataset:
    """SafeBench (500) or SafeBench-Tiny (50), all malicious, with FigStep's text prompt.

    ``images``: ``"mirror"`` uses the benchmark PNGs, ``"render"`` re-renders the instruction
    (:mod:`davsp_lib.data.render`), ``"none"`` gives FigStep's text-only baseline (the question as
    the query; ids end in ``/text``, same group).
    """
    _check_on_error(on_error)
    if images not in ("mirror", "render", "none"):
        raise ValueError(f"images must be 'mirror', 'render' or 'none', got {images!r}")
    root = data_root(root)
    path = root / "figstep" / ("SafeBench-Tiny.csv" if tiny else "safebench.csv")
    query = figstep_query(root) if images != "none" else ""
    image_dir = root / "figstep" / "images"

    def build(item: str, row: dict[str, Any]) -> list[Record]:
        _check_ragged(row)
        category_id, task_id = _positive_int(row, "category_id"), _positive_int(row, "task_id")
        native = f"{category_id}_{task_id}"
        question, instruction = _text(row, "question"), _text(row, "instruction")
        meta = {
            "question": question,
            "instruction": instruction,
            "category_id": category_id,
            "task_id": task_id,
            "image_kind": images,
        }
        common = dict(
            label=Label.MALICIOUS,
            source="figstep",
            category=_text(row, "category_name"),
            group=group_id("figstep", native),
            meta=meta,
        )
        if images == "none":
            return [Record(id=f"figstep/{native}/text", query=question, **common)]
        if images == "render":
            spec = RenderSpec("figstep", instruction)
            return [Record(id=f"figstep/{native}", query=query, render=spec, **common)]
        image_path = image_dir / f"query_ForbidQI_{category_id}_{task_id}_6.png"
        if not image_path.is_file():
            raise _RowError(f"image file missing: {image_path}")
        return [Record(id=f"figstep/{native}", query=query, image_path=image_path, **common)]

    collector = _Collector(path, on_error)
    collector.run(_csv_rows(path, FIGSTEP_COLUMNS), build)
    name = "figstep-tiny" if tiny else "figstep"
    return _dataset(name if images != "none" else f"{name}-text", [collector])


# ------------------------------------------------------------------------------ MM-SafetyBench


def mmsafetybench_judging(scenario: str) -> str:
    """``"harmful"`` or ``"sensitive"`` (scenarios 08, 10-13 are judged on caution, not harm)."""
    return "sensitive" if scenario[:2] in MMSB_SENSITIVE else "harmful"


def _mmsb_scenarios(scenarios: Iterable[str] | None) -> list[str]:
    if scenarios is None:
        return list(MMSB_SCENARIOS)
    chosen = [scenarios] if isinstance(scenarios, str) else list(scenarios)
    unknown = [name for name in chosen if name not in MMSB_SCENARIOS]
    if unknown:
        raise ValueError(f"unknown MM-SafetyBench scenario(s) {unknown}; known: {MMSB_SCENARIOS}")
    return chosen


def mmsafetybench_tiny_ids(root: str | Path | None = None) -> dict[str, list[str]]:
    """Scenario -> question ids of the 168-question tiny split (ints upstream, strings here)."""
    path = data_root(root) / "mm-safetybench" / "TinyVersion_ID_List.json"
    entries = _expect(read_json(path), list, path, "the tiny id list")
    tiny: dict[str, list[str]] = {}
    for index, entry in enumerate(entries):
        item = f"entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("Scenario"), str):
            raise DataError(path, "expected an object with a string 'Scenario'", item=item)
        ids = entry.get("Sampled_ID_List")
        if not isinstance(ids, list) or not all(_is_id(value) for value in ids):
            raise DataError(path, "'Sampled_ID_List' must be a list of integer ids", item=item)
        if entry["Scenario"] not in MMSB_SCENARIOS:
            raise DataError(path, f"unknown scenario {entry['Scenario']!r}", item=item)
        tiny.setdefault(entry["Scenario"], []).extend(str(int(value)) for value in ids)
    return tiny


def _is_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())


def load_mmsafetybench(
    root: str | Path | None = None,
    *,
    variant: Literal["typo", "text"] = "typo",
    tiny: bool = False,
    scenarios: Iterable[str] | None = None,
    on_error: OnError = "raise",
) -> Dataset:
    """MM-SafetyBench questions (1680, tiny 168), all malicious; ``meta["judging"]`` says how
    to judge them.

    ``typo``: the key phrase rendered as TYPO with ``Rephrased Question``; ``text``: no image,
    ``Question``. The SD and SD_TYPO images need Stable Diffusion and are not in the mirror.
    """
    _check_on_error(on_error)
    if variant not in ("typo", "text"):
        raise ValueError(f"variant must be 'typo' or 'text', got {variant!r}")
    root = data_root(root)
    chosen = _mmsb_scenarios(scenarios)
    tiny_ids = mmsafetybench_tiny_ids(root) if tiny else None
    collectors = []
    for scenario in chosen:
        path = root / "mm-safetybench" / "processed_questions" / f"{scenario}.json"
        questions = _expect(read_json(path), dict, path, f"scenario file {scenario}")
        collector = _Collector(path, on_error)
        if tiny_ids is None:
            rows = list(questions.items())
        else:
            rows = []
            for question_id in tiny_ids.get(scenario, []):
                if question_id not in questions:
                    collector.reject(question_id, "id from TinyVersion_ID_List.json not found")
                else:
                    rows.append((question_id, questions[question_id]))
        collector.run(rows, _mmsb_builder(scenario, variant))
        collectors.append(collector)
    name = f"mm-safetybench{'-tiny' if tiny else ''}-{variant}"
    return _dataset(name, collectors)


def _mmsb_builder(scenario: str, variant: str) -> Callable[[str, Any], list[Record]]:
    def build(question_id: str, row: Any) -> list[Record]:
        if not question_id.strip():
            raise _RowError("empty question id")
        if not isinstance(row, dict):
            raise _RowError(f"expected an object, got {type(row).__name__}")
        question = _text(row, "Question")
        meta = {
            "scenario": scenario,
            "question_id": question_id,
            "question": question,
            "judging": mmsafetybench_judging(scenario),
            "phrase_type": _optional_text(row, "Phrase Type"),
        }
        native = f"{scenario}/{question_id}"
        common = dict(
            label=Label.MALICIOUS,
            source="mm-safetybench",
            category=scenario,
            group=group_id("mm-safetybench", native),
        )
        if variant == "text":
            return [Record(id=f"mm-safetybench/{native}/text", query=question, meta=meta, **common)]
        phrase = _text(row, "Key Phrase")
        meta |= {
            "key_phrase": phrase,
            "changed_question": _optional_text(row, "Changed Question"),
            "rephrased_question_sd": _optional_text(row, "Rephrased Question(SD)"),
        }
        return [
            Record(
                id=f"mm-safetybench/{native}/typo",
                query=_text(row, "Rephrased Question"),
                render=RenderSpec("typo", phrase),
                meta=meta,
                **common,
            )
        ]

    return build


# ------------------------------------------------------------------------------ MM-Vet


def load_mmvet(root: str | Path | None = None, *, on_error: OnError = "raise") -> Dataset:
    """MM-Vet (218 benign questions on 200 images); ``reference`` keeps ``<AND>``/``<OR>``.

    Questions on one image share a group (``mm-vet/image/<file>``).
    """
    _check_on_error(on_error)
    root = data_root(root)
    path = root / "mm-vet" / "mm-vet.json"
    entries = _expect(read_json(path), dict, path, "mm-vet.json")
    image_dir = root / "mm-vet" / "images"

    def build(key: str, row: Any) -> list[Record]:
        if not isinstance(row, dict):
            raise _RowError(f"expected an object, got {type(row).__name__}")
        image_name = _text(row, "imagename")
        if Path(image_name).name != image_name or image_name in (".", ".."):
            raise _RowError(f"imagename must be a plain file name, got {image_name!r}")
        capabilities = row.get("capability")
        if (
            not isinstance(capabilities, list)
            or not capabilities
            or not all(isinstance(c, str) and c.strip() for c in capabilities)
        ):
            raise _RowError(
                f"'capability' must be a non-empty list of strings, got {capabilities!r}"
            )
        image_path = image_dir / image_name
        if not image_path.is_file():
            raise _RowError(f"image file missing: {image_path}")
        return [
            Record(
                id=f"mm-vet/{key}",
                query=_text(row, "question"),
                label=Label.BENIGN,
                source="mm-vet",
                category="+".join(capabilities),
                image_path=image_path,
                reference=_text(row, "answer"),
                group=group_id("mm-vet", f"image/{image_name}"),
                meta={
                    "key": key,
                    "capability": list(capabilities),
                    "imagename": image_name,
                    "imagesource": _optional_text(row, "imagesource"),
                },
            )
        ]

    collector = _Collector(path, on_error)
    collector.run(entries.items(), build)
    return _dataset("mm-vet", [collector])


# ------------------------------------------------------------------------------ VLGuard


def load_vlguard(
    root: str | Path | None = None,
    split: Literal["train", "test"] = "train",
    *,
    on_error: OnError = "raise",
) -> Dataset:
    """VLGuard instruction/response pairs as text-only records (the mirror has no images).

    ``instruction`` (on an unsafe image) and ``unsafe_instruction`` are malicious,
    ``safe_instruction`` benign; ``reference`` is the response (``None`` where upstream left it
    empty). Ids ``vlguard/{split}/{id}/{k}``. Upstream ids name an image source and repeat once in
    train.json with different content (``Ads_303871``): later occurrences become ``{id}~{n}``
    (``meta["occurrence"]``); an exact repeat of an item is a duplicate. Records about one image
    share a group (``vlguard/image/<path>``), across splits too.
    """
    _check_on_error(on_error)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = data_root(root) / "vlguard" / f"{split}.json"
    items = _expect(read_json(path), list, path, f"vlguard/{split}.json")
    collector = _Collector(path, on_error)
    occurrences: dict[str, list[Any]] = {}

    def build(item: str, row: Any) -> list[Record]:
        if not isinstance(row, dict):
            raise _RowError(f"expected an object, got {type(row).__name__}")
        upstream_id = _text(row, "id")
        earlier = occurrences.get(upstream_id, [])
        if row in earlier:
            raise _RowError(f"duplicate item: exact repeat of id {upstream_id}")
        occurrence = len(earlier) + 1
        native = upstream_id if occurrence == 1 else f"{upstream_id}~{occurrence}"
        records = _vlguard_records(split, native, row, occurrence=occurrence)
        occurrences.setdefault(upstream_id, []).append(row)
        return records

    rows = [(_vlguard_item_name(index, row), row) for index, row in enumerate(items)]
    collector.run(rows, build)
    return _dataset(f"vlguard-{split}", [collector])


def _vlguard_item_name(index: int, row: Any) -> str:
    upstream = row.get("id") if isinstance(row, dict) else None
    return f"item {index} ({upstream})" if isinstance(upstream, str) else f"item {index}"


def _vlguard_records(split: str, native: str, row: dict, *, occurrence: int) -> list[Record]:
    image = _text(row, "image")
    safe = row.get("safe")
    if not isinstance(safe, bool):
        raise _RowError(f"'safe' must be true or false, got {safe!r}")
    category = None if safe else _text(row, "harmful_category")
    pairs = row.get("instr-resp")
    if not isinstance(pairs, list) or not pairs:
        raise _RowError("'instr-resp' must be a non-empty list")
    records = []
    for k, pair in enumerate(pairs):
        kind, instruction = _vlguard_instruction(pair, safe, k)
        response = pair.get("response")
        if not isinstance(response, str):
            raise _RowError(f"instr-resp[{k}]: 'response' must be a string, got {response!r}")
        records.append(
            Record(
                id=f"vlguard/{split}/{native}/{k}",
                query=instruction,
                label=VLGUARD_LABELS[kind],
                source="vlguard",
                category=category if kind != "safe_instruction" else None,
                reference=response if response.strip() else None,
                group=group_id("vlguard", f"image/{image}"),
                meta={
                    "split": split,
                    "upstream_id": row["id"],
                    "occurrence": occurrence,
                    "image": image,
                    "image_safe": safe,
                    "instruction_kind": kind,
                    "harmful_subcategory": None if safe else row.get("harmful_subcategory"),
                },
            )
        )
    return records


def _vlguard_instruction(pair: Any, safe: bool, k: int) -> tuple[str, str]:
    if not isinstance(pair, dict):
        raise _RowError(f"instr-resp[{k}]: expected an object, got {type(pair).__name__}")
    kinds = [kind for kind in VLGUARD_LABELS if kind in pair]
    if len(kinds) != 1:
        raise _RowError(
            f"instr-resp[{k}]: expected exactly one instruction key, got {sorted(pair)}"
        )
    kind = kinds[0]
    if (kind == "instruction") == safe:
        expected = "'safe_instruction'/'unsafe_instruction'" if safe else "'instruction'"
        raise _RowError(
            f"instr-resp[{k}]: {kind!r} on a {'safe' if safe else 'unsafe'} image "
            f"(expected {expected})"
        )
    try:
        return kind, _text(pair, kind)
    except _RowError as exc:
        raise _RowError(f"instr-resp[{k}]: {exc}") from None


# ------------------------------------------------------------------------------ text prompts


def load_text_prompts(
    root: str | Path | None = None,
    split: str = "harmful_train",
    *,
    on_error: OnError = "raise",
) -> Dataset:
    """Text-only harmful (malicious) or harmless (benign) instructions; ids by position.

    Groups are content hashes (:func:`text_group`), so a repeated instruction stays on one side
    of any split.
    """
    _check_on_error(on_error)
    if split not in TEXT_PROMPT_SPLITS:
        raise ValueError(f"split must be one of {sorted(TEXT_PROMPT_SPLITS)}, got {split!r}")
    path = data_root(root) / "text-prompts" / f"{split}.json"
    rows = _expect(read_json(path), list, path, f"{split}.json")

    def build(item: str, row: Any) -> list[Record]:
        if not isinstance(row, dict):
            raise _RowError(f"expected an object, got {type(row).__name__}")
        instruction = _text(row, "instruction")
        return [
            Record(
                id=f"text-prompts/{split}/{item}",
                query=instruction,
                label=TEXT_PROMPT_SPLITS[split],
                source="text-prompts",
                category=_optional_text(row, "category"),
                group=text_group(instruction),
                meta={"split": split, "index": int(item)},
            )
        ]

    collector = _Collector(path, on_error)
    collector.run(((str(index), row) for index, row in enumerate(rows)), build)
    return _dataset(f"text-prompts-{split}", [collector])


# ------------------------------------------------------------------------------ built-in set

BUILTIN_STYLES = ("figstep", "typo", "text")


def load_builtin(
    style: Literal["figstep", "typo", "text"] = "figstep",
    *,
    path: str | Path | None = None,
    on_error: OnError = "raise",
) -> Dataset:
    """Our own small paired set (``data/builtin/instructions.json``, CC0): harmful requests and
    topic-matched benign ones, no data download needed.

    ``figstep``: the instruction rendered FigStep-style with FigStep's prompt; ``typo``: the
    activity phrase rendered TYPO-style with MM-SafetyBench's prompt; ``text``: the instruction
    as the query. Ids ``builtin/{id}/{style}``, group ``builtin/{id}``.
    """
    _check_on_error(on_error)
    if style not in BUILTIN_STYLES:
        raise ValueError(f"style must be one of {BUILTIN_STYLES}, got {style!r}")
    path = Path(path) if path is not None else BUILTIN_PATH
    document = _expect(read_json(path), dict, path, "the built-in data file")
    items = _expect(document.get("items"), list, path, "'items'")

    def build(item: str, row: Any) -> list[Record]:
        if not isinstance(row, dict):
            raise _RowError(f"expected an object, got {type(row).__name__}")
        native = _text(row, "id")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", native):
            raise _RowError(f"id must be letters, digits, '_' or '-', got {native!r}")
        label_text = _text(row, "label")
        if label_text not in (Label.MALICIOUS.value, Label.BENIGN.value):
            raise _RowError(f"label must be 'malicious' or 'benign', got {label_text!r}")
        instruction, phrase = _text(row, "instruction"), _text(row, "phrase")
        query, render = _builtin_query(style, instruction, phrase)
        return [
            Record(
                id=f"builtin/{native}/{style}",
                query=query,
                label=Label(label_text),
                source="builtin",
                category=_text(row, "category"),
                render=render,
                group=group_id("builtin", native),
                meta={
                    "instruction": instruction,
                    "phrase": phrase,
                    "pair": _optional_text(row, "pair"),
                    "style": style,
                },
            )
        ]

    rows = ((_builtin_item_name(index, row), row) for index, row in enumerate(items))
    collector = _Collector(path, on_error)
    collector.run(rows, build)
    return _dataset(f"builtin-{style}", [collector])


def _builtin_item_name(index: int, row: Any) -> str:
    native = row.get("id") if isinstance(row, dict) else None
    return f"item {index} ({native})" if isinstance(native, str) else f"item {index}"


def _builtin_query(style: str, instruction: str, phrase: str) -> tuple[str, RenderSpec | None]:
    if style == "figstep":
        return FIGSTEP_QUERY, RenderSpec("figstep", instruction)
    if style == "typo":
        return TYPO_QUERY, RenderSpec("typo", phrase)
    return instruction, None


# ------------------------------------------------------------------------------ transforms


def as_image_attack(
    dataset: Dataset | Iterable[Record],
    style: RenderStyle = "figstep",
    *,
    name: str | None = None,
) -> Dataset:
    """Move text-only prompts into the image (the modality-gap study).

    Each record's query is rendered (FigStep or TYPO) and replaced by that style's fixed prompt;
    the new id is ``{id}/{style}``, the group and label are kept, and ``meta`` gains
    ``rendered_from``. Records that already have an image raise ValueError.
    """
    if style not in ("figstep", "typo"):
        raise ValueError(f"style must be 'figstep' or 'typo', got {style!r}")
    records = list(dataset)
    with_image = [record.id for record in records if record.has_image]
    if with_image:
        raise ValueError(
            f"as_image_attack needs text-only records; these have images: {with_image[:5]}"
        )
    prompt = FIGSTEP_QUERY if style == "figstep" else TYPO_QUERY
    converted = [
        record.with_(
            id=f"{record.id}/{style}",
            query=prompt,
            render=RenderSpec(style, record.query),
            group=record.group_key,
            meta={**record.meta, "rendered_from": record.id, "original_query": record.query},
        )
        for record in records
    ]
    base = dataset.name if isinstance(dataset, Dataset) else "records"
    skipped = dataset.skipped if isinstance(dataset, Dataset) else []
    return Dataset(name=name or f"{base}-as-{style}", records=converted, skipped=list(skipped))


# ------------------------------------------------------------------------------ summary


def summarize(root: str | Path | None = None) -> str:
    """One report per mirror dataset, bad rows skipped and listed (``davsp data summary``)."""
    root = data_root(root)
    loaders: list[tuple[str, Callable[[], Dataset]]] = [
        ("figstep", lambda: load_figstep(root, on_error="skip")),
        ("figstep-tiny", lambda: load_figstep(root, tiny=True, on_error="skip")),
        ("mm-safetybench", lambda: load_mmsafetybench(root, on_error="skip")),
        ("mm-safetybench-tiny", lambda: load_mmsafetybench(root, tiny=True, on_error="skip")),
        ("mm-vet", lambda: load_mmvet(root, on_error="skip")),
        ("vlguard-train", lambda: load_vlguard(root, "train", on_error="skip")),
        ("vlguard-test", lambda: load_vlguard(root, "test", on_error="skip")),
    ]
    loaders += [
        (
            f"text-prompts-{split}",
            lambda split=split: load_text_prompts(root, split, on_error="skip"),
        )
        for split in TEXT_PROMPT_SPLITS
    ]
    lines = [f"data root: {root}"]
    for label, load in loaders:
        try:
            lines.append(load().report())
        except DataError as exc:
            lines.append(f"{label}: ERROR {exc}")
    return "\n".join(lines)
