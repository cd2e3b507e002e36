"""The ``davsp`` command: ask / read on real models (embedded default and a tiny HF folder)."""

from __future__ import annotations

import pytest

from davsp_lib.data.render import render_figstep, render_typo
from davsp_lib.models.adapters.tiny import build_tiny_llava, save_tiny
from davsp_lib.runtime.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    first, second = folder / "first.png", folder / "second.jpg"
    render_figstep("Steps to bake bread at home.").image.save(first)
    render_typo("water the garden plants").image.save(second, quality=90)
    return [first, second]


def embedded_available() -> bool:
    from davsp_lib.models.embedded.reader import find_weights
    from davsp_lib.models.embedded.weights import SOURCES, MissingPartError

    try:
        SOURCES["tiny"].part_paths()
        find_weights()
    except (MissingPartError, FileNotFoundError):
        return False
    return True


needs_embedded = pytest.mark.skipif(not embedded_available(), reason="[tiny] extra not installed")


@needs_embedded
def test_read_prints_one_line_per_image_in_order(images, capsys):
    assert main(["read", "--image", *map(str, images)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    assert "bake bread" in lines[0].lower() and "garden" in lines[1].lower()


@needs_embedded
def test_ask_prints_an_answer(images, capsys):
    query = "What food is the image about? Answer in a few words."
    assert main(["ask", "--image", str(images[0]), "--query", query, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1]


def test_read_works_with_a_hugging_face_folder(images, tmp_path, capsys):
    save_tiny(build_tiny_llava(), tmp_path / "llava")
    args = ["read", "--model", str(tmp_path / "llava"), "--max-new-tokens", "4", "--image"]
    assert main([*args, *map(str, images)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]


def test_missing_image_is_a_clear_error(tmp_path, capsys):
    save_tiny(build_tiny_llava(), tmp_path / "llava")
    code = main(["read", "--model", str(tmp_path / "llava"), "--image", str(tmp_path / "nope.png")])
    assert code == 2
    assert "nope.png: image file not found" in capsys.readouterr().err


def test_run_parameters_are_parsed_like_papermills_and_model_is_a_shorthand():
    from davsp_lib.runtime.cli import build_parser, overrides

    args = build_parser().parse_args(
        [
            "run",
            "--preset",
            "smoke",
            "-p",
            "max_new_tokens",
            "8",
            "-p",
            "lr",
            "1e-3",
            "-p",
            "interactive",
            "false",
            "-p",
            "alphas",
            "[0, 1.5]",
            "-p",
            "device",
            "cuda",
            "-p",
            "mmvet_capability",
            "",
            "--model",
            "small",
        ]
    )
    assert overrides(args) == {
        "max_new_tokens": 8,
        "lr": 0.001,
        "interactive": False,
        "alphas": [0, 1.5],
        "device": "cuda",
        "mmvet_capability": "",
        "model": "small",
        "model_a": "small",
    }


def test_run_refuses_an_unknown_parameter(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r"), "-p", "no_such_parameter", "1"]) == 2
    assert "no_such_parameter" in capsys.readouterr().err


def test_recipe_prints_the_card_of_a_preset(capsys):
    assert main(["recipe", "--preset", "paper"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "## Recipe card — preset `paper` against the DAVSP reference"
    start = "mean (zeros in normalised space)"
    assert f"| border start | {start} | {start} | same |" in lines
    assert main(["recipe", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
