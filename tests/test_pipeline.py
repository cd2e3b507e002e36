"""The pipeline's pure parts (running notebooks is tested in test_notebooks.py)."""

from __future__ import annotations

import json

import pytest

from davsp_lib.runtime.pipeline import (
    PRESET_DIR,
    PRESETS,
    StepResult,
    load_presets,
    markdown_table,
    write_report,
)


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


def test_presets_give_each_notebook_only_parameters_it_declares():
    import papermill

    from davsp_lib.runtime.pipeline import NOTEBOOK_DIR, discover

    notebooks = {path.stem: path for path in discover(NOTEBOOK_DIR)}
    assert set(PRESETS) == {"embedded", "smoke", "paper"}
    for name, preset in PRESETS.items():
        assert set(preset) == set(notebooks), name  # one file per notebook
        for stem, values in preset.items():
            declared = papermill.inspect_notebook(str(notebooks[stem]))
            assert set(values) <= set(declared), (name, stem, set(values) - set(declared))


def test_each_preset_file_reads_the_same_with_papermill():
    from papermill.iorw import read_yaml_file

    for name, preset in PRESETS.items():
        for stem, values in preset.items():
            path = PRESET_DIR / name / f"{stem}.yaml"
            assert json.dumps(read_yaml_file(str(path))) == json.dumps(values), path


def test_load_presets_reads_folders_of_notebook_files(tmp_path):
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "01_a.yaml").write_text("# a comment\nsteps: 2\nalphas: [0.0, 1]\n")
    (tmp_path / "quick" / "02_b.yaml").write_text("{}\n")
    assert load_presets(tmp_path) == {
        "quick": {"01_a": {"steps": 2, "alphas": [0.0, 1]}, "02_b": {}}
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- 1\n- 2\n", "expected a mapping of parameter names"),
        ("", "expected a mapping of parameter names"),
        ("steps: [1\n", "not valid YAML"),
    ],
)
def test_load_presets_names_the_bad_file(tmp_path, text, problem):
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "01_a.yaml").write_text(text)
    with pytest.raises(ValueError, match=problem) as error:
        load_presets(tmp_path)
    assert "01_a.yaml" in str(error.value)


def test_load_presets_refuses_an_empty_preset_or_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no presets"):
        load_presets(tmp_path)
    (tmp_path / "quick").mkdir()
    with pytest.raises(ValueError, match="quick: preset folder without notebook files"):
        load_presets(tmp_path)


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
    from davsp_lib.runtime.pipeline import run_pipeline

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
    # the smoke preset has no file for these notebooks: 02_b keeps its own default seed
    assert seen == [{"max_new_tokens": 8, "model": "tiny"}, {"seed": 1}]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["overrides"] == {"max_new_tokens": 8, "model": "tiny"}
    assert manifest["steps"][0]["parameters"]["max_new_tokens"] == 8
    assert "max_new_tokens" not in manifest["steps"][1]["parameters"]


def test_an_override_no_notebook_declares_is_refused(tmp_path):
    import pytest

    from davsp_lib.runtime.pipeline import run_pipeline

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

    from davsp_lib.runtime.pipeline import check_overrides

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks / "01_a.ipynb", "model = 'x'", "pass")
    write_notebook(notebooks / "02_b.ipynb", "seed = 1", "pass")
    check_overrides({"model": "tiny", "model_a": "tiny"}, [notebooks / "01_a.ipynb"])
    with pytest.raises(ValueError, match=r"\['model', 'model_a'\] are declared by none"):
        check_overrides({"model": "tiny", "model_a": "tiny"}, [notebooks / "02_b.ipynb"])
