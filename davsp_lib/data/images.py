"""Strict image loading, RGB conversion done right, tensors, and the render cache.

A bad image must fail loudly at load time with the file and the problem named, not later as a
shape error inside a model: missing, not an image, truncated (fully decoded, never with
``LOAD_TRUNCATED_IMAGES``), decompression bombs (checked from the header before decoding) and
images too small to be real inputs are all :class:`~davsp_lib.runtime.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from davsp_lib.data import render as rendering
from davsp_lib.data.records import Record, RenderSpec
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_bytes

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MIN_SIDE = 8
WHITE = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def load_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Open, fully decode, orient (EXIF) and convert an image file to 8-bit RGB."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "image file not found")
    if not path.is_file():
        raise DataError(path, "not a file (expected an image file)")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes), not an image")
    with warnings.catch_warnings():
        # Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        opened = _open(path)
        try:
            _check_size(path, opened.size, max_pixels=max_pixels, min_side=min_side)
            _decode(path, opened)
            oriented = _orient(path, opened)
            try:
                return to_rgb(oriented)
            except (ValueError, OSError) as exc:
                raise DataError(
                    path, f"cannot convert mode {oriented.mode} to RGB ({exc})"
                ) from None
        finally:
            opened.close()


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(path, f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise DataError(path, "not an image (or an unsupported format): cannot identify") from None
    except OSError as exc:
        raise DataError(path, f"cannot open image ({exc})") from None


def _check_size(path: Path, size: tuple[int, int], *, max_pixels: int, min_side: int) -> None:
    """Header-only checks: nothing has been decoded yet."""
    width, height = size
    if width * height > max_pixels:
        raise DataError(
            path,
            f"decompression bomb: header claims {width}x{height} = {width * height} pixels, "
            f"above max_pixels={max_pixels}",
        )
    if min(width, height) < min_side:
        raise DataError(path, f"image too small: {width}x{height}, each side must be >= {min_side}")


def _decode(path: Path, image: Image.Image) -> None:
    """Force a full decode so that truncated or corrupt data fails here."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(path, f"decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error...
        message = str(exc) or type(exc).__name__
        kind = "truncated" if "truncat" in message.lower() else "corrupt"
        raise DataError(path, f"{kind} image data: {message}") from None


def _orient(path: Path, image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:
        raise DataError(path, f"bad EXIF orientation data: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, 16-bit/float stretched by value range."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _HIGH_DEPTH_MODES:  # before transparency: Pillow's RGBA conversion would clip
        return Image.fromarray(_stretch_to_uint8(image), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(image)
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX...


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _stretch_to_uint8(image: Image.Image) -> np.ndarray:
    """Map [min, max] of the pixel values onto [0, 255] (Pillow's own convert clips at 255).

    A flat image has no range to stretch; it is mapped by its mode's nominal range instead
    (65535 for 16-bit, 1.0 for float data in [0, 1], else 255) so a white 16-bit page stays white.
    """
    values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high > low:
        scaled = (values - low) / (high - low) * 255.0
    else:
        scaled = values * 255.0 / _nominal_max(image.mode, high)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _nominal_max(mode: str, value: float) -> float:
    if mode.startswith("I;16") or value > 255:
        return 65535.0
    if mode == "F" and 0.0 <= value <= 1.0:
        return 1.0
    return 255.0


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``torch.float32`` ``[3, H, W]`` in [0, 1] (the adapters' pixel-space contract)."""
    import torch

    array = np.asarray(to_rgb(image) if image.mode != "RGB" else image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """The inverse of :func:`to_tensor`; values are clamped to [0, 1] and rounded."""
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"expected a tensor [3, H, W], got {shape}")
    if not tensor.is_floating_point():
        raise ValueError(f"expected a floating point tensor in [0, 1], got {tensor.dtype}")
    if torch.isnan(tensor).any():
        raise ValueError("tensor contains NaN")
    array = tensor.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy(), mode="RGB")


# ---------------------------------------------------------------------------- render cache


def default_cache_dir() -> Path:
    configured = os.environ.get("DAVSP_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "davsp" / "renders"


def render_cache_path(spec: RenderSpec, cache_dir: str | Path | None = None) -> Path:
    """``{style}-{sha256(style, text, RENDERER_VERSION)}{.png|.jpg}`` in the cache folder."""
    _, suffix = rendering.file_format(spec.style)
    key = json.dumps([spec.style, spec.text, rendering.RENDERER_VERSION], ensure_ascii=False)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{spec.style}-{digest}{suffix}"


def rendered_image(spec: RenderSpec, cache_dir: str | Path | None = None) -> Image.Image:
    """The rendered image as the benchmark stores it (FigStep PNG, TYPO JPEG q75), cached.

    A hit and a miss return identical pixels: a fresh render is returned decoded from the exact
    bytes written to the cache. A cache file that does not load is re-rendered, never trusted.
    """
    path = render_cache_path(spec, cache_dir)
    if path.is_file():
        try:
            return load_image(path)
        except DataError:
            pass  # corrupt or partial cache file: fall through and overwrite it
    data = rendering.encode(rendering.render(spec).image, spec.style)
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:  # a read-only cache must not stop an evaluation
        warnings.warn(f"render cache not written ({path}): {exc}", stacklevel=2)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def record_image(record: Record, cache_dir: str | Path | None = None) -> Image.Image:
    """The RGB image of a record: its file, or its cached render; text-only records raise."""
    if record.image_path is not None:
        return load_image(record.image_path)
    if record.render is not None:
        return rendered_image(record.render, cache_dir)
    raise ValueError(f"record {record.id} is text-only: it has no image_path and no render spec")
