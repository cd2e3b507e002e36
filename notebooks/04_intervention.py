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
# # 04 · Test-time intervention: steering along the harmfulness vector
#
# Is the harmfulness vector of notebook 01 *causal* for refusal, or only a read-out? The paper
# (Table 5, LLaVA-1.5-13B) adds `±α·v_l` to the hidden state at layer `l` during generation:
# adding raises FigStep RSR (43.0 → 70.4), subtracting lowers it (→ 38.6). This notebook runs the
# same experiment on the loaded model, sweeps α from negative to positive, and adds VLM-Guard's
# projection removal `h ← h − (h·v)v` as a comparison.
#
# **How** (`davsp_lib.method.intervention`): `steer(adapter, v, layer, alpha, positions)` and
# `ablate(adapter, v, layer)` are context managers around forward hooks on the language block
# whose output is layer `l` (layer 0 = embeddings, layer `l` = output of block `l − 1`); the
# hooks are removed on exit, even when the body raises. `positions="all"` edits every prompt
# token and every generated token as it is fed back in; `positions="last"` edits only the
# prompt's last token (the one the vector was fitted on), never a generated one. Both are
# exact under cached generation (the tests compare cached decoding with step-by-step uncached
# recomputation, logits and tokens).
#
# **The α unit (decided here).** α is given in units of `d_l = |mean_malicious − mean_benign|`
# at layer `l` (from the vector file): `k = α / d_l = 1` moves a last-token state's projection
# `v·h` by the distance between the two class means of the vector data. The typical hidden-state
# norm at that layer (median over the evaluation prompts) is printed and stored too, so `α`
# can also be read as a fraction of `|h|`.
#
# **Data.** Held-out harmful instructions (text-prompts `harmful_val`) rendered FigStep-style
# with FigStep's query (*malicious FigStep*, RSR = refusal rate), held-out harmless ones
# (`harmless_val`) rendered the same way (*benign FigStep*, refusal rate should stay low), and
# the first harmful instructions again as **plain text** over a blank white image — the
# format the vector was fitted on — which shows what the vector does where the model already
# refuses sometimes. Without the benchmark mirror: the project's built-in instructions.
#
# **Judge.** Refusal-string matching with the JailbreakBench refusal prefixes
# (`judges.RefusalJudge("jailbreakbench")`): a response containing a marker is a refusal
# (safe), anything else is not. It reads *refusal*, not harm: gibberish counts as "not refused".

# %% tags=["parameters"]
# Parameters (papermill)
model: str = "tiny"  # "tiny"/"small" (embedded default) or a LLaVA-1.5 / Qwen2-VL id or folder
dtype: str = "auto"  # model dtype: auto, float32, bfloat16, float16. auto: a bfloat16 LM
# for the embedded model (losses, projections, border: float32), an HF checkpoint's own dtype
# otherwise; float32 reproduces earlier embedded results exactly
device: str = ""  # empty: the default (CPU); e.g. cuda
data_root: str = ""  # benchmark mirror; "": $DAVSP_DATA_ROOT, else ../shared/data
use_mirror: bool = True  # False: only the built-in dataset written by the project
vector_path: str = "runs/interactive/01_harmfulness_vector/harmfulness_vector"  # notebook 01
layer: int = -1  # -1: the layer notebook 01 chose (metadata diagnostics.chosen_layer)
alphas: list[float] = [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]  # k: alpha in units of d_l (0 always added)
positions: str = "all"  # "all": prompt + generated tokens; "last": the prompt's last token only
ablation: bool = True  # also run VLM-Guard's projection removal at the same layer
safety_prefix: bool = False  # DAVSP's text safety prefix in the prompts (Table 5: none)
n_malicious: int = 16  # held-out harmful instructions, rendered FigStep-style
n_benign: int = 16  # held-out harmless instructions, rendered FigStep-style
n_text: int = 8  # of the harmful ones, also asked as plain text (0: skip)
batch_size: int = 8
max_new_tokens: int = 24
n_examples: int = 2  # example responses shown per set
seed: int = 0
output_dir: str = "runs/interactive/04_intervention"  # results.json + per-condition responses
figures_dir: str = "figures/04_intervention"  # PNG + SVG

# %%
import hashlib
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from davsp_lib.data import prompts
from davsp_lib.evaluation import judges, metrics
from davsp_lib.method import intervention, vectors
from davsp_lib.models.adapters import load_adapter
from davsp_lib.models.inputs import iter_batches
from davsp_lib.runtime import notebook as nb

parameters = nb.parameters(
    globals(), __annotations__, layer=nb.at_least(-1), alphas={"finite": True},
    positions=nb.one_of(*intervention.POSITIONS), n_malicious=nb.at_least(1),
    n_benign=nb.at_least(1), n_text=nb.at_least(0), max_new_tokens=nb.at_least(1),
    n_examples=nb.at_least(0),
)
output_dir, figures_dir = Path(output_dir), Path(figures_dir)
ks = sorted({float(value) for value in alphas} | {0.0})  # the unsteered row is always there
parameters["alphas"] = ks

# %%
started = time.perf_counter()
adapter = load_adapter(model, dtype=dtype, device_map=device or None)
model_id = adapter.info()["model_id"]
vector = vectors.HarmfulnessVector.load(vector_path, adapter)
chosen = vector.metadata.get("diagnostics", {}).get("chosen_layer")
if layer == -1:
    if chosen is None:
        raise nb.ParameterError(f"{vector_path}: no chosen layer in the vector; set 'layer'")
    layer = int(chosen)
parameters["layer"] = layer
direction = vector.direction(layer)
d_l = intervention.alpha_unit(vector, layer)
margins = {k: vector.metadata.get("diagnostics", {}).get(k) for k in ("mu_plus", "mu_minus")}
print(f"{model_id}: steering at layer {layer} of {adapter.num_layers} "
      f"(notebook 01 chose {chosen}); d_l = {d_l:.3f}; margins {margins}")

# %%
mirror_root = nb.mirror_root(use_mirror, data_root)
vector_ids = [i for ids in vector.metadata.get("data_ids", {}).values() for i in ids]
data = intervention.sweep_data(
    mirror_root, n_malicious=n_malicious, n_benign=n_benign, n_text=n_text, seed=seed,
    exclude_ids=vector_ids,
)
for note in data.notes:
    print("note:", note)
safety = None
if safety_prefix:
    safety = prompts.text("davsp_safety_prefix", mirror_root)
# images are rendered / read once and reused by every condition
batches = {
    name: list(iter_batches(adapter, records, batch_size, safety_prompt=safety,
                            blank_image=name == "malicious_text"))
    for name, records in data.sets.items() if records
}
print(data.source, data.sizes())

# %% [markdown]
# ## The sweep
#
# One condition = one α (or the projection removal), applied to every set. For each response the
# notebook also records the projection `v·h_l` of the prompt's last token *as the model saw it*
# (after the edit). Each (condition, set) is stored under `output_dir/responses/` with everything
# that produced it, so an interrupted run resumes where it stopped.

# %%
judge = judges.RefusalJudge("jailbreakbench", mirror_root)
key_base = {
    "model": adapter.info(), "vector_file": str(vector_path),
    "direction_sha256": hashlib.sha256(direction.cpu().numpy().tobytes()).hexdigest(),
    "layer": layer, "positions": positions,
    "safety_prefix": safety_prefix, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
}
conditions = [("steer", k) for k in ks] + ([("ablate", None)] if ablation else [])


def label(kind, k):
    return f"k={k:+g}" if kind == "steer" else "projection removed"


def context_for(kind, k):
    if kind == "ablate":
        return lambda: intervention.ablate(adapter, direction, layer, positions)
    return lambda: intervention.steer(adapter, direction, layer, k * d_l, positions)


def run(kind, k, name):
    tic = time.perf_counter()
    out = intervention.respond(
        adapter, batches[name], max_new_tokens=max_new_tokens,
        intervention=context_for(kind, k), state_layer=layer, progress=False,
    )
    return {"texts": out.texts,
            "projections": vector.project(out.states, layer).tolist(),
            "state_norms": out.states.norm(dim=-1).tolist(),
            "seconds": round(time.perf_counter() - tic, 2)}


responses, seconds, resumed = {}, {}, []
for kind, k in conditions:
    for name in batches:
        key = {**key_base, "condition": kind, "k": k, "alpha": None if k is None else k * d_l,
               "set": name, "ids": [r.id for r in data.sets[name]]}
        path = output_dir / "responses" / f"{kind}_{'' if k is None else f'{k:+g}'}_{name}.json"
        responses[label(kind, k), name], reused = intervention.resumable(
            path, key, lambda kind=kind, k=k, name=name: run(kind, k, name)
        )
        if reused and label(kind, k) not in resumed:
            resumed.append(label(kind, k))
    # generation time as measured when the responses were made (also when resumed)
    seconds[label(kind, k)] = round(sum(responses[label(kind, k), name].get("seconds", 0.0)
                                        for name in batches), 1)
    print(f"{label(kind, k):>20}: {seconds[label(kind, k)]} s"
          + (" (stored, resumed)" if label(kind, k) in resumed else ""))


# %%
def refusals(texts):
    return [judge.is_refusal(t) for t in texts]


set_titles = {
    "malicious_figstep": "malicious FigStep: RSR",
    "benign_figstep": "benign FigStep: refusal rate",
    "malicious_text": "malicious text: refusal rate",
}
rows = []
for kind, k in conditions:
    row = {"condition": label(kind, k), "k": k, "alpha": None if k is None else k * d_l}
    for name in batches:
        flags = refusals(responses[label(kind, k), name]["texts"])
        n, hits = len(flags), sum(flags)
        low, high = metrics.wilson_interval(hits, n)
        row[name] = {"refused": hits, "n": n, "rate": hits / n, "ci95": [low, high],
                     "mean_projection": float(np.mean(
                         responses[label(kind, k), name]["projections"]))}
    rows.append(row)
base_norm = float(np.median(np.concatenate(
    [responses[label("steer", 0.0), name]["state_norms"] for name in batches])))
print(f"median |h_l| of the prompts' last token (unsteered): {base_norm:.2f}; d_l = {d_l:.3f} "
      f"= {d_l / base_norm:.3f} |h_l|")
table = pd.DataFrame([
    {"condition": row["condition"],
     "alpha": "" if row["alpha"] is None else f"{row['alpha']:+.2f}",
     **{set_titles[name]: f"{row[name]['refused']}/{row[name]['n']} "
                          f"({100 * row[name]['rate']:.0f} %)" for name in batches},
     **{f"mean v·h ({name})": round(row[name]["mean_projection"], 2) for name in batches}}
    for row in rows
]).set_index("condition")
table

# %% [markdown]
# ## The α-sweep curve
#
# Refusal rates (Wilson 95 % intervals) against `k = α / d_l`; the dotted lines are the
# projection removal. Right: where the prompts' last-token projection lands after the edit,
# against notebook 01's margins (the projection a DAVSP border is trained to reach).

# %%
steer_rows = [row for row in rows if row["k"] is not None]
ablate_row = next((row for row in rows if row["k"] is None), None)
colors = {"malicious_figstep": "#c0392b", "benign_figstep": "#2e86c1",
          "malicious_text": "#8e44ad"}
fig, (ax, ax_proj) = plt.subplots(1, 2, figsize=(11, 4.2))
x = np.array([row["k"] for row in steer_rows])
shift = 0.03 * (x.max() - x.min() or 1)  # sets side by side: equal rates would hide each other
for offset, name in zip((-shift, 0.0, shift), batches, strict=False):
    rate = np.array([row[name]["rate"] for row in steer_rows])
    low = rate - np.array([row[name]["ci95"][0] for row in steer_rows])
    high = np.array([row[name]["ci95"][1] for row in steer_rows]) - rate
    ax.errorbar(x + offset, rate, yerr=[low, high], marker="o", capsize=3, color=colors[name],
                label=f"{set_titles[name]} (n={steer_rows[0][name]['n']})")
    if ablate_row is not None:
        ax.axhline(ablate_row[name]["rate"], color=colors[name], linestyle=":", linewidth=1)
    ax_proj.plot(x, [row[name]["mean_projection"] for row in steer_rows], marker="o",
                 color=colors[name], label=name.replace("_", " "))
ax.set_xlabel(f"k = alpha / d_l   (d_l = {d_l:.2f}; positions: {positions})")
ax.set_ylabel("refusal rate (JailbreakBench refusal strings)")
ax.set_ylim(-0.03, 1.03)
ax.set_title(f"{model_id}, layer {layer}: steering along v_l" +
             ("; dotted: projection removed" if ablate_row is not None else ""), fontsize=9)
ax.legend(fontsize=7)
for name, value in margins.items():
    if value is not None:
        ax_proj.axhline(value, color="grey", linestyle="--", linewidth=1)
        ax_proj.annotate(name, (x.max(), value), fontsize=7, va="bottom", ha="right")
ax_proj.set_xlabel("k")
ax_proj.set_ylabel(f"mean v·h at layer {layer}, prompt's last token (after the edit)")
ax_proj.set_title("where the prompts land", fontsize=9)
ax_proj.legend(fontsize=7)
fig.tight_layout()
nb.save_figure(fig, figures_dir, "alpha_sweep")

# %% [markdown]
# ## Example responses
#
# The first records of each set at the most negative, zero and most positive `k` (and with the
# projection removed); truncated to 160 characters; `[R]` marks a judged refusal.

# %%
shown = [label("steer", ks[0]), label("steer", 0.0), label("steer", ks[-1])]
shown += [label("ablate", None)] if ablation else []
examples = {}
for name in batches:
    for index, record in enumerate(data.sets[name][:n_examples]):
        query = record.meta.get("original_query", record.query)
        print(f"\n[{name}] {record.id}: {query[:100]!r}")
        for condition in dict.fromkeys(shown):
            text = responses[condition, name]["texts"][index]
            mark = "[R]" if judge.is_refusal(text) else "   "
            print(f"  {condition:>20} {mark} {text[:160]!r}")
            examples.setdefault(name, {}).setdefault(record.id, {})[condition] = text

# %%
short = {"malicious_figstep": "malicious FigStep (RSR)", "benign_figstep": "benign FigStep",
         "malicious_text": "malicious text"}
zero = next(row for row in rows if row["k"] == 0.0)
points = list({id(row): row for row in (steer_rows[0], zero, steer_rows[-1])}.values())
points += [ablate_row] if ablate_row is not None else []
columns = " | ".join(row["condition"] for row in points)
per_set = "; ".join(
    f"{short[name]} " + " | ".join(f"{row[name]['refused']}/{row[name]['n']}" for row in points)
    for name in batches
)
headline = (
    f"{model_id}: steering +-k*d_l along v_l at layer {layer} (d_l={d_l:.2f}, positions "
    f"{positions}, {max_new_tokens} new tokens); judge: refusal-string match (JailbreakBench "
    f"prefixes); data: {data.source}, "
    + " / ".join(f"{len(data.sets[name])} {short[name].removesuffix(' (RSR)')}"
                 for name in batches)
    + f". Refusals at {columns}: {per_set}"
)
results = {
    "model": adapter.info(),
    "judge": judge.describe(),
    "vector": {"path": str(vector_path), "layer": layer, "chosen_layer": chosen,
               "d_l": d_l, "margins": margins, "model_id": vector.model_id},
    "alpha_unit": "k = alpha / d_l, d_l = |mean_malicious - mean_benign| at the layer "
                  "(vector data, last input token)",
    "median_state_norm": base_norm,
    "positions": positions,
    "data_source": data.source,
    "notes": data.notes,
    "sizes": data.sizes(),
    "ids": data.ids(),
    "rows": rows,
    # refused / n (mean projection) per condition, as the run report shows it
    "table": {row["condition"]: {
        short[name]: f"{row[name]['refused']}/{row[name]['n']} "
                     f"({row[name]['mean_projection']:.2f})" for name in batches
    } for row in rows},
    "seconds_per_condition": seconds,
    "resumed_conditions": resumed,
    "seconds_total": round(time.perf_counter() - started, 1),
    "examples": examples,
}
nb.write_results(output_dir / "results.json", notebook="04_intervention",
                 parameters=parameters, results=results, headline=headline)
print(headline)
