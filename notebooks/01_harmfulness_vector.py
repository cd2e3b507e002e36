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
# # 01 · The harmfulness vector: extraction, layer choice and margins
#
# DAVSP supervises a frozen model in activation space. For malicious and benign inputs it reads
# the hidden state of the **last input token** at layer `l`, takes
# `v_l = unit(mean_malicious - mean_benign)`, and later trains the border so that the projection
# `s(x) = v_l · h_l(x)` of malicious inputs rises above `mu_plus` while benign ones stay below
# `mu_minus`. The paper fixes layer 20 of 40 and margins 27 / -2 for LLaVA-1.5-13B. Both choices
# are offered (`layer_choice`): the reference values, or a layer and margins read off a
# **selection split** (never the held-out split whose AUROC is reported), so that they fit
# whichever model is loaded; the other choice is always computed and reported beside.
#
# This notebook extracts activations at every requested layer (one batched, truncated forward per
# batch: the forward stops after the deepest requested layer), fits the vector, scores it per
# layer on held-out records, chooses a layer, suggests margins, measures how much harder a
# FigStep-style image attack is to separate than the same instruction as text, and saves the
# vector (safetensors + JSON) for the training notebook.

# %% [markdown]
# ## Data (decided here)
#
# - **Vector split**: *easy* malicious instructions (text-prompts `harmful_train`) against benign
#   ones (`harmless_train`), the instruction in the **text query over a blank white image**. A
#   blank image rather than a text-only turn because every input DAVSP sees later carries an image
#   (the border lives on it): with a blank image the prompt template (image block, border slots,
#   safety prefix) is exactly that of an image input, so the direction does not also encode
#   "image present vs absent", and the held-out FigStep inputs differ from the easy ones only in
#   *where* the instruction is.
# - **Held-out**: easy malicious from `harmful_val` (same format); **hard** malicious = the same
#   `harmful_val` instructions rendered FigStep-style with FigStep's prompt as the query; benign
#   from `harmless_val` in both formats (text over a blank image, and rendered FigStep-style).
# - **Topic-matched pairs**: the project's own built-in instructions (never in the vector split):
#   each harmful request has a benign one on the same topic ("pick a lock to break in" / "pick the
#   lock of my own shed"), as text over a blank image and as FigStep images. They check that a
#   layer separates *harm*, not topic or style (the text-prompt splits differ in both), and show
#   the modality gap.
# - Without the benchmark mirror, the built-in dataset is split instead (per class, seeded,
#   group-aware) and the modality-gap set is its held-out part.
# - **Selection split** (chooses the layer and the margins): further `harmful_train` /
#   `harmless_train` instructions the vector did not use (text over a blank image, and rendered
#   FigStep-style), plus the topic-matched pairs. The held-out split is only reported.
# - **`pools="paper"`** replaces all of the above by the paper's disjoint pools
#   (`davsp_lib.data.pools`): vector = VLGuard 470 + 470 instructions (text over a blank image: the
#   mirror has no VLGuard images), selection = 100 + 100 more VLGuard and 100 MM-SafetyBench
#   TYPO images, held-out = `n_heldout` per part of the evaluation pool (VLGuard test text,
#   MM-SafetyBench TYPO, MM-Vet). A pool that cannot supply what is asked is an error.
# - The DAVSP text safety prefix is in every prompt (`safety_prefix`), as in the reference
#   extraction script (`vector/extract_hs.py` prepends it), since the vector is used with it.

# %% tags=["parameters"]
# Parameters (papermill)
model: str = "tiny"  # "tiny"/"small" (embedded default) or a LLaVA-1.5 / Qwen2-VL id or folder
dtype: str = "auto"  # model dtype: auto, float32, bfloat16, float16. auto: a bfloat16 LM
# for the embedded model (losses, projections, border: float32), an HF checkpoint's own dtype
# otherwise; float32 reproduces earlier embedded results exactly
device: str = ""  # empty: the default (CPU); e.g. cuda
data_root: str = ""  # benchmark mirror; "": $DAVSP_DATA_ROOT, else ../shared/data
use_mirror: bool = True  # False: only the built-in dataset written by the project
pools: str = ""  # "paper": the paper's disjoint data pools (davsp_lib.data.pools); "": splits below
layer_choice: str = "data"  # "data": from the selection split; "reference": 20 of 40, 27 / -2
n_vector: int = 48  # records per class in the vector split
n_heldout: int = 32  # records per class held out (each also rendered FigStep-style)
n_gap: int = 32  # built-in topic-matched instructions per class (max 40)
layers: str = "all"  # "all" (0..num_layers) or a comma list, e.g. "4,8,12"
safety_prefix: bool = True  # DAVSP's text safety prefix in every prompt
tolerance: float = 0.01  # layer choice: earliest layer within this AUROC of the best
q_plus: float = 0.5  # mu_plus: this quantile of easy malicious projections
q_minus: float = 0.9  # mu_minus: this quantile of benign projections
batch_size: int = 8
interactive: bool = True  # show the ipywidgets layer slider (the pipeline runs headless: False)
seed: int = 0
output_dir: str = "runs/interactive/01_harmfulness_vector"  # results.json + vector files
figures_dir: str = "figures/01_harmfulness_vector"  # PNG + SVG

# %%
import time
from pathlib import Path

import numpy as np
import torch

from davsp_lib.data import pools as pools_lib
from davsp_lib.data import prompts
from davsp_lib.method import diagnostics, vectors
from davsp_lib.models.adapters import load_adapter
from davsp_lib.runtime import notebook as nb
from davsp_lib.runtime import plots, recipe
from davsp_lib.runtime.errors import DataError

parameters = nb.parameters(
    globals(), __annotations__, pools=nb.one_of("", *pools_lib.PRESET_POOLS),
    layer_choice=nb.one_of(*recipe.LAYER_CHOICES), n_vector=nb.at_least(2),
    n_heldout=nb.at_least(2), n_gap=nb.at_least(1), tolerance=nb.between(0.0, 0.5),
    q_plus=nb.between(0.0, 1.0), q_minus=nb.between(0.0, 1.0),
)
output_dir, figures_dir = Path(output_dir), Path(figures_dir)

# %%
adapter = load_adapter(model, dtype=dtype, device_map=device or None)
layer_list = vectors.parse_layers(layers, adapter.num_layers)
if max(layer_list) == 0:
    raise nb.ParameterError("parameter 'layers' needs a layer > 0 (layer 0 is the embeddings)")
model_id = adapter.info()["model_id"]
print(f"{model_id}: {adapter.num_layers} layers x {adapter.hidden_size}; layers {layer_list}")

# %%
mirror_root = nb.mirror_root(use_mirror, data_root)
pool_info = None
if pools:
    drawn = pools_lib.build_pools(mirror_root, pools, seed=seed)
    pool_info = drawn.to_json(ids=False)
    data = diagnostics.study_data_from_pools(drawn, n_heldout=n_heldout, n_gap=n_gap, seed=seed)
    print(f"{pools} pools (n_vector ignored):", pool_info["counts"])
    for substitution in data.substitutions:
        print("substitution:", substitution)
else:
    data = diagnostics.study_data(
        mirror_root, n_vector=n_vector, n_heldout=n_heldout, n_gap=n_gap, seed=seed
    )
for note in data.notes:
    print("note:", note)
safety = None
if safety_prefix:
    try:
        safety = prompts.text("davsp_safety_prefix", mirror_root)
    except DataError as error:
        print(f"no safety prefix available ({error}); prompts carry none")
for name, size in data.sizes().items():
    print(f"{name:>13}: {size}")

# %% [markdown]
# ## Extraction
#
# Every part goes through `vectors.extract`: batched, `torch.no_grad`, last input token, all
# requested layers in one forward, stored in float64. Text records get the blank white image.

# %%
acts, seconds = {}, {}
for name, records in data.parts().items():
    start = time.perf_counter()
    acts[name] = vectors.extract(
        adapter, records, layer_list, batch_size=batch_size, safety_prompt=safety,
        blank_image=True, desc=name,
    )
    seconds[name] = round(time.perf_counter() - start, 2)
print({name: f"{len(a)} records, {seconds[name]} s" for name, a in acts.items()})
vector = vectors.fit_vector(
    acts["vector"],
    metadata={"seed": seed, "data_source": data.source, "safety_prefix": safety_prefix,
              "pools": pool_info},
)
print("||mean_mal - mean_ben|| per layer:",
      [round(x, 2) for x in vector.metadata["mean_difference_norm"]])

# %% [markdown]
# ## Geometry: malicious vs benign per layer (PCA)
#
# PCA fitted on the vector split (circles); the held-out FigStep images (triangles) are projected
# into the same plane. Layer 0 (the embedding of the last template token, the same for every
# input) is left out.

# %%
shown = [layer for layer in layer_list if layer > 0]
picks = np.linspace(0, len(shown) - 1, min(8, len(shown)))
grid_layers = sorted({shown[round(i)] for i in picks})


def groups_at(layer):
    return {
        "malicious": acts["vector"].malicious.at(layer).numpy(),
        "benign": acts["vector"].benign.at(layer).numpy(),
        "hard malicious (FigStep)": acts["hard"].at(layer).numpy(),
        "benign (FigStep)": acts["benign_image"].at(layer).numpy(),
    }


fig = plots.pca_grid(
    {layer: groups_at(layer) for layer in grid_layers},
    fit_on=["malicious", "benign"],
    suptitle=f"{model_id}: last-input-token states, PCA of the vector split",
)
nb.save_figure(fig, figures_dir, "pca_layers")

# %%
# Interactive only: a layer slider (skipped headless, e.g. under papermill, or without ipywidgets)
if interactive:
    try:
        import ipywidgets as widgets
        import matplotlib.pyplot as plt
        from IPython.display import display
    except ImportError as error:
        print(f"no slider: {error}")
    else:
        def show_layer(layer):
            _fig, ax = plt.subplots(figsize=(4.5, 4))
            plots.pca_scatter(ax, groups_at(layer), fit_on=["malicious", "benign"])
            ax.set_title(f"layer {layer}")
            ax.legend(fontsize=7)
            plt.show()

        slider = widgets.SelectionSlider(options=shown, value=shown[len(shown) // 2],
                                         description="layer")
        display(widgets.VBox([slider, widgets.interactive_output(show_layer, {"layer": slider})]))

# %% [markdown]
# ## Which layer
#
# Per layer, the AUROC of the projection (malicious positive) and Cohen's d. The data-driven
# layer is chosen on the **selection split** only: the **worst case** of its easy malicious vs
# benign AUROC and of the topic-matched built-in pairs (a layer must separate harm from benign on
# the same topic too), and it is the **earliest** layer within `tolerance` of the best worst-case
# AUROC: a DAVSP step only runs the model up to that layer, so earlier is cheaper. The held-out
# curves are reported, never used to choose. The reference layer (20 of 40, at the same relative
# depth for another model) is shown beside; `layer_choice` says which one is used.

# %%
easy_heldout = vectors.concat_activations([acts["easy"], acts["benign_text"]])
hard_heldout = vectors.concat_activations([acts["hard"], acts["benign_image"]])
report = diagnostics.layer_report(vector, easy_heldout)
paired_report = diagnostics.layer_report(vector, acts["gap_text"])
hard_report = diagnostics.layer_report(vector, hard_heldout)
if data.has_selection:  # the no-mirror fallback has no selection split: its held-out chooses
    sel_report = diagnostics.layer_report(
        vector, vectors.concat_activations([acts["sel_easy"], acts["sel_benign"]])
    )
else:
    sel_report = report
    print("note: no selection split (built-in data): the held-out split chooses the layer")
selection = diagnostics.worst_case([sel_report, paired_report])
data_layer = diagnostics.choose_layer(selection, tolerance)
reference = recipe.reference_choice(adapter.num_layers)
if layer_choice == "reference" and reference.layer not in layer_list:
    raise nb.ParameterError(f"the reference layer {reference.layer} is not in 'layers'")
chosen = data_layer if layer_choice == "data" else reference.layer
print(f"data-driven layer {data_layer}; {reference.source}; using {layer_choice}: {chosen}")
for name, rep in (("selection split", sel_report), ("topic-matched pairs", paired_report),
                  ("worst case", selection), ("held-out (reported)", report)):
    print(f"{name:>19}: best AUROC {max(rep.auroc):.4f} at layer {rep.best_layer}, "
          f"{rep.at(chosen)['auroc']:.4f} at the chosen layer {chosen}")
fig = plots.layer_auroc(
    report.layers,
    {
        "worst case of selection split and pairs (chooses)": selection.auroc,
        "selection split: easy malicious vs benign": sel_report.auroc,
        "held-out split: easy malicious vs benign (reported)": report.auroc,
        "topic-matched built-in pairs (text)": paired_report.auroc,
        "hard malicious vs benign (held-out images)": hard_report.auroc,
    },
    chosen=chosen,
    tolerance=tolerance,
    title=f"{model_id}: held-out AUROC of v_l . h_l (text over a blank image unless FigStep)",
)
nb.save_figure(fig, figures_dir, "layer_auroc")

# %% [markdown]
# ## Margins and the easy/hard gap at the chosen layer
#
# Data-driven margins, from the **selection split** at the data-driven layer: `mu_plus` = median
# projection of its easy malicious inputs (where an input the model refuses lives); `mu_minus` =
# 0.9-quantile of its benign inputs, both formats pooled (benign inputs stay where they are). The
# reference margins are 27 / -2 (LLaVA-1.5-13B's scale). Hard malicious inputs should sit below
# `mu_plus`: the distance is what the border has to move them (shown on the held-out split).

# %%
scores = {name: vector.project(a, chosen).cpu().numpy() for name, a in acts.items()}
benign_all = np.concatenate([scores["benign_text"], scores["benign_image"]])
sep = diagnostics.separation(scores["easy"], scores["hard"], benign_all)
within_format = {
    "easy_vs_benign_text": diagnostics.auroc(scores["easy"], scores["benign_text"]),
    "hard_vs_benign_image": diagnostics.auroc(scores["hard"], scores["benign_image"]),
}
# the data-driven margins come from the selection split (held-out parts without one)
margin_parts = (
    {"easy": "sel_easy", "hard": "sel_hard", "benign": ["sel_benign", "sel_benign_image"]}
    if data.has_selection
    else {"easy": "easy", "hard": "hard", "benign": ["benign_text", "benign_image"]}
)
at_data = {name: vector.project(a, data_layer).cpu().numpy() for name, a in acts.items()}
try:
    data_margins = diagnostics.suggest_margins(
        at_data[margin_parts["easy"]],
        np.concatenate([at_data[k] for k in margin_parts["benign"] if k in at_data]),
        at_data[margin_parts["hard"]], q_plus=q_plus, q_minus=q_minus,
    )
    margin_error = None
except ValueError as error:
    data_margins, margin_error = None, str(error)
    print("no data-driven margins:", error)
margins = data_margins if layer_choice == "data" else (reference.mu_plus, reference.mu_minus)
print(sep)
print("within format:", within_format, "data-driven margins:", data_margins,
      "reference margins:", (reference.mu_plus, reference.mu_minus), "used:", margins)
fig = plots.projection_histograms(
    {
        "easy malicious": scores["easy"],
        "hard malicious (FigStep)": scores["hard"],
        "benign": scores["benign_text"],
        "benign (FigStep)": scores["benign_image"],
    },
    margins=margins,
    layer=chosen,
    title=f"{model_id}: held-out projections at layer {chosen}",
)
nb.save_figure(fig, figures_dir, "projections")

# %% [markdown]
# ## The modality gap
#
# The same built-in instructions, once in the text query (over a blank image) and once as a
# FigStep image; one line per instruction.

# %%
gap_labels = [r.label.value for r in data.gap_text]
fig = plots.modality_pairs(
    scores["gap_text"], scores["gap_image"], gap_labels, layer=chosen,
    title=f"{model_id}: the same instructions as text and as FigStep images",
)
nb.save_figure(fig, figures_dir, "modality_gap")
gap_malicious = np.array(gap_labels) == "malicious"
modality = {
    label: {
        "mean_text": float(scores["gap_text"][mask].mean()),
        "mean_image": float(scores["gap_image"][mask].mean()),
        "mean_shift_image_minus_text": float(
            (scores["gap_image"][mask] - scores["gap_text"][mask]).mean()
        ),
    }
    for label, mask in (("malicious", gap_malicious), ("benign", ~gap_malicious))
    if mask.any()
}
print(modality)

# %% [markdown]
# ## Save the vector
#
# Safetensors (directions, means, layers; float64) + JSON (model id and checksum, layers, counts,
# prompt template, token position, data ids, seed, and the choices made here). Reloaded with the
# adapter to check the round trip and that it matches this model.

# %%
data_choice = {
    "layer": data_layer,
    "mu_plus": None if data_margins is None else data_margins[0],
    "mu_minus": None if data_margins is None else data_margins[1],
    "source": "earliest layer within tolerance of the best worst-case AUROC (selection split, "
    "topic-matched pairs); margins: quantiles of the selection split at that layer",
}
vector.metadata["diagnostics"] = {
    "layer_choice": layer_choice,
    "chosen_layer": chosen,
    "tolerance": tolerance,
    "mu_plus": None if margins is None else margins[0],
    "mu_minus": None if margins is None else margins[1],
    "q_plus": q_plus,
    "q_minus": q_minus,
    "heldout_auroc_at_chosen": report.at(chosen)["auroc"],
    "paired_auroc_at_chosen": paired_report.at(chosen)["auroc"],
    "selection_auroc_at_chosen": sel_report.at(chosen)["auroc"],
    "data_choice": data_choice,
    "reference_choice": reference.to_json(),
    "selection": data_choice["source"] if layer_choice == "data" else reference.source,
}
tensor_file, json_file = vector.save(output_dir / "harmfulness_vector")
reloaded = vectors.HarmfulnessVector.load(output_dir / "harmfulness_vector", adapter=adapter)
assert torch.equal(reloaded.directions, vector.directions) and reloaded.metadata == vector.metadata
print(f"saved {tensor_file} and {json_file}")

# %%
results = {
    "model": adapter.info(),
    "data_source": data.source,
    "notes": data.notes,
    "sizes": data.sizes(),
    "ids": data.ids(),
    "layers": layer_list,
    "layer_report_easy": report.to_json(),
    "layer_report_paired": paired_report.to_json(),
    "layer_report_selection": selection.to_json(),
    "layer_report_hard": hard_report.to_json(),
    "pools": pool_info,
    "layer_choice": layer_choice,
    "chosen_layer": chosen,
    "data_choice": data_choice,
    "reference_choice": reference.to_json(),
    "layer_report_selection_split": sel_report.to_json(),
    "best_layer": report.best_layer,
    "margins": None if margins is None else {"mu_plus": margins[0], "mu_minus": margins[1]},
    "margin_error": margin_error,
    "separation": sep.to_json(),
    "auroc_within_format": within_format,
    "modality_gap": modality,
    "extraction_seconds": seconds,
    "vector_files": [str(tensor_file), str(json_file)],
}
margin_text = (
    "no margins (no room between the quantiles)" if margins is None
    else f"margins mu+ {margins[0]:.3g}, mu- {margins[1]:.3g}"
)
headline = (
    f"{model_id}, vector from {data.sizes()['vector']['malicious']}+"
    f"{data.sizes()['vector']['benign']} {data.source} instructions (text over a blank image), "
    f"no judge (activation statistics): layer {chosen} ({layer_choice}; data-driven "
    f"{data_layer}, reference {reference.layer}) (held-out AUROC "
    f"{report.at(chosen)['auroc']:.3f}, topic-matched pairs "
    f"{paired_report.at(chosen)['auroc']:.3f}); "
    f"AUROC against all held-out benign there: easy {sep.auroc_easy:.3f}, "
    f"hard image attack ({data.hard[0].source}) "
    f"{sep.auroc_hard:.3f} (gap {sep.auroc_gap:+.3f}); {margin_text}"
)
nb.write_results(output_dir / "results.json", notebook="01_harmfulness_vector",
                 parameters=parameters, results=results, headline=headline)
print(headline)
