"""Strict image loading: every class of bad file names the file and the problem."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from davsp_lib.data import images
from davsp_lib.data.images import load_image, record_image, to_pil, to_rgb, to_tensor
from davsp_lib.data.records import Label, Record, RenderSpec
from davsp_lib.runtime.errors import DataError


def noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims a size in its header but carries no pixel data (a cheap bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def assert_data_error(path: Path, *fragments: str, **kwargs: int) -> DataError:
    with pytest.raises(DataError) as caught:
        load_image(path, **kwargs)
    message = str(caught.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


# ---------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path: Path) -> None:
    assert_data_error(tmp_path / "nowhere.png", "not found")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert_data_error(folder, "not a file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert_data_error(path, "empty file")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    assert_data_error(path, "not an image")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    noise().save(whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    assert_data_error(cut, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_pixel_data(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.png"
    noise().save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 200] = bytes(200)  # scramble the zlib stream, keep the length
    path.write_bytes(bytes(data))
    assert_data_error(path, "image data")


def test_bomb_rejected_by_pillow(tmp_path: Path) -> None:
    """20000 x 20000 is above twice Pillow's limit: Pillow's own error, reported as a bomb."""
    path = png_header_only(tmp_path / "bomb.png", 20_000, 20_000)
    assert_data_error(path, "decompression bomb")


def test_bomb_rejected_by_header_check(tmp_path: Path) -> None:
    """7000 x 7000 = 49 M pixels: below Pillow's limit, above ours, caught before decoding."""
    path = png_header_only(tmp_path / "big.png", 7_000, 7_000)
    assert_data_error(path, "decompression bomb", "7000x7000", "max_pixels")


def test_bomb_with_low_limit(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    noise((100, 100)).save(path)
    assert_data_error(path, "decompression bomb", max_pixels=5_000)
    assert load_image(path).size == (100, 100)


def test_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.png"
    noise((3, 3)).save(path)
    assert_data_error(path, "too small", "3x3")
    assert load_image(path, min_side=3).size == (3, 3)


# ---------------------------------------------------------------------------- conversions


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    original = noise()
    original.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), np.asarray(original))


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    image = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    image.save(path)
    loaded = load_image(path)
    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (0, 0, 255)
    assert all(120 <= channel <= 135 for channel in loaded.getpixel((1, 0)))  # half black


def test_la_transparent_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (16, 16), (0, 0)).save(path)
    assert load_image(path).getpixel((3, 3)) == (255, 255, 255)


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "palette-transparent.png"
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 1)
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (255, 0, 0)


def test_palette_without_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    image.save(path)
    assert load_image(path).getpixel((2, 2)) == (10, 200, 30)


def test_grey_with_trns_chunk_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "grey-trns.png"
    Image.new("L", (16, 16), 10).save(path, transparency=10)
    assert load_image(path).getpixel((2, 2)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(path, quality=95)  # pure magenta ink
    assert Image.open(path).mode == "CMYK"
    red, green, blue = load_image(path).getpixel((8, 8))
    assert red > 240 and green < 15 and blue > 240


def test_sixteen_bit_png_narrow_range_is_stretched(tmp_path: Path) -> None:
    path = tmp_path / "depth16.png"
    values = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.frombytes("I;16", (64, 64), values.tobytes()).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_image(path)).astype(int)
    grey = loaded[..., 0]
    assert (loaded == grey[..., None]).all()
    assert grey.min() == 0 and grey.max() == 255  # stretched, not clipped to white
    middle = grey.reshape(-1)[len(grey.reshape(-1)) // 2]
    assert 120 <= middle <= 135
    assert (np.diff(grey.reshape(-1)) >= 0).all()  # order preserved


def test_sixteen_bit_big_endian_and_flat() -> None:
    values = np.linspace(200, 400, 16 * 16).reshape(16, 16).astype(">u2")
    image = Image.frombytes("I;16B", (16, 16), values.tobytes())
    grey = np.asarray(to_rgb(image))[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    white = Image.frombytes("I;16", (16, 16), np.full((16, 16), 65535, np.uint16).tobytes())
    assert to_rgb(white).getpixel((0, 0)) == (255, 255, 255)


def test_int32_and_float_tiff(tmp_path: Path) -> None:
    ints = np.linspace(-50_000, 90_000, 32 * 32).reshape(32, 32).astype(np.int32)
    Image.fromarray(ints, mode="I").save(tmp_path / "int.tif")
    grey = np.asarray(load_image(tmp_path / "int.tif"))[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    floats = np.zeros((16, 16), np.float32)
    floats[0, 0], floats[1, 1] = 2.0, -1.0
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    grey = np.asarray(load_image(tmp_path / "float.tif"))[..., 0]
    assert (grey[0, 0], grey[1, 1], grey[5, 5]) == (255, 0, 85)


def test_bilevel_and_grey(tmp_path: Path) -> None:
    Image.new("1", (16, 16), 1).save(tmp_path / "one.png")
    Image.new("L", (16, 16), 77).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "one.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 30, 30)).save(path, exif=exif)
    assert load_image(path).size == (20, 40)


# ---------------------------------------------------------------------------- tensors


def test_to_tensor_and_back() -> None:
    image = noise((37, 21))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 21, 37) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    assert np.array_equal(np.asarray(to_pil(tensor)), np.asarray(image))


def test_to_tensor_converts_modes() -> None:
    tensor = to_tensor(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    assert torch.equal(tensor, torch.ones(3, 8, 8))


def test_to_pil_clamps_and_rejects_bad_shapes() -> None:
    assert to_pil(torch.full((3, 4, 4), 2.0)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        to_pil(torch.zeros(4, 4, 3))
    with pytest.raises(ValueError, match="NaN"):
        to_pil(torch.full((3, 2, 2), float("nan")))


# ---------------------------------------------------------------------------- records + cache


def make_record(**kwargs: object) -> Record:
    return Record(id="test/1", query="q", label=Label.BENIGN, source="test", **kwargs)


def test_record_image_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pic.png"
    noise().save(path)
    assert record_image(make_record(image_path=path)).size == (64, 48)


def test_text_only_record_raises() -> None:
    with pytest.raises(ValueError, match="test/1"):
        record_image(make_record())


def test_render_is_cached_and_reused(tmp_path: Path) -> None:
    spec = RenderSpec("figstep", "Steps to bake sourdough bread at home.")
    first = record_image(make_record(render=spec), cache_dir=tmp_path)
    cached = images.render_cache_path(spec, tmp_path)
    assert cached.is_file() and cached.suffix == ".png" and cached.parent == tmp_path
    assert first.size == (760, 760)
    stamp = cached.stat().st_mtime_ns
    second = record_image(make_record(render=spec), cache_dir=tmp_path)
    assert cached.stat().st_mtime_ns == stamp  # a hit: not rewritten
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert list(tmp_path.glob(".*.tmp")) == []  # atomic write left no temporary file


def test_typo_cache_is_jpeg_q75_and_hit_equals_miss(tmp_path: Path) -> None:
    spec = RenderSpec("typo", "bake sourdough bread at home")
    miss = images.rendered_image(spec, tmp_path)
    path = images.render_cache_path(spec, tmp_path)
    assert path.suffix == ".jpg" and Image.open(path).format == "JPEG"
    hit = images.rendered_image(spec, tmp_path)
    assert np.array_equal(np.asarray(miss), np.asarray(hit))


def test_corrupt_cache_file_is_rerendered(tmp_path: Path) -> None:
    spec = RenderSpec("figstep", "Steps to repot a house plant.")
    path = images.render_cache_path(spec, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    image = images.rendered_image(spec, tmp_path)
    assert image.size == (760, 760)
    assert load_image(path).size == (760, 760)  # the bad file was replaced


def test_cache_key_and_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = images.render_cache_path(RenderSpec("figstep", "x y"), tmp_path)
    assert a != images.render_cache_path(RenderSpec("figstep", "x  y"), tmp_path)
    assert a.name.startswith("figstep-")
    monkeypatch.setenv("DAVSP_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert images.default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("DAVSP_CACHE_DIR")
    assert images.default_cache_dir().parts[-3:] == (".cache", "davsp", "renders")


def test_unwritable_cache_still_returns_the_image(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    spec = RenderSpec("typo", "bake bread")
    with pytest.warns(UserWarning, match="render cache not written"):
        image = images.rendered_image(spec, blocker / "cache")
    assert image.size == (1024, 180)
