"""Figures the notebooks share (matplotlib; callers save them with ``notebook.save_figure``)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

LABEL_COLORS = {"malicious": "#c0392b", "benign": "#2e86c1"}


#: frame drawn around each image panel so a white border stays visible on a white page
FRAME_COLOR = "#333333"


def wrap_title(title: str, width: int, max_lines: int = 3) -> str:
    """Wrap each line of ``title`` to ``width`` characters; at most ``max_lines`` lines."""
    lines = [
        piece
        for line in title.split("\n")
        for piece in (textwrap.wrap(line, width, break_long_words=True) or [""])
    ]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, width - 1)] + "…"
    return "\n".join(lines)


def image_grid(
    images: Sequence[Image.Image],
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    cell_inches: float = 2.6,
    suptitle: str | None = None,
    fontsize: float = 8,
):
    """A grid of framed images with titles wrapped to the cell width; returns the figure."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"image_grid got {len(images)} images but {len(titles)} titles")
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    # characters per title line: the cell width over an average glyph (~0.6 em), with a margin
    width = max(8, int(cell_inches * 72 * 0.9 / (0.6 * fontsize)))
    wrapped = [wrap_title(t, width) for t in titles] if titles else None
    title_lines = max((t.count("\n") + 1 for t in wrapped), default=0) if wrapped else 0
    title_inches = title_lines * fontsize * 1.3 / 72
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(cell_inches * ncols, (cell_inches + title_inches) * nrows + 0.4),
        squeeze=False,
    )
    for index, ax in enumerate(axes.ravel()):
        if index >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[index])
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_color(FRAME_COLOR)
            spine.set_linewidth(0.8)
        if wrapped:
            ax.set_title(wrapped[index], fontsize=fontsize)
    if suptitle:
        fig.suptitle(suptitle, fontsize=fontsize + 2)
    fig.tight_layout()
    return fig


def label_bars(counts: dict[str, dict[str, int]], *, title: str = "records per source"):
    """Side-by-side malicious / benign counts per source (log scale: sources differ 100x)."""
    names = list(counts)
    positions = np.arange(len(names))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.4))
    for offset, (label, color) in zip((-width / 2, width / 2), LABEL_COLORS.items(), strict=True):
        values = [counts[n].get(label, 0) for n in names]
        bars = ax.bar(positions + offset, values, width, label=label, color=color)
        ax.bar_label(bars, labels=[str(v) if v else "" for v in values], fontsize=7)
    ax.set_xticks(positions, names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("records (log scale)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ harmfulness vector

#: colours of the record groups of the harmfulness-vector study (notebook 01)
GROUP_COLORS = {
    "malicious": "#c0392b",
    "benign": "#2e86c1",
    "easy malicious": "#c0392b",
    "hard malicious (FigStep)": "#e67e22",
    "benign (FigStep)": "#85c1e9",
}
_FALLBACK_COLORS = ("#27ae60", "#8e44ad", "#7f8c8d", "#d35400")


def group_color(name: str, index: int = 0) -> str:
    return GROUP_COLORS.get(name, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])


def pca_scatter(ax, groups: dict[str, np.ndarray], *, fit_on: Sequence[str] | None = None):
    """Scatter of ``[n, D]`` states per group on the first two principal components.

    The PCA is fitted on the groups named in ``fit_on`` (default: all), the others are only
    projected into it (so held-out groups show where they fall in the training geometry).
    """
    from sklearn.decomposition import PCA

    names = list(groups)
    fit_names = [n for n in (fit_on or names) if n in groups]
    fit_data = np.concatenate([np.asarray(groups[n], dtype=np.float64) for n in fit_names])
    pca = PCA(n_components=2).fit(fit_data)
    for index, name in enumerate(names):
        points = pca.transform(np.asarray(groups[name], dtype=np.float64))
        marker = "o" if name in fit_names else "^"
        ax.scatter(
            points[:, 0],
            points[:, 1],
            s=14,
            alpha=0.75,
            marker=marker,
            color=group_color(name, index),
            label=name,
            linewidths=0,
        )
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})", fontsize=8)
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})", fontsize=8)
    ax.tick_params(labelsize=7)
    return pca


def pca_grid(
    by_layer: dict[int, dict[str, np.ndarray]],
    *,
    fit_on: Sequence[str] | None = None,
    ncols: int = 4,
    suptitle: str | None = None,
):
    """One :func:`pca_scatter` per layer (``by_layer[layer][group] = [n, D]``)."""
    if not by_layer:
        raise ValueError("pca_grid needs at least one layer")
    layers = list(by_layer)
    ncols = max(1, min(ncols, len(layers)))
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 2.9 * nrows + 0.5))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes[len(layers) :]:
        ax.axis("off")
    for ax, layer in zip(axes, layers, strict=False):
        pca_scatter(ax, by_layer[layer], fit_on=fit_on)
        ax.set_title(f"layer {layer}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def layer_auroc(
    layers: Sequence[int],
    curves: dict[str, Sequence[float]],
    *,
    chosen: int | None = None,
    tolerance: float | None = None,
    title: str = "held-out AUROC of the projection per layer",
):
    """AUROC against layer, one line per comparison, the chosen layer marked."""
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for index, (name, values) in enumerate(curves.items()):
        color = group_color(name, index)
        # the first curve is the one the choice is made on: wide and underneath, visible where
        # other curves coincide with it
        style = {"lw": 4, "alpha": 0.45, "zorder": 1} if index == 0 else {"lw": 1.3, "zorder": 2}
        ax.plot(layers, values, marker="o", ms=3, label=name, color=color, **style)
    first = next(iter(curves.values()))
    if chosen is not None:
        ax.axvline(chosen, color="#333333", ls="--", lw=1)
        value = first[list(layers).index(chosen)]
        note = f"chosen layer {chosen}: {value:.3f}"
        if tolerance is not None:
            note += f"\n(earliest within {tolerance:g} of the best)"
        ax.annotate(note, (chosen, value), xytext=(8, -28), textcoords="offset points", fontsize=8)
    ax.axhline(0.5, color="#999999", lw=0.8, ls=":")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("AUROC (malicious positive)")
    ax.set_ylim(min(0.4, min(min(v) for v in curves.values()) - 0.02), 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def projection_histograms(
    groups: dict[str, np.ndarray],
    *,
    margins: tuple[float, float] | None = None,
    layer: int | None = None,
    bins: int = 24,
    title: str | None = None,
):
    """Histograms of the projection ``s = v . h`` per group, with ``mu_plus`` / ``mu_minus``."""
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in groups.values()])
    edges = np.histogram_bin_edges(values, bins=bins)
    for index, (name, scores) in enumerate(groups.items()):
        label = f"{name} (n={len(scores)})"
        ax.hist(scores, bins=edges, alpha=0.5, color=group_color(name, index), label=label)
    if margins is not None:
        mu_plus, mu_minus = margins
        ax.axvline(mu_plus, color="#7b241c", lw=1.5, label=f"mu_plus = {mu_plus:.3g}")
        ax.axvline(mu_minus, color="#1b4f72", lw=1.5, ls="--", label=f"mu_minus = {mu_minus:.3g}")
    ax.set_xlabel("projection s = v . h" + (f" at layer {layer}" if layer is not None else ""))
    ax.set_ylabel("records")
    ax.set_title(title or "projection on the harmfulness vector", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def modality_pairs(
    text_scores: Sequence[float],
    image_scores: Sequence[float],
    labels: Sequence[str],
    *,
    layer: int | None = None,
    left: str = "text query",
    right: str = "FigStep image",
    title: str | None = None,
):
    """Paired lines: each instruction's projection as text (left) and as an image (right)."""
    text_scores, image_scores = np.asarray(text_scores), np.asarray(image_scores)
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for label, color in LABEL_COLORS.items():
        chosen = labels == label
        for a, b in zip(text_scores[chosen], image_scores[chosen], strict=True):
            ax.plot([0, 1], [a, b], color=color, alpha=0.35, lw=1)
        if chosen.any():
            means = (text_scores[chosen].mean(), image_scores[chosen].mean())
            ax.plot([0, 1], means, color=color, lw=3, marker="o", label=f"{label} (mean)")
    ax.set_xticks([0, 1], [left, right])
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylabel("projection s" + (f" at layer {layer}" if layer is not None else ""))
    ax.set_title(title or "the same instructions as text and as an image", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_curves(
    histories: dict[str, Sequence[dict]],
    *,
    margins: tuple[float, float] | None = None,
    title: str | None = None,
):
    """Loss per step for each run, and (DA runs) the step's mean malicious / benign projection."""
    fig, (loss_ax, proj_ax) = plt.subplots(1, 2, figsize=(10.0, 3.6))
    for index, (name, history) in enumerate(histories.items()):
        color = f"C{index}"
        steps = [h["step"] for h in history]
        loss_ax.plot(steps, [h["loss"] for h in history], color=color, lw=1, label=name)
        for key, style in (("projection_malicious", "-"), ("projection_benign", ":")):
            points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                kind = key.removeprefix("projection_")
                proj_ax.plot(xs, ys, style, color=color, lw=1, marker=".", ms=3,
                             label=f"{name}: {kind} batches")  # fmt: skip
    if margins is not None:
        proj_ax.axhline(margins[0], color="#7b241c", lw=1.2, label=f"mu_plus = {margins[0]:.3g}")
        proj_ax.axhline(margins[1], color="#1b4f72", lw=1.2, ls="--",
                        label=f"mu_minus = {margins[1]:.3g}")  # fmt: skip
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_yscale("symlog", linthresh=1e-2)
    loss_ax.legend(fontsize=8)
    proj_ax.set_xlabel("step")
    proj_ax.set_ylabel("mean projection of the batch")
    if proj_ax.lines:
        proj_ax.legend(fontsize=7)
    fig.suptitle(title or "training", fontsize=10)
    fig.tight_layout()
    return fig
