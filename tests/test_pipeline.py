"""The pipeline's pure parts (running notebooks is tested in test_notebooks.py)."""

from __future__ import annotations

import json

from davsp_lib.pipeline import PRESETS, StepResult, markdown_table, write_report


def test_markdown_table_columns_in_first_seen_order_and_escaped():
    lines = markdown_table({"none": {"RSR": "0", "a|b": 1}, "DAVSP": {"RSR": "100", "extra": "x"}})
    assert lines == [
        "| | RSR | a\\|b | extra |",
        "|---|---|---|---|",
        "| none | 0 | 1 |  |",
        "| DAVSP | 100 |  | x |",
    ]
    assert markdown_table({}) == []


def test_report_shows_each_notebooks_table(tmp_path):
    results = tmp_path / "03" / "results.json"
    results.parent.mkdir()
    table = {"no defense": {"RSR (n=2)": "0"}, "DAVSP": {"RSR (n=2)": "50"}}
    results.write_text(json.dumps({"headline": "h", "results": {"table": table}}))
    steps = [
        StepResult("03_evaluation.ipynb", "ok", 1.0, results_json=str(results), headline="h"),
        StepResult("04_intervention.ipynb", "skipped"),
    ]
    report = write_report(tmp_path, "smoke", steps).read_text()
    assert "## 03_evaluation.ipynb" in report
    assert "| DAVSP | 50 |" in report and "| no defense | 0 |" in report
    assert "| 04_intervention.ipynb | skipped |" in report
    # every report ends with the preset's recipe card
    assert "## Recipe card — preset `smoke` against the DAVSP reference" in report
    assert "| malicious output-loss p | 0.05 | 0 |" in report


def test_presets_name_only_existing_notebooks():
    from davsp_lib.pipeline import NOTEBOOK_DIR, discover

    stems = {path.stem for path in discover(NOTEBOOK_DIR)}
    for name, preset in PRESETS.items():
        assert set(preset) - {"common"} <= stems, name


def test_peak_rss_script_sees_memory_of_a_child_process():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "peak_rss.py"
    child = "import time; block = bytearray(256 * 2**20); time.sleep(1.5)"
    # the grandchild (python under sh) holds the memory: the whole tree is summed
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--every",
            "0.1",
            "--",
            "sh",
            "-c",
            f'"{sys.executable}" -c "{child}"; exit 3',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3  # the command's exit status is passed on
    peak = float(done.stderr.split("process tree ")[1].split(" GiB")[0])
    assert peak >= 0.25, done.stderr


def write_notebook(path, parameters: str, body: str) -> None:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    cell = new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[cell, new_code_cell(body)])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


def test_overrides_reach_every_notebook_that_declares_them_and_run_json(tmp_path):
    from davsp_lib.pipeline import run_pipeline

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    save = (
        "import json, pathlib\n"
        "pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(output_dir, 'results.json').write_text(json.dumps({'seen': {k: v for k, v "
        "in dict(globals()).items() if k in ('max_new_tokens', 'model', 'seed')}}))"
    )
    write_notebook(
        notebooks / "01_a.ipynb", "output_dir = ''\nmax_new_tokens = 4\nmodel = 'x'", save
    )
    write_notebook(notebooks / "02_b.ipynb", "output_dir = ''\nseed = 1", save)
    run_dir = tmp_path / "run"
    extra = {"max_new_tokens": 8, "model": "tiny"}
    run_pipeline(run_dir, preset="smoke", extra=extra, notebook_dir=notebooks, log=lambda _: None)

    seen = [
        json.loads((run_dir / s / "results.json").read_text())["seen"] for s in ("01_a", "02_b")
    ]
    assert seen == [{"max_new_tokens": 8, "model": "tiny"}, {"seed": 0}]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["overrides"] == {"max_new_tokens": 8, "model": "tiny"}
    assert manifest["steps"][0]["parameters"]["max_new_tokens"] == 8
    assert "max_new_tokens" not in manifest["steps"][1]["parameters"]


def test_an_override_no_notebook_declares_is_refused(tmp_path):
    import pytest

    from davsp_lib.pipeline import run_pipeline

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01_a.ipynb", "seed = 1", "pass")
    with pytest.raises(ValueError, match=r"\['max_new_tokenz'\] are declared by none.*01_a"):
        run_pipeline(
            tmp_path / "run",
            preset="smoke",
            extra={"max_new_tokenz": 8},
            notebook_dir=notebooks,
            log=lambda _: None,
        )
    assert not (tmp_path / "run" / "run.json").exists()


def test_model_and_model_a_are_one_override_group(tmp_path):
    """``--model`` sets model and model_a; notebooks 01-03 declare only model (no refusal),
    while a notebook declaring neither still refuses them."""
    import pytest

    from davsp_lib.pipeline import check_overrides

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01_a.ipynb", "model = 'x'", "pass")
    write_notebook(notebooks / "02_b.ipynb", "seed = 1", "pass")
    check_overrides({"model": "tiny", "model_a": "tiny"}, [notebooks / "01_a.ipynb"])
    with pytest.raises(ValueError, match=r"\['model', 'model_a'\] are declared by none"):
        check_overrides({"model": "tiny", "model_a": "tiny"}, [notebooks / "02_b.ipynb"])
