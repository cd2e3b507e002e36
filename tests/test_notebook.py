"""The helpers every notebook's validation cell uses."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from davsp_lib.runtime import notebook as nb


def test_check_accepts_int_for_float_and_names_the_parameter():
    assert nb.check("lr", 1, float) == 1.0
    assert isinstance(nb.check("lr", 1, float), float)
    with pytest.raises(nb.ParameterError, match="'steps' must be int, got bool True"):
        nb.check("steps", True, int)
    with pytest.raises(nb.ParameterError, match="'steps' must be >= 1, got 0"):
        nb.check("steps", 0, int, minimum=1)


def test_parameters_applies_the_shared_rule_of_each_common_name():
    ok = {"model": "tiny", "dtype": "auto", "device": "", "seed": 0, "batch_size": 1}
    annotations = {"model": str, "dtype": str, "device": str, "seed": int, "batch_size": int}
    assert nb.parameters(ok, annotations) == ok
    for name, bad, message in [
        ("dtype", "fp8", "'dtype' must be one of"),
        ("batch_size", 0, "'batch_size' must be >= 1, got 0"),
        ("seed", -1, "'seed' must be >= 0, got -1"),
    ]:
        with pytest.raises(nb.ParameterError, match=message):
            nb.parameters({**ok, name: bad}, annotations)
    # a notebook's own rule replaces the shared one for that name
    assert nb.parameters({**ok, "batch_size": 0}, annotations, batch_size=nb.at_least(0))


def test_mirror_root_present_absent_and_unused(tmp_path: Path, capsys):
    assert nb.mirror_root(True, str(tmp_path)) == tmp_path
    assert nb.mirror_root(False, str(tmp_path)) is None
    missing = tmp_path / "nowhere"
    assert nb.mirror_root(True, str(missing)) is None
    printed = capsys.readouterr().out
    assert "no benchmark mirror" in printed and str(missing) in printed


def test_check_finite_refuses_nan_and_infinity():
    assert nb.check("alpha", 2, float, finite=True) == 2.0
    for bad in (float("nan"), float("inf")):
        with pytest.raises(nb.ParameterError, match="'alpha' must be finite"):
            nb.check("alpha", bad, float, finite=True)
    assert math.isnan(nb.check("alpha", float("nan"), float))  # only when asked


CELL = {  # what a typed parameters cell leaves behind: values and __annotations__
    "model": ("tiny", str),
    "seed": (0, int),
    "lr": (1, float),
    "n_gap": (3, int),
    "variants": (["davsp", "pat"], list[str]),
    "split_sizes": ({"vector": 4}, dict[str, int]),
    "output_dir": ("runs/x", str),
    "figures_dir": ("figures/x", str),
}


def cell(**changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    values = {name: value for name, (value, _) in CELL.items()} | changes
    return values, {name: annotation for name, (_, annotation) in CELL.items()}


def test_parameters_returns_the_cell_in_order_without_output_paths():
    namespace, annotations = cell()
    namespace["unrelated"] = 1  # other globals are not parameters
    got = nb.parameters(namespace, annotations, n_gap={"minimum": 1})
    assert got == {
        "model": "tiny",
        "seed": 0,
        "lr": 1,  # not converted: the record shows the value the cell ran with
        "n_gap": 3,
        "variants": ["davsp", "pat"],
        "split_sizes": {"vector": 4},
    }
    assert list(got) == ["model", "seed", "lr", "n_gap", "variants", "split_sizes"]


@pytest.mark.parametrize(
    ("changes", "rules", "message"),
    [
        ({"n_gap": "3"}, {}, "'n_gap' must be int, got str '3'"),
        ({"n_gap": 0}, {"n_gap": {"minimum": 1}}, "'n_gap' must be >= 1, got 0"),
        ({"seed": -1}, {}, "'seed' must be >= 0"),  # the shared rule of a common name
        ({"lr": True}, {}, "'lr' must be float, got bool True"),
        ({"variants": "davsp"}, {}, "'variants' must be list"),
        ({"variants": ["davsp", 3]}, {}, r"'variants\[1\]' must be str, got int 3"),
        (
            {"variants": ["davsp", "nope"]},
            {"variants": {"choices": ["davsp", "pat"]}},
            r"'variants\[1\]' must be one of \['davsp', 'pat'\], got 'nope'",
        ),
        (
            {"split_sizes": {"vector": 0}},
            {"split_sizes": {"minimum": 1}},
            r"split_sizes\['vector'\]\" must be >= 1",
        ),
        ({"split_sizes": {1: 4}}, {}, "'split_sizes key' must be str, got int 1"),
    ],
)
def test_parameters_names_the_bad_one(changes, rules, message):
    namespace, annotations = cell(**changes)
    with pytest.raises(nb.ParameterError, match=message):
        nb.parameters(namespace, annotations, **rules)


def test_parameters_refuses_rules_for_undeclared_names_and_missing_values():
    namespace, annotations = cell()
    with pytest.raises(KeyError, match=r"rules for \['n_gapp'\]"):
        nb.parameters(namespace, annotations, n_gapp={"minimum": 1})
    del namespace["seed"]
    with pytest.raises(nb.ParameterError, match="'seed' is declared but has no value"):
        nb.parameters(namespace, annotations)
    with pytest.raises(TypeError, match="'x': unsupported annotation 'int'"):
        nb.parameters({"x": 1}, {"x": "int"})  # a string annotation (from __future__)
    with pytest.raises(TypeError, match="unsupported annotation"):
        nb.parameters({"x": (1,)}, {"x": tuple[int, int]})


def test_parameters_sees_papermills_values_and_the_cells_annotations(tmp_path: Path):
    """In a kernel, the typed cell's ``__annotations__`` survive papermill's injected cell."""
    import json

    import nbformat
    import papermill
    from nbformat.v4 import new_code_cell, new_notebook

    params = new_code_cell('steps: int = 2\nnames: list[str] = ["a"]\noutput_dir: str = ""')
    params.metadata["tags"] = ["parameters"]
    body = (
        "import json, pathlib\n"
        "from davsp_lib.runtime import notebook as nb\n"
        "parameters = nb.parameters(globals(), __annotations__, steps={'minimum': 1})\n"
        "pathlib.Path(output_dir, 'p.json').write_text(json.dumps(parameters))"
    )
    notebook = new_notebook(cells=[params, new_code_cell(body)])
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, tmp_path / "in.ipynb")
    run = {"steps": 5, "names": ["b", "c"], "output_dir": str(tmp_path)}
    papermill.execute_notebook(
        str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), parameters=run,
        cwd=str(Path(__file__).resolve().parents[1]), progress_bar=False, kernel_name="python3",
    )  # fmt: skip
    assert json.loads((tmp_path / "p.json").read_text()) == {"steps": 5, "names": ["b", "c"]}
    with pytest.raises(papermill.PapermillExecutionError, match="'steps' must be >= 1, got 0"):
        papermill.execute_notebook(
            str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), parameters={"steps": 0},
            cwd=str(Path(__file__).resolve().parents[1]), progress_bar=False,
            kernel_name="python3",
        )  # fmt: skip


def test_rule_helpers_are_check_keywords():
    assert nb.at_least(1) == {"minimum": 1}
    assert nb.between(0.0, 0.5) == {"minimum": 0.0, "maximum": 0.5}
    assert nb.one_of("adam", "sign") == {"choices": ["adam", "sign"]}
    namespace, annotations = cell(n_gap=13, model="big")
    with pytest.raises(nb.ParameterError, match="'n_gap' must be <= 12, got 13"):
        nb.parameters(namespace, annotations, n_gap=nb.between(1, 12))
    with pytest.raises(nb.ParameterError, match=r"'model' must be one of \['tiny'\], got 'big'"):
        nb.parameters(namespace, annotations, model=nb.one_of("tiny"))
