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

from davsp_lib.io import atomic_write_json, atomic_write_text

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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


#: Parameter presets: ``common`` goes to every notebook that declares the parameter, then the
#: per-notebook entries (keyed by notebook stem) override it.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The default main job on a CPU machine with no model weights (finishes in minutes).
    "embedded": {
        "common": {"seed": 0},
        "00_data_tour": {"examples_per_source": 3},
        "01_harmfulness_vector": {
            "n_vector": 40,
            "n_heldout": 24,
            "n_gap": 32,
            "layers": "all",
            "interactive": False,
        },
        "02_vsp_training": {
            "n_train": 16,
            "n_heldout": 12,
            "steps": 24,
            "ablation_steps": 8,
            "batch_size": 4,
            "lr": 0.1,
            "answer_tokens": 24,
            "snapshots": 4,
            "esiii_steps": 16,
            "pat_steps": 4,
            "pat_candidates": 8,
        },
        "03_evaluation": {
            "n_figstep": 8,
            "n_mmsb": 13,
            "n_harmful_val": 6,
            "n_harmless_val": 10,
            "n_mmvet": 4,
            "batch_size": 8,
            "max_new_tokens": 24,
        },
        "04_intervention": {
            "alphas": [-2.0, -1.0, 0.0, 1.0, 2.0],
            "positions": "all",
            "n_malicious": 16,
            "n_benign": 16,
            "n_text": 8,
            "batch_size": 8,
            "max_new_tokens": 24,
        },
        "05_transfer": {
            "model_b": "small",
            "n_figstep": 4,
            "n_harmful_val": 4,
            "n_harmless_val": 8,
            "reference_rows": "davsp",
            "max_new_tokens": 24,
            "batch_size": 8,
        },
        "06_ecso": {
            "n_figstep": 6,
            "n_harmful_val": 6,
            "n_harmless_val": 10,
            "n_mmvet": 2,
            "max_new_tokens": 24,
            "check_tokens": 3,
            "caption_tokens": 24,
            "oracle": True,
            "batch_size": 8,
        },
    },
    # Smallest sizes that still exercise every code path (used by the tests).
    "smoke": {
        "common": {"seed": 0},
        "00_data_tour": {
            "examples_per_source": 1,
            "split_sizes": {"vector": 4, "train": 4, "eval": 4},
        },
        "01_harmfulness_vector": {
            "n_vector": 4,
            "n_heldout": 3,
            "n_gap": 2,
            "layers": "0,3,6",
            "interactive": False,
        },
        "02_vsp_training": {
            "n_train": 2,
            "n_heldout": 2,
            "steps": 2,
            "ablation_steps": 1,
            "batch_size": 2,
            "answer_tokens": 4,
            "checkpoint_every": 1,
            "snapshots": 2,
            # the paper's pools in miniature: MM-SafetyBench TYPO training records, so that
            # AdaShield-A's pool (4 anchors) is built and evaluated
            "pools": "mini",
            "variants": ["davsp", "uniguard", "esiii", "pat", "uniguard_published", "adashield_a"],
            "esiii_steps": 1,
            "uniguard_steps": 1,
            "pat_steps": 1,
            "pat_control_len": 4,
            "pat_candidates": 2,
            "pat_batch_size": 1,
        },
        "03_evaluation": {
            "n_figstep": 1,
            "n_mmsb": 1,
            "n_harmful_val": 0,
            "n_harmless_val": 1,
            "n_mmvet": 1,
            "batch_size": 4,
            "max_new_tokens": 8,
            "defenses": "none,adashield_s,adashield_a,uniguard,uniguard_published,davsp,esiii,pat",
        },
        "04_intervention": {
            "alphas": [0.0, 2.0],
            "n_malicious": 2,
            "n_benign": 2,
            "n_text": 1,
            "max_new_tokens": 6,
        },
        "05_transfer": {
            "model_b": "tiny",
            "b_canvas": 448,
            "b_border_width": 40,
            "n_figstep": 1,
            "n_harmful_val": 1,
            "n_harmless_val": 2,
            "reference_rows": "",
            "max_new_tokens": 6,
            "batch_size": 4,
        },
        "06_ecso": {
            "n_figstep": 1,
            "n_harmful_val": 1,
            "n_harmless_val": 1,
            "n_mmvet": 1,
            "max_new_tokens": 6,
            "check_tokens": 2,
            "caption_tokens": 6,
            "oracle": True,
            "batch_size": 4,
        },
    },
    # Real models on a GPU (the paper's setting).
    "paper": {
        "common": {"seed": 0, "model": "llava-hf/llava-1.5-13b-hf"},
        "00_data_tour": {"examples_per_source": 6},
        # the paper's disjoint pools (davsp_lib.pools), the reference layer and margins (the
        # data-driven ones are reported beside), bfloat16 (float16 + signed steps underflow)
        "01_harmfulness_vector": {
            "dtype": "bfloat16",
            "device": "cuda",
            "pools": "paper",
            "layer_choice": "reference",
            "n_heldout": 100,
            "n_gap": 40,
            "layers": "all",
            "batch_size": 16,
            "interactive": False,
        },
        "02_vsp_training": {  # the reference recipe (davsp recipe --preset paper)
            "dtype": "bfloat16",
            "device": "cuda",
            "pools": "paper",
            "layer_choice": "reference",
            "n_heldout": 100,
            "malicious_output_p": 0.05,
            "answer_eos": False,
            "border_start": "mean",
            "border_clamp": False,
            "steps": 1200,
            "ablation_steps": 1200,
            "batch_size": 2,
            "optimizer": "sign",
            "lr": 0.00392156862745098,  # 1/255
            "schedule": "random",
            "answer_tokens": 128,
            "checkpoint_every": 50,
            # adashield_a: its pool is the 600 MM-SafetyBench TYPO training records
            "variants": [
                "davsp",
                "da_noise",
                "vsp_output",
                "uniguard_published",
                "uniguard",
                "esiii",
                "pat",
                "adashield_a",
            ],
            "uniguard_steps": 5000,  # UniGuard's published iterations
            "esiii_steps": 1000,  # not given by the ESIII paper (our choice)
            "pat_steps": 100,  # the PAT reference: n_steps 100, 256 candidates, top-k 256
            "pat_candidates": 256,
            "pat_batch_size": 8,
        },
        "03_evaluation": {  # the evaluation pool: everything the other pools left
            "dtype": "bfloat16",
            "device": "cuda",
            "pools": "paper",
            "n_figstep": 500,
            "n_mmsb": 980,
            "n_harmful_val": 0,
            "n_harmless_val": 100,
            "n_mmvet": 118,
            "mmvet_capability": "",
            "batch_size": 16,
            "max_new_tokens": 1024,  # the reference: max_new_tokens=1024
            "judge_specs": "endpoint,refusal:jailbreakbench,refusal:gcg,refusal:xstest",
            "defenses": "none,adashield_s,adashield_a,uniguard_published,uniguard,davsp,da_only,"
            "vsp_only,davsp_prefix,esiii,pat",
        },
        "04_intervention": {
            "dtype": "bfloat16",
            "device": "cuda",
            "alphas": [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0],
            "n_malicious": 39,
            "n_benign": 64,
            "n_text": 39,
            "batch_size": 16,
            "max_new_tokens": 1024,  # the reference: max_new_tokens=1024
        },
        "05_transfer": {
            "model_a": "llava-hf/llava-1.5-13b-hf",
            "model_b": "Qwen/Qwen2-VL-7B-Instruct",
            "dtype": "bfloat16",
            "device": "cuda",
            "n_figstep": 100,
            "n_harmful_val": 39,
            "n_harmless_val": 100,
            "reference_rows": "none,davsp",
            "max_new_tokens": 1024,  # the reference: max_new_tokens=1024
            "batch_size": 16,
        },
        "06_ecso": {
            "dtype": "bfloat16",
            "device": "cuda",
            "n_figstep": 100,
            "n_harmful_val": 39,
            "n_harmless_val": 100,
            "n_mmvet": 100,
            "mmvet_capability": "",
            "max_new_tokens": 1024,  # the reference: max_new_tokens=1024
            "check_tokens": 4,
            "caption_tokens": 128,
            "oracle": True,
            "batch_size": 16,
        },
    },
}


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
        **preset.get("common", {}),
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
    """The recipe card of the preset (:mod:`davsp_lib.recipe`); never fails the report."""
    from davsp_lib import recipe

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
