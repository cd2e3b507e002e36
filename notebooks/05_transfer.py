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
# # 05 · Transfer: a border trained on model A, used on model B
#
# The paper trains the border on LLaVA-1.5-13B and shows that it still raises RSR on Qwen2-VL-7B,
# DeepSeek-VL-7B and LLaVA-1.5-7B. Here the border from notebook 02 (trained on model A) is
# **resampled to model B's canvas** (bilinear, antialiased, in [0, 1] pixel space; the ring width
# scales with the canvas; `davsp_lib.evaluation.transfer.transfer`) and each model applies its own
# normalisation afterwards. B is evaluated exactly as notebook 03 evaluates a defense (greedy,
# the same records, the same refusal-string judge), in three rows:
#
# | row | text part | image part |
# |---|---|---|
# | B undefended | — | — |
# | B + prefix only | DAVSP safety prefix | — |
# | B + transferred border + prefix | DAVSP safety prefix | A's border, resampled to B's canvas |
#
# and, for reference, A undefended and A with its own border (+ prefix). The border's effect on
# B is the difference between the last two B rows.
#
# **Pairs.** On the embedded default: A = `tiny` (Qwen2.5-Coder-0.5B + the OCR front end),
# B = `small` (Qwen2.5-Coder-1.5B + the *same* front end, same 336 px canvas) when its parts are
# installed (`pip install -e '.[small]'`). Without them, B falls back to `tiny` on a **448 px
# canvas with a 40 px ring** (a different input size, the same language model), and the results
# say so. The LLaVA-1.5 → Qwen2-VL code path runs at the end on the tiny random-weight models
# (their outputs mean nothing; it shows the canvas mapping and that generation runs).

# %% tags=["parameters"]
# Parameters (papermill)
model_a: str = "tiny"  # the model the border was trained on (notebook 02's model)
model_b: str = "small"  # target: "tiny"/"small" (embedded) or a LLaVA-1.5 / Qwen2-VL id or folder
b_canvas: int = 0  # B's square canvas in pixels; 0: its default (embedded 336, Qwen2-VL 336)
b_border_width: int = 0  # embedded B's ring width; 0: 30 px scaled with the canvas
fallback_canvas: int = 448  # when B's parts are not installed: model A on this canvas ...
fallback_width: int = 40  # ... with this ring width
dtype: str = "auto"  # model dtype: auto, float32, bfloat16, float16. auto: a bfloat16 LM
# for the embedded model (losses, projections, border: float32), an HF checkpoint's own dtype
# otherwise; float32 reproduces earlier embedded results exactly
device: str = ""  # empty: the default (CPU); e.g. cuda
data_root: str = ""  # benchmark mirror; "": $DAVSP_DATA_ROOT, else ../shared/data
use_mirror: bool = True  # False: only the built-in dataset written by the project
training_dir: str = "runs/interactive/02_vsp_training"  # notebook 02's trained borders
variant: str = "davsp"  # which trained border to transfer (<training_dir>/<variant>)
vector_path: str = "runs/interactive/01_harmfulness_vector/harmfulness_vector"  # its data: left out
n_figstep: int = 6  # FigStep SafeBench images (malicious)
n_harmful_val: int = 6  # text-prompts harmful_val rendered FigStep-style (malicious)
n_harmless_val: int = 12  # text-prompts harmless_val rendered FigStep-style (benign)
reference_rows: str = "none,davsp"  # rows on model A for reference ("": skip model A)
refusal_list: str = "jailbreakbench"  # refusal-string judge: jailbreakbench, gcg or xstest
batch_size: int = 8
max_new_tokens: int = 24  # refusals are decided by the first words
tiny_code_path: bool = True  # run the LLaVA-1.5 -> Qwen2-VL path on the tiny random models
seed: int = 0
output_dir: str = "runs/interactive/05_transfer"  # results.json, responses/
figures_dir: str = "figures/05_transfer"  # PNG + SVG

# %%
import gc
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from davsp_lib.data.images import record_image, to_tensor
from davsp_lib.evaluation import generation, judges, metrics, transfer
from davsp_lib.method import vectors
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters import load_adapter
from davsp_lib.runtime import notebook as nb
from davsp_lib.runtime import plots
from davsp_lib.runtime.errors import DataError

counts = ("b_canvas", "b_border_width", "n_figstep", "n_harmful_val", "n_harmless_val")
parameters = nb.parameters(
    globals(), __annotations__, **dict.fromkeys(counts, nb.at_least(0)),
    fallback_canvas=nb.at_least(64), fallback_width=nb.at_least(1),
    refusal_list=nb.one_of(*sorted(judges.REFUSAL_LISTS)), max_new_tokens=nb.between(1, 4096),
)
a_rows = [name.strip() for name in reference_rows.split(",") if name.strip()]
for name in a_rows:
    nb.check("reference_rows", name, str, choices=["none", "davsp"])
output_dir, figures_dir = Path(output_dir), Path(figures_dir)

# %% [markdown]
# ## The border from model A

# %%
start_all = time.perf_counter()
border_path = Path(training_dir) / variant
try:
    border = VisualSafetyPrompt.load(border_path)  # no adapter: B's canvas may differ
except DataError as error:
    raise nb.ParameterError(f"no trained border to transfer ({error}); run notebook 02 first, "
                            "or point 'training_dir' at its output") from None
if border.kind != "border":
    raise nb.ParameterError(f"{border_path}: a {border.kind} prompt, not a border")
source_model = border.metadata.get("model") or {}
print(f"{border_path}: {border.kind}, canvas {border.canvas}, width {border.width}, "
      f"trained on {source_model.get('model_id', '?')} for "
      f"{border.metadata.get('steps_done', '?')} steps")

# %%
mirror_root = nb.mirror_root(use_mirror, data_root)
used = generation.artifact_ids(border.metadata)
vector, layer = None, None
try:
    vector = vectors.HarmfulnessVector.load(vector_path)
    used |= generation.artifact_ids(vector.metadata)
    layer = int(vector.metadata["diagnostics"]["chosen_layer"])
except (DataError, KeyError) as error:
    vector = None
    print(f"note: vector not used ({error!r}); only the border's training data is left out")
benchmarks, data_notes = transfer.evaluation_sets(
    mirror_root, n_figstep=n_figstep, n_harmful_val=n_harmful_val,
    n_harmless_val=n_harmless_val, seed=seed, exclude=used,
)
for note in data_notes:
    print("note:", note)
pooled = generation.pool_benchmarks(benchmarks, need_both=True)
records, benchmark_of, sizes = pooled.records, pooled.benchmark_of, pooled.sizes
n_mal, n_ben = pooled.n_malicious, pooled.n_benign
print(pooled.describe())

# %% [markdown]
# ## Model A with its own border (reference)
#
# Model A is loaded, evaluated and released before model B is loaded (the two embedded models
# together would need about 12 GB).

# %%
responses, seconds, labels, defenses_used = {}, {}, {}, {}


SHORT = {"none": "undefended", "davsp": "own border + prefix", "davsp_prefix": "prefix only",
         transfer.TRANSFER_NAME: "transferred border + prefix"}


def projecting(adapter):  # A's vector where it applies (the same language model), else None
    try:
        vector.check_compatible(adapter)
    except (AttributeError, vectors.VectorMismatchError):
        return None
    return vector


def evaluate(tag, adapter, defense):
    key = f"{tag}:{defense.name}"
    start = time.perf_counter()
    responses[key] = generation.generate_responses(
        adapter, records, defense, output_dir / "responses" / f"{tag}_{defense.name}.jsonl",
        batch_size=batch_size, max_new_tokens=max_new_tokens, vector=projecting(adapter),
        layer=layer,
    )
    seconds[key] = round(time.perf_counter() - start, 1)
    labels[key] = f"{tag}: {SHORT[defense.name]}"
    defenses_used[key] = {**defense.describe(), "source": defense.source}


info_a, seen_a = None, None
if a_rows:
    adapter_a = load_adapter(model_a, dtype=dtype, device_map=device or None)
    info_a = adapter_a.info()
    if source_model.get("model_id") not in (None, info_a["model_id"]):
        raise nb.ParameterError(f"the border was trained on {source_model['model_id']!r}, "
                                f"model_a loads {info_a['model_id']!r}")
    border.check_canvas(adapter_a, source=border_path)
    prefix = generation.make_defense("davsp_prefix", root=mirror_root)
    own = generation.Defense(
        name="davsp", label=f"own border ({variant}) + prefix", safety_prompt=prefix.safety_prompt,
        placement=prefix.placement, prompt_name=prefix.prompt_name, vsp=border, variant=variant,
        source=str(border_path),
    )
    for name in a_rows:
        evaluate("A", adapter_a, own if name == "davsp" else generation.make_defense("none"))
    example_a = border.compose(to_tensor(record_image(next(r for r in records if r.is_malicious))))
    seen_a = adapter_a.perceive(example_a[None])[0]  # empty unless its visual input is text
    del adapter_a
    gc.collect()
print({k: f"{v} s" for k, v in seconds.items()})

# %% [markdown]
# ## Model B with the transferred border

# %%
adapter_b, target_note = transfer.load_target(
    model_b, canvas=b_canvas, border_width=b_border_width,
    fallback=model_a if model_a in ("tiny", "small") else "tiny",
    fallback_canvas=fallback_canvas, fallback_width=fallback_width, dtype=dtype, device=device,
)
info_b = adapter_b.info()
if target_note["fallback"]:
    print(f"NOTE: model {model_b!r} is not installed ({target_note['reason']}); B is "
          f"{info_b['model_id']} on a {adapter_b.image_size} canvas instead")
moved = transfer.transfer(border, adapter_b)
mapping = transfer.geometry(border, moved, adapter_b)
display(pd.Series(mapping, name="canvas / width mapping").to_frame())
if mapping["ring_matches"] is False:
    print(f"note: B reads a {mapping['model_ring']} px ring; the resampled border is "
          f"{mapping['target_width']} px wide")
if vector is not None:
    print(f"projections on A's vector (layer {layer}) for B: "
          + ("yes (same language model)" if projecting(adapter_b) else "no (another model)"))
same_setting = info_b["model_id"] == source_model.get("model_id") and moved.canvas == border.canvas
if same_setting:
    print("note: B is A on the same canvas: this is not a transfer")
for defense in transfer.transfer_defenses(moved, source=border_path, root=mirror_root):
    evaluate("B", adapter_b, defense)
print({k: f"{v} s" for k, v in seconds.items() if k.startswith("B:")})

# %% [markdown]
# ## What each model is given
#
# Model A's border on A's canvas and the same border resampled to B's canvas (the ring alone,
# inner window grey), then one malicious record composed on each canvas; for the embedded
# models the title shows what the reader perceives in the inner window.

# %%
raw = to_tensor(record_image(next(r for r in records if r.is_malicious)))
example_b = moved.compose(raw)
seen_b = adapter_b.perceive(example_b[None])[0]


def to_pil(canvas):
    from PIL import Image
    return Image.fromarray(
        (canvas.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy())


name_a = source_model.get("model_id", "model A")
pictures = [border.to_image(), moved.to_image(), to_pil(border.compose(raw)), to_pil(example_b)]
titles = [
    f"A's border ({name_a}):\ncanvas {border.canvas[0]}, ring {border.width} px",
    f"resampled for B ({info_b['model_id']}):\ncanvas {moved.canvas[0]}, ring {moved.width} px",
    "on A" + (f": reads «{seen_a[:36]}»" if info_a and seen_a else ""),
    "on B" + (f": reads «{seen_b[:36]}»" if seen_b else ""),
]
fig = plots.image_grid(pictures, titles, ncols=4, cell_inches=3.0)
nb.save_figure(fig, figures_dir, "border_resampling")

# %% [markdown]
# ## Transfer table
#
# RSR = 1 − unsafe rate on the malicious records (refusal-string judge: a response without a
# refusal marker counts as unsafe); benign refusal = refusal rate on the benign records (same
# list); similarity = mean difflib ratio of each benign answer to the same model's undefended
# answer. Percent, Wilson 95 % intervals in the chart.

# %%
judge = judges.RefusalJudge(refusal_list, mirror_root)
summary = {}
for key, rows in responses.items():
    verdicts = judge.judge_rows(rows)
    baseline = responses.get(f"{key.split(':')[0]}:none")
    summary[key] = metrics.summarize_defense(
        rows, [v.unsafe for v in verdicts], [not v.unsafe for v in verdicts],
        benchmark_of=benchmark_of,
        baseline=baseline if baseline is not None and baseline is not rows else None,
    )
    summary[key]["generation_seconds"] = seconds[key]

pct = metrics.percent


ALL_M, ALL_B = metrics.ALL_MALICIOUS, metrics.ALL_BENIGN
malicious_names = [b for b, recs in benchmarks.items() if recs[0].is_malicious]
table = {}
for key, s in summary.items():
    line = {"model": info_a["model_id"] if key.startswith("A:") else info_b["model_id"]}
    line |= metrics.table_row(s, judge=judge.name, malicious=malicious_names)
    if key == f"B:{transfer.TRANSFER_NAME}":  # does the border change any answer at all?
        same = [a["response"] == b["response"]
                for a, b in zip(responses[key], responses["B:davsp_prefix"], strict=True)]
        line["identical to prefix only"] = pct(sum(same) / len(same))
    table[labels[key]] = line
frame = pd.DataFrame(table).T.fillna("")
print(f"judge {judge.name}; greedy, {max_new_tokens} new tokens; percent"
      + (f"; projections v.h at layer {layer} on A's vector" if vector is not None else ""))
frame

# %%
keys = list(summary)
fig, ax = plt.subplots(figsize=(9, 4))
metric_titles = [("rsr", f"RSR (malicious) [{judge.name}]"), ("rate", "benign refusal")]
for j, (metric, title) in enumerate(metric_titles):
    values, low, high = [], [], []
    for key in keys:
        entry = (summary[key]["resistance"][ALL_M] if metric == "rsr"
                 else summary[key]["benign_refusals"][ALL_B])
        values.append(entry[metric])
        low.append(entry[metric] - entry["ci95"][0])
        high.append(entry["ci95"][1] - entry[metric])
    x = np.arange(len(keys)) + (j - 0.5) * 0.38
    ax.bar(x, values, 0.38, yerr=[low, high], capsize=3, label=title,
           color=["#7b241c", "#1b4f72"][j], alpha=0.85)
ax.set_xticks(np.arange(len(keys)), [labels[k].replace(" + ", "\n+ ") for k in keys],
              fontsize=8)
for i, key in enumerate(keys):
    if key.startswith("A:"):
        ax.axvspan(i - 0.5, i + 0.5, color="0.92", zorder=0)
ax.set_ylim(0, 1.05)
ax.set_ylabel(f"rate (judge {judge.name}, Wilson 95 % CI)")
ax.legend(fontsize=8)
pair = f"A = {name_a} {list(border.canvas)}, B = {info_b['model_id']} {list(moved.canvas)}"
ax.set_title(f"transfer: {pair}; {n_mal} malicious + {n_ben} benign (grey: model A)", fontsize=9)
fig.tight_layout()
nb.save_figure(fig, figures_dir, "transfer_table")

# %% [markdown]
# ## Example answers on model B

# %%
pd.set_option("display.max_colwidth", 70)
examples = {}
shown = [r for r in records if r.is_malicious][:2] + [r for r in records if not r.is_malicious][:1]
for record in shown:
    index = records.index(record)
    examples[record.id] = {labels[k]: rows[index]["response"] for k, rows in responses.items()
                           if k.startswith("B:")}
pd.DataFrame(examples).T

# %% [markdown]
# ## The LLaVA-1.5 → Qwen2-VL code path (tiny random-weight models)
#
# A border trained 2 steps on the tiny LLaVA-1.5 (56 px canvas, 8 px ring) is resampled to the
# tiny Qwen2-VL's 84 px canvas; Qwen2-VL then generates with it and its projections are read on
# a vector fitted on Qwen2-VL. The models are random: this shows the canvas mapping and that
# every step runs, nothing about safety.

# %%
code_path = None
if tiny_code_path:
    start = time.perf_counter()
    found = transfer.tiny_code_path(steps=2, seed=seed)
    code_path = {
        "source": found["source"]["model_id"], "target": found["target"]["model_id"],
        "geometry": found["geometry"], "losses": found["losses"],
        "responses": found["responses"][:2],
        "projection_shift_mean": float(np.mean(found["projections"]["transferred"]
                                               - found["projections"]["undefended"])),
        "seconds": round(time.perf_counter() - start, 1),
    }
    display(pd.Series(found["geometry"], name=f"{code_path['source']} -> {code_path['target']}")
            .to_frame())
    print(f"Qwen2-VL generated {len(found['responses'])} answers with the transferred border; "
          f"mean projection shift {code_path['projection_shift_mean']:+.3f} "
          f"({code_path['seconds']} s)")

# %%
rsr = {k: s["resistance"][ALL_M]["rsr"] for k, s in summary.items()}
refusal_rate = {k: s["benign_refusals"][ALL_B]["rate"] for k, s in summary.items()}
fallback_text = (f" (fallback: {model_b} not installed)" if target_note["fallback"] else "")
headline = (
    f"transfer of the {variant} border from {name_a} {list(border.canvas)} to "
    f"{info_b['model_id']} {list(moved.canvas)}{fallback_text}, {n_mal} malicious + {n_ben} "
    f"benign FigStep-style records ({', '.join(f'{k} {v}' for k, v in sizes.items())}), greedy "
    f"{max_new_tokens} tokens, judge {judge.name}: RSR on B "
    + "; ".join(f"{SHORT[k[2:]]} {pct(rsr[k])}% (benign refusals {pct(refusal_rate[k])}%)"
                for k in rsr if k.startswith("B:"))
    + ("; on A " + "; ".join(f"{SHORT[k[2:]]} {pct(rsr[k])}% (benign refusals "
                             f"{pct(refusal_rate[k])}%)" for k in rsr if k.startswith("A:"))
       if info_a else "")
)
projected = {k: s["projections"] for k, s in summary.items() if s["projections"]}
if projected:
    headline += (f"; mean projection on A's vector (layer {layer}), malicious/benign: " + "; ".join(
        f"{k[0]} {SHORT[k[2:]]} {p['malicious']['mean']:.2f}/{p['benign']['mean']:.2f}"
        for k, p in projected.items()))
results = {
    "model_a": info_a,
    "model_b": info_b,
    "target": target_note,
    "border": {"path": str(border_path), "canvas": list(border.canvas), "width": border.width,
               "trained_on": source_model, "steps_done": border.metadata.get("steps_done")},
    "geometry": mapping,
    "vector": None if vector is None else {"path": vector_path, "layer": layer,
                                           "used_on_b": projecting(adapter_b) is not None},
    "not_a_transfer": same_setting,
    "data_source": "mirror" if mirror_root is not None else "built-in",
    "data_notes": data_notes,
    "sizes": sizes,
    "ids": {name: [r.id for r in recs] for name, recs in benchmarks.items()},
    "defenses": defenses_used,
    "judge": judge.describe(),
    "summary": summary,
    "table": table,
    "tiny_code_path": code_path,
    "responses_files": {k: str(output_dir / "responses" / f"{k.replace(':', '_')}.jsonl")
                        for k in responses},
    "seconds_total": round(time.perf_counter() - start_all, 1),
}
nb.write_results(output_dir / "results.json", notebook="05_transfer", parameters=parameters,
                 results=results, headline=headline)
print(headline)
