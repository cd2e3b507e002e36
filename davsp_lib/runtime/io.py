"""Atomic file writes and strict readers for JSON, CSV and text, and the artifact file pair.

An artifact (a harmfulness vector, a visual safety prompt) is ``NAME.safetensors`` plus
``NAME.json``: the JSON's ``format``, its own fields, the tensor file's sha256 and free
``metadata`` (:func:`write_artifact`, :func:`read_artifact`).

Every writer goes through a temporary file in the destination folder and ``os.replace``,
so a crash never leaves a half-written artifact and never clobbers a finished one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from davsp_lib.runtime.errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; keep the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file; missing, unreadable or non-UTF-8 files raise :class:`DataError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, expected a file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            path, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    if not text.strip():
        raise DataError(path, "file is empty")
    return text


def read_json(path: str | Path) -> Any:
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            path, f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def read_csv_rows(path: str | Path, required: list[str]) -> list[dict[str, str]]:
    """Read a CSV with a header; missing columns raise, ragged rows come back with ``None`` values.

    Each row dict carries ``__line__`` (1-based line in the file) so that callers can name the
    row in errors and skip reports.
    """
    path = Path(path)
    text = read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="__extra__")
    header = reader.fieldnames or []
    missing = [column for column in required if column not in header]
    if missing:
        raise DataError(path, f"missing CSV column(s) {missing}; header is {header}")
    rows = []
    for row in reader:
        row["__line__"] = str(reader.line_num)
        rows.append(row)
    return rows


def artifact_paths(path: str | Path) -> tuple[Path, Path]:
    """The ``(.safetensors, .json)`` pair for ``path`` (its suffix, if any, is replaced)."""
    path = Path(path)
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def write_artifact(
    path: str | Path,
    tensors: dict[str, Any],
    *,
    format: str,
    fields: dict[str, Any],
    metadata: dict[str, Any],
) -> tuple[Path, Path]:
    """Write ``path.safetensors`` then ``path.json`` (each atomically).

    The JSON is ``{"format", **fields, "tensors": {file, sha256}, "metadata"}``: the sha256
    catches a pair from two different saves (or an edited tensor file) on load.
    """
    from safetensors.torch import save as to_bytes

    tensor_path, json_path = artifact_paths(path)
    json.dumps(metadata)  # fail before writing anything if metadata is not JSON-safe
    data = to_bytes(tensors, metadata={"format": format})
    atomic_write_bytes(tensor_path, data)
    header = {
        "format": format,
        **fields,
        "tensors": {"file": tensor_path.name, "sha256": hashlib.sha256(data).hexdigest()},
        "metadata": metadata,
    }
    atomic_write_json(json_path, header)
    return tensor_path, json_path


def read_artifact(path: str | Path, *, format: str, what: str) -> tuple[dict[str, Any], dict]:
    """The ``(header, tensors)`` of an artifact written by :func:`write_artifact`.

    A missing or unreadable file, another ``format``, an unreadable tensor file or a sha256
    that differs from the header's raise :class:`DataError` naming the file; ``what`` names
    the artifact in those messages. The caller checks its own fields and tensors.
    """
    from safetensors.torch import load as from_bytes

    tensor_path, json_path = artifact_paths(path)
    if not json_path.exists():
        raise DataError(
            json_path,
            f"{what} metadata file not found (an artifact is the .safetensors + .json pair "
            "its save writes)",
        )
    header = read_json(json_path)
    if not isinstance(header, dict) or header.get("format") != format:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise DataError(json_path, f"not a {what} (format {found!r}, expected {format!r})")
    recorded = header.get("tensors", {})
    if not isinstance(recorded, dict):
        raise DataError(json_path, "'tensors' must be an object with the tensor file's sha256")
    try:
        data = tensor_path.read_bytes()
    except FileNotFoundError:
        raise DataError(tensor_path, f"{what} tensor file not found") from None
    except OSError as exc:
        raise DataError(tensor_path, f"cannot read file ({exc.strerror})") from None
    expected = recorded.get("sha256")
    differs = expected is not None and hashlib.sha256(data).hexdigest() != expected
    try:
        tensors = from_bytes(data)
    except Exception as exc:  # safetensors raises its own error types for any malformed header
        also = f"; its sha256 also differs from the one recorded in {json_path.name}"
        raise DataError(
            tensor_path, f"not a readable safetensors file ({exc}){also if differs else ''}"
        ) from None
    if differs:
        raise DataError(
            tensor_path,
            f"sha256 differs from the one recorded in {json_path.name}: the pair comes from "
            "different saves or the tensor file was modified",
        )
    return header, tensors
