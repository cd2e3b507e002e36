"""requirements/lock.txt: every version pinned, inside pyproject's ranges, used by every install."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def locked() -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert match, f"{LOCK}:{number}: not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    found = [Requirement(r) for r in [*project["dependencies"], *extras]]
    return [r for r in found if canonicalize_name(r.name) != "davsp-workbook"]


def test_every_project_requirement_is_locked_inside_its_range():
    pins = locked()
    assert len(pins) > 100
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK.name}: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_torch_is_locked_to_the_version_every_install_pins():
    assert locked()["torch"] == Version("2.13.0")  # no "+cpu": PyPI's and the CPU wheel match
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert 'TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"' in install
    assert "--constraint" in install and "requirements/lock.txt" in install


def test_environment_yml_installs_through_the_lock():
    text = (ROOT / "environment.yml").read_text()
    assert "- python=3.11\n" in text  # the lock is resolved for CPython 3.11
    assert "- -c requirements/lock.txt\n" in text and "- torch==2.13.0\n" in text


@pytest.mark.skipif(
    bool(os.environ.get("DAVSP_UNLOCKED")), reason="scripts/upgrade_check.sh tests newer versions"
)
def test_this_environment_has_exactly_the_locked_versions():
    pins = locked()
    drift = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and Version(dist.version).public != pins[name].public:
            drift.append(f"{name} {dist.version} (locked {pins[name]})")
    assert not drift, "installed versions differ from the lock: " + ", ".join(sorted(drift))
