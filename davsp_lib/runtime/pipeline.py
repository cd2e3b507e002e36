"""The main job: run the numbered notebooks in order with papermill and write a report.

``davsp run`` executes ``notebooks/NN_*.ipynb`` into a run folder (executed notebooks,
figures, results JSON per notebook, ``run.json`` and ``report.md``) and stops at the first
failing notebook, naming it.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from davsp_lib.runtime.io import atomic_write_json, atomic_write_text

PROJECT_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"

#: Artifacts one notebook writes and later ones read: parameter name -> path in the run folder.
ARTIFACTS: dict[str, str] = {
    "vector_path": "01_harmfulness_vector/harmfulness_vector",
    "training_dir": "02_vsp_training",
    "evaluation_dir": "03_evaluation",
}

PRESET_DIR = PROJECT_ROOT / "presets"


def load_presets(preset_dir: Path = PRESET_DIR) -> dict[str, dict[str, dict[str, Any]]]:
    """``presets/<name>/<NN_name>.yaml`` -> ``{name: {NN_name: {parameter: value}}}``.

    Each file holds every parameter the preset gives one notebook, flat, so that
    ``papermill -f presets/<name>/<NN_name>.yaml`` runs that notebook as ``davsp run`` does
    (less the run-folder paths).
    """
    import yaml

    if not preset_dir.is_dir():
        raise FileNotFoundError(f"{preset_dir}: no preset folder")
    presets: dict[str, dict[str, dict[str, Any]]] = {}
    for folder in sorted(path for path in preset_dir.iterdir() if path.is_dir()):
        files = sorted(folder.glob("*.yaml"))
        if not files:
            raise ValueError(f"{folder}: preset folder without notebook files (NN_name.yaml)")
        presets[folder.name] = {}
        for path in files:
            try:
                values = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as error:
                raise ValueError(f"{path}: not valid YAML: {error}") from error
            if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
                raise ValueError(
                    f"{path}: expected a mapping of parameter names to values, got {values!r}"
                )
            presets[folder.name][path.stem] = values
    if not presets:
        raise FileNotFoundError(f"{preset_dir}: no presets (<name>/NN_name.yaml)")
    return presets


#: The presets, ``{name: {NN_name: {parameter: value}}}``, read from ``presets/`` at import.
PRESETS: dict[str, dict[str, dict[str, Any]]] = load_presets()


@dataclass
class StepResult:
    notebook: str
    status: str  # "ok" | "failed" | "skipped"
    seconds: float = 0.0
    output_notebook: str | None = None
    results_json: str | None = None
    headline: str | None = None
    error: str | None = None
    figures: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


class PipelineError(RuntimeError):
    """A notebook failed; the message names it and the run folder keeps what finished."""


def discover(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    notebooks = sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"{notebook_dir}: no numbered notebooks (NN_name.ipynb)")
    return notebooks


def parameters_for(
    notebook: Path, preset: Mapping[str, Mapping[str, Any]], run_dir: Path, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """Preset + run paths, restricted to what the notebook's ``parameters`` cell declares."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    stem = notebook.stem
    values: dict[str, Any] = {
        "output_dir": str(run_dir / stem),
        "figures_dir": str(run_dir / "figures" / stem),
        # what earlier notebooks wrote (a notebook declares the ones it reads)
        **{name: str(run_dir / relative) for name, relative in ARTIFACTS.items()},
        **preset.get(stem, {}),
        **extra,
    }
    return {name: value for name, value in values.items() if name in declared}


#: parameters that name the model under study; ``davsp run --model M`` sets all of them
MODEL_PARAMETERS: tuple[frozenset[str], ...] = (frozenset({"model", "model_a"}),)


def check_overrides(extra: Mapping[str, Any], notebooks: Sequence[Path]) -> None:
    """Refuse an override that none of the notebooks to run declares (a typo, most often)."""
    import papermill

    declared = {name for nb in notebooks for name in papermill.inspect_notebook(str(nb))}
    # a group (``--model`` sets model and model_a) is known when any of its names is declared
    known = declared | {name for group in MODEL_PARAMETERS for name in group if group & declared}
    unknown = sorted(set(extra) - known)
    if unknown:
        names = ", ".join(nb.stem for nb in notebooks)
        raise ValueError(
            f"parameter(s) {unknown} are declared by none of the notebooks to run ({names})"
        )


def run_notebook(notebook: Path, run_dir: Path, parameters: Mapping[str, Any]) -> StepResult:
    import papermill

    output = run_dir / "notebooks" / notebook.name
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    step = StepResult(
        notebook=notebook.name,
        status="ok",
        output_notebook=str(output),
        parameters=json.loads(json.dumps(dict(parameters), default=str)),
    )
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=dict(parameters),
            cwd=str(PROJECT_ROOT),
            progress_bar=False,
            kernel_name="python3",
        )
    except papermill.PapermillExecutionError as exc:
        step.status, step.error = "failed", f"cell {exc.exec_count}: {exc.ename}: {exc.evalue}"
    except Exception as exc:  # kernel death, missing kernel, bad notebook JSON
        step.status, step.error = "failed", f"{type(exc).__name__}: {exc}"
    step.seconds = round(time.perf_counter() - start, 2)
    results = Path(parameters.get("output_dir", run_dir / notebook.stem)) / "results.json"
    if results.is_file():
        step.results_json = str(results)
        step.headline = json.loads(results.read_text()).get("headline")
    figures = Path(parameters.get("figures_dir", run_dir / "figures"))
    step.figures = sorted(str(p) for p in figures.glob("*.png")) if figures.is_dir() else []
    return step


def markdown_table(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Rows of ``{row: {column: value}}`` as markdown lines (columns in first-seen order)."""
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    if not columns:
        return []

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| | " + " | ".join(map(cell, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        values = " | ".join(cell(row.get(c, "")) for c in columns)
        lines.append(f"| {cell(name)} | {values} |")
    return lines


def _results_table(step: StepResult) -> list[str]:
    """The notebook's ``results["table"]`` (``{row: {column: value}}``), if it wrote one."""
    if step.status != "ok" or not step.results_json or not Path(step.results_json).is_file():
        return []
    table = json.loads(Path(step.results_json).read_text()).get("results", {}).get("table")
    if not isinstance(table, Mapping) or not all(isinstance(r, Mapping) for r in table.values()):
        return []
    return markdown_table(table)


def _recipe_card(preset: str) -> list[str]:
    """The recipe card of the preset (:mod:`davsp_lib.runtime.recipe`); never fails the report."""
    from davsp_lib.runtime import recipe

    try:
        return recipe.markdown(recipe.recipe_rows(preset), preset)
    except Exception as exc:  # a report must still be written
        return [f"## Recipe card — preset `{preset}`", "", f"(not available: {exc})"]


def write_report(run_dir: Path, preset: str, steps: Sequence[StepResult]) -> Path:
    lines = [
        f"# DAVSP workbook run — preset `{preset}`",
        "",
        f"Run folder: `{run_dir}`  ",
        f"Finished: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
        "",
        "Numbers below come from the model and data named in each notebook's results; the",
        "embedded default model's figures are not the paper's.",
        "",
        "| notebook | status | seconds | headline |",
        "|---|---|---:|---|",
    ]
    for step in steps:
        note = (step.headline or step.error or "").replace("|", "\\|")
        lines.append(f"| {step.notebook} | {step.status} | {step.seconds:.1f} | {note} |")
    for step in steps:
        table = _results_table(step)
        if step.figures or table:
            lines += ["", f"## {step.notebook}", ""]
            lines += [*table, ""] if table else []
            for figure in step.figures:
                relative = Path(figure).relative_to(run_dir)
                lines.append(f"![{relative.stem}]({relative.as_posix()})")
    lines += ["", *_recipe_card(preset)]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")


def run_pipeline(
    run_dir: str | Path,
    *,
    preset: str = "embedded",
    only: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    log: Callable[[str], None] = print,
) -> list[StepResult]:
    """Run the notebooks in order; raise :class:`PipelineError` naming the first failure."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    notebooks = discover(notebook_dir)
    if only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(key) for key in only)]
        if not notebooks:
            raise ValueError(f"--only {list(only)} matches no notebook in {notebook_dir}")
    extra = dict(extra or {})
    check_overrides(extra, notebooks)
    steps: list[StepResult] = []
    failed: StepResult | None = None
    for notebook in notebooks:
        if failed is not None:
            steps.append(StepResult(notebook=notebook.name, status="skipped"))
            continue
        parameters = parameters_for(notebook, PRESETS[preset], run_dir, extra)
        log(f"[run] {notebook.name} ...")
        step = run_notebook(notebook, run_dir, parameters)
        steps.append(step)
        log(
            f"[run] {notebook.name}: {step.status} in {step.seconds:.1f} s"
            + (f" — {step.error}" if step.error else "")
        )
        if step.status == "failed":
            failed = step
    manifest = {
        "preset": preset,
        "overrides": json.loads(json.dumps(extra, default=str)),
        "run_dir": str(run_dir),
        "steps": [asdict(s) for s in steps],
    }
    atomic_write_json(run_dir / "run.json", manifest)
    report = write_report(run_dir, preset, steps)
    log(f"[run] report: {report}")
    for step in steps:
        if step.output_notebook and step.status == "ok":
            log(f"[run]   {step.notebook} -> {step.output_notebook}")
    if failed is not None:
        raise PipelineError(
            f"notebook {failed.notebook} failed: {failed.error}; executed copy with the traceback: "
            f"{failed.output_notebook}"
        )
    return steps


def default_run_dir() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return PROJECT_ROOT / "runs" / stamp


def main_run(
    out: str | None,
    preset: str,
    only: Sequence[str] | None,
    overrides: Mapping[str, Any] | None = None,
) -> int:
    run_dir = Path(out) if out else default_run_dir()
    print(f"[run] preset {preset!r} -> {run_dir}")
    if overrides:
        print(f"[run] overrides: {dict(overrides)}")
    try:
        run_pipeline(run_dir, preset=preset, only=only, extra=overrides)
    except PipelineError as exc:
        print(f"[run] FAILED: {exc}", file=sys.stderr)
        return 1
    return 0
