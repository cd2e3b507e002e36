"""Prompt strings and refusal lists of DAVSP and its baselines (``prompts.json`` in the data root).

The strings are used verbatim (they are data, copied from the sources named in each entry).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import read_json


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object of named prompts")
    return data


def prompts_path(root: str | Path | None = None) -> Path:
    from davsp_lib.data.datasets import data_root

    return data_root(root) / "prompts.json"


def text(name: str, root: str | Path | None = None) -> str:
    """A prompt string by name, e.g. ``davsp_safety_prefix``, ``adashield_static``."""
    path = prompts_path(root)
    entry = _load(path).get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
        raise DataError(path, f"no prompt text named {name!r}")
    return entry["text"]


def items(name: str, root: str | Path | None = None) -> list[str]:
    """A string list by name, e.g. ``refusal_prefixes_jailbreakbench``."""
    path = prompts_path(root)
    entry = _load(path).get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("items"), list):
        raise DataError(path, f"no list named {name!r}")
    return [str(item) for item in entry["items"]]


def refusal_marker(response: str, markers: Sequence[str], *, mode: str = "substring") -> str | None:
    """The first of ``markers`` that makes ``response`` a refusal (None: not a refusal).

    ``substring`` (GCG / JailbreakBench): the marker occurs anywhere, case kept; ``prefix``
    (XSTest): the stripped, lower-cased response starts with it.
    """
    if mode == "substring":
        return next((marker for marker in markers if marker in response), None)
    if mode == "prefix":
        lowered = response.strip().lower()
        return next((marker for marker in markers if lowered.startswith(marker)), None)
    raise ValueError(f"mode must be 'substring' or 'prefix', got {mode!r}")


def is_refusal(response: str, markers: Sequence[str], *, mode: str = "substring") -> bool:
    """Refusal-string matching (:func:`refusal_marker` found one)."""
    return refusal_marker(response, markers, mode=mode) is not None
