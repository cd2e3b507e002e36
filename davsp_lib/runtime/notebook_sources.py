"""The notebooks' one source: ``notebooks/NN_name.py`` (jupytext percent) -> ``NN_name.ipynb``.

Edit the ``.py`` (any editor; ruff lints it) or the paired ``.ipynb`` in JupyterLab with jupytext
installed (it saves both). ``davsp notebooks sync`` rewrites every ``.ipynb`` from its ``.py``
without outputs and with fixed cell ids, so the committed bytes depend only on the source;
``davsp notebooks sync --check`` only reports pairs that are out of sync.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

from davsp_lib.runtime.io import atomic_write_text
from davsp_lib.runtime.pipeline import NOTEBOOK_DIR

PAIRING = "ipynb,py:percent"
#: notebook metadata of every committed ``.ipynb`` (papermill runs it with this kernel)
METADATA = {
    "jupytext": {"formats": PAIRING},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def sources(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered percent sources, ``NN_name.py``, in order."""
    found = sorted(notebook_dir.glob("[0-9][0-9]_*.py"))
    if not found:
        raise FileNotFoundError(f"{notebook_dir}: no notebook sources (NN_name.py)")
    return found


def notebook(source: Path) -> nbformat.NotebookNode:
    """The notebook a percent source describes: no outputs, cell ids ``c00``, ``c01``, ..."""
    try:
        import jupytext
    except ModuleNotFoundError as error:  # a dependency; an older environment may lack it
        raise ModuleNotFoundError(
            "davsp notebooks needs jupytext: pip install -c requirements/lock.txt jupytext"
        ) from error
    nb = jupytext.read(source, fmt="py:percent")
    if not nb.cells:
        raise ValueError(f"{source}: no cells")
    nb.metadata = nbformat.from_dict(METADATA)
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"c{index:02d}"
        cell.source = cell.source.strip("\n")
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(nb)
    return nb


def render(source: Path) -> str:
    """The exact ``.ipynb`` text for ``source`` (what ``nbformat.write`` would write)."""
    text = nbformat.writes(notebook(source), version=4)
    return text if text.endswith("\n") else text + "\n"


def out_of_sync(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The ``.ipynb`` files that differ from (or lack) what their ``.py`` produces."""
    stale = []
    for source in sources(notebook_dir):
        target = source.with_suffix(".ipynb")
        if not target.is_file() or target.read_text(encoding="utf-8") != render(source):
            stale.append(target)
    return stale


def sync(notebook_dir: Path = NOTEBOOK_DIR, *, check: bool = False) -> list[Path]:
    """Rewrite each stale ``.ipynb`` from its source (unless ``check``); returns the stale ones."""
    stale = out_of_sync(notebook_dir)
    if not check:
        for target in stale:
            atomic_write_text(target, render(target.with_suffix(".py")))
    return stale
