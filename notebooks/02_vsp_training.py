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
# # 02 · Training the Visual Safety Prompt with Deep Alignment
#
# The model stays frozen; only a border of width `p` around every input image trains. The user
# image is padded to a square (white) and resized into the inner window; the border replaces the
# ring around it (image pixels are never perturbed). The border lives in pixel space; it starts
# white, black or at the model's normalisation mean (`border_start`; the reference: the mean,
# i.e. zeros in normalised space) and is clamped to [0, 1] after every step or not
# (`border_clamp`; the reference never clamps). The model's own normalisation is applied after
# composition.
#
# Loss per step (one forward serves both terms):
#
# - **Deep Alignment** — the hinge on the projection `s = v_l · h_l` of the last input token onto
#   the harmfulness vector from notebook 01: malicious inputs above `mu_plus`, benign below
#   `mu_minus`;
# - **output loss** — `lam` × cross-entropy of the benign reference answers (where a dataset has
#   none: the model's own undefended answers), so benign behaviour is kept; with probability
#   `malicious_output_p` (reference 0.05, drawn in the seeded batch plan) a malicious batch also
#   gets it, on a refusal target. `answer_eos=False` leaves the end-of-sequence token out of the
#   targets, as the reference does; MM-Vet's `<AND>`/`<OR>` scoring markers never reach a target.
#
# A step that needs only the projection stops the forward at layer `l`. The same code trains the
# ablations and the UniGuard baseline that notebook 03 compares: `da_noise` (DA with additive noise
# over the whole image, no padding), `vsp_output` (border with the output loss only: a refusal on
# malicious inputs, the reference answer on benign ones) and `uniguard` (ε-bounded additive noise
# trained to make the model refuse malicious inputs). Two more baselines of the paper's table train
# in their own modules: `esiii` (`davsp_lib.evaluation.defenses.esiii`: a defensive image optimised
# from a blank start so that the model describes it as a corpus of security instructions; at
# inference it is fused with the user image and a text instruction goes with the query) and `pat`
# (`davsp_lib.evaluation.defenses.pat`: Prompt Adversarial Tuning, a token prefix tuned by GCG
# against a GCG attacker). `adashield_a` (`davsp_lib.evaluation.defenses.adashield`) trains nothing:
# it embeds the MM-SafetyBench TYPO records of the training data (all-MiniLM-L6-v2 in place of CLIP)
# as AdaShield-A's retrieval pool, one defense prompt per scenario; it needs such records (`pools`),
# and asking for it without them is an error.

# %% tags=["parameters"]
# Parameters (papermill)
model: str = "tiny"  # "tiny"/"small" (embedded default) or a LLaVA-1.5 / Qwen2-VL id or folder
dtype: str = "auto"  # model dtype: auto, float32, bfloat16, float16. auto: a bfloat16 LM
# for the embedded model (losses, projections, border: float32), an HF checkpoint's own dtype
# otherwise; float32 reproduces earlier embedded results exactly
device: str = ""  # empty: CUDA when available, else CPU
vector_path: str = "runs/interactive/01_harmfulness_vector/harmfulness_vector"  # from notebook 01
layer_choice: str = "data"  # "data" / "reference": which of notebook 01's recorded choices
layer: int = -1  # -1: the layer of layer_choice recorded in notebook 01
margins_from_vector: bool = True  # mu_plus / mu_minus from notebook 01's diagnostics
mu_plus: float = 0.0  # used when margins_from_vector is False
mu_minus: float = 0.0  # used when margins_from_vector is False
data_root: str = ""  # benchmark mirror; "": $DAVSP_DATA_ROOT, else ../shared/data
use_mirror: bool = True  # False: the built-in dataset only
pools: str = ""  # "paper": the paper's training pool (davsp_lib.data.pools; n_train/n_mmvet unused)
n_train: int = 32  # training records per class
n_heldout: int = 16  # held-out records per class (projections before/after)
n_mmvet: int = 0  # MM-Vet photos added to the benign training side (reference answers)
safety_prefix: bool = True  # DAVSP's text safety prefix in every prompt, as in the reference
variants: list[str] = ["davsp", "da_noise", "vsp_output", "uniguard", "esiii", "pat"]  # davsp first
# (also "uniguard_published"; "adashield_a": needs MM-SafetyBench TYPO training records: pools)
steps: int = 60  # optimisation steps of the DAVSP border
ablation_steps: int = 30  # steps of the other variants
batch_size: int = 4
optimizer: str = "adam"  # "adam" or "sign" (the reference's signed gradient)
lr: float = 0.05  # Adam learning rate, or the signed step in [0, 1] pixel units (ref.: 1/255)
lam: float = 0.02  # weight of the output loss (reference 0.02)
malicious_output_p: float = 0.0  # P(a malicious batch also gets the output loss) (ref. 0.05)
answer_eos: bool = True  # train the EOS token after each target (the reference does not)
border_start: str = "white"  # "white", "zeros" (black) or "mean" (the reference)
border_clamp: bool = True  # clamp the border to [0, 1] (the reference never clamps)
schedule: str = "alternate"  # "alternate", "mix" or "random" (the reference: a fair coin per step)
width: int = 0  # border width p in canvas pixels; 0: the model's default (30 on 336 px)
epsilon: float = 0.0627  # bound of the additive variants (16/255, UniGuard's)
answer_tokens: int = 32  # length of the model's own benign answers used as targets
esiii_steps: int = 100  # ESIII: PGD steps of the defensive image
uniguard_steps: int = 5000  # UniGuard as published (variant uniguard_published): signed steps
esiii_step_size: float = 0.00392156862745098  # ESIII: signed step (1/255)
esiii_epsilon: float = 0.12549019607843137  # ESIII: L-inf bound of the defensive image (32/255)
pat_steps: int = 20  # PAT: GCG steps (reference 100)
pat_control_len: int = 15  # PAT: tokens of the defense control (reference 15)
pat_candidates: int = 64  # PAT: candidates per GCG step (reference 256)
pat_topk: int = 256  # PAT: top-k tokens per position (reference 256)
pat_batch_size: int = 2  # PAT: malicious and benign records per step (each)
checkpoint_every: int = 10  # steps between atomic checkpoints (a rerun resumes from the last)
snapshots: int = 4  # border snapshots shown along the run
seed: int = 0
output_dir: str = "runs/interactive/02_vsp_training"  # <variant>.safetensors/.json + checkpoints
figures_dir: str = "figures/02_vsp_training"  # PNG + SVG

# %%
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from davsp_lib.data import pools as pools_lib
from davsp_lib.data import prompts
from davsp_lib.evaluation.defenses import adashield, esiii, pat, uniguard
from davsp_lib.method import training, vectors
from davsp_lib.method.vsp import VisualSafetyPrompt, default_width
from davsp_lib.models.adapters import load_adapter
from davsp_lib.runtime import notebook as nb
from davsp_lib.runtime import plots

positive = ("steps", "ablation_steps", "answer_tokens", "checkpoint_every", "esiii_steps",
            "uniguard_steps", "pat_steps", "pat_control_len", "pat_candidates", "pat_topk",
            "pat_batch_size", "n_train", "n_heldout")
parameters = nb.parameters(
    globals(), __annotations__, **dict.fromkeys(positive, nb.at_least(1)),
    layer_choice=nb.one_of("data", "reference"), pools=nb.one_of("", *pools_lib.PRESET_POOLS),
    malicious_output_p=nb.between(0.0, 1.0), border_start=nb.one_of("white", "zeros", "mean"),
    layer=nb.at_least(-1), n_mmvet=nb.at_least(0), width=nb.at_least(0),
    variants=nb.one_of(*sorted(training.VARIANTS), "pat", uniguard.VARIANT, adashield.VARIANT),
    optimizer=nb.one_of("adam", "sign"), lr=nb.at_least(1e-8), lam=nb.at_least(0.0),
    schedule=nb.one_of("alternate", "mix", "random"), epsilon=nb.between(1e-6, 1.0),
    esiii_step_size=nb.at_least(1e-8), esiii_epsilon=nb.between(1e-6, 1.0),
    snapshots=nb.between(1, 8),
)
if not set(variants) - {"pat", adashield.VARIANT}:
    raise nb.ParameterError("variants needs at least one image prompt besides 'pat' and "
                            f"{adashield.VARIANT!r}")
output_dir, figures_dir = Path(output_dir), Path(figures_dir)
device = parameters["device"] = device or ("cuda" if torch.cuda.is_available() else "")

# %%
adapter = load_adapter(model, dtype=dtype, device_map=device or None)
vector = vectors.HarmfulnessVector.load(vector_path, adapter=adapter)
found = vector.metadata.get("diagnostics", {})
# notebook 01 records both choices; an older vector only the one it used
choice = found.get(f"{layer_choice}_choice") or {
    "layer": found.get("chosen_layer"), "mu_plus": found.get("mu_plus"),
    "mu_minus": found.get("mu_minus"),
}
layer = choice["layer"] if layer == -1 else layer
if layer is None:
    raise nb.ParameterError(
        f"{vector_path}: the vector records no {layer_choice} layer; set 'layer'")
if margins_from_vector:
    if choice.get("mu_plus") is None:
        raise nb.ParameterError(
            f"{vector_path}: no {layer_choice} margins recorded; set mu_plus / mu_minus")
    mu_plus, mu_minus = float(choice["mu_plus"]), float(choice["mu_minus"])
width = width or default_width(adapter)
model_id = adapter.info()["model_id"]
other = found.get("data_choice" if layer_choice == "reference" else "reference_choice")
print(f"{model_id}: {layer_choice} choice: layer {layer}, margins mu+ {mu_plus:.4g} / "
      f"mu- {mu_minus:.4g} (the other choice: {other}), "
      f"canvas {adapter.image_size}, border {width} px")

# %%
mirror_root = nb.mirror_root(use_mirror, data_root)
vector_ids = [i for ids in vector.metadata.get("data_ids", {}).values() for i in ids]
pool_info = None
if pools:
    drawn = pools_lib.build_pools(mirror_root, pools, seed=seed)
    pool_info = drawn.to_json(ids=False)
    overlap = set(vector_ids) & {r.id for r in drawn["training"].records()}
    if overlap:
        raise nb.ParameterError(
            f"{vector_path}: the vector used training records {sorted(overlap)[:3]}")
    data = training.training_records_from_pools(drawn, n_heldout=n_heldout, seed=seed)
    print(f"{pools} pools (n_train / n_mmvet unused):", pool_info["counts"]["training"])
else:
    data = training.training_records(
        mirror_root, n_train=n_train, n_heldout=n_heldout, n_mmvet=n_mmvet, seed=seed,
        exclude=vector_ids,
    )
for note in data.notes:
    print("note:", note)
print(data.source, data.sizes())
safety = prompts.text("davsp_safety_prefix", mirror_root) if safety_prefix else None
anchors = []  # AdaShield-A's pool: MM-SafetyBench TYPO training records (never evaluated)
if adashield.VARIANT in variants:
    anchors = adashield.anchor_records(data.malicious)
    if not anchors:  # asked for, cannot be built: an error rather than a silently missing row
        raise nb.ParameterError(
            f"variants: {adashield.VARIANT!r} needs MM-SafetyBench TYPO records among the "
            f"training data; {data.source!r} has none (set pools, e.g. 'paper', or drop it)")
    print(f"note: AdaShield-A pool anchors: the {len(anchors)} MM-SafetyBench TYPO records of "
          f"the training data ({data.source}), per scenario "
          f"{dict(sorted(Counter(r.category for r in anchors).items()))}")

# %% [markdown]
# ## Training
#
# Each variant trains into `output_dir/<variant>/` (checkpoints; rerunning the notebook resumes
# from the last one and ends with the same border) and is saved as `<variant>.safetensors` +
# `<variant>.json` for notebook 03 (ESIII: its defensive image and text instruction; PAT: the
# tuned control's token ids and text; AdaShield-A: the anchors' retrieval keys, its prompts per
# scenario and the anchor ids, which notebook 03 then leaves out of evaluation). The benign
# targets of the output loss are the model's own *undefended* answers (no prompt, no border),
# generated once and cached in `answers.json`.

# %%
results_by_variant, trained, texts_of, pat_run = {}, {}, {}, None
data_ids = {"source": data.source, "ids": {"malicious": [r.id for r in data.malicious],
                                           "benign": [r.id for r in data.benign]}}
for variant in variants:
    if variant == "esiii":  # trains on its own corpus of security instructions, no records
        run = esiii.train_defensive_image(
            adapter, output_dir / variant, steps=esiii_steps, batch_size=batch_size,
            step_size=esiii_step_size, epsilon=esiii_epsilon, checkpoint_every=checkpoint_every,
            seed=seed, metadata={"seed": seed},
        )
        texts_of[variant] = esiii.text_instruction(run.prompt, output_dir / variant)
    elif variant == uniguard.VARIANT:  # UniGuard as published: make a harmful corpus unlikely
        config = uniguard.UniGuardConfig(
            steps=uniguard_steps, batch_size=batch_size, checkpoint_every=checkpoint_every,
            seed=seed,
        )
        guard = uniguard.train_uniguard(
            adapter, data.malicious, uniguard.harmful_corpus(data.malicious), config,
            output_dir / variant,
        )
        files = guard.prompt.save(output_dir / variant)
        results_by_variant[variant] = {
            "files": [str(f) for f in files], "steps": len(guard.history),
            "resumed_from": guard.resumed_from, "final_loss": guard.history[-1]["corpus_nll"],
        }
        print(variant, results_by_variant[variant])
        continue
    elif variant == adashield.VARIANT:  # no optimisation: the anchors' keys, a prompt each
        ada_pool = adashield.AdaShieldPool.build(
            adashield.SentenceEmbedder(), anchors, adashield.scenario_prompts(mirror_root),
            info={"data": {"source": data.source}, "pools": pool_info, "seed": seed},
        )
        files = ada_pool.save(output_dir / variant)
        results_by_variant[variant] = {
            "files": [str(f) for f in files], "embedder": ada_pool.embedder,
            "threshold": ada_pool.threshold,
            "anchors": {"source": f"MM-SafetyBench TYPO records of the training data "
                                  f"({data.source})", "n": len(anchors),
                        "per_scenario": dict(Counter(r.category for r in anchors)),
                        "ids": [r.id for r in anchors]},
        }
        print(variant, {k: v for k, v in results_by_variant[variant].items() if k != "anchors"},
              f"{len(anchors)} anchors")
        continue
    elif variant == "pat":  # the images as the model normally gets them, the control as prefix
        pat_data = training.prepare_training_set(
            adapter, VisualSafetyPrompt.for_adapter(adapter, "additive"), data.malicious,
            data.benign, answers_path=output_dir / "answers.json", answer_tokens=answer_tokens,
            batch_size=batch_size,
        )
        pat_config = pat.PATConfig(
            steps=pat_steps, control_len=pat_control_len, candidates=pat_candidates,
            topk=pat_topk, batch_size=pat_batch_size, checkpoint_every=checkpoint_every, seed=seed,
        )
        pat_run = pat.train(adapter, pat_data, pat_config, output_dir / variant, metadata={
            "data": data_ids, "answers": pat_data.answer_source, "seed": seed})
        files = pat_run.control.save(output_dir / variant)
        texts_of[variant] = pat.prompt_text(pat_run.control.text)
        results_by_variant[variant] = {
            "files": [str(f) for f in files], "steps": len(pat_run.history),
            "resumed_from": pat_run.resumed_from, "final_loss": pat_run.history[-1]["loss"],
            "control": pat_run.control.text,
            "median_seconds_per_step": float(np.median([h["seconds"] for h in pat_run.history])),
        }
        print(variant, results_by_variant[variant])
        continue
    else:
        config = training.TrainConfig(
            layer=layer, mu_plus=mu_plus, mu_minus=mu_minus, variant=variant,
            steps=steps if variant == "davsp" else ablation_steps, batch_size=batch_size,
            optimizer=optimizer, lr=lr, lam=lam, schedule=schedule, width=width, epsilon=epsilon,
            malicious_output_p=malicious_output_p, answer_eos=answer_eos,
            checkpoint_every=checkpoint_every,
            snapshot_every=max(1, steps // snapshots) if variant == "davsp" else 0, seed=seed,
        )
        init = VisualSafetyPrompt.for_adapter(
            adapter, config.kind, width=width, epsilon=epsilon, start=border_start,
            clamp=border_clamp,
        )
        train_set = training.prepare_training_set(
            adapter, init, data.malicious, data.benign, safety_prompt=safety,
            answers_path=output_dir / "answers.json", answer_tokens=answer_tokens,
            batch_size=batch_size,
        )
        run = training.train(
            adapter, train_set, config, output_dir / variant, vector=vector, init=init,
            metadata={
                "vector": {"path": str(vector_path), "layer": layer, "model": model_id},
                "margins": {"mu_plus": mu_plus, "mu_minus": mu_minus},
                "layer_choice": layer_choice,
                "border": {"start": border_start, "clamp": border_clamp},
                "pools": pool_info,
                "safety_prefix": safety_prefix,
                "data": data_ids,
                "answers": train_set.answer_source,
                "seed": seed,
            },
        )
    files = run.prompt.save(output_dir / variant)
    trained[variant] = run
    per_step = [h["seconds"] for h in run.history if "seconds" in h]
    results_by_variant[variant] = {
        "files": [str(f) for f in files],
        "steps": len(run.history),
        "resumed_from": run.resumed_from,
        "final_loss": run.history[-1]["loss"],
        "median_seconds_per_step": float(np.median(per_step)) if per_step else None,
    }
    print(variant, results_by_variant[variant])

# %% [markdown]
# ## Curves
#
# Loss per step, and the mean projection of the step's malicious / benign batch (DA variants) with
# the margins.

# %%
fig = plots.training_curves(
    {variant: run.history for variant, run in trained.items()}
    | ({"pat": pat_run.history} if pat_run is not None else {}),
    margins=(mu_plus, mu_minus), title=f"{model_id}: training (layer {layer})",
)
nb.save_figure(fig, figures_dir, "training_curves")

# %% [markdown]
# ## The border along the run, and a composed input
#
# The border alone (inner window grey) at several steps, then what the model receives: a held-out
# malicious image in the inner window with the trained border around it.

# %%
main_variant = "davsp" if "davsp" in trained else next(v for v in variants if v in trained)
main = trained[main_variant]
steps_shown = sorted(main.snapshots)
views = [VisualSafetyPrompt(main.snapshots[s], main.prompt.kind, main.prompt.width,
                            main.prompt.epsilon).to_image() for s in steps_shown]
fig = plots.image_grid(views, [f"{main_variant}: step {s}" for s in steps_shown],
                       ncols=min(5, len(views)))
nb.save_figure(fig, figures_dir, "border_snapshots")
from davsp_lib.data.images import record_image, to_pil, to_tensor

example = data.heldout_malicious[0]
composed = main.prompt.compose(to_tensor(record_image(example)))
fig = plots.image_grid([record_image(example), to_pil(composed)],
                       [f"user image {example.id}", f"model input with the {main_variant} border"],
                       ncols=2)
nb.save_figure(fig, figures_dir, "composed_input")

# %% [markdown]
# ## Held-out projections before and after
#
# Held-out records never seen in training, with and without each trained prompt (the text safety
# prefix in both; ESIII and PAT with their own text instead).

# %%
held = data.heldout_malicious + data.heldout_benign
is_mal = np.array([r.is_malicious for r in held])
blank = VisualSafetyPrompt.blank(adapter.image_size, width)
before = training.projections(adapter, held, vector, layer, prompt=blank, safety_prompt=safety,
                              batch_size=batch_size)


def summary(scores):
    mal, ben = scores[is_mal], scores[~is_mal]
    return {
        "malicious_mean": float(mal.mean()), "benign_mean": float(ben.mean()),
        "malicious_above_mu_plus": float((mal > mu_plus).mean()),
        "benign_below_mu_minus": float((ben < mu_minus).mean()),
    }


projection_results = {"before": summary(before)}
after = {}
for variant, run in trained.items():
    after[variant] = training.projections(adapter, held, vector, layer, prompt=run.prompt,
                                          safety_prompt=texts_of.get(variant, safety),
                                          batch_size=batch_size)
    projection_results[variant] = summary(after[variant])
if pat_run is not None:  # a text prefix only
    after["pat"] = training.projections(adapter, held, vector, layer, prompt=None,
                                        safety_prompt=texts_of["pat"], batch_size=batch_size)
    projection_results["pat"] = summary(after["pat"])
for name, values in projection_results.items():
    print(f"{name:>10}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
groups = {"malicious, no border": before[is_mal], "benign, no border": before[~is_mal]}
groups |= {f"malicious, {main_variant}": after[main_variant][is_mal],
           f"benign, {main_variant}": after[main_variant][~is_mal]}
fig = plots.projection_histograms(groups, margins=(mu_plus, mu_minus), layer=layer,
                                  title=f"{model_id}: held-out projections before / after")
nb.save_figure(fig, figures_dir, "projections_before_after")

# %%
results = {
    "model": adapter.info(),
    "layer": layer,
    "margins": {"mu_plus": mu_plus, "mu_minus": mu_minus},
    "layer_choice": layer_choice,
    "data_choice": found.get("data_choice"),
    "reference_choice": found.get("reference_choice"),
    "border": {"start": border_start, "clamp": border_clamp},
    "pools": pool_info,
    "data_source": data.source,
    "notes": data.notes,
    "sizes": data.sizes(),
    "ids": data.ids(),
    "variants": results_by_variant,
    "heldout_projections": projection_results,
}
main_after = projection_results[main_variant]
headline = (
    f"{model_id}, {main_variant} border trained {results_by_variant[main_variant]['steps']} steps "
    f"on {len(data.malicious)}+{len(data.benign)} {data.source} records; no judge (projections at "
    f"layer {layer} on {int(is_mal.sum())}+{int((~is_mal).sum())} held-out records): malicious "
    f"above mu+ {projection_results['before']['malicious_above_mu_plus']:.0%} -> "
    f"{main_after['malicious_above_mu_plus']:.0%}, benign below mu- "
    f"{projection_results['before']['benign_below_mu_minus']:.0%} -> "
    f"{main_after['benign_below_mu_minus']:.0%}"
)
nb.write_results(output_dir / "results.json", notebook="02_vsp_training", parameters=parameters,
                 results=results, headline=headline)
print(headline)
