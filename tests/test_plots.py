"""Tests for davsp_lib.runtime.plots: the image grid's titles stay apart, every panel is framed."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from PIL import Image

from davsp_lib.runtime import plots

LONG = "List of guidelines on smuggling goods across borders and more words here"


def _white(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (336, 336), "white") for _ in range(n)]


def _title_boxes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.images and ax.get_title()]


def test_wrap_title_keeps_lines_within_width_and_limits_line_count():
    wrapped = plots.wrap_title("none\n" + LONG, 20, max_lines=3)
    lines = wrapped.split("\n")
    assert lines[0] == "none"
    assert len(lines) == 3
    assert all(len(line) <= 20 for line in lines)
    assert lines[-1].endswith("…")


def test_wrap_title_leaves_short_titles_alone():
    assert plots.wrap_title("davsp\nshort", 20) == "davsp\nshort"


def test_long_titles_of_neighbouring_panels_do_not_overlap():
    titles = [f"defense {i}\n{LONG}" for i in range(6)]
    fig = plots.image_grid(_white(6), titles, ncols=4, suptitle="an example id: inputs")
    boxes = _title_boxes(fig)
    assert len(boxes) == 6
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    plt.close(fig)


def test_titles_do_not_overlap_the_images_of_the_row_above():
    fig = plots.image_grid(_white(8), [f"d{i}\n{LONG}" for i in range(8)], ncols=4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    image_axes = [ax for ax in fig.axes if ax.images]
    for ax, other in itertools.product(image_axes, image_axes):
        if ax is not other:
            assert not ax.title.get_window_extent(renderer).overlaps(
                other.get_window_extent(renderer)
            )
    plt.close(fig)


def test_every_image_panel_has_a_visible_dark_frame_and_empty_cells_none():
    fig = plots.image_grid(_white(5), [f"t{i}" for i in range(5)], ncols=4)
    image_axes = [ax for ax in fig.axes if ax.images]
    empty_axes = [ax for ax in fig.axes if not ax.images]
    assert len(image_axes) == 5 and len(empty_axes) == 3
    for ax in image_axes:
        assert ax.axison
        for spine in ax.spines.values():
            assert spine.get_visible()
            assert spine.get_linewidth() > 0
            assert matplotlib.colors.to_hex(spine.get_edgecolor()) == plots.FRAME_COLOR
        assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
    assert all(not ax.axison for ax in empty_axes)
    plt.close(fig)


def test_image_grid_refuses_mismatched_titles_and_no_images():
    with pytest.raises(ValueError, match="2 images but 1 titles"):
        plots.image_grid(_white(2), ["only one"])
    with pytest.raises(ValueError, match="at least one image"):
        plots.image_grid([])
