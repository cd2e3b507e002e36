"""Shared fixtures: the benchmark mirror, and a private render cache for every test."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

# Tests never reach a model hub: an accidental hub lookup fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def mirror_root() -> Path:
    """``$DAVSP_DATA_ROOT``, else ``../shared/data`` beside the project folder."""
    configured = os.environ.get("DAVSP_DATA_ROOT")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark mirror root; tests that need it skip where it is absent."""
    root = mirror_root()
    if not (root / "figstep").is_dir():
        pytest.skip(f"benchmark mirror not found at {root} (set DAVSP_DATA_ROOT)")
    return root


@pytest.fixture(autouse=True)
def _private_render_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep rendered images out of the user's ~/.cache during tests."""
    monkeypatch.setenv("DAVSP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "render-cache"))


def embedded_tiny_or_skip(dtype: str = "float32"):
    """The embedded ``tiny`` adapter, or a skip where the ``[tiny]`` extra is not installed.

    float32 unless asked: these tests compare paths (batched / per sample, cached / uncached)
    to float32 rounding; the bfloat16 default is tested in ``test_embedded_model.py``.
    """
    from davsp_lib.models.embedded.reader import find_weights
    from davsp_lib.models.embedded.weights import SOURCES, MissingPartError

    try:
        SOURCES["tiny"].part_paths()
        find_weights()
    except (MissingPartError, FileNotFoundError) as error:
        pytest.skip(f"embedded model not installed: {error}")
    from davsp_lib.models.adapters import load_adapter

    return load_adapter("tiny", dtype=dtype)


@pytest.fixture(scope="module")
def llava():
    """The tiny random LLaVA (seed 0), built once per test module."""
    from davsp_lib.models.adapters.tiny import build_tiny_llava

    return build_tiny_llava(seed=0)


def mixed_records(n_malicious: int, n_benign: int, as_figstep: list[tuple[str, int]]) -> list:
    """The first built-in text records of each label, with ``(label, index)`` picks of them
    also rendered as FigStep images: ``(malicious, benign, images)`` for a fixture to order."""
    from davsp_lib.data.datasets import as_image_attack, load_builtin

    text = load_builtin("text")
    malicious = [r for r in text if r.is_malicious][:n_malicious]
    benign = [r for r in text if not r.is_malicious][:n_benign]
    picks = [(malicious if label == "malicious" else benign)[i] for label, i in as_figstep]
    return [malicious, benign, list(as_image_attack(picks, "figstep"))]


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
