"""Once, before the dicts go: the YAML presets equal pipeline.PRESETS merged per notebook."""

import json

import papermill
from papermill.iorw import read_yaml_file

from davsp_lib.pipeline import PRESETS, discover, load_presets


def test_yaml_presets_equal_the_dicts_merged_for_each_notebook():
    loaded = load_presets()
    assert set(loaded) == set(PRESETS)
    for name, preset in PRESETS.items():
        expected = {}
        for notebook in discover():
            declared = papermill.inspect_notebook(str(notebook))
            common = {k: v for k, v in preset.get("common", {}).items() if k in declared}
            expected[notebook.stem] = {**common, **preset.get(notebook.stem, {})}
        assert json.dumps(loaded[name]) == json.dumps(expected), name  # types and order too
        for stem, values in loaded[name].items():
            assert read_yaml_file(f"presets/{name}/{stem}.yaml") == values
