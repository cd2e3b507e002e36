"""The embedded model's visual channel: ViT-S/14 patch features -> connector -> visual tokens.

``load_embedded("tiny", vision="vit")`` (or ``load_adapter("tiny-vit")``) gives the embedded model
with this channel instead of the ring's 16 character slots. The whole canvas (window and ring,
336 x 336 by default) goes through the frozen ViT-S/14 (:mod:`davsp_lib.models.embedded.vision`): a
24 x 24 grid of patch features, i.e. LLaVA-1.5's 576 patches at the same 336-pixel input. The
connector merges each 2 x 2 block of neighbouring patches by concatenation (Qwen2-VL's patch
merger) and maps it with a two-layer GELU MLP (LLaVA-1.5's projector) into the language model's
embedding space: 12 x 12 = 144 visual tokens, placed where LLaVA puts ``<image>`` (first in the
user turn, then a newline), in raster order. The reading path (OCR transcription of the window)
still follows them, so reading typographic attacks is unchanged.

With 28-pixel merged cells, the outer row and column of cells (44 of the 144 tokens) lie on the
30-pixel ring, about the share of LLaVA-1.5's tokens a 30-pixel ring covers; and every visual
token is a continuous function of every pixel (attention mixes the whole canvas), so a border
reaches the language model through a wide, differentiable channel.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from davsp_lib.models.embedded.model import EmbeddedAdapter
from davsp_lib.models.embedded.vision import PATCH_SIZE, patch_grid
from davsp_lib.runtime.io import atomic_write_json

CONNECTOR_FORMAT = "davsp-embedded-connector/1"
VIT_WIDTH = 384
MERGE = 2
DATA_DIR = Path(__file__).resolve().parents[3] / "data" / "embedded"
DEFAULT_CONNECTOR = DATA_DIR / "connector_tiny.safetensors"


class Connector(nn.Module):
    """2 x 2 patch merge + ``Linear -> GELU -> Linear`` into the language model's embeddings.

    ``output_rms``: when set, every visual token is rescaled to that root-mean-square (the
    language model's own input embeddings' RMS, :func:`embedding_rms`), so visual tokens live
    on the text tokens' scale; ``None`` (the files trained so far) leaves the MLP's output as is.
    """

    def __init__(
        self,
        hidden_size: int,
        vit_width: int = VIT_WIDTH,
        merge: int = MERGE,
        output_rms: float | None = None,
    ):
        super().__init__()
        self.merge = merge
        self.vit_width = vit_width
        self.hidden_size = hidden_size
        self.output_rms = output_rms
        self.fc1 = nn.Linear(vit_width * merge * merge, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, C]`` patch grid -> ``[B, (h/m) * (w/m), D]`` visual tokens (raster order)."""
        batch, height, width, channels = grid.shape
        m = self.merge
        if height % m or width % m:
            raise ValueError(f"patch grid {height}x{width} is not a multiple of the merge {m}")
        merged = grid.reshape(batch, height // m, m, width // m, m, channels)
        merged = merged.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, m * m * channels)
        tokens = self.fc2(self.act(self.fc1(merged)))
        if self.output_rms is None:
            return tokens
        rms = tokens.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
        return tokens * (self.output_rms / rms)


def embedding_rms(lm) -> float:
    """Root-mean-square of the language model's input embedding matrix (all entries, float32)."""
    weight = lm.get_input_embeddings().weight.detach().float()
    return float(weight.pow(2).mean().sqrt())


def save_connector(connector: Connector, path: str | Path, record: dict[str, Any]) -> Path:
    """Weights as safetensors (atomic) and ``<path>.json`` with the record and the shape."""
    from safetensors.torch import save

    from davsp_lib.runtime.io import atomic_write_bytes

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in connector.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": CONNECTOR_FORMAT}))
    meta = {
        "format": CONNECTOR_FORMAT,
        "hidden_size": connector.hidden_size,
        "vit_width": connector.vit_width,
        "merge": connector.merge,
        "output_rms": connector.output_rms,
        **record,
    }
    atomic_write_json(path.with_suffix(".json"), meta)
    return path


def load_connector(path: str | Path, hidden_size: int | None = None) -> tuple[Connector, dict]:
    """Connector and its record; refuses a file made for another hidden size or format."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"{path}: connector weights or their JSON record are missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CONNECTOR_FORMAT:
        raise ValueError(f"{meta_path}: not a connector record (format {meta.get('format')!r})")
    if hidden_size is not None and meta["hidden_size"] != hidden_size:
        raise ValueError(
            f"{path}: connector maps into {meta['hidden_size']} dimensions, "
            f"the language model has {hidden_size}"
        )
    connector = Connector(
        meta["hidden_size"], meta["vit_width"], meta["merge"], meta.get("output_rms")
    )
    connector.load_state_dict(load_file(str(path)))
    return connector.eval().requires_grad_(False), meta


class VisionEmbeddedAdapter(EmbeddedAdapter):
    """The embedded model with the ViT channel: 144 continuous visual tokens + the reading path."""

    architecture = "davsp-embedded-vit"
    sites: ClassVar = {
        "language_layers": ("lm.model.layers",),
        "vision_tower": ("vit",),
        "projector": ("connector",),
        "lm_head": ("lm.lm_head",),
    }

    def __init__(self, lm, tokenizer, reader, vit: nn.Module, connector: Connector, **kwargs):
        super().__init__(lm, tokenizer, reader, **kwargs)
        height, width = self.image_size
        cell = PATCH_SIZE * connector.merge
        if height % cell or width % cell:
            raise ValueError(f"canvas {self.image_size} must be a multiple of {cell} pixels")
        if connector.hidden_size != self.hidden_size:
            raise ValueError(
                f"connector maps into {connector.hidden_size} dimensions, "
                f"the language model has {self.hidden_size}"
            )
        vit.requires_grad_(False)
        connector.requires_grad_(False)
        self.model.vit = vit.eval()  # registered on the container so that sites resolve
        self.model.connector = connector.eval()
        self.vit = vit
        self.connector = connector
        self.grid = (height // cell, width // cell)

    @property
    def num_slots(self) -> int:
        return self.grid[0] * self.grid[1]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "vision": "vit", "visual_tokens": self.num_slots}

    def image_tokens(self) -> str:
        rows, cols = self.grid
        return f"{self.num_slots} visual tokens ({rows} x {cols} cells, raster order)"

    def visual_tokens(self, canvases: torch.Tensor) -> torch.Tensor:
        """``[B, 144, D]`` visual tokens of whole canvases (differentiable in the pixels)."""
        grid = patch_grid(self.vit, canvases.to(next(self.vit.parameters()).dtype))
        return self.connector(grid)

    def border_embeddings_batch(self, canvases: torch.Tensor) -> torch.Tensor:
        return self.visual_tokens(canvases)

    def place_image_tokens(
        self, embeds: torch.Tensor, canvases: torch.Tensor, positions: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Replace each row's image-token placeholders by its visual tokens (like LLaVA)."""
        tokens = self.visual_tokens(canvases).to(embeds.dtype)
        out = embeds.clone()
        for row, where in enumerate(positions):
            out[row, where] = tokens[row]
        return out

    def border_token_indices(self) -> list[int]:
        """The visual tokens placed on the ring (:meth:`ring_cells`)."""
        return self.ring_cells()

    def ring_cells(self) -> list[int]:
        """Indices (raster order) of the visual tokens whose merged cell is centred on the ring.

        (Every token depends on every pixel; these are the ones *placed* on the ring: 44 of 144
        on the default canvas, the outer row and column of 28-pixel cells.)
        """
        cell = PATCH_SIZE * self.connector.merge
        rows, cols = self.grid
        mask = self.ring_mask()
        return [i * cols + j for i in range(rows) for j in range(cols)
                if mask[i * cell + cell // 2, j * cell + cell // 2] > 0]  # fmt: skip


def with_vision(
    adapter: EmbeddedAdapter, vit: nn.Module, connector: Connector
) -> VisionEmbeddedAdapter:
    """The same language model, tokenizer and reader with the ViT channel."""
    return VisionEmbeddedAdapter(
        adapter.lm,
        adapter.tokenizer,
        adapter.reader,
        vit,
        connector,
        model_id=f"{adapter.model_id}-vit",
        image_size=adapter.image_size,
        border_width=adapter.border_width,
        provenance=adapter.provenance,
    )
