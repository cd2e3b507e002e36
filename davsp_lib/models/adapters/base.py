"""The one interface the rest of the library uses to talk to a vision-language model.

Pixel-space contract (as in torchattacks): images come in as float tensors ``[B, 3, H, W]`` in
``[0, 1]``; resizing to the model's canvas and the model's own normalisation happen inside, in
torch, so gradients flow back to the pixels (and so to a border drawn on them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from davsp_lib.models.adapters.hooks import capture_hidden, check_layers, run_until_stop
from davsp_lib.models.conversation import Conversation
from davsp_lib.runtime.errors import UnsupportedModelError

IGNORE_INDEX = -100
#: how :meth:`VLMAdapter.prepare_image` puts a user image on the canvas by default
PAD_AND_RESIZE = "padded to a square, then resized bilinearly (antialiased) onto the canvas"


@dataclass(frozen=True)
class PreprocessingSpec:
    """How one user image and one conversation become a model's input, declared by each
    adapter and recorded by :meth:`VLMAdapter.info` (key ``preprocessing``)."""

    #: grey level in [0, 1] that pads an image to a square (1.0: white, as the DAVSP reference)
    pad_fill: float
    #: how the padded square reaches the canvas
    resize: str
    #: ``"fixed"``: one canvas (``image_size``) for every image; ``"native:SIDE"`` (Qwen2-VL):
    #: the processor's own size for a SIDE x SIDE image, then fixed for the run
    canvas: str
    #: pixels of white ring kept around the image for the model's own border input (0: none)
    ring: int
    #: the system prompt when a conversation sets none (None: no system turn)
    system_prompt: str | None
    #: where the image's tokens go in the prompt, and how many
    image_tokens: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EncodedBatch:
    """Model-ready inputs for a left-padded batch.

    ``last_input_index[b]`` is the position of the last prompt token of sample ``b`` (the token
    whose hidden state DAVSP reads); with no answers appended it is the last position.
    ``labels`` (only when answers are given) holds answer token ids and ``-100`` elsewhere.
    """

    model_inputs: dict[str, torch.Tensor]
    last_input_index: torch.Tensor
    labels: torch.Tensor | None = None
    prompt_lengths: list[int] = field(default_factory=list)


def check_pixels(images: torch.Tensor, expected_channels: int = 3, *, bounded: bool = True) -> None:
    """Refuse anything that is not a float ``[B, C, H, W]`` tensor in ``[0, 1]`` (any finite
    values when ``bounded`` is False: an unclamped safety-prompt border)."""
    if (
        not isinstance(images, torch.Tensor)
        or images.ndim != 4
        or images.shape[1] != expected_channels
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"images must be a float tensor [B, {expected_channels}, H, W], got {shape}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    low, high = float(images.detach().min()), float(images.detach().max())
    if not bounded:
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"images must be finite, got range [{low}, {high}]")
        return
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
            f"images must lie in [0, 1] (pixel space), got range [{low:.4f}, {high:.4f}]"
        )


def resolve_module(root: nn.Module, candidates: Sequence[str], site: str) -> nn.Module:
    """Return the first dotted path in ``candidates`` that exists under ``root``."""
    for path in candidates:
        module: Any = root
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        return module
    raise UnsupportedModelError(
        f"{type(root).__name__}: no module for site {site!r}; looked for {list(candidates)}"
    )


class VLMAdapter(ABC):
    """A vision-language model behind one interface.

    Subclasses declare ``architecture`` and ``sites`` (canonical site -> candidate module paths:
    ``language_model`` (the decoder stack: embeddings in, final norm out), ``language_layers``
    (its blocks), ``vision_tower``, ``projector``, ``lm_head``) and implement
    :meth:`encode` and :meth:`normalize`. Everything else here is shared.

    Capabilities only some models have are part of the contract too, with neutral defaults
    that the models having them override (callers never probe with ``hasattr``):
    :attr:`border_width` (a ring the model reads as its own border input), :attr:`lm` (a bare
    causal LM that can judge text alone), :meth:`perceive` / :attr:`perceives_text` (a vision
    front end whose input decodes to text) and :meth:`shared_border` (reading one shared
    border once per batch).
    """

    architecture: ClassVar[str] = "abstract"
    tokenizer: Any  # set by each adapter: a Hugging Face tokenizer
    sites: ClassVar[Mapping[str, Sequence[str]]] = {}

    #: width in pixels of the ring the model reads as its border input (the embedded model);
    #: None: no such ring, a border is then DAVSP's 30 px
    #: (:func:`davsp_lib.method.vsp.default_width`)
    border_width: int | None = None
    #: a bare causal language model (ids or embeddings in, logits out) that can judge text on
    #: its own (the embedded model's); None for a composite Hugging Face VLM
    lm: nn.Module | None = None
    #: True when :meth:`perceive` decodes what the vision front end sees (the embedded model's
    #: reader); False for a vision tower whose output is embeddings, not text
    perceives_text: ClassVar[bool] = False
    #: grey level that pads a user image to a square (:meth:`prepare_image`)
    pad_fill: ClassVar[float] = 1.0

    def __init__(self, model: nn.Module, *, model_id: str, image_size: tuple[int, int]):
        self.model = model
        self.model_id = model_id
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.model.eval()

    # -- structure -----------------------------------------------------------------------------
    def module(self, site: str) -> nn.Module:
        if site not in self.sites:
            raise KeyError(
                f"{self.architecture}: unknown site {site!r}; known: {sorted(self.sites)}"
            )
        return resolve_module(self.model, self.sites[site], site)

    @functools.cached_property
    def language_layers(self) -> nn.ModuleList:
        layers = self.module("language_layers")
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedModelError(f"{self.architecture}: language_layers is not a ModuleList")
        return layers

    @functools.cached_property
    def language_model(self) -> nn.Module:
        """The decoder stack whose forward receives the key/value cache and runs the blocks."""
        return self.module("language_model")

    @property
    def num_layers(self) -> int:
        return len(self.language_layers)

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def info(self) -> dict[str, Any]:
        """What an artifact must record to be tied to this model."""
        return {
            "model_id": self.model_id,
            "architecture": self.architecture,
            "revision": getattr(getattr(self.model, "config", None), "_commit_hash", None),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "image_size": list(self.image_size),
            "dtype": str(self.dtype).removeprefix("torch."),
            "preprocessing": self.preprocessing.to_json(),
        }

    @property
    @abstractmethod
    def preprocessing(self) -> PreprocessingSpec:
        """This model's input convention (pad colour, resize, canvas, system prompt, image
        tokens): what a result made with it must record."""

    # -- inputs --------------------------------------------------------------------------------
    @abstractmethod
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[B, 3, H, W]`` pixels in [0, 1] at ``image_size`` to the model's input space."""

    def prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        """Put one user image ``[3, h, w]`` in [0, 1] on this model's canvas ``[3, H, W]``.

        The default pads to a square with :attr:`pad_fill` (white, as the DAVSP reference does)
        and resizes to ``image_size``; adapters with a different convention override it.
        """
        check_pixels(image[None])
        return nn.functional.interpolate(
            pad_to_square(image, self.pad_fill)[None],
            size=self.image_size,
            mode="bilinear",
            antialias=True,
        )[0].clamp(0, 1)

    #: False once a border that may leave [0, 1] is used (:meth:`accept_unbounded_pixels`)
    pixels_bounded: bool = True

    def accept_unbounded_pixels(self) -> None:
        """Accept canvases outside [0, 1] from now on: the reference's border is never clamped,
        so its values reach the normalisation as they are."""
        self.pixels_bounded = False

    def to_canvas(self, images: torch.Tensor) -> torch.Tensor:
        """Check the pixel contract and resize (bilinear, differentiable) to ``image_size``."""
        check_pixels(images, bounded=self.pixels_bounded)
        if tuple(images.shape[-2:]) != self.image_size:
            images = nn.functional.interpolate(
                images, size=self.image_size, mode="bilinear", align_corners=False, antialias=False
            )
            images = images.clamp(0, 1) if self.pixels_bounded else images
        return images

    @abstractmethod
    def encode(
        self,
        images: torch.Tensor | None,
        conversations: Sequence[Conversation],
        answers: Sequence[str] | None = None,
    ) -> EncodedBatch:
        """Build a left-padded batch; ``images`` is None for a text-only batch."""

    def perceive(self, images: torch.Tensor) -> list[str]:
        """What the vision front end perceives in each canvas, as text.

        Empty strings unless :attr:`perceives_text` (a VLM's vision tower yields embeddings,
        not text: ask the model with :meth:`generate` instead).
        """
        return [""] * int(images.shape[0])

    @contextlib.contextmanager
    def shared_border(self) -> Iterator[None]:
        """Within this context every row of a batch carries the same border, so a model that
        reads the border per row may read it once (the embedded model does). Default: no-op."""
        yield

    # -- running -------------------------------------------------------------------------------
    def forward(self, batch: EncodedBatch, **kwargs: Any) -> Any:
        return self.model(**batch.model_inputs, **kwargs)

    def hidden_states(
        self,
        images: torch.Tensor | None,
        conversations: Sequence[Conversation],
        layers: Sequence[int],
        answers: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Last-input-token hidden states ``[B, len(layers), hidden]`` (in the model's dtype).

        The forward stops after the deepest requested layer. Gradients flow when called
        outside ``torch.no_grad``.
        """
        layers = check_layers(layers, self.num_layers)
        batch = self.encode(images, conversations, answers)
        with capture_hidden(
            self.language_layers, layers, batch.last_input_index, stop_after_deepest=True
        ) as store:
            run_until_stop(self.model, **batch.model_inputs, use_cache=False)
        # a model split by device_map="auto" leaves each layer's state on its own GPU
        device = batch.last_input_index.device
        return torch.stack([store[layer].to(device) for layer in layers], dim=1)

    #: the module whose ``generate`` decodes (the causal LM inside a composite model)
    @property
    def decoder(self) -> nn.Module:
        return self.model

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int = 128,
    ) -> list[str]:
        """Greedy decoding for a left-padded batch; returns the new text only."""
        inputs = dict(self.encode(images, conversations).model_inputs)
        inputs.pop("position_ids", None)  # generate() derives positions from the mask
        output = self.decoder.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_token_id,
        )
        if "input_ids" in inputs:  # from ids the output echoes the prompt; from embeddings not
            output = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [text.strip() for text in texts]


def check_batch(
    images: torch.Tensor | None,
    conversations: Sequence[Conversation],
    answers: Sequence[str] | None,
) -> None:
    """Refuse a batch whose parts disagree (sizes, image / text-only mix)."""
    if not conversations:
        raise ValueError("empty batch")
    if images is not None and images.shape[0] != len(conversations):
        raise ValueError(f"{images.shape[0]} images for {len(conversations)} conversations")
    if answers is not None and len(answers) != len(conversations):
        raise ValueError(f"{len(answers)} answers for {len(conversations)} conversations")
    if any(conv.has_image != (images is not None) for conv in conversations):
        raise ValueError("conversation.has_image must match whether images were given")


@dataclass
class TokenBatch:
    """Left-padded prompt (+ answer) ids: ``shifts[b]`` is the padding in front of row ``b``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_input_index: torch.Tensor
    labels: torch.Tensor | None
    shifts: list[int]


def assemble_tokens(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]] | None, pad_id: int
) -> TokenBatch:
    """Left-pad prompts (with answers appended); labels keep only the answer tokens."""
    sequences = [list(p) for p in prompts]
    if answers is not None:
        sequences = [[*p, *a] for p, a in zip(prompts, answers, strict=True)]
    input_ids, attention_mask = left_pad(sequences, pad_id)
    length = input_ids.shape[1]
    shifts = [length - len(seq) for seq in sequences]
    last_input = torch.tensor([s + len(p) - 1 for s, p in zip(shifts, prompts, strict=True)])
    labels = None
    if answers is not None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (shift, p) in enumerate(zip(shifts, prompts, strict=True)):
            labels[row, shift + len(p) :] = input_ids[row, shift + len(p) :]
    return TokenBatch(input_ids, attention_mask, last_input, labels, shifts)


def pad_to_square(image: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """Pad ``[C, h, w]`` symmetrically to a square with ``fill`` (white by default)."""
    _, height, width = image.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    pads = (left, side - width - left, top, side - height - top)
    return nn.functional.pad(image, pads, value=fill)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists; returns ``(input_ids, attention_mask)``."""
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, length - len(seq) :] = 1
    return ids, mask
