"""Every notebook runs headless with papermill (smoke parameters) and is committed stripped."""

from __future__ import annotations

import json

import nbformat
import papermill
import pytest

from davsp_lib.runtime.cli import main as cli_main
from davsp_lib.runtime.pipeline import (
    PRESETS,
    PipelineError,
    discover,
    parameters_for,
    run_pipeline,
)

NOTEBOOKS = discover()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_stripped_with_a_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: outputs saved"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_parameters_cell_is_typed_and_validated_in_one_call(path):
    """Every papermill parameter is annotated (nb.parameters sees only annotated names)."""
    import ast

    from davsp_lib.runtime import notebook as nb

    notebook = nbformat.read(path, as_version=4)
    index = next(
        i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])
    )
    source = notebook.cells[index].source
    statements = [s for s in ast.parse(source).body if not isinstance(s, ast.Expr)]
    assert all(isinstance(s, ast.AnnAssign) for s in statements), "an unannotated parameter"
    namespace: dict = {}
    # dont_inherit: this module's `from __future__ import annotations` would make them strings
    exec(compile(source, path.name, "exec", dont_inherit=True), namespace)
    annotations = namespace["__annotations__"]
    assert list(annotations) == list(papermill.inspect_notebook(str(path)))
    recorded = nb.parameters(namespace, annotations)  # the defaults fit their own annotations
    assert set(recorded) == set(annotations) - set(nb.OUTPUT_PARAMETERS)
    validation = next(c.source for c in notebook.cells[index + 1 :] if c.cell_type == "code")
    assert "parameters = nb.parameters(\n    globals(), __annotations__," in validation


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The whole smoke pipeline once, in order (later notebooks read earlier artifacts)."""
    run_dir = tmp_path_factory.mktemp("smoke-run")
    steps = run_pipeline(run_dir, preset="smoke", log=lambda _: None)
    return run_dir, {step.notebook: step for step in steps}


# the first test that asks for ``smoke_run`` pays for the whole pipeline (00 -> 06) in its setup
SMOKE_PIPELINE_TIMEOUT = 2400


@pytest.mark.timeout(SMOKE_PIPELINE_TIMEOUT)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_with_smoke_preset(path, smoke_run):
    run_dir, steps = smoke_run
    step = steps[path.name]
    assert step.status == "ok", step.error
    results = json.loads((run_dir / path.stem / "results.json").read_text())
    declared = papermill.inspect_notebook(str(path))
    assert set(results["parameters"]) <= set(declared)  # the parameters that produced it
    assert results["headline"]
    assert step.figures, "a notebook shows something"
    report = (run_dir / "report.md").read_text()
    assert report.count(path.name) >= 1
    table = results["results"].get("table")
    if table:  # the notebook's table is in the report, one line per row
        for row in table:
            assert f"| {row} |" in report, row


@pytest.mark.timeout(SMOKE_PIPELINE_TIMEOUT)
def test_training_notebook_writes_each_variant_and_resumes(smoke_run):
    run_dir, _ = smoke_run
    folder = run_dir / "02_vsp_training"
    results = json.loads((folder / "results.json").read_text())
    from davsp_lib.evaluation.defenses.adashield import AdaShieldPool
    from davsp_lib.evaluation.defenses.pat import PATControl
    from davsp_lib.method.vsp import VisualSafetyPrompt

    def trained(variant):  # PAT: a token prefix; AdaShield-A: retrieval keys; else an image
        if variant == "pat":
            control = PATControl.load(folder / variant)
            return control.metadata, control.ids
        if variant == "adashield_a":
            pool = AdaShieldPool.load(folder / variant)
            return pool.metadata, pool.keys
        prompt = VisualSafetyPrompt.load(folder / variant)
        return prompt.metadata, prompt.delta

    variants = results["results"]["variants"]
    assert set(variants) == set(PRESETS["smoke"]["02_vsp_training"]["variants"])
    for variant, info in variants.items():
        metadata, _ = trained(variant)
        if variant == "adashield_a":  # built, not optimised: the training pool's MM-SB records
            mmsb = [i for i in results["results"]["ids"]["malicious"] if "/typo" in i]
            assert metadata["ids"]["anchors"] == info["anchors"]["ids"] == mmsb
            assert len(mmsb) == 4  # the mini pools
            continue
        assert metadata["steps_done"] == info["steps"]
        if variant not in ("esiii", "pat", "uniguard_published"):  # these use no vector
            assert metadata["vector"]["layer"] == results["results"]["layer"]
    # a rerun finds the finished checkpoints: nothing is retrained, same borders (and the
    # rebuilt AdaShield-A pool has the same keys)
    before = {v: trained(v)[1] for v in variants}
    steps = run_pipeline(run_dir, preset="smoke", only=["02"], log=lambda _: None)
    assert steps[0].status == "ok"
    again = json.loads((folder / "results.json").read_text())["results"]["variants"]
    assert all(info["resumed_from"] == info["steps"] for info in again.values() if "steps" in info)
    for variant, delta in before.items():
        assert (trained(variant)[1] == delta).all()


@pytest.mark.timeout(SMOKE_PIPELINE_TIMEOUT)
def test_evaluation_notebook_runs_adashield_a_without_its_anchors(smoke_run):
    run_dir, _ = smoke_run
    results = json.loads((run_dir / "03_evaluation" / "results.json").read_text())["results"]
    anchors = json.loads((run_dir / "02_vsp_training" / "adashield_a.json").read_text())
    assert "adashield_a" in results["defenses"]
    assert results["defenses"]["adashield_a"]["rewrite"]["n_entries"] == anchors["n"] == 4
    evaluated = {i for ids in results["ids"].values() for i in ids}
    assert not evaluated & set(anchors["anchors"]["ids"])
    retrieval = results["adashield_a_retrieval"]["adashield_a"]
    assert set(retrieval) == set(results["sizes"])
    assert sum(b["n"] for b in retrieval.values()) == sum(results["sizes"].values())
    assert all(0 <= b["applied_share"] <= 1 and -1 <= b["mean_similarity"] <= 1
               for b in retrieval.values())  # fmt: skip


def test_data_tour_without_mirror(tmp_path):
    path = next(p for p in NOTEBOOKS if p.stem.startswith("00"))
    params = parameters_for(path, PRESETS["smoke"], tmp_path, {"use_mirror": False})
    papermill.execute_notebook(
        str(path),
        str(tmp_path / "out.ipynb"),
        parameters=params,
        progress_bar=False,
        kernel_name="python3",
    )
    results = json.loads((tmp_path / "00_data_tour" / "results.json").read_text())
    assert results["results"]["mirror_root"] is None
    assert set(results["results"]["counts"]) == {"builtin-figstep", "builtin-typo", "builtin-text"}
    splits = json.loads((tmp_path / "00_data_tour" / "splits.json").read_text())
    ids = [i for part in splits["ids"].values() for i in part]
    assert len(ids) == len(set(ids)) == 12


def test_bad_parameter_fails_naming_it(tmp_path):
    with pytest.raises(PipelineError, match="examples_per_source"):
        run_pipeline(
            tmp_path,
            preset="smoke",
            only=["00"],
            extra={"examples_per_source": 0},
            log=lambda _: None,
        )


def test_failing_notebook_is_named_and_later_ones_skipped(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    for name, body in [
        ("01_ok", "x = 1"),
        ("02_bad", "raise RuntimeError('broken step')"),
        ("03_after", "x = 3"),
    ]:
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell("output_dir = ''")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(body)]
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nbformat.write(nb, folder / f"{name}.ipynb")
    run_dir = tmp_path / "run"
    with pytest.raises(PipelineError, match=r"02_bad.ipynb failed: .*RuntimeError: broken step"):
        run_pipeline(run_dir, preset="smoke", notebook_dir=folder, log=lambda _: None)
    manifest = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in manifest["steps"]] == ["ok", "failed", "skipped"]
    assert "02_bad.ipynb | failed" in (run_dir / "report.md").read_text()


def test_cli_run_exit_codes(tmp_path, capsys):
    assert cli_main(["run", "--preset", "smoke", "--only", "00", "--out", str(tmp_path)]) == 0
    assert "report:" in capsys.readouterr().out
    assert cli_main(["run", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err
