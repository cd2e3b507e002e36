"""Tests for davsp_lib.runtime.readme_figures (``davsp figures --from RUN``) on a fake run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from davsp_lib.runtime import readme_figures as rf
from davsp_lib.runtime.cli import main

SPECS = (
    rf.FigureSpec("01_harmfulness_vector", "projections", "projection histograms"),
    rf.FigureSpec("03_evaluation", "rsr_utility", "RSR bars"),
)


def _fake_run(root: Path, *, noisy: bool = False, run_json: bool = True) -> Path:
    run = root / "run"
    rng = np.random.default_rng(0)
    for spec in SPECS:
        path = run / spec.source
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (
            rng.integers(0, 256, (600, 800, 4), dtype=np.uint8)
            if noisy
            else np.full((60, 80, 4), 255, dtype=np.uint8)
        )
        Image.fromarray(pixels, "RGBA").save(path)
        (run / spec.notebook).mkdir(parents=True, exist_ok=True)
        results = {"headline": f"headline of {spec.notebook}", "parameters": {"model": "tiny"}}
        (run / spec.notebook / "results.json").write_text(json.dumps(results))
    if run_json:
        (run / "run.json").write_text(json.dumps({"preset": "embedded", "steps": []}))
    return run


def test_collect_copies_figures_and_writes_the_manifest(tmp_path):
    run = _fake_run(tmp_path)
    manifest = rf.collect(run, tmp_path / "figures", specs=SPECS, commit="abc1234")
    assert [f["file"] for f in manifest["figures"]] == ["01_projections.png", "03_rsr_utility.png"]
    assert manifest["preset"] == "embedded" and manifest["commit"] == "abc1234"
    first = manifest["figures"][0]
    assert first["headline"] == "headline of 01_harmfulness_vector"
    assert first["model"] == "tiny" and first["embedded_stand_in"] is True
    assert first["pixels"] == [80, 60]
    with Image.open(tmp_path / "figures" / "01_projections.png") as image:
        assert image.mode == "RGB" and image.size == (80, 60)
    on_disk = json.loads((tmp_path / "figures" / "manifest.json").read_text())
    assert on_disk == manifest
    text = (tmp_path / "figures" / "README.md").read_text()
    assert "embedded stand-in" in text and "`abc1234`" in text
    assert "headline of 03_evaluation" in text


def test_large_figures_are_downscaled_under_the_limit_deterministically(tmp_path):
    run = _fake_run(tmp_path, noisy=True)
    a = rf.collect(run, tmp_path / "a", specs=SPECS, max_bytes=150_000)
    b = rf.collect(run, tmp_path / "b", specs=SPECS, max_bytes=150_000)
    for figure in a["figures"]:
        data = (tmp_path / "a" / figure["file"]).read_bytes()
        assert len(data) <= 150_000
        assert figure["pixels"][0] < 800
        assert data == (tmp_path / "b" / figure["file"]).read_bytes()
    assert [f["sha256"] for f in a["figures"]] == [f["sha256"] for f in b["figures"]]


def test_missing_figure_is_an_error_naming_the_file(tmp_path):
    run = _fake_run(tmp_path)
    (run / SPECS[1].source).unlink()
    with pytest.raises(FileNotFoundError, match=r"03_evaluation/rsr_utility\.png"):
        rf.collect(run, tmp_path / "figures", specs=SPECS)
    assert not (tmp_path / "figures" / "manifest.json").exists()


def test_allow_missing_skips_and_lists_the_file(tmp_path):
    run = _fake_run(tmp_path, run_json=False)
    (run / SPECS[1].source).unlink()
    manifest = rf.collect(run, tmp_path / "figures", specs=SPECS, allow_missing=True)
    assert [f["file"] for f in manifest["figures"]] == ["01_projections.png"]
    assert manifest["skipped"] == ["figures/03_evaluation/rsr_utility.png"]
    assert manifest["preset"] is None and manifest["run_json"] is False
    assert "no run.json" in (tmp_path / "figures" / "README.md").read_text()


def test_unreadable_png_names_the_file(tmp_path):
    run = _fake_run(tmp_path)
    (run / SPECS[0].source).write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"01_harmfulness_vector/projections\.png"):
        rf.collect(run, tmp_path / "figures", specs=SPECS)


def test_cli_reports_a_missing_figure_and_exits_2(tmp_path, capsys):
    run = _fake_run(tmp_path)
    code = main(["figures", "--from", str(run), "--out", str(tmp_path / "figures")])
    assert code == 2
    error = capsys.readouterr().err
    assert "davsp figures: error:" in error and "pca_layers.png" in error


def test_default_selection_names_distinct_targets():
    targets = [spec.target for spec in rf.README_FIGURES]
    assert len(set(targets)) == len(targets)
    assert "03_defended_inputs.png" in targets and "04_alpha_sweep.png" in targets


def test_a_figure_that_fits_as_a_palette_keeps_its_size(tmp_path):
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, (200, 3), dtype=np.uint8)
    image = Image.fromarray(colours[rng.integers(0, 200, (300, 400))], "RGB")
    as_rgb, as_palette = len(rf._png(image)), len(rf._png(rf.palette(image)))
    assert as_palette < as_rgb  # the case under test
    limit = (as_rgb + as_palette) // 2
    data = rf.encode_png(image, limit)
    with Image.open(io.BytesIO(data)) as written:
        assert written.size == (400, 300) and written.mode == "P"
    assert len(data) <= limit
    assert rf.encode_png(image, as_rgb) == rf._png(image)  # fits as is: RGB, untouched
