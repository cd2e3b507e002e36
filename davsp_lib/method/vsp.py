"""The Visual Safety Prompt: a trainable border (or additive pattern) on the model's input canvas.

Pixel-space contract: everything here is in ``[0, 1]`` on the adapter's canvas ``(H, W)``; the
model's own normalisation happens later, inside :meth:`VLMAdapter.encode`, so one object works
for any adapter and canvas size.

- ``kind="border"`` (DAVSP): the user image is padded to a square with white (aspect ratio kept,
  as the reference does) and resized into the inner ``(H - 2p) x (W - 2p)`` window; the ring of
  width ``p`` is *replaced* by the border: ``x' = m * delta + (1 - m) * placed(x)``. Image pixels
  are never perturbed. ``delta`` starts white, black (``zeros``) or at the model's normalisation
  mean (``mean``: zeros in normalised space, the reference's start), and is clamped to ``[0, 1]``
  after every step unless ``clamp=False`` (the reference never clamps: its border may leave the
  valid pixel range, and the adapter is then told to accept such pixels, see :func:`placer_for`).
- ``kind="additive"`` (the DA-only ablation and the UniGuard baseline): the image fills the
  whole canvas and ``x' = clamp(x + delta, 0, 1)`` with ``|delta| <= epsilon``.

Artifacts are ``.safetensors`` (the tensor) + ``.json`` (canvas, width, kind, the model, the
vector and margins used, data, steps, seed, losses), never pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from davsp_lib.models.adapters.base import VLMAdapter, check_pixels, pad_to_square
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import artifact_paths, read_artifact, write_artifact

VSP_FORMAT = "davsp-visual-safety-prompt/1"
Kind = Literal["border", "additive"]
KINDS: tuple[str, ...] = ("border", "additive")
#: where an untrained border starts (see :func:`border_start`)
STARTS: tuple[str, ...] = ("white", "zeros", "mean")


class VSPMismatchError(ValueError):
    """A saved safety prompt used on a canvas it was not made for (and not resampled)."""


def default_width(adapter: VLMAdapter) -> int:
    """The adapter's own ring width if it has one (embedded model), else DAVSP's 30 px."""
    return 30 if adapter.border_width is None else int(adapter.border_width)


def placer_for(prompt: VisualSafetyPrompt | None, adapter: VLMAdapter):
    """How a user image reaches the canvas under ``prompt``.

    A border needs the image in its inner window (:meth:`VisualSafetyPrompt.place`); additive
    noise is drawn on the image exactly as the model normally receives it
    (``adapter.prepare_image``: the whole canvas for LLaVA / Qwen2-VL, the inner window of the
    embedded model, whose ring must stay clear for its border input).
    """
    if prompt is not None and prompt.kind == "border":
        if not prompt.clamp:  # the composed canvas may leave [0, 1], as the reference's does
            adapter.accept_unbounded_pixels()
        return prompt.place
    return adapter.prepare_image


def normalisation_mean(adapter: VLMAdapter) -> torch.Tensor:
    """The pixel value per channel that the adapter's normalisation maps to zero, ``[3]``.

    Read through the public :meth:`VLMAdapter.normalize` (an affine map per channel): for
    ``(x - m) / s``, ``m = -n(0) / (n(1) - n(0))``. An identity normalisation gives zeros.
    """
    height, width = adapter.image_size
    zero = adapter.normalize(torch.zeros(1, 3, height, width))[0, :, 0, 0].float().cpu()
    one = adapter.normalize(torch.ones(1, 3, height, width))[0, :, 0, 0].float().cpu()
    return -zero / (one - zero)


def border_start(adapter: VLMAdapter, start: str = "white") -> torch.Tensor:
    """The untrained border ``[3, H, W]``: ``white`` (ones), ``zeros`` (black) or ``mean``."""
    if start not in STARTS:
        raise ValueError(f"border start must be one of {STARTS}, got {start!r}")
    height, width = adapter.image_size
    if start == "white":
        return torch.ones(3, height, width)
    if start == "zeros":
        return torch.zeros(3, height, width)
    return normalisation_mean(adapter).view(3, 1, 1).expand(3, height, width).clone()


@dataclass
class VisualSafetyPrompt:
    """``delta [3, H, W]`` float32 plus how it is applied; see the module docstring."""

    delta: torch.Tensor
    kind: Kind = "border"
    width: int = 30
    epsilon: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: border kind: project delta to [0, 1] (False: the reference's unbounded border)
    clamp: bool = True
    #: border kind: where the untrained border started (recorded in the JSON metadata)
    start: str = "white"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.delta.ndim != 3 or self.delta.shape[0] != 3:
            raise ValueError(f"delta must be [3, H, W], got {list(self.delta.shape)}")
        height, width = self.canvas
        if self.kind == "border":
            if not 1 <= self.width < min(height, width) // 2:
                raise ValueError(
                    f"border width {self.width} does not fit a {height}x{width} canvas"
                )
        elif self.epsilon is None or not 0 < self.epsilon <= 1:
            raise ValueError(f"additive kind needs 0 < epsilon <= 1, got {self.epsilon!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")
        self.delta = self.delta.detach().to(torch.float32).clone()
        self.clamp_()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def blank(
        cls, canvas: tuple[int, int], width: int = 30, *, metadata: Mapping[str, Any] | None = None
    ) -> VisualSafetyPrompt:
        """A white border: composing it onto a placed image changes nothing."""
        return cls(torch.ones(3, *canvas), "border", width, None, dict(metadata or {}))

    @classmethod
    def zero_noise(
        cls, canvas: tuple[int, int], epsilon: float, *, metadata: Mapping[str, Any] | None = None
    ) -> VisualSafetyPrompt:
        """Additive noise initialised at zero, bounded by ``epsilon`` (in [0, 1] pixel units)."""
        return cls(torch.zeros(3, *canvas), "additive", 0, float(epsilon), dict(metadata or {}))

    @classmethod
    def for_adapter(
        cls, adapter: VLMAdapter, kind: Kind = "border", *, width: int | None = None,
        epsilon: float = 16 / 255, start: str = "white", clamp: bool = True,
    ) -> VisualSafetyPrompt:  # fmt: skip
        """The untrained prompt of ``kind`` on the adapter's canvas: a border from ``start``
        (:func:`border_start`), bounded to [0, 1] or not (``clamp``), or zero noise."""
        if kind == "border":
            width = default_width(adapter) if width is None else width
            return cls(border_start(adapter, start), "border", width, None, {}, clamp, start)
        return cls.zero_noise(adapter.image_size, epsilon)

    # -- geometry ------------------------------------------------------------------------------
    @property
    def canvas(self) -> tuple[int, int]:
        return int(self.delta.shape[1]), int(self.delta.shape[2])

    def mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[1, H, W]``: 1 where ``delta`` acts (the ring, or everywhere for additive)."""
        height, width = self.canvas
        mask = torch.ones(1, height, width, device=device)
        if self.kind == "border":
            p = self.width
            mask[:, p : height - p, p : width - p] = 0
        return mask

    @property
    def inner_size(self) -> tuple[int, int]:
        height, width = self.canvas
        p = self.width if self.kind == "border" else 0
        return height - 2 * p, width - 2 * p

    def place(self, image: torch.Tensor) -> torch.Tensor:
        """One user image ``[3, h, w]`` in [0, 1] -> the canvas ``[3, H, W]`` before composition.

        Border: pad to square (white), resize (bilinear, antialiased) into the inner window,
        white ring. Additive: pad to square and resize to the whole canvas.
        """
        check_pixels(image[None])
        inner = F.interpolate(
            pad_to_square(image)[None].float(), size=self.inner_size, mode="bilinear",
            antialias=True,
        )[0].clamp(0, 1)  # fmt: skip
        if self.kind == "additive":
            return inner
        height, width = self.canvas
        p = self.width
        canvas = torch.ones(3, height, width, dtype=inner.dtype, device=inner.device)
        canvas[:, p : height - p, p : width - p] = inner
        return canvas

    def apply(self, canvases: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Compose onto placed canvases ``[B, 3, H, W]``; differentiable in ``delta``.

        ``delta`` defaults to this prompt's own (pass a tensor that requires grad to train).
        """
        if tuple(canvases.shape[-2:]) != self.canvas:
            raise VSPMismatchError(
                f"canvases are {tuple(canvases.shape[-2:])}, this safety prompt is for "
                f"{self.canvas}; resample it with .resampled(size)"
            )
        delta = self.delta if delta is None else delta
        delta = delta.to(canvases.device, canvases.dtype)
        if self.kind == "additive":
            return (canvases + delta).clamp(0, 1)
        mask = self.mask(canvases.device).to(canvases.dtype)
        return canvases * (1 - mask) + delta * mask

    def compose(self, image: torch.Tensor) -> torch.Tensor:
        """``apply(place(image))`` for one image ``[3, h, w]`` -> ``[3, H, W]``."""
        return self.apply(self.place(image)[None])[0]

    def clamp_(self) -> VisualSafetyPrompt:
        """Project ``delta`` back to its valid set (in place): [0, 1], or [-eps, eps]."""
        with torch.no_grad():
            if self.kind == "border":
                if self.clamp:
                    self.delta.clamp_(0, 1)
            else:
                eps = float(self.epsilon or 0)
                self.delta.clamp_(-eps, eps)
        return self

    def resampled(self, size: tuple[int, int]) -> VisualSafetyPrompt:
        """The same prompt on another canvas (transfer to a model with another input size).

        The border width scales with the canvas (rounded); ``delta`` is resized bilinearly.
        """
        size = (int(size[0]), int(size[1]))
        if size == self.canvas:
            return self
        delta = F.interpolate(self.delta[None], size=size, mode="bilinear", antialias=True)[0]
        width = self.width
        if self.kind == "border":
            width = max(1, round(self.width * min(size) / min(self.canvas)))
        metadata = {**self.metadata, "resampled_from": {"canvas": list(self.canvas),
                                                        "width": self.width}}  # fmt: skip
        return VisualSafetyPrompt(
            delta, self.kind, width, self.epsilon, metadata, self.clamp, self.start
        )

    def to_image(self, background: float = 0.5) -> Image.Image:
        """The prompt alone as a PIL image (border: inner window grey; additive: 0.5 + delta)."""
        if self.kind == "additive":
            shown = (0.5 + self.delta / (2 * float(self.epsilon or 1))).clamp(0, 1)
        else:
            mask = self.mask()
            shown = (self.delta * mask + background * (1 - mask)).clamp(0, 1)
        array = (shown.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
        return Image.fromarray(array)

    # -- files ---------------------------------------------------------------------------------
    def check_canvas(self, adapter: VLMAdapter, *, source: str | Path | None = None) -> None:
        if tuple(adapter.image_size) != self.canvas:
            where = f"{source}: " if source is not None else ""
            raise VSPMismatchError(
                f"{where}safety prompt made for a {self.canvas} canvas; "
                f"{adapter.info()['model_id']!r} takes {tuple(adapter.image_size)}. Use "
                ".resampled(adapter.image_size) to transfer it deliberately."
            )

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """``path.safetensors`` then ``path.json`` (:func:`write_artifact`: each atomic, the
        JSON pins the tensor sha256)."""
        border = self.kind == "border"
        fields = {
            "kind": self.kind,
            "canvas": list(self.canvas),
            "width": self.width,
            "epsilon": self.epsilon,
            "start": self.start if border else None,
            "clamp": self.clamp if border else None,
            "pixel_space": "[0, 1] before the model's normalisation"
            + ("" if self.clamp or not border else " (unclamped: may leave [0, 1])"),
        }
        return write_artifact(
            path, {"delta": self.delta.contiguous()}, format=VSP_FORMAT, fields=fields,
            metadata=self.metadata,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path, adapter: VLMAdapter | None = None) -> VisualSafetyPrompt:
        """Read a saved prompt; bad files raise :class:`DataError` naming the file."""
        tensor_path, json_path = artifact_paths(path)
        header, tensors = read_artifact(path, format=VSP_FORMAT, what="visual safety prompt")
        if "delta" not in tensors:
            raise DataError(tensor_path, f"missing tensor 'delta'; has {sorted(tensors)}")
        delta = tensors["delta"]
        if list(delta.shape[1:]) != header.get("canvas") or not torch.isfinite(delta).all():
            canvas = header.get("canvas")
            raise DataError(
                tensor_path,
                f"delta {list(delta.shape)} does not match canvas {canvas} or is not finite",
            )
        try:
            prompt = cls(
                delta, header["kind"], int(header["width"]), header.get("epsilon"),
                dict(header.get("metadata") or {}), header.get("clamp") is not False,
                header.get("start") or "white",
            )  # fmt: skip
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(json_path, f"invalid safety prompt header: {exc}") from None
        if adapter is not None:
            prompt.check_canvas(adapter, source=json_path)
        return prompt
