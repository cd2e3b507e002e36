"""Exceptions that name the file (or model) and the problem."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: the message always names the file and, where known, the row or id."""

    def __init__(self, path: str | Path | None, problem: str, *, item: str | None = None):
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.item = item
        where = str(self.path) if self.path is not None else "<in-memory>"
        if item is not None:
            where = f"{where} [{item}]"
        super().__init__(f"{where}: {problem}")


class UnsupportedModelError(ValueError):
    """A model whose architecture has no adapter."""
