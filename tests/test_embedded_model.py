"""The embedded default (Qwen2.5-Coder-0.5B + EasyOCR english_g2) through the adapter interface.

Real weights, real reader: skipped only where the ``[tiny]`` extra is not installed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import embedded_tiny_or_skip
from PIL import Image, ImageDraw

from davsp_lib.data.datasets import load_builtin
from davsp_lib.data.images import record_image, to_tensor
from davsp_lib.models.conversation import Conversation


@pytest.fixture(scope="module")
def adapter():
    return embedded_tiny_or_skip()


@pytest.fixture(scope="module")
def canvases(adapter):
    data = load_builtin("figstep")
    records = [data[0], data[-1]]  # one harmful, one benign instruction
    return records, torch.stack(
        [adapter.prepare_image(to_tensor(record_image(r))) for r in records]
    )


def short(query: str, **kw) -> Conversation:
    return Conversation(query, **kw)


def test_structure(adapter):
    assert adapter.architecture == "davsp-embedded"
    assert adapter.num_layers == 24 and adapter.hidden_size == 896
    assert adapter.image_size == (336, 336) and adapter.border_width == 30
    assert adapter.info()["gguf_sha256"].startswith("1d9614638d18")


def test_prepared_canvas_has_a_white_ring(adapter, canvases):
    _, images = canvases
    ring = torch.ones_like(images[0], dtype=torch.bool)
    ring[:, 30:306, 30:306] = False
    assert torch.equal(images[:, ring], torch.ones_like(images[:, ring]))


def test_perceives_the_text_in_the_window(adapter, canvases):
    records, images = canvases
    seen = adapter.perceive(images)
    for record, text in zip(records, seen, strict=True):
        words = record.meta["instruction"].lower().split()[:4]
        assert all(w.strip(".,'") in text.lower() for w in words), (text, words)


def test_blank_border_changes_nothing(adapter, canvases):
    records, images = canvases
    convs = [short(r.query) for r in records]
    with_border = adapter.encode(images, convs)
    without = adapter.encode(images, convs, border=False)
    assert torch.equal(
        with_border.model_inputs["inputs_embeds"], without.model_inputs["inputs_embeds"]
    )
    assert torch.count_nonzero(adapter.border_embeddings(images[0])) == 0


def test_gradients_reach_every_side_of_the_border(adapter, canvases):
    _, images = canvases
    for fill in (1.0, 0.5):  # a blank (white) and a grey border
        canvas = images[:1].clone()
        canvas[:, :, :30], canvas[:, :, -30:] = fill, fill
        canvas[:, :, :, :30], canvas[:, :, :, -30:] = fill, fill
        canvas.requires_grad_(True)
        state = adapter.hidden_states(canvas, [short("What does it say?")], [12])
        state.sum().backward()
        grad = canvas.grad[0].abs().sum(0)
        sides = {
            "top": grad[:30],
            "bottom": grad[-30:],
            "left": grad[:, :30],
            "right": grad[:, -30:],
        }
        for name, side in sides.items():
            assert side.sum() > 0, f"no gradient on the {name} side (fill {fill})"
        assert grad[60:270, 60:270].sum() == 0  # the reading path is token ids: no gradient


def test_a_border_that_says_something_writes_those_characters(adapter):
    canvas = torch.ones(3, 336, 336)
    strip = Image.new("L", (336, 30), 255)
    ImageDraw.Draw(strip).text((4, 2), "SAFE SAFE SAFE", fill=0, font_size=24)
    canvas[:, :30, :] = to_tensor(strip.convert("RGB"))
    slots = adapter.border_embeddings(canvas)[:4].sum(0)  # the top side's slots
    chars = adapter.char_embeddings
    index = {c: i for i, c in enumerate("0123456789")}  # digits: unrelated characters
    letters = chars[[adapter_char("S"), adapter_char("A"), adapter_char("F"), adapter_char("E")]]
    digits = chars[list(index.values())]
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(slots, letters.sum(0), dim=0) > cosine(slots, digits.sum(0), dim=0) + 0.2


def adapter_char(char: str) -> int:
    from davsp_lib.models.embedded.reader import CHARACTERS

    return CHARACTERS.index(char)


def test_hooks_equal_output_hidden_states(adapter, canvases):
    _, images = canvases
    convs = [
        short("Read it."),
        short("What is this about? Answer briefly.", safety_prompt="Be safe."),
    ]
    with torch.no_grad():
        ours = adapter.hidden_states(images, convs, [1, 6, 12])
        batch = adapter.encode(images, convs)
        reference = adapter.forward(batch, output_hidden_states=True).hidden_states
    for column, layer in enumerate([1, 6, 12]):
        torch.testing.assert_close(ours[:, column], reference[layer][:, -1], rtol=0, atol=0)


def test_batched_equals_per_sample(adapter, canvases):
    _, images = canvases
    convs = [short("Read it."), short("What is this about? Answer in one short sentence.")]
    with torch.no_grad():
        batched = adapter.hidden_states(images, convs, [8])
        single = torch.cat(
            [adapter.hidden_states(images[i : i + 1], [c], [8]) for i, c in enumerate(convs)]
        )
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=2e-4)
    answers = adapter.generate(images, convs, max_new_tokens=6)
    assert answers == [
        adapter.generate(images[i : i + 1], [c], max_new_tokens=6)[0] for i, c in enumerate(convs)
    ]


def test_answers_leave_prompt_states_unchanged(adapter, canvases):
    _, images = canvases
    convs = [short("Read it."), short("Summarise.")]
    answers = ["It says hello.", "I'm sorry, I can't help with that."]
    batch = adapter.encode(images, convs, answers)
    for row, answer in enumerate(answers):
        assert batch.labels[row][batch.labels[row] != -100].tolist() == adapter.answer_ids(answer)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.hidden_states(images, convs, [10], answers),
            adapter.hidden_states(images, convs, [10]),
            rtol=1e-4,
            atol=2e-4,
        )


def test_text_only_conversation(adapter):
    with torch.no_grad():
        states = adapter.hidden_states(None, [short("Hello", has_image=False)], [3])
    assert states.shape == (1, 1, 896)


# ------------------------------------------------------------------------------ dtypes


@pytest.fixture(scope="module")
def bf16_adapter():
    embedded_tiny_or_skip()  # skip where the model is not installed
    from davsp_lib.models.adapters import load_adapter

    return load_adapter("tiny")  # the default: a bfloat16 language model


def test_the_default_is_a_bfloat16_lm_with_a_float32_reader(bf16_adapter):
    assert {p.dtype for p in bf16_adapter.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16_adapter.reader.model.parameters()} == {torch.float32}
    assert bf16_adapter.dtype == torch.bfloat16
    assert bf16_adapter.info()["dtype"] == "bfloat16"


def test_float32_is_available_and_holds_the_stored_weights_exactly(adapter, bf16_adapter):
    from safetensors.torch import load_file

    from davsp_lib.models.embedded.weights import model_dir

    stored = load_file(model_dir("tiny", log=lambda *_: None) / "model.safetensors")
    fp32 = adapter.lm.state_dict()
    bf16 = bf16_adapter.lm.state_dict()
    assert adapter.dtype == torch.float32 and adapter.info()["dtype"] == "float32"
    for name, tensor in stored.items():
        assert fp32[name].dtype == torch.float32
        assert torch.equal(fp32[name], tensor.float()), name
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), name


def test_unknown_embedded_dtype_is_refused():
    from davsp_lib.models.embedded.model import load_embedded

    with pytest.raises(ValueError, match="dtype must be one of"):
        load_embedded("tiny", dtype=torch.float64)


def test_bfloat16_lm_keeps_border_projection_and_losses_in_float32(bf16_adapter, canvases):
    from davsp_lib.method import training
    from davsp_lib.method.vsp import VisualSafetyPrompt

    records, images = canvases
    prompt = VisualSafetyPrompt.blank(bf16_adapter.image_size, 30)
    delta = (prompt.delta * 0.5).requires_grad_(True)  # a grey ring: the border path is live
    shown = prompt.apply(images, delta)
    convs = [short(r.query) for r in records]
    assert bf16_adapter.border_embeddings_batch(shown).dtype == torch.float32
    assert bf16_adapter.encode(shown, convs).model_inputs["inputs_embeds"].dtype == torch.bfloat16
    with torch.no_grad():
        assert bf16_adapter.hidden_states(shown, convs, [6]).dtype == torch.bfloat16
    config = training.TrainConfig(layer=6, mu_plus=1e4, mu_minus=-1e4, lam=0.5)  # hinge > 0
    direction = torch.nn.functional.normalize(
        torch.randn(bf16_adapter.hidden_size, generator=torch.Generator().manual_seed(0)), dim=0
    )
    out = training.forward_losses(
        bf16_adapter, shown, convs, [True, False], [None, "It says hello."], config, direction
    )
    assert out.loss.dtype == torch.float32
    assert out.projection_loss > 0 and out.output_loss > 0
    out.loss.backward()
    assert delta.grad.dtype == torch.float32
    assert torch.isfinite(delta.grad).all() and (delta.grad.abs() * prompt.mask()).sum() > 0


def test_bfloat16_states_follow_float32_states(adapter, bf16_adapter, canvases):
    from davsp_lib.method.vectors import extract

    records, _ = canvases
    fp32 = extract(adapter, records, [6, 24], blank_image=True, progress=False)
    bf16 = extract(bf16_adapter, records, [6, 24], blank_image=True, progress=False)
    assert bf16.states.dtype == torch.float64 and bf16.meta["dtype"]["model"] == "bfloat16"
    assert fp32.meta["dtype"]["model"] == "float32"
    cosine = torch.nn.functional.cosine_similarity(fp32.states, bf16.states, dim=-1)
    assert cosine.min() > 0.98, cosine


def test_without_the_default_system_turn_the_prompt_starts_at_the_user_turn(adapter):
    conv = short("What does it say?", safety_prompt="Be safe.")
    with_turn, slots = adapter.prompt_ids(conv, "hello")
    system = adapter.tokenizer(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n",
        add_special_tokens=False,
    )["input_ids"]
    assert with_turn[: len(system)] == system
    adapter.system_turn = False
    try:
        without, slots_without = adapter.prompt_ids(conv, "hello")
        own_system, _ = adapter.prompt_ids(short("Hi", system_prompt="Be brief."), "hello")
        info = adapter.info()
    finally:
        adapter.system_turn = True
    assert without == with_turn[len(system) :]
    assert slots_without == [s - len(system) for s in slots]
    assert adapter.tokenizer.decode(own_system).startswith("<|im_start|>system\nBe brief.")
    assert info["system_turn"] is False and "system_turn" not in adapter.info()
    assert info["preprocessing"]["system_prompt"] is None


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
INNER_RESIZE = "padded to a square, then resized bilinearly (antialiased) into the inner window"


def test_info_reports_the_preprocessing_spec(adapter):
    from davsp_lib.models.embedded.model import READING_TEXT

    assert adapter.info()["preprocessing"] == {
        "pad_fill": 1.0,
        "resize": INNER_RESIZE,
        "canvas": "fixed",
        "ring": 30,
        "system_prompt": QWEN_SYSTEM,
        "image_tokens": "16 border slots (4 per side of the ring), then the reading path's "
        f"text ({READING_TEXT}), first in the user turn, then a newline",
    }
    # the declared system prompt is the one the template inserts
    text = adapter.tokenizer.decode(adapter.prompt_ids(short("Hi"), "hello")[0])
    assert text.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>")


def test_capabilities_of_the_embedded_model(adapter):
    assert adapter.perceives_text is True and adapter.lm is adapter.model.lm
    assert adapter.border_token_indices() == list(range(16))
    assert adapter.border_width == 30
