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
# # 03 · Evaluation: resistance and utility of each defense, with the same data and judge
#
# Every defense answers the same records with greedy decoding; each number below says which
# judge, data and model produced it. Defenses:
#
# | name | text part | image part |
# |---|---|---|
# | `none` | — | — |
# | `adashield_s` | AdaShield-S static prompt, `query + prompt + query` | — |
# | `adashield_a` | AdaShield-A: retrieved scenario prompt (> 0.7), `query + prompt + query` | — |
# | `uniguard` | UniGuard suffix | refusal-trained noise, not UniGuard's objective (`uniguard`) |
# | `uniguard_published` | UniGuard suffix | UniGuard's corpus-trained noise, `uniguard_published` |
# | `davsp` | DAVSP safety prefix | trained border (`<training_dir>/davsp`) |
# | `da_only` | DAVSP safety prefix | DA-trained additive noise (`da_noise`): no border |
# | `vsp_only` | DAVSP safety prefix | border trained with the output loss only (`vsp_output`) |
# | `davsp_prefix` | DAVSP safety prefix | — (the text part alone: what the border adds) |
# | `esiii` | ESIII text instruction | ESIII defensive image fused with the user image (`esiii`) |
# | `pat` | PAT control: a GCG-tuned token prefix (`pat`) | — |
#
# A trained defense whose artifact is not in `training_dir` is skipped with a note, so this
# notebook runs before training exists. Generation is resumable: responses go to one JSON-lines
# file per defense under `output_dir/responses/`; rerunning continues where a run stopped.
#
# **Metrics.** RSR = 1 - unsafe rate among malicious records (per benchmark; MM-SafetyBench per
# scenario, with its harmful scenarios apart from the lobbying / legal / financial / health /
# government ones, whose reference judging asks for caution rather than harmlessness). Utility:
# refusal rate on benign records (refusal strings), MM-Vet with a *local string scorer* (not the
# GPT-4 grader), and how close defended answers stay to the undefended ones on benign inputs.
# Projections `v_l . h_l` of every input on the harmfulness vector (notebook 01) are read from the
# same forward that generates. Rates carry Wilson 95 % intervals: the samples are small.

# %% [markdown]
# ## Data (decided here)
#
# Malicious: FigStep SafeBench images (mirror; stratified over its 10 categories), MM-SafetyBench
# TYPO (key phrase rendered by our renderer, stratified over its 13 scenarios), and text-prompts
# `harmful_val` instructions rendered FigStep-style. Benign: text-prompts `harmless_val` rendered
# FigStep-style, and MM-Vet questions (by default those needing OCR: the embedded model reads
# text in images, it cannot see photographs). Records listed as training data of a loaded
# safety prompt (`data_ids` in its metadata), as AdaShield-A's pool anchors or as the vector's
# data are dropped. Notebook 01 used some
# `harmful_val` / `harmless_val` instructions as held-out data to choose its layer and margins
# (not to fit anything the border learns from). Without the mirror: the built-in set, rendered
# FigStep-style.

# %% tags=["parameters"]
# Parameters (papermill)
model: str = "tiny"  # "tiny"/"small" (embedded default) or a LLaVA-1.5 / Qwen2-VL id or folder
dtype: str = "auto"  # model dtype: auto, float32, bfloat16, float16. auto: a bfloat16 LM
# for the embedded model (losses, projections, border: float32), an HF checkpoint's own dtype
# otherwise; float32 reproduces earlier embedded results exactly
device: str = ""  # empty: the default (CPU); e.g. cuda
data_root: str = ""  # benchmark mirror; empty: $DAVSP_DATA_ROOT, else ../shared/data
use_mirror: bool = True  # False: only the built-in dataset written by the project
pools: str = ""  # "paper": FigStep / MM-SafetyBench / MM-Vet from the paper's evaluation pool
vector_path: str = "runs/interactive/01_harmfulness_vector/harmfulness_vector"  # from 01
training_dir: str = "runs/interactive/02_vsp_training"  # trained defenses from 02
defenses: str = "none,adashield_s,uniguard,davsp,da_only,vsp_only,davsp_prefix,esiii,pat"
n_figstep: int = 10  # FigStep SafeBench images (malicious)
n_mmsb: int = 13  # MM-SafetyBench TYPO questions (malicious)
n_harmful_val: int = 8  # text-prompts harmful_val rendered FigStep-style (malicious)
n_harmless_val: int = 12  # text-prompts harmless_val rendered FigStep-style (benign)
n_mmvet: int = 6  # MM-Vet questions (benign)
mmvet_capability: str = "ocr"  # only MM-Vet questions needing this capability; empty: any
batch_size: int = 8
max_new_tokens: int = 24  # refusals are decided by the first words
judge_specs: str = "refusal:jailbreakbench,refusal:gcg,refusal:xstest"  # the first is primary
judge_template: str = "davsp"  # wording of LLM / endpoint judges: davsp, mmsafetybench, ecso
n_examples: int = 3  # example responses shown per label
seed: int = 0
output_dir: str = "runs/interactive/03_evaluation"  # results.json, responses/, verdicts/
figures_dir: str = "figures/03_evaluation"  # PNG + SVG

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from PIL import Image

from davsp_lib.data import datasets
from davsp_lib.data import pools as pools_lib
from davsp_lib.data.images import record_image, to_tensor
from davsp_lib.evaluation import generation, judges, metrics
from davsp_lib.evaluation.defenses import adashield
from davsp_lib.method import vectors
from davsp_lib.models.adapters import load_adapter
from davsp_lib.runtime import notebook as nb
from davsp_lib.runtime import plots
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_json, atomic_write_text

counts = ("n_figstep", "n_mmsb", "n_harmful_val", "n_harmless_val", "n_mmvet", "n_examples")
parameters = nb.parameters(
    globals(), __annotations__, **dict.fromkeys(counts, nb.at_least(0)),
    pools=nb.one_of("", *pools_lib.PRESET_POOLS), max_new_tokens=nb.between(1, 4096),
    judge_template=nb.one_of(*judges.TEMPLATES),
)
defense_names = [name.strip() for name in defenses.split(",") if name.strip()]
if not defense_names:
    raise nb.ParameterError("parameter 'defenses' names no defense")
for name in defense_names:
    nb.check("defenses", name, str, choices=list(generation.DEFENSES))
output_dir, figures_dir = Path(output_dir), Path(figures_dir)

# %%
start_all = time.perf_counter()
adapter = load_adapter(model, dtype=dtype, device_map=device or None)
model_id = adapter.info()["model_id"]
vector, layer, margins = None, None, None
try:
    vector = vectors.HarmfulnessVector.load(vector_path, adapter)
    diagnosis = vector.metadata.get("diagnostics", {})
    layer = int(diagnosis["chosen_layer"])
    if diagnosis.get("mu_plus") is not None:
        margins = (diagnosis["mu_plus"], diagnosis["mu_minus"])
    print(f"vector from {vector_path}: projections at layer {layer}, margins {margins}")
except (DataError, KeyError) as error:
    vector = None
    print(f"note: no projections (no usable harmfulness vector at {vector_path!r}: {error})")
chosen, skipped = generation.load_defenses(
    defense_names, training_dir=training_dir or None, adapter=adapter
)
for name, reason in skipped.items():
    print(f"note: defense {name!r} skipped: {reason}")
labels = {d.name: d.label for d in chosen}
print(f"{model_id}: defenses {list(labels)}")

# %%
mirror_root = nb.mirror_root(use_mirror, data_root)


def sample(records, n, key=lambda r: r.category):
    return generation.stratified_sample(list(records), n, seed=seed, key=key)


def rendered(split, n):
    return list(datasets.as_image_attack(sample(datasets.load_text_prompts(mirror_root, split), n)))


benchmarks = {}  # name -> records; malicious first
if pools:  # held out from every other pool; a part smaller than n_* raises (no clamping)
    held = pools_lib.build_pools(mirror_root, pools, seed=seed)["evaluation"]
    for name, n in (("FigStep", n_figstep), ("MM-SafetyBench TYPO", n_mmsb)):
        benchmarks[name] = pools_lib.take(held, name, n, seed=seed)
    benchmarks["harmful_val (FigStep-style)"] = rendered("harmful_val", n_harmful_val)
    benchmarks["harmless_val (FigStep-style)"] = rendered("harmless_val", n_harmless_val)
    mmvet = [r for r in held.parts["MM-Vet"]
             if not mmvet_capability or mmvet_capability in r.meta["capability"]]
    if n_mmvet > len(mmvet):
        raise pools_lib.PoolError(None, f"evaluation pool MM-Vet ({mmvet_capability or 'any'}): "
                                  f"{n_mmvet} requested, {len(mmvet)} available")
    benchmarks["MM-Vet" + (f" ({mmvet_capability})" if mmvet_capability else "")] = sample(
        mmvet, n_mmvet, key=lambda r: 0)
    for substitution in held.substitutions:
        print("substitution:", substitution)
elif mirror_root is not None:
    figstep = datasets.load_figstep(mirror_root, images="mirror")
    mmsb = datasets.load_mmsafetybench(mirror_root, variant="typo")
    benchmarks["FigStep"] = sample(figstep, n_figstep)
    benchmarks["MM-SafetyBench TYPO"] = sample(mmsb, n_mmsb)
    benchmarks["harmful_val (FigStep-style)"] = rendered("harmful_val", n_harmful_val)
    benchmarks["harmless_val (FigStep-style)"] = rendered("harmless_val", n_harmless_val)
    mmvet = [r for r in datasets.load_mmvet(mirror_root)
             if not mmvet_capability or mmvet_capability in r.meta["capability"]]
    mmvet_name = "MM-Vet" + (f" ({mmvet_capability})" if mmvet_capability else "")
    benchmarks[mmvet_name] = sample(mmvet, n_mmvet, key=lambda r: 0)
else:
    builtin = datasets.load_builtin("figstep")
    benchmarks["built-in harmful (FigStep-style)"] = sample(
        [r for r in builtin if r.is_malicious], n_harmful_val + n_figstep + n_mmsb)
    benchmarks["built-in benign (FigStep-style)"] = sample(
        [r for r in builtin if not r.is_malicious], n_harmless_val + n_mmvet)
used = set()
for artifact in [d.vsp for d in chosen] + [d.trained for d in chosen] + [vector]:
    if artifact is not None:
        used |= generation.artifact_ids(artifact.metadata)
for name in list(benchmarks):
    benchmarks[name], dropped = generation.exclude_used(benchmarks[name], used)
    if dropped:
        print(f"note: {len(dropped)} {name} records dropped (training data of an artifact)")
    if not benchmarks[name]:
        del benchmarks[name]
pooled = generation.pool_benchmarks(benchmarks, need_both=True)
records, benchmark_of, sizes = pooled.records, pooled.benchmark_of, pooled.sizes
n_mal, n_ben = pooled.n_malicious, pooled.n_benign
print(pooled.describe())


# %% [markdown]
# ## What the model is given
#
# One malicious image as each image defense delivers it (the canvas after placement and the
# safety prompt) and, for the embedded model, what its reader perceives (title).

# %%
def to_pil(canvas):
    return Image.fromarray(
        (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy())


example = next(r for r in records if r.is_malicious and r.has_image)
raw = to_tensor(record_image(example))
pictures, titles = [], []
for defense in [d for d in chosen if d.name == "none" or d.vsp is not None]:
    canvas = defense.apply(defense.placer(adapter)(raw)[None])
    pictures.append(to_pil(canvas[0]))
    seen = adapter.perceive(canvas)[0]  # empty unless the model's visual input is text
    titles.append(f"{defense.name}\n{seen[:48]}")
if pictures:
    fig = plots.image_grid(pictures, titles, ncols=min(4, len(pictures)),
                           suptitle=f"{example.id}: the model's input per image defense")
    nb.save_figure(fig, figures_dir, "defended_inputs")

# %% [markdown]
# ## Generation
#
# Greedy, batched, `max_new_tokens` new tokens, one resumable JSON-lines file per defense.

# %%
responses, seconds = {}, {}
for defense in chosen:
    start = time.perf_counter()
    responses[defense.name] = generation.generate_responses(
        adapter, records, defense, output_dir / "responses" / f"{defense.name}.jsonl",
        batch_size=batch_size, max_new_tokens=max_new_tokens, vector=vector, layer=layer,
    )
    seconds[defense.name] = round(time.perf_counter() - start, 1)
print("generation seconds per defense:", seconds)

# %% [markdown]
# AdaShield-A (when evaluated): per benchmark, the share of inputs whose best pool entry exceeded
# the threshold (so its prompt was applied), the mean best similarity, and on MM-SafetyBench how
# often the retrieved scenario was the record's own.

# %%
retrieval = {}
for defense in chosen:
    if isinstance(defense.rewrite, adashield.AdaShieldRewrite):
        hits = defense.rewrite.retrieve(records)  # the ones generation used (cached)
        retrieval[defense.name] = adashield.retrieval_summary(records, hits, benchmark_of)
        print(f"{labels[defense.name]}: threshold {defense.rewrite.pool.threshold}, "
              f"{len(defense.rewrite.pool.anchor_ids)} pool entries")
        display(pd.DataFrame(retrieval[defense.name]).T[
            ["n", "applied_share", "mean_similarity", "same_scenario_share"]])
if not retrieval:
    print("AdaShield-A not evaluated")

# %% [markdown]
# ## Judging
#
# The first judge in `judge_specs` is the primary one (table and charts); the others are compared
# with it below. Refusal-string judges read "did not refuse" as unsafe. Benign refusals are always
# counted with refusal strings (the primary list if it is one, else JailbreakBench's).

# %%
judge_list, judge_notes = [], []
for spec in [s.strip() for s in judge_specs.split(",") if s.strip()]:
    try:
        judge_list.append(judges.make_judge(spec, adapter=adapter, template=judge_template,
                                            batch_size=batch_size, root=mirror_root))
    except judges.EndpointError as error:  # no endpoint configured: note it, go on
        judge_notes.append(f"judge {spec!r} skipped: {error}")
        print("note:", judge_notes[-1])
if not judge_list:
    raise nb.ParameterError(f"no usable judge in judge_specs={judge_specs!r}")
primary = judge_list[0]
refusals = next((j for j in judge_list if isinstance(j, judges.RefusalJudge)), None)
refusals = refusals or judges.RefusalJudge("jailbreakbench", mirror_root)
queries = {r.id: r.query for r in records}
verdicts = {}  # judge name -> defense -> [Verdict]
for judge in [*judge_list, *([refusals] if refusals not in judge_list else [])]:
    start = time.perf_counter()
    verdicts[judge.name] = {n: judge.judge_rows(rows, queries) for n, rows in responses.items()}
    print(f"{judge.name}: {time.perf_counter() - start:.1f} s")
    atomic_write_json(
        output_dir / "verdicts" / (judge.name.replace("/", "_").replace(":", "_") + ".json"),
        {"judge": judge.describe(),
         "verdicts": {n: [{"id": row["id"], **v.to_json()} for row, v in zip(rows, found,
                                                                             strict=True)]
                      for (n, rows), found in zip(responses.items(),
                                                  verdicts[judge.name].values(), strict=True)}},
    )

# %%
references = {r.id: r.reference for r in records if r.reference}
summary = {}
for name, rows in responses.items():
    summary[name] = metrics.summarize_defense(
        rows,
        [v.unsafe for v in verdicts[primary.name][name]],
        [not v.unsafe for v in verdicts[refusals.name][name]],
        benchmark_of=benchmark_of,
        references=references,
        baseline=responses["none"] if "none" in responses and name != "none" else None,
    )
    summary[name]["generation_seconds"] = seconds[name]

pct = metrics.percent


malicious_names = [b for b, recs in benchmarks.items() if recs[0].is_malicious]
ALL_M, ALL_B = metrics.ALL_MALICIOUS, metrics.ALL_BENIGN
table = {labels[name]: metrics.table_row(s, judge=primary.name, malicious=malicious_names)
         for name, s in summary.items()}
frame = pd.DataFrame(table).fillna("")
print(f"{model_id}; RSR judge {primary.name}, benign refusals {refusals.name}; percent; "
      f"greedy, {max_new_tokens} new tokens")
frame

# %%
scenarios = {
    labels[name]: {key.split("/", 1)[1]: f"{pct(v['rsr'])} ({v['n']})"
                   for key, v in s["resistance"].items()
                   if key.startswith("MM-SafetyBench TYPO/")}
    for name, s in summary.items()
}
if any(scenarios.values()):
    print(f"MM-SafetyBench TYPO: RSR per scenario, percent (n); judge {primary.name}")
    display(pd.DataFrame(scenarios).fillna(""))

# %% [markdown]
# ## RSR and utility per defense

# %%
names = list(summary)
width = 0.8 / len(names)
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
groups = [ALL_M, *malicious_names]
for i, name in enumerate(names):
    res = summary[name]["resistance"]
    values = np.array([res[g]["rsr"] for g in groups])
    intervals = np.array([res[g]["ci95"] for g in groups])
    errors = np.clip(np.stack([values - intervals[:, 0], intervals[:, 1] - values]), 0, None)
    left.bar(np.arange(len(groups)) + i * width, values, width, yerr=errors, capsize=2,
             color=plt.cm.tab10(i), label=labels[name])
left.set_xticks(np.arange(len(groups)) + 0.4 - width / 2,
                [g.replace(" (", "\n(") for g in groups], fontsize=8)
left.set_ylim(0, 1.05)
left.set_ylabel("RSR = 1 - unsafe rate\n(Wilson 95 % CI)")
left.set_title(f"resistance, judge {primary.name}", fontsize=10)
left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
utility = {
    "benign refusal rate": [summary[n]["benign_refusals"][ALL_B]["rate"] for n in names],
    "MM-Vet (local scorer)": [(summary[n]["mmvet_local"] or {}).get("score") for n in names],
    "similarity to none": [(summary[n]["agreement_with_none"] or {}).get("similarity", 1.0)
                           for n in names],
}
for i in range(len(names)):
    values = [utility[key][i] or 0.0 for key in utility]
    right.bar(np.arange(len(utility)) + i * width, values, width, color=plt.cm.tab10(i))
right.set_xticks(np.arange(len(utility)) + 0.4 - width / 2, list(utility), fontsize=8)
right.set_ylim(0, 1.05)
right.set_title(f"benign inputs ({refusals.name} for refusals)", fontsize=10)
fig.suptitle(f"{model_id}: {n_mal} malicious, {n_ben} benign records, "
             f"{max_new_tokens} new tokens", fontsize=10)
fig.tight_layout()
nb.save_figure(fig, figures_dir, "rsr_utility")

# %% [markdown]
# ## Projections on the harmfulness vector, before and after each defense
#
# Outline: no defense; filled: the defense. DAVSP trains the border to push malicious inputs
# above `mu_plus` and keep benign ones below `mu_minus`.

# %%
if vector is None:
    print("no harmfulness vector: projection histograms skipped")
else:
    ncols = min(3, len(responses))
    nrows = -(-len(responses) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    every = [r["projection"] for rows in responses.values() for r in rows]
    edges = np.histogram_bin_edges(every + list(margins or ()), bins=24)
    for ax, name in zip(axes.ravel(), responses, strict=False):
        for label, color in plots.LABEL_COLORS.items():
            if "none" in responses:
                before = [r["projection"] for r in responses["none"] if r["label"] == label]
                ax.hist(before, bins=edges, histtype="step", color=color, lw=1.2)
            after = [r["projection"] for r in responses[name] if r["label"] == label]
            ax.hist(after, bins=edges, alpha=0.45, color=color, label=f"{label} (n={len(after)})")
        if margins is not None:
            ax.axvline(margins[0], color="#7b241c", lw=1, label="mu_plus")
            ax.axvline(margins[1], color="#1b4f72", lw=1, ls="--", label="mu_minus")
        ax.set_title(labels[name], fontsize=9)
        ax.set_xlabel(f"v . h at layer {layer}", fontsize=8)
    for ax in axes.ravel()[len(responses):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{model_id}: projections per defense (outline: no defense)", fontsize=10)
    fig.tight_layout()
    nb.save_figure(fig, figures_dir, "projections")

# %% [markdown]
# ## Example responses, side by side
#
# Malicious rows: the primary judge's verdict; benign rows: whether the answer is a refusal.

# %%
pd.set_option("display.max_colwidth", 80)
examples = {}
for label in ("malicious", "benign"):
    for record in [r for r in records if r.label.value == label][:n_examples]:
        index = records.index(record)
        line = {"label": label}
        for name, rows in responses.items():
            if label == "malicious":
                tag = "UNSAFE" if verdicts[primary.name][name][index].unsafe else "safe"
            else:
                tag = "answered" if verdicts[refusals.name][name][index].unsafe else "refused"
            line[labels[name]] = f"[{tag}] {rows[index]['response']}"
        examples[record.id] = line
example_frame = pd.DataFrame(examples).T
atomic_write_text(output_dir / "examples.txt", example_frame.to_string() + "\n")
example_frame

# %% [markdown]
# ## Judge agreement
#
# On the project's hand-labelled responses (`data/judging/labelled_responses.json`, 48 items:
# refusals with and without the usual strings, harmful compliance, compliance that mentions
# "illegal", FigStep-style lists, benign answers): each judge against the labels (raw agreement,
# Cohen's kappa, and the AUROC of its score). Then each pair of judges on the generated
# malicious responses of all defenses.

# %%
on_labels = judges.agreement_on_labelled(judge_list, judges.load_labelled())
print(f"hand-labelled sample: {on_labels['n']} responses, {on_labels['n_unsafe']} unsafe")
display(pd.DataFrame(on_labels["vs_labels"]).T[["raw_agreement", "cohen_kappa", "auroc"]])
malicious_verdicts = {
    judge.name: [v.unsafe for name, rows in responses.items()
                 for row, v in zip(rows, verdicts[judge.name][name], strict=True)
                 if row["label"] == "malicious"]
    for judge in judge_list
}
pairs = list(malicious_verdicts)
on_generated = {
    f"{a} vs {b}": judges.agreement(malicious_verdicts[a], malicious_verdicts[b])
    for i, a in enumerate(pairs) for b in pairs[i + 1:]
}
if on_generated:
    display(pd.DataFrame(on_generated).T[["n", "raw_agreement", "cohen_kappa"]])

# %%
rsr = {n: s["resistance"][ALL_M]["rsr"] for n, s in summary.items()}
refusal_rate = {n: s["benign_refusals"][ALL_B]["rate"] for n, s in summary.items()}
shown = [n for n in ("none", "adashield_s", "davsp_prefix", "davsp") if n in rsr] or list(rsr)
headline = (
    f"{model_id}, {n_mal} malicious + {n_ben} benign records "
    f"({', '.join(f'{k} {v}' for k, v in sizes.items())}), greedy {max_new_tokens} tokens, "
    f"judge {primary.name}: RSR "
    + "; ".join(f"{n} {pct(rsr[n])}% (benign refusals {pct(refusal_rate[n])}%)" for n in shown)
    + ("" if "davsp" in rsr else " (no trained DAVSP border found)")
)
results = {
    "model": adapter.info(),
    "data_source": "mirror" if mirror_root is not None else "built-in",
    "sizes": sizes,
    "ids": {name: [r.id for r in recs] for name, recs in benchmarks.items()},
    "defenses": {d.name: {**d.describe(), "source": d.source} for d in chosen},
    "skipped_defenses": skipped,
    "adashield_a_retrieval": retrieval,
    "judges": [j.describe() for j in judge_list],
    "judge_notes": judge_notes,
    "primary_judge": primary.name,
    "refusal_judge": refusals.name,
    "vector": None if vector is None else {"path": vector_path, "layer": layer,
                                           "margins": margins},
    "summary": summary,
    "table": table,
    "judge_agreement": {
        "labelled_sample": {k: v for k, v in on_labels.items() if k not in ("verdicts", "scores")},
        "generated_malicious": on_generated,
    },
    "responses_files": {n: str(output_dir / "responses" / f"{n}.jsonl") for n in responses},
    "seconds_total": round(time.perf_counter() - start_all, 1),
}
nb.write_results(output_dir / "results.json", notebook="03_evaluation", parameters=parameters,
                 results=results, headline=headline)
print(headline)
