# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Data tour: the benchmarks, our renderers and the splits
#
# What the workbook trains and evaluates on. Each sample is one `Record` (image or render spec,
# query, label, source, category). This notebook loads every source that is available (the
# benchmark mirror under the data root, and our own built-in set, which needs no download), shows
# examples, compares our FigStep re-renders with the benchmark's images, and makes the seeded,
# non-overlapping vector / train / eval splits that later notebooks use.

# %% tags=["parameters"]
# Parameters (papermill)
data_root: str = ""  # benchmark mirror; "": $DAVSP_DATA_ROOT, else ../shared/data
use_mirror: bool = True  # False: only the built-in dataset written by the project
examples_per_source: int = 3  # example images shown per source
split_sizes: dict[str, int] = {"vector": 24, "train": 24, "eval": 24}  # per split, label-stratified
rerender_samples: int = 8  # FigStep images re-rendered and compared with the originals
seed: int = 0
output_dir: str = "runs/interactive/00_data_tour"  # results.json and splits.json go here
figures_dir: str = "figures/00_data_tour"  # PNG + SVG

# %%
from pathlib import Path

from davsp_lib.data import datasets, images, render, splits
from davsp_lib.runtime import notebook as nb
from davsp_lib.runtime import plots

parameters = nb.parameters(
    globals(), __annotations__, examples_per_source=nb.between(1, 12),
    split_sizes=nb.at_least(1), rerender_samples=nb.at_least(0),
)
output_dir, figures_dir = Path(output_dir), Path(figures_dir)

# %% [markdown]
# ## Sources
#
# Bad rows are never dropped silently: each loader reports what it skipped and why.

# %%
sources = {
    "builtin-figstep": datasets.load_builtin("figstep"),
    "builtin-typo": datasets.load_builtin("typo"),
    "builtin-text": datasets.load_builtin("text"),
}
mirror_root = nb.mirror_root(use_mirror, data_root)
if mirror_root is not None:
    sources |= {
        "figstep": datasets.load_figstep(mirror_root, on_error="skip"),
        "mm-safetybench-typo": datasets.load_mmsafetybench(
            mirror_root, variant="typo", on_error="skip"
        ),
        "mm-vet": datasets.load_mmvet(mirror_root, on_error="skip"),
        "vlguard-train": datasets.load_vlguard(mirror_root, "train", on_error="skip"),
        "harmful-train": datasets.load_text_prompts(mirror_root, "harmful_train", on_error="skip"),
        "harmless-val": datasets.load_text_prompts(mirror_root, "harmless_val", on_error="skip"),
    }
for dataset in sources.values():
    print(dataset.report() if dataset.skipped else dataset.report().splitlines()[0])
counts = {name: dataset.counts() for name, dataset in sources.items()}
fig = plots.label_bars(counts)
nb.save_figure(fig, figures_dir, "records_per_source")

# %% [markdown]
# ## Examples
#
# Image sources only (VLGuard's images are not redistributed; its text is used).

# %%
example_images, example_titles = [], []
for name, dataset in sources.items():
    with_images = [record for record in dataset if record.has_image]
    for record in with_images[:examples_per_source]:
        example_images.append(images.record_image(record))
        example_titles.append(f"{name}\n{record.label.value}: {record.id}")
fig = plots.image_grid(example_images, example_titles, ncols=min(6, max(3, examples_per_source)))
nb.save_figure(fig, figures_dir, "examples")

# %% [markdown]
# ## Our FigStep renderer against the benchmark's images
#
# The renderer follows FigStep's recipe (FreeMonoBold 80 pt, wrap at 15 characters, an empty
# numbered list); only anti-aliasing may differ. Mean absolute difference in 8-bit grey levels:

# %%
import numpy as np

rerender_diffs = []
if mirror_root is not None and rerender_samples:
    pairs = []
    for record in list(sources["figstep"])[:rerender_samples]:
        original = images.record_image(record)
        ours = render.render_figstep(record.meta["instruction"]).image
        diff = np.abs(np.asarray(original, dtype=np.float32) - np.asarray(ours, dtype=np.float32))
        rerender_diffs.append(float(diff.mean()))
        pairs.append((original, ours, record.id))
    print("mean |original - ours| per image:", [round(d, 3) for d in rerender_diffs])
    first = pairs[0]
    titles = [f"benchmark {first[2]}", "our re-render"]
    fig = plots.image_grid([first[0], first[1]], titles, ncols=2)
    nb.save_figure(fig, figures_dir, "figstep_rerender")
else:
    print("skipped (no mirror)")

# %% [markdown]
# ## One instruction, three modalities
#
# The modality-gap study puts the same instruction in plain text, in a FigStep-style image and
# in a TYPO-style image; records made from one instruction share a `group`, so a split never
# separates them.

# %%
text_record = sources["builtin-text"][0]
variants = [
    datasets.as_image_attack([text_record], "figstep")[0],
    datasets.as_image_attack([text_record], "typo")[0],
]
print("text query:", text_record.query)
for record in variants:
    print(f"{record.id}: group={record.group} query={record.query[:70]!r}")
variant_images = [images.record_image(r) for r in variants]
fig = plots.image_grid(variant_images, [r.id for r in variants], ncols=2)
nb.save_figure(fig, figures_dir, "modalities")

# %% [markdown]
# ## Splits
#
# Seeded, label-stratified, group-aware and non-overlapping; saved next to the results.

# %%
pool = list(sources["builtin-figstep"])
if mirror_root is not None:
    pool += list(sources["figstep"]) + list(sources["mm-vet"])
split = splits.make_splits(pool, split_sizes, seed=seed)
split.save(output_dir / "splits.json")
for split_name in split.names:
    chosen = split.select(pool, split_name)
    by_label = {lab: sum(r.label.value == lab for r in chosen) for lab in ("malicious", "benign")}
    print(f"{split_name:>6}: {len(chosen)} records {by_label}")

# %%
results = {
    "mirror_root": None if mirror_root is None else str(mirror_root),
    "counts": counts,
    "skipped": {name: len(dataset.skipped) for name, dataset in sources.items()},
    "figstep_rerender_mean_abs_diff": rerender_diffs,
    "splits": split.counts(),
    "splits_file": str(output_dir / "splits.json"),
}
total = sum(sum(c.values()) for c in counts.values())
headline = f"{len(sources)} sources, {total} records; splits {split.counts()} (seed {seed})"
if rerender_diffs:
    headline += (
        f"; FigStep re-render mean abs diff {np.mean(rerender_diffs):.2f}/255"
        f" on {len(rerender_diffs)} images"
    )
nb.write_results(output_dir / "results.json", notebook="00_data_tour", parameters=parameters,
                 results=results, headline=headline)
print(headline)
