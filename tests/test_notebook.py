"""The helpers every notebook's validation cell uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from davsp_lib import notebook as nb


def test_check_accepts_int_for_float_and_names_the_parameter():
    assert nb.check("lr", 1, float) == 1.0
    assert isinstance(nb.check("lr", 1, float), float)
    with pytest.raises(nb.ParameterError, match="'steps' must be int, got bool True"):
        nb.check("steps", True, int)
    with pytest.raises(nb.ParameterError, match="'steps' must be >= 1, got 0"):
        nb.check("steps", 0, int, minimum=1)


def test_check_common_applies_each_rule():
    nb.check_common(model="tiny", dtype="auto", device="", seed=0, batch_size=1, use_mirror=True)
    with pytest.raises(nb.ParameterError, match="'dtype' must be one of"):
        nb.check_common(dtype="fp8")
    with pytest.raises(nb.ParameterError, match="'batch_size' must be >= 1, got 0"):
        nb.check_common(batch_size=0)
    with pytest.raises(nb.ParameterError, match="'use_mirror' must be bool"):
        nb.check_common(use_mirror="yes")
    with pytest.raises(KeyError, match="'steps' is not a common parameter"):
        nb.check_common(steps=3)


def test_mirror_root_present_absent_and_unused(tmp_path: Path, capsys):
    assert nb.mirror_root(True, str(tmp_path)) == tmp_path
    assert nb.mirror_root(False, str(tmp_path)) is None
    missing = tmp_path / "nowhere"
    assert nb.mirror_root(True, str(missing)) is None
    printed = capsys.readouterr().out
    assert "no benchmark mirror" in printed and str(missing) in printed
