"""steer / ablate on real (tiny random) models: exact edits, positions in cached generation."""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch
from conftest import embedded_tiny_or_skip
from torch import nn
from transformers import DynamicCache

from davsp_lib.data import datasets
from davsp_lib.method.intervention import ablate, alpha_unit, respond, resumable, steer, sweep_data
from davsp_lib.method.vectors import HarmfulnessVector
from davsp_lib.models.adapters.hooks import hidden_of
from davsp_lib.models.adapters.tiny import build_tiny_llava
from davsp_lib.models.conversation import Conversation
from davsp_lib.models.inputs import iter_batches
from davsp_lib.runtime.errors import DataError

LAYER = 2  # output of block 1 of 4


@pytest.fixture(scope="module")
def llava():
    return build_tiny_llava()


@pytest.fixture(scope="module")
def batch(llava):
    """Two image prompts of different lengths (so the shorter one is left-padded)."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, *llava.image_size)
    convs = [Conversation("What is shown?"), Conversation("Describe the image in detail please.")]
    return images, convs


def exact_vector(size: int, seed: int = 0) -> torch.Tensor:
    """Multiples of 1/8: ``alpha * v`` is exact in float32, so sums can be compared with 0 atol."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-16, 17, (size,), generator=generator).float() / 8


@contextmanager
def record_outputs(blocks: nn.ModuleList):
    """Full block outputs ``{layer: [B, T, D]}`` of the next forward (after any earlier hook)."""
    store: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(
            lambda m, a, out, layer=index + 1: store.__setitem__(layer, hidden_of(out).clone())
        )
        for index, block in enumerate(blocks)
    ]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def forward_outputs(adapter, images, convs, context=None):
    encoded = adapter.encode(images, convs)
    with (
        torch.no_grad(),
        context or nullcontext(),
        record_outputs(adapter.language_layers) as store,
    ):
        logits = adapter.forward(encoded, use_cache=False).logits
    return store, logits, encoded


def no_hooks_left(adapter) -> bool:
    blocks = adapter.language_layers
    return not adapter.language_model._forward_pre_hooks and all(
        not b._forward_hooks and not b._forward_pre_hooks for b in blocks
    )


# ------------------------------------------------------------------------------ exact edits


def test_steer_all_adds_alpha_v_at_every_position(llava, batch):
    v = exact_vector(llava.hidden_size)
    base, base_logits, _ = forward_outputs(llava, *batch)
    with steer(llava, v, LAYER, 2.5, "all") as state:
        steered, logits, encoded = forward_outputs(llava, *batch)
    length = encoded.model_inputs["input_ids"].shape[1]
    assert torch.equal(steered[LAYER], base[LAYER] + 2.5 * v)
    assert torch.equal(steered[LAYER - 1], base[LAYER - 1])
    assert not torch.allclose(steered[LAYER + 1], base[LAYER + 1])
    assert not torch.allclose(logits, base_logits)
    assert state.chunks == [(0, length, length)]
    assert no_hooks_left(llava)


def test_steer_last_edits_only_the_last_prompt_token(llava, batch):
    v = exact_vector(llava.hidden_size, seed=1)
    base, _, encoded = forward_outputs(llava, *batch)
    with steer(llava, v, LAYER, -1.5, "last") as state:
        steered, _, _ = forward_outputs(llava, *batch)
    length = encoded.model_inputs["input_ids"].shape[1]
    # left padding: the last prompt token of every row is the last column
    assert encoded.last_input_index.tolist() == [length - 1, length - 1]
    expected = base[LAYER].clone()
    expected[:, -1] += -1.5 * v
    assert torch.equal(steered[LAYER], expected)
    for layer in range(LAYER + 1, llava.num_layers + 1):  # causal: earlier columns untouched
        assert torch.equal(steered[layer][:, :-1], base[layer][:, :-1])
        assert not torch.allclose(steered[layer][:, -1], base[layer][:, -1])
    assert state.chunks == [(0, length, 1)] and state.prompt_length == length


def test_hidden_states_api_sees_the_edit(llava, batch):
    v = exact_vector(llava.hidden_size, seed=2)
    with torch.no_grad():
        base = llava.hidden_states(*batch, [LAYER - 1, LAYER])
        for positions in ("all", "last"):
            with steer(llava, v, LAYER, 4.0, positions):
                steered = llava.hidden_states(*batch, [LAYER - 1, LAYER])
            assert torch.equal(steered[:, 0], base[:, 0])
            assert torch.equal(steered[:, 1], base[:, 1] + 4.0 * v)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_ablate_removes_the_projection(llava, batch, positions):
    base, _, _ = forward_outputs(llava, *batch)
    v = base[LAYER][0, -1].clone() * 3  # a direction the states really have; not unit
    unit = (v / v.norm()).double()
    with ablate(llava, v, LAYER, positions) as state:
        after, _, _ = forward_outputs(llava, *batch)
    h = base[LAYER].double()
    expected = h - (h @ unit)[..., None] * unit
    columns = slice(None) if positions == "all" else slice(-1, None)
    before_proj = (h[:, columns] @ unit).abs()
    after_proj = (after[LAYER][:, columns].double() @ unit).abs()
    scale = h.norm(dim=-1).max()
    assert before_proj.max() > 0.5 * scale
    assert after_proj.max() < 1e-6 * scale
    assert torch.allclose(after[LAYER][:, columns].double(), expected[:, columns], atol=1e-5)
    if positions == "last":
        assert torch.equal(after[LAYER][:, :-1], base[LAYER][:, :-1])
    assert state.edited_columns == (h.shape[1] if positions == "all" else 1)


def test_half_precision_edits_in_the_model_dtype(batch):
    adapter = build_tiny_llava()
    adapter.model.to(torch.bfloat16)
    v = exact_vector(adapter.hidden_size, seed=7)
    base, _, _ = forward_outputs(adapter, *batch)
    with steer(adapter, v, LAYER, 2.5, "all"):
        steered, _, _ = forward_outputs(adapter, *batch)
    assert steered[LAYER].dtype == torch.bfloat16
    assert torch.equal(steered[LAYER], base[LAYER] + (2.5 * v).to(torch.bfloat16))
    direction = base[LAYER][1, -1].float()
    with ablate(adapter, direction, LAYER, "all"):
        after, _, _ = forward_outputs(adapter, *batch)
    unit = direction / direction.norm()
    residual = (after[LAYER].float() @ unit).abs().max()
    assert residual < 2**-7 * after[LAYER].float().norm(dim=-1).max()  # bf16 rounding level
    assert (base[LAYER].float() @ unit).abs().max() > 0.5 * base[LAYER].float().norm(dim=-1).max()


# ------------------------------------------------------------------------------ generation


def greedy(adapter, images, convs, max_new_tokens, context=None):
    """``decoder.generate`` as ``adapter.generate`` calls it, with token ids and step logits."""
    inputs = dict(adapter.encode(images, convs).model_inputs)
    inputs.pop("position_ids", None)
    with torch.no_grad(), context or nullcontext():
        out = adapter.decoder.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=adapter.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    tokens = out.sequences
    if "input_ids" in inputs:
        tokens = tokens[:, inputs["input_ids"].shape[1] :]
    return tokens, torch.stack(out.logits, dim=1)


def uncached_greedy(adapter, images, convs, max_new_tokens, make_context):
    """Reference decoding: every step recomputes the whole sequence with ``use_cache=False``.

    ``make_context(prompt_length)`` gives the intervention for one full pass.
    """
    inputs = dict(adapter.encode(images, convs).model_inputs)
    mask = inputs.pop("attention_mask")
    inputs.pop("position_ids", None)
    prompt_length = mask.shape[1]
    embed = adapter.decoder.get_input_embeddings()
    tokens, step_logits = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with make_context(prompt_length):
                out = adapter.decoder(
                    **inputs, attention_mask=mask, position_ids=positions, use_cache=False
                )
            logits = out.logits[:, -1]
            token = logits.argmax(-1)
            step_logits.append(logits)
            tokens.append(token)
            key = "input_ids" if "input_ids" in inputs else "inputs_embeds"
            new = token[:, None] if key == "input_ids" else embed(token[:, None])
            inputs[key] = torch.cat([inputs[key], new], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(step_logits, dim=1)


def check_cached_equals_uncached(
    adapter, images, convs, v, alpha, positions, steps, layer, plain_logits=None
):
    tokens, logits = greedy(
        adapter, images, convs, steps, steer(adapter, v, layer, alpha, positions)
    )
    ref_tokens, ref_logits = uncached_greedy(
        adapter,
        images,
        convs,
        steps,
        lambda p: steer(adapter, v, layer, alpha, positions, prompt_length=p),
    )
    eos = adapter.decoder.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos, adapter.tokenizer.eos_token_id])
    assert not eos & set(tokens.flatten().tolist()), "premise: no row ends early (pads follow)"
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    if plain_logits is None:
        _, plain_logits = greedy(adapter, images, convs, steps)
    assert (logits - plain_logits).abs().max() > 1e-2  # the hook acts during generation


@pytest.mark.parametrize("positions", ["all", "last"])
def test_cached_generation_equals_uncached_recomputation(llava, batch, positions):
    v = torch.randn(llava.hidden_size, generator=torch.Generator().manual_seed(3))
    check_cached_equals_uncached(llava, *batch, v, 3.0, positions, 6, LAYER)


def test_generation_edits_the_right_columns(llava, batch):
    v = exact_vector(llava.hidden_size)
    length = llava.encode(*batch).model_inputs["input_ids"].shape[1]
    with steer(llava, v, LAYER, 1.0, "all") as every, torch.no_grad():
        llava.generate(*batch, max_new_tokens=4)
    with steer(llava, v, LAYER, 1.0, "last") as last, torch.no_grad():
        llava.generate(*batch, max_new_tokens=4)
        llava.generate(batch[0][:1], batch[1][:1], max_new_tokens=3)  # a new prompt pass
    # the 4th new token is produced but never fed back, so 3 decoding steps follow the prompt
    assert every.chunks == [(0, length, length)] + [(length + i, 1, 1) for i in range(3)]
    short = llava.encode(batch[0][:1], batch[1][:1]).model_inputs["input_ids"].shape[1]
    assert last.chunks == (
        [(0, length, 1)]
        + [(length + i, 1, 0) for i in range(3)]
        + [(0, short, 1)]
        + [(short + i, 1, 0) for i in range(2)]
    )
    assert last.prompt_length == short


@pytest.mark.parametrize("positions", ["all", "last"])
def test_alpha_zero_generation_is_identical(llava, batch, positions):
    v = torch.randn(llava.hidden_size, generator=torch.Generator().manual_seed(4))
    tokens, logits = greedy(llava, *batch, 6)
    zero_tokens, zero_logits = greedy(llava, *batch, 6, steer(llava, v, LAYER, 0.0, positions))
    assert torch.equal(zero_tokens, tokens) and torch.equal(zero_logits, logits)
    plain = llava.generate(*batch, max_new_tokens=6)
    with steer(llava, v, LAYER, 0.0, positions):
        assert llava.generate(*batch, max_new_tokens=6) == plain


def test_entering_mid_generation_with_last_needs_the_prompt_length(llava, batch):
    inputs = dict(llava.encode(*batch).model_inputs)
    # the cache's keyword is read from the model's public signature: it was renamed in 5.24
    keyword = (
        "cache"
        if "cache" in inspect.signature(llava.model.forward).parameters
        else ("past_key_values")
    )
    cache = DynamicCache(config=llava.model.config.get_text_config())
    with torch.no_grad():
        first = llava.model(**inputs, use_cache=True, **{keyword: cache})
        step = {
            "input_ids": first.logits[:, -1].argmax(-1)[:, None],
            "attention_mask": torch.cat(
                [inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :1])], 1
            ),
            keyword: cache,
        }
        v = torch.ones(llava.hidden_size)
        with (
            pytest.raises(RuntimeError, match="prompt length is unknown; pass prompt_length"),
            steer(llava, v, LAYER, 1.0, "last"),
        ):
            llava.model(**step, use_cache=True)
    assert no_hooks_left(llava)


# ------------------------------------------------------------------------------ safety


def test_hooks_removed_when_the_body_raises(llava, batch):
    v = torch.ones(llava.hidden_size)
    _, base_logits, _ = forward_outputs(llava, *batch)
    for context in (steer(llava, v, LAYER, 5.0, "all"), ablate(llava, v, LAYER, "last")):
        with pytest.raises(KeyError, match="boom"), context:
            assert not no_hooks_left(llava)
            raise KeyError("boom")
        assert no_hooks_left(llava)
    _, logits, _ = forward_outputs(llava, *batch)
    assert torch.equal(logits, base_logits)


def test_bad_arguments_are_refused(llava):
    v = torch.ones(llava.hidden_size)
    cases = [
        (lambda: steer(llava, v, 0, 1.0), ValueError, "layer 0 cannot be edited.*1..4"),
        (lambda: steer(llava, v, 5, 1.0), ValueError, "layer 5 cannot be edited"),
        (lambda: steer(llava, v, 2.0, 1.0), TypeError, "layer must be an int"),
        (lambda: steer(llava, v, 2, 1.0, "first"), ValueError, "positions must be one of"),
        (lambda: steer(llava, torch.ones(3), 2, 1.0), ValueError, r"tensor \[64\], got \(3,\)"),
        (lambda: steer(llava, v * float("nan"), 2, 1.0), ValueError, "finite"),
        (lambda: steer(llava, v, 2, float("inf")), ValueError, "alpha must be finite"),
        (lambda: steer(llava, v, 2, 1.0, prompt_length=0), ValueError, "prompt_length"),
        (lambda: ablate(llava, v * 0, 2), ValueError, "zero vector"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message), make():
            pass
    assert no_hooks_left(llava)


class AddOne(nn.Module):
    def forward(self, hidden):
        return (hidden + 1, "extra")  # transformers 4.x decoder layers return tuples


class ToyLanguageModel(nn.Module):
    """Blocks behind a forward that takes no cache at all."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([AddOne() for _ in range(3)])

    def forward(self, hidden):
        for block in self.layers:
            hidden = block(hidden)[0]
        return hidden


def test_tuple_outputs_and_language_models_without_a_cache():
    lm = ToyLanguageModel()
    toy = SimpleNamespace(
        language_model=lm, language_layers=lm.layers, num_layers=3, hidden_size=2, model_id="toy"
    )
    x = torch.zeros(1, 3, 2)
    with steer(toy, torch.tensor([1.0, -2.0]), 2, 2.0, "all") as state:
        out = lm(x)
    assert torch.equal(out, torch.tensor([[[5.0, -1.0]] * 3]))
    assert state.chunks == [(0, 3, 3)]  # no cache handed in: the chunk starts at column 0
    with steer(toy, torch.tensor([1.0, -2.0]), 2, 2.0, "last") as state:
        out = lm(x)
    assert torch.equal(out, torch.tensor([[[3.0, 3.0], [3.0, 3.0], [5.0, -1.0]]]))
    assert state.chunks == [(0, 3, 1)] and state.prompt_length == 3
    assert not lm._forward_pre_hooks and all(not b._forward_hooks for b in lm.layers)


# ------------------------------------------------------------------------------ helpers


def test_alpha_unit_is_the_mean_difference_norm():
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    mean_mal = torch.tensor([[0, 0, 0, 0], [3.0, 4.0, 1.0, 0]], dtype=torch.float64)
    mean_ben = torch.tensor([[0, 0, 0, 0], [0.0, 0.0, 1.0, 0]], dtype=torch.float64)
    vector = HarmfulnessVector(
        layers=[1, 5],
        directions=zeros,
        mean_malicious=mean_mal,
        mean_benign=mean_ben,
        counts={"malicious": 1, "benign": 1},
    )
    assert alpha_unit(vector, 5) == 5.0
    with pytest.raises(ValueError, match="layer 1: the class means coincide"):
        alpha_unit(vector, 1)
    with pytest.raises(KeyError, match="no layer 3"):
        alpha_unit(vector, 3)


def test_respond_runs_batches_inside_one_intervention(llava):
    records = list(datasets.load_builtin("figstep"))[:3]
    batches = list(iter_batches(llava, records, 2))
    v = exact_vector(llava.hidden_size, seed=5)
    plain = respond(llava, batches, max_new_tokens=4, state_layer=LAYER, progress=False)
    contexts = []

    def make():
        contexts.append(steer(llava, v, LAYER, 4.0, "all"))
        return contexts[-1]

    steered = respond(
        llava, batches, max_new_tokens=4, intervention=make, state_layer=LAYER, progress=False
    )
    assert len(contexts) == 1 and no_hooks_left(llava)
    expected_plain, expected_steered = [], []
    for _, images, convs in batches:
        expected_plain += llava.generate(images, convs, max_new_tokens=4)
        with steer(llava, v, LAYER, 4.0, "all"):
            expected_steered += llava.generate(images, convs, max_new_tokens=4)
    assert plain.texts == expected_plain and steered.texts == expected_steered
    # the recorded prompt states are what the model saw: the hidden_states API, edit included
    with torch.no_grad():
        base = torch.cat([llava.hidden_states(im, cv, [LAYER])[:, 0] for _, im, cv in batches])
    assert plain.states.dtype == torch.float64 and plain.states.shape == (3, llava.hidden_size)
    assert torch.equal(plain.states, base.double())
    assert torch.equal(steered.states, (base + 4.0 * v).double())
    assert respond(llava, batches[:1], max_new_tokens=2, progress=False).states is None


def test_sweep_data_builtin_is_seeded_disjoint_and_paired():
    data = sweep_data(None, n_malicious=5, n_benign=4, n_text=3, seed=0)
    again = sweep_data(None, n_malicious=5, n_benign=4, n_text=3, seed=0)
    other = sweep_data(None, n_malicious=5, n_benign=4, n_text=3, seed=1)
    assert data.ids() == again.ids() and data.ids() != other.ids()
    assert data.sizes() == {"malicious_figstep": 5, "benign_figstep": 4, "malicious_text": 3}
    figstep = data.sets["malicious_figstep"]
    assert all(r.is_malicious and r.has_image for r in figstep)
    assert all(not r.is_malicious and r.has_image for r in data.sets["benign_figstep"])
    text = data.sets["malicious_text"]
    assert all(r.is_malicious and not r.has_image for r in text)
    assert [r.id for r in text] == [r.meta["rendered_from"] for r in figstep[:3]]
    # the vector's own records (and their groups) are left out, with a note
    excluded = sweep_data(
        None, n_malicious=40, n_benign=1, n_text=0, seed=0, exclude_ids=[text[0].id]
    )
    malicious_groups = {r.group_key for r in excluded.sets["malicious_figstep"]}
    assert text[0].group_key not in malicious_groups and len(malicious_groups) == 39
    assert "malicious: 1 records left out (vector data)" in excluded.notes
    assert "malicious: 40 requested, 39 available; using 39" in excluded.notes


def test_sweep_data_from_the_mirror(shared_data):
    data = sweep_data(shared_data, n_malicious=4, n_benign=4, n_text=2, seed=0)
    assert data.source.startswith("text-prompts")
    assert all("harmful_val" in r.id for r in data.sets["malicious_figstep"])
    assert all("harmless_val" in r.id for r in data.sets["benign_figstep"])


def test_resumable_reuses_only_a_matching_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"texts": ["a", "b"], "n": len(calls)}

    path = tmp_path / "step" / "alpha=1.json"
    first = resumable(path, {"alpha": 1.0, "ids": ["x"]}, compute)
    assert first == ({"texts": ["a", "b"], "n": 1}, False)
    assert resumable(path, {"alpha": 1.0, "ids": ["x"]}, compute) == (first[0], True)
    assert resumable(path, {"alpha": 2.0, "ids": ["x"]}, compute) == (
        {"texts": ["a", "b"], "n": 2},
        False,
    )
    assert len(calls) == 2
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"alpha=1.json: expected an object with 'key'"):
        resumable(path, {"alpha": 1.0}, compute)
    path.write_text("{")
    with pytest.raises(DataError, match="malformed JSON"):
        resumable(path, {"alpha": 1.0}, compute)


# ------------------------------------------------------------------------------ embedded model


@pytest.fixture(scope="module")
def embedded():
    return embedded_tiny_or_skip()


def test_embedded_cached_generation_equals_uncached(embedded):
    convs = [
        Conversation("Write a story about a lighthouse.", has_image=False),
        Conversation("Explain how tides work, step by step.", has_image=False),
    ]
    v = torch.randn(embedded.hidden_size, generator=torch.Generator().manual_seed(6))
    layer = embedded.num_layers // 2
    _, plain_logits = greedy(embedded, None, convs, 3)
    for positions in ("all", "last"):
        check_cached_equals_uncached(
            embedded, None, convs, v / v.norm(), 40.0, positions, 3, layer, plain_logits
        )
    plain = embedded.generate(None, convs, max_new_tokens=3)
    with steer(embedded, v, layer, 0.0, "all"):
        assert embedded.generate(None, convs, max_new_tokens=3) == plain
