"""The visual safety prompt: placement, composition, clamping, resampling and its artifact."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from davsp_lib.method import vsp
from davsp_lib.method.vsp import VisualSafetyPrompt, VSPMismatchError
from davsp_lib.models.adapters.base import pad_to_square
from davsp_lib.models.adapters.tiny import build_tiny_llava
from davsp_lib.runtime.errors import DataError

CANVAS = (48, 48)


def image(h: int = 20, w: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_place_puts_the_padded_image_in_the_inner_window_with_a_white_ring():
    vsp = VisualSafetyPrompt.blank(CANVAS, width=6)
    placed = vsp.place(image())
    expected = F.interpolate(
        pad_to_square(image())[None], size=(36, 36), mode="bilinear", antialias=True
    )[0].clamp(0, 1)
    assert torch.equal(placed[:, 6:42, 6:42], expected)
    ring = placed * vsp.mask()
    assert torch.equal(ring, vsp.mask().expand(3, -1, -1))  # white everywhere on the ring


def test_blank_border_is_the_identity_and_a_border_never_touches_the_image():
    vsp = VisualSafetyPrompt.blank(CANVAS, width=6)
    placed = vsp.place(image())[None]
    assert torch.equal(vsp.apply(placed), placed)
    painted = VisualSafetyPrompt(torch.rand(3, *CANVAS), "border", 6)
    composed = painted.apply(placed)
    assert torch.equal(composed[..., 6:42, 6:42], placed[..., 6:42, 6:42])
    mask = painted.mask().bool().expand(3, -1, -1)
    assert torch.equal(composed[0][mask], painted.delta[mask])


def test_delta_is_clamped_to_the_valid_range():
    border = VisualSafetyPrompt(torch.full((3, *CANVAS), 1.7), "border", 6)
    assert float(border.delta.max()) == 1.0
    noise = VisualSafetyPrompt(torch.full((3, *CANVAS), -0.5), "additive", 0, epsilon=16 / 255)
    assert float(noise.delta.min()) == pytest.approx(-16 / 255)
    composed = noise.apply(torch.zeros(1, 3, *CANVAS))
    assert float(composed.min()) == 0.0  # clamp(x + delta, 0, 1)


def test_additive_kind_fills_the_canvas_and_adds():
    noise = VisualSafetyPrompt.zero_noise(CANVAS, 8 / 255)
    placed = noise.place(image())
    assert placed.shape == (3, *CANVAS)
    delta = torch.full((3, *CANVAS), 0.01)
    expected = (placed + delta).clamp(0, 1)
    assert torch.allclose(noise.apply(placed[None], delta)[0], expected, atol=0)


def test_gradient_reaches_only_the_ring():
    vsp = VisualSafetyPrompt.blank(CANVAS, width=6)
    delta = vsp.delta.clone().requires_grad_(True)
    vsp.apply(vsp.place(image())[None], delta).sum().backward()
    assert torch.equal(delta.grad, vsp.mask().expand(3, -1, -1))


def test_resampled_scales_canvas_and_width():
    vsp = VisualSafetyPrompt(torch.rand(3, 336, 336), "border", 30)
    moved = vsp.resampled((448, 448))
    assert moved.canvas == (448, 448) and moved.width == 40
    assert moved.metadata["resampled_from"] == {"canvas": [336, 336], "width": 30}
    assert vsp.resampled((336, 336)) is vsp


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        VisualSafetyPrompt.blank((20, 20), width=10)
    with pytest.raises(ValueError, match="epsilon"):
        VisualSafetyPrompt(torch.zeros(3, 8, 8), "additive", 0)
    with pytest.raises(VSPMismatchError, match="resample"):
        VisualSafetyPrompt.blank(CANVAS, 6).apply(torch.ones(1, 3, 40, 40))


def test_save_load_round_trip_and_adapter_check(tmp_path):
    vsp = VisualSafetyPrompt(torch.rand(3, 56, 56), "border", 8, metadata={"seed": 3})
    tensor_file, json_file = vsp.save(tmp_path / "davsp")
    loaded = VisualSafetyPrompt.load(tmp_path / "davsp", adapter=build_tiny_llava())
    assert torch.equal(loaded.delta, vsp.delta) and loaded.metadata == {"seed": 3}
    header = json.loads(json_file.read_text())
    assert header["canvas"] == [56, 56] and header["width"] == 8
    other = VisualSafetyPrompt.blank(CANVAS, 6)
    other.save(tmp_path / "small")
    with pytest.raises(VSPMismatchError, match="56"):
        VisualSafetyPrompt.load(tmp_path / "small", adapter=build_tiny_llava())
    assert tensor_file.suffix == ".safetensors"


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="metadata file not found"):
        VisualSafetyPrompt.load(tmp_path / "nothing")
    VisualSafetyPrompt.blank(CANVAS, 6).save(tmp_path / "a")
    VisualSafetyPrompt(torch.zeros(3, *CANVAS), "border", 6).save(tmp_path / "b")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(DataError, match=r"a\.safetensors.*sha256"):
        VisualSafetyPrompt.load(tmp_path / "a")
    (tmp_path / "c.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match=r"c\.json.*not a visual safety prompt"):
        VisualSafetyPrompt.load(tmp_path / "c")


def test_to_image_shows_the_border():
    vsp = VisualSafetyPrompt(torch.zeros(3, *CANVAS), "border", 6)
    shown = vsp.to_image()
    assert shown.size == CANVAS[::-1]
    assert shown.getpixel((0, 0)) == (0, 0, 0) and shown.getpixel((24, 24)) == (128, 128, 128)


# ------------------------------------------------------------------------------ start and bound


def test_border_starts_white_black_or_at_the_normalisation_mean():
    adapter = build_tiny_llava()
    mean = torch.tensor(adapter.processor.image_processor.image_mean)
    assert torch.allclose(vsp.normalisation_mean(adapter), mean, atol=1e-6)
    for start, expected in (("white", torch.ones(3)), ("zeros", torch.zeros(3)), ("mean", mean)):
        prompt = VisualSafetyPrompt.for_adapter(adapter, width=8, start=start)
        assert prompt.start == start
        assert torch.allclose(prompt.delta, expected.view(3, 1, 1).expand_as(prompt.delta))
    # the reference's start: zeros in the model's normalised space
    prompt = VisualSafetyPrompt.for_adapter(adapter, width=8, start="mean")
    assert adapter.normalize(prompt.delta[None]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="border start must be one of"):
        VisualSafetyPrompt.for_adapter(adapter, width=8, start="grey")


def test_unclamped_border_keeps_values_outside_the_pixel_range_and_the_adapter_accepts_them(
    tmp_path,
):
    adapter = build_tiny_llava()
    delta = torch.full((3, *adapter.image_size), 1.5)
    clamped = VisualSafetyPrompt(delta, "border", 8)
    assert clamped.delta.max() == 1.0 and clamped.clamp
    free = VisualSafetyPrompt(delta, "border", 8, clamp=False, start="mean")
    assert free.delta.max() == 1.5
    image = torch.rand(3, 20, 30)
    composed = free.apply(free.place(image)[None])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        adapter.to_canvas(composed)
    placer = vsp.placer_for(free, adapter)  # using an unclamped border tells the adapter
    assert placer(image).shape == composed.shape[1:] and not adapter.pixels_bounded
    assert adapter.to_canvas(composed).max() == 1.5
    free.save(tmp_path / "free")
    header = json.loads((tmp_path / "free.json").read_text())
    assert (header["start"], header["clamp"]) == ("mean", False)
    loaded = VisualSafetyPrompt.load(tmp_path / "free")
    assert (loaded.start, loaded.clamp, float(loaded.delta.max())) == ("mean", False, 1.5)
    assert build_tiny_llava().pixels_bounded  # a fresh adapter still guards the pixel range
