"""Each notebook's .ipynb is exactly what its jupytext percent source produces, stripped."""

from __future__ import annotations

import nbformat
import pytest

from davsp_lib.runtime.cli import main as cli_main
from davsp_lib.runtime.notebook_sources import notebook, out_of_sync, render, sources, sync

SOURCES = sources()

SOURCE = """# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Title
#
# Some *text*.

# %% tags=["parameters"]
steps: int = 3  # papermill overrides this

# %%
total = steps * 2


# %%
print(total)
"""


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_pair_in_sync_and_stripped(source):
    target = source.with_suffix(".ipynb")
    assert target.read_text(encoding="utf-8") == render(source), (
        f"{target.name} differs from {source.name}: run `davsp notebooks sync`"
    )
    committed = nbformat.read(target, as_version=4)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_every_notebook_has_a_source():
    notebooks = sorted(p.stem for p in SOURCES[0].parent.glob("[0-9][0-9]_*.ipynb"))
    assert notebooks == [p.stem for p in SOURCES]


def test_percent_source_becomes_cells_with_fixed_ids(tmp_path):
    path = tmp_path / "00_demo.py"
    path.write_text(SOURCE)
    nb = notebook(path)
    assert [(c.cell_type, c.id, c.source) for c in nb.cells] == [
        ("markdown", "c00", "# Title\n\nSome *text*."),
        ("code", "c01", "steps: int = 3  # papermill overrides this"),
        ("code", "c02", "total = steps * 2"),
        ("code", "c03", "print(total)"),
    ]
    assert nb.cells[1].metadata == {"tags": ["parameters"]}
    assert nb.metadata["jupytext"] == {"formats": "ipynb,py:percent"}


def test_sync_writes_stale_pairs_only_unless_checking(tmp_path):
    (tmp_path / "00_demo.py").write_text(SOURCE)
    target = tmp_path / "00_demo.ipynb"
    assert sync(tmp_path, check=True) == [target] and not target.exists()
    assert sync(tmp_path) == [target]
    first = target.read_bytes()
    assert out_of_sync(tmp_path) == [] and sync(tmp_path) == []
    assert target.read_bytes() == first  # deterministic: nothing rewritten

    executed = nbformat.read(target, as_version=4)
    executed.cells[2].outputs = [nbformat.v4.new_output("stream", text="6\n")]
    executed.cells[2].execution_count = 1
    nbformat.write(executed, target)
    assert sync(tmp_path) == [target] and target.read_bytes() == first  # outputs stripped


def test_no_sources_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        sources(tmp_path)


def test_cli_check_passes_on_the_committed_notebooks(capsys):
    assert cli_main(["notebooks", "sync", "--check"]) == 0
    assert "in sync" in capsys.readouterr().out
