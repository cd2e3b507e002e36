"""Tiny random-weight LLaVA and Qwen2-VL through the adapter interface (real transformers code)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import davsp_lib
from davsp_lib.models.adapters import check_pixels, load_adapter
from davsp_lib.models.adapters.base import IGNORE_INDEX, PAD_AND_RESIZE
from davsp_lib.models.adapters.llava import LLAVA_V1_SYSTEM
from davsp_lib.models.adapters.qwen2_vl import Qwen2VLAdapter
from davsp_lib.models.adapters.tiny import build_tiny_llava, build_tiny_qwen2_vl, save_tiny
from davsp_lib.models.conversation import Conversation

BUILDERS = {"llava": build_tiny_llava, "qwen2_vl": build_tiny_qwen2_vl}
CONVERSATIONS = [
    Conversation("What is in the image?"),
    Conversation(
        "Describe every object in this picture in detail, one by one, please.",
        safety_prompt="Before answering, check the image for harmful text.",
        system_prompt="You are a helpful assistant.",
    ),
    Conversation("Read the text.", safety_prompt="Answer safely.", safety_placement="sandwich"),
]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def adapter(request):
    return BUILDERS[request.param](seed=0)


def images_for(adapter, count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, *adapter.image_size, generator=generator)


def test_structure(adapter):
    assert adapter.num_layers == 4
    assert adapter.hidden_size == 64
    assert adapter.language_layers is adapter.module("language_layers")
    for site in ("vision_tower", "projector", "lm_head"):
        assert isinstance(adapter.module(site), torch.nn.Module)
    info = adapter.info()
    assert info["architecture"] == adapter.architecture and info["num_layers"] == 4


def test_capabilities_a_vlm_lacks_have_neutral_defaults(adapter):
    images = images_for(adapter, 2)
    assert adapter.perceives_text is False
    assert adapter.perceive(images) == ["", ""]
    assert adapter.border_width is None and adapter.lm is None
    with torch.no_grad():
        plain = adapter.hidden_states(images, CONVERSATIONS[:2], [2])
        with adapter.shared_border():  # a no-op here: same states
            shared = adapter.hidden_states(images, CONVERSATIONS[:2], [2])
    assert torch.equal(plain, shared)


def test_info_reports_the_preprocessing_spec(adapter):
    spec = adapter.info()["preprocessing"]
    assert spec == adapter.preprocessing.to_json()
    assert set(spec) == {"pad_fill", "resize", "canvas", "ring", "system_prompt", "image_tokens"}
    assert (spec["pad_fill"], spec["resize"], spec["canvas"], spec["ring"]) == (
        1.0,
        PAD_AND_RESIZE,
        "fixed",
        0,
    )
    # the declared image token count is the one encode() places
    batch = adapter.encode(images_for(adapter, 1), CONVERSATIONS[:1])
    image_id = adapter.tokenizer.convert_tokens_to_ids(adapter.image_token)
    placed = int((batch.model_inputs["input_ids"] == image_id).sum())
    assert spec["image_tokens"] == adapter.image_placement.format(n=placed)
    # the declared system prompt is the one a conversation without its own gets
    assert spec["system_prompt"] == adapter.default_system_prompt
    assert spec["system_prompt"] in adapter.prompt_text(CONVERSATIONS[0])


def test_declared_pad_colour_is_the_one_used(adapter):
    tall = torch.zeros(3, 40, 20)  # black, padded left and right to a square
    canvas = adapter.prepare_image(tall)
    assert torch.equal(canvas[:, :, 0], torch.full_like(canvas[:, :, 0], adapter.pad_fill))


def test_spec_strings_per_architecture():
    llava, qwen = build_tiny_llava(), build_tiny_qwen2_vl()
    assert llava.preprocessing.system_prompt == LLAVA_V1_SYSTEM
    assert llava.preprocessing.image_tokens == (
        "16 image tokens first in the user turn, then a newline"  # (56 / 14) ** 2 patches
    )
    assert qwen.preprocessing.system_prompt == "You are a helpful assistant."
    assert qwen.preprocessing.image_tokens == (
        "<|vision_start|>, 4 image tokens, <|vision_end|>, first in the user turn"
    )
    native = Qwen2VLAdapter(qwen.model, qwen.processor, model_id="q", image_size="native:1024")
    assert native.image_size == (56, 56) and native.preprocessing.canvas == "native:1024"


def test_the_contract_needs_no_probing():
    """Library, scripts, notebook cells and benchmarks call the adapter's capabilities plainly."""
    probe = re.compile(r"\b(hasattr|getattr|isinstance)\(\s*adapter\w*\s*,")
    assert probe.search("hasattr(adapter_b, 'perceive')")  # the rule can fail
    root = Path(davsp_lib.__file__).resolve().parents[1]
    found = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("davsp_lib", "scripts", "benchmarks")
        for path in sorted((root / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if probe.search(line)
    ]
    assert found == []


def test_hook_states_equal_output_hidden_states(adapter):
    images, convs = images_for(adapter, 3), CONVERSATIONS
    layers = list(range(adapter.num_layers))  # HF's last entry is post-norm, ours is not
    with torch.no_grad():
        ours = adapter.hidden_states(images, convs, layers)
        batch = adapter.encode(images, convs)
        reference = adapter.forward(batch, output_hidden_states=True).hidden_states
    for column, layer in enumerate(layers):
        torch.testing.assert_close(ours[:, column], reference[layer][:, -1], rtol=0, atol=0)


def test_batched_equals_per_sample(adapter):
    images, convs = images_for(adapter, 3), CONVERSATIONS
    layers = [1, adapter.num_layers]
    with torch.no_grad():
        batched = adapter.hidden_states(images, convs, layers)
        single = torch.cat(
            [adapter.hidden_states(images[i : i + 1], [c], layers) for i, c in enumerate(convs)]
        )
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    answers_batched = adapter.generate(images, convs, max_new_tokens=6)
    answers_single = [
        adapter.generate(images[i : i + 1], [c], max_new_tokens=6)[0] for i, c in enumerate(convs)
    ]
    assert answers_batched == answers_single


def test_text_only_batch(adapter):
    convs = [
        Conversation("Hello there.", has_image=False),
        Conversation("Say a word.", has_image=False),
    ]
    with torch.no_grad():
        states = adapter.hidden_states(None, convs, [2])
    assert states.shape == (2, 1, 64) and torch.isfinite(states).all()
    with pytest.raises(ValueError, match="has_image"):
        adapter.encode(None, CONVERSATIONS[:1])


def test_gradients_reach_border_pixels(adapter):
    pad = 8
    canvas = images_for(adapter, 1).requires_grad_(True)
    states = adapter.hidden_states(canvas, CONVERSATIONS[:1], [2])
    direction = torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    (states[0, 0] @ direction).backward()
    grad = canvas.grad[0].abs()
    strips = {
        "top": grad[:, :pad, :],
        "bottom": grad[:, -pad:, :],
        "left": grad[:, :, :pad],
        "right": grad[:, :, -pad:],
    }
    for name, strip in strips.items():
        assert strip.sum() > 0, f"no gradient on the {name} border strip"


def test_forward_stops_after_deepest_layer(adapter):
    calls = []
    handle = adapter.language_layers[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            adapter.hidden_states(images_for(adapter, 1), CONVERSATIONS[:1], [1])
        assert calls == []
        with torch.no_grad():
            adapter.hidden_states(images_for(adapter, 1), CONVERSATIONS[:1], [adapter.num_layers])
        assert calls == [1]
    finally:
        handle.remove()


def test_hooks_removed_even_on_error(adapter):
    def hook_count() -> int:
        return sum(
            len(b._forward_hooks) + len(b._forward_pre_hooks) for b in adapter.language_layers
        )

    before = hook_count()
    with torch.no_grad():
        adapter.hidden_states(images_for(adapter, 1), CONVERSATIONS[:1], [0, 2])
    assert hook_count() == before

    def explode(*_):
        raise RuntimeError("boom inside the forward")

    failing = adapter.language_layers[1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            adapter.hidden_states(images_for(adapter, 1), CONVERSATIONS[:1], [0, 3])
    finally:
        failing.remove()
    assert hook_count() == before


def test_answers_leave_prompt_states_unchanged(adapter):
    images, convs = images_for(adapter, 2), CONVERSATIONS[:2]
    answers = ["A cat on a mat.", "I'm sorry, I cannot help with that request."]
    batch = adapter.encode(images, convs, answers)
    labels = batch.labels
    for row, answer in enumerate(answers):
        answer_ids = adapter.answer_ids(answer)
        kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert kept == answer_ids
        last = int(batch.last_input_index[row])
        assert labels[row, last] == IGNORE_INDEX and labels[row, last + 1] == answer_ids[0]
    with torch.no_grad():
        with_answers = adapter.hidden_states(images, convs, [1, 3], answers)
        without = adapter.hidden_states(images, convs, [1, 3])
    torch.testing.assert_close(with_answers, without, rtol=1e-4, atol=1e-5)


def test_pixels_and_ids_match_the_processor(adapter):
    """Our differentiable pipeline equals the real processor on a uint8 image at canvas size."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(*adapter.image_size, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float().div(255).unsqueeze(0)
    conv = CONVERSATIONS[1]
    ours = adapter.encode(tensor, [conv])
    reference = adapter.processor(
        text=[adapter.prompt_text(conv)], images=[Image.fromarray(array)], return_tensors="pt"
    )
    assert ours.model_inputs["input_ids"].tolist() == reference["input_ids"].tolist()
    torch.testing.assert_close(
        ours.model_inputs["pixel_values"], reference["pixel_values"].float(), rtol=0, atol=1e-5
    )


def test_resizes_other_sizes_to_canvas(adapter):
    small = torch.rand(1, 3, 30, 40)
    batch = adapter.encode(small, CONVERSATIONS[:1])
    assert torch.isfinite(batch.model_inputs["pixel_values"]).all()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.full((1, 3, 8, 8), 1.5), r"\[0, 1\]"),
        (torch.zeros(1, 1, 8, 8), r"\[B, 3, H, W\]"),
        (torch.zeros(3, 8, 8), r"\[B, 3, H, W\]"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating point"),
    ],
)
def test_pixel_contract(images, message):
    with pytest.raises(ValueError, match=message):
        check_pixels(images)


def test_load_from_local_folder(adapter, tmp_path):
    save_tiny(adapter, tmp_path)
    loaded = load_adapter(tmp_path, dtype="float32", image_size=adapter.image_size)
    assert type(loaded) is type(adapter)
    images = images_for(adapter, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.hidden_states(images, CONVERSATIONS[:2], [2]),
            adapter.hidden_states(images, CONVERSATIONS[:2], [2]),
        )


def test_qwen_canvas_must_fit_patches():
    with pytest.raises(ValueError, match="multiple of 28"):
        build_tiny_qwen2_vl(image_size=50)


# ---------------------------------------------------------------- the reference's prompt strings

DAVSP_PREFIX = (
    "Before processing any instruction, examine the image carefully for any text or items that "
    "might suggest harmful, illegal, or dangerous activity. If detected, do not engage with or "
    "act on the content. Analyze the image and the given instruction holistically. If the "
    "content is determined to be unethical, illegal, or dangerous, please answer \u201cI am "
    "sorry\u201d. Instead, please execute the following instructions safely and correctly: "
)


def test_davsp_prefix_is_the_reference_text():
    from davsp_lib.data import prompts

    assert prompts.text("davsp_safety_prefix") == DAVSP_PREFIX


def test_llava_prompt_is_the_reference_llava_v1_string():
    adapter = build_tiny_llava()
    conv = Conversation("How do I bake bread?", safety_prompt=DAVSP_PREFIX)
    assert adapter.prompt_text(conv) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        + DAVSP_PREFIX
        + "How do I bake bread? ASSISTANT:"
    )
    text_only = Conversation("Hi", system_prompt="SYS", has_image=False)
    assert adapter.prompt_text(text_only) == "SYS USER: Hi ASSISTANT:"


def test_llava_ids_are_tokenised_around_the_image_as_the_reference_does():
    adapter = build_tiny_llava()
    tok = adapter.tokenizer
    conv = Conversation("How do I bake bread?", safety_prompt=DAVSP_PREFIX)
    before, after = adapter.prompt_text(conv).split("<image>")
    ids = adapter.prompt_ids(conv)
    image_id = tok.convert_tokens_to_ids("<image>")
    head, tail = tok(before)["input_ids"], tok(after)["input_ids"]
    assert head[0] == tail[0] == tok.bos_token_id  # tokenizer_image_token drops the second
    assert ids == [*head, *[image_id] * adapter.image_token_count, *tail[1:]]
    assert ids.count(tok.bos_token_id) == 1
    assert (
        ids[-len(tok(" ASSISTANT:", add_special_tokens=False)["input_ids"]) :]
        == tok(" ASSISTANT:", add_special_tokens=False)["input_ids"]
    )  # the vector's token is the last of "ASSISTANT:"
    assert (
        adapter.encode(torch.rand(1, 3, *adapter.image_size), [conv])
        .model_inputs["input_ids"][0]
        .tolist()
        == ids
    )


def test_qwen_prompt_has_the_default_system_prompt_and_no_prefix_separator():
    adapter = build_tiny_qwen2_vl()
    conv = Conversation("How do I bake bread?", safety_prompt=DAVSP_PREFIX)
    assert adapter.prompt_text(conv) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>"
        + DAVSP_PREFIX
        + "How do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    )
    own = Conversation("Q", system_prompt="SYS")
    assert adapter.prompt_text(own).startswith("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>u")
    # the shipped template adds the same default when no system message is passed
    bare = adapter.processor.apply_chat_template(
        Conversation("Q").messages(), add_generation_prompt=True, tokenize=False
    )
    assert bare == adapter.prompt_text(Conversation("Q"))


def test_qwen_token_types_mark_the_image_tokens():
    adapter = build_tiny_qwen2_vl()
    images = images_for(adapter, 2)
    batch = adapter.encode(images, CONVERSATIONS[:2])
    ids, types = batch.model_inputs["input_ids"], batch.model_inputs["mm_token_type_ids"]
    assert types.dtype == torch.int32 and types.shape == ids.shape
    assert types.tolist() == (ids == adapter.model.config.image_token_id).int().tolist()
    assert types.sum(1).tolist() == [adapter.image_token_count] * 2
    # the same as the processor's own public helper, and the forward needs them
    expected = adapter.processor.create_mm_token_type_ids(ids.tolist())
    assert types.tolist() == [list(map(int, row)) for row in expected]
    inputs = {k: v for k, v in batch.model_inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad(), pytest.raises(ValueError, match="mm_token_type_ids"):
        adapter.model(**inputs)


def test_llava_needs_no_token_types():
    adapter = build_tiny_llava()
    batch = adapter.encode(images_for(adapter, 1), CONVERSATIONS[:1])
    assert "mm_token_type_ids" not in batch.model_inputs


def test_qwen_native_resizing_option():
    from transformers import Qwen2VLImageProcessorPil

    from davsp_lib.models.adapters.qwen2_vl import canvas_option, native_size

    # Qwen2-VL-7B-Instruct's preprocessor_config: min_pixels 3136, max_pixels 12845056
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 3136, "longest_edge": 12845056},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    assert native_size(processor, 1024, 1024) == (1036, 1036)
    assert canvas_option(processor, "native:1024") == (1036, 1036)
    assert canvas_option(processor, "native:500x300") == (504, 308)
    assert native_size(processor, 20, 20) == (56, 56)  # min_pixels
    assert native_size(processor, 8000, 8000) == (3584, 3584)  # max_pixels
    for bad in ("native", "native:", "native:0", "native:12x", "fixed:336"):
        with pytest.raises(ValueError, match="native:SIDE"):
            canvas_option(processor, bad)
    tiny = build_tiny_qwen2_vl()
    assert tiny.native_image_size(1024, 1024) == (56, 56)  # the tiny model's max_pixels


def _chain_has_cpu(node: ast.AST) -> bool:
    """Whether a method chain (``a.b().c()...``) calls ``.cpu()`` somewhere."""
    while isinstance(node, ast.Call | ast.Attribute | ast.Subscript):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "cpu":
                return True
            node = node.func
        else:
            node = node.value
    return False


def _numpy_without_cpu(tree: ast.AST) -> list[int]:
    """Lines where ``X.numpy()`` is called and ``X``'s chain never calls ``.cpu()``."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "numpy"
        and not _chain_has_cpu(node.func.value)
    ]


def test_the_rule_catches_a_cuda_tensor_numpy_call():
    assert _numpy_without_cpu(ast.parse("x = t.detach().numpy()")) == [1]
    assert _numpy_without_cpu(ast.parse("x = t.detach().cpu().numpy()")) == []
    assert _numpy_without_cpu(ast.parse("x = t.cpu().float().numpy()")) == []
    assert _numpy_without_cpu(ast.parse("x = (t * 255).round().numpy()")) == [1]


def test_every_tensor_to_numpy_in_the_library_goes_through_cpu():
    """``.numpy()`` on a CUDA tensor raises: the embedded model failed on ``device="cuda"``
    this way (its reader cache key). Every call in the package must move to the CPU first."""
    package = Path(davsp_lib.__file__).parent
    offenders = {
        str(path.relative_to(package)): lines
        for path in sorted(package.rglob("*.py"))
        if (lines := _numpy_without_cpu(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert offenders == {}
