"""Records -> model inputs, in batches an adapter accepts.

An adapter batch is all-image or all-text (:meth:`VLMAdapter.encode` refuses a mix), so
consecutive records are grouped by whether they carry an image; order is always input order.
Text-only records can instead be given a blank white image (``blank_image=True``): the prompt
template then matches an image input exactly, and only the place of the instruction differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from davsp_lib.data.images import record_image, to_tensor
from davsp_lib.data.records import Record
from davsp_lib.models.adapters.base import VLMAdapter
from davsp_lib.models.conversation import Conversation, Placement

#: side of the blank white image given to text-only records with ``blank_image=True``
BLANK_SIDE = 64

Batch = tuple[list[Record], torch.Tensor | None, list[Conversation]]
#: puts one image ``[3, h, w]`` on the canvas (default: ``adapter.prepare_image``; a safety
#: prompt's ``place`` puts it in the inner window instead)
Placer = Callable[[torch.Tensor], torch.Tensor]


def blank_canvas(adapter: VLMAdapter, place: Placer | None = None) -> torch.Tensor:
    """A white image on the adapter's canvas ``[3, H, W]`` (what "no image content" looks like)."""
    return (place or adapter.prepare_image)(torch.ones(3, BLANK_SIDE, BLANK_SIDE))


def canvas_for(adapter: VLMAdapter, record: Record, place: Placer | None = None) -> torch.Tensor:
    """The record's image on the adapter's canvas, ``[3, H, W]`` in [0, 1]."""
    return (place or adapter.prepare_image)(to_tensor(record_image(record)))


def conversation_for(
    record: Record,
    *,
    has_image: bool,
    safety_prompt: str | None = None,
    placement: Placement = "prefix",
    system_prompt: str | None = None,
    query_override: str | None = None,
) -> Conversation:
    """The text side of one record (``query_override`` replaces every query, e.g. a fixed
    FigStep prompt)."""
    return Conversation(
        query=record.query if query_override is None else query_override,
        system_prompt=system_prompt,
        safety_prompt=safety_prompt,
        safety_placement=placement,
        has_image=has_image,
    )


def batch_ranges(records: Sequence[Record], batch_size: int, blank_image: bool) -> list[range]:
    """The one batch layout of every batched loop: consecutive runs of at most ``batch_size``
    records that agree on having an image (unless ``blank_image``, where every record gets one).

    Generation, extraction and the sharded work units all cut here, so a resumed or sharded run
    rebuilds the very batches (and bytes) of an uninterrupted single-process one.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ranges, start = [], 0
    for index in range(1, len(records) + 1):
        if index == len(records) or (
            index - start == batch_size
            or (not blank_image and records[index].has_image != records[start].has_image)
        ):
            ranges.append(range(start, index))
            start = index
    return ranges


def record_runs(
    records: Sequence[Record], batch_size: int, blank_image: bool
) -> Iterator[list[Record]]:
    """The records of each :func:`batch_ranges` batch."""
    for batch in batch_ranges(records, batch_size, blank_image):
        yield list(records[batch.start : batch.stop])


def _image_of(
    adapter: VLMAdapter, record: Record, blank: torch.Tensor | None, place: Placer | None
) -> torch.Tensor:
    if record.has_image:
        return canvas_for(adapter, record, place)
    if blank is None:
        raise ValueError(f"record {record.id} has no image and blank_image is off")
    return blank


def iter_batches(
    adapter: VLMAdapter,
    records: Iterable[Record],
    batch_size: int,
    *,
    safety_prompt: str | None = None,
    placement: Placement = "prefix",
    system_prompt: str | None = None,
    query_override: str | None = None,
    blank_image: bool = False,
    place: Placer | None = None,
) -> Iterator[Batch]:
    """Yield ``(records_chunk, images_or_None, conversations)`` in input order.

    A chunk never mixes records with and without an image (a text run is cut where an image
    record starts, and vice versa), so a chunk may be shorter than ``batch_size``. With
    ``blank_image`` every text-only record gets :func:`blank_canvas` instead and all chunks are
    image chunks. Images are rendered/loaded lazily, one chunk at a time.
    """
    records = list(records)
    blank = (
        blank_canvas(adapter, place)
        if blank_image and any(not r.has_image for r in records)
        else None
    )
    for chunk in record_runs(records, batch_size, blank_image):
        with_image = chunk[0].has_image or blank is not None
        images = None
        if with_image:
            images = torch.stack([_image_of(adapter, r, blank, place) for r in chunk])
        conversations = [
            conversation_for(
                record,
                has_image=with_image,
                safety_prompt=safety_prompt,
                placement=placement,
                system_prompt=system_prompt,
                query_override=query_override,
            )
            for record in chunk
        ]
        yield chunk, images, conversations


def describe_template(
    *,
    blank_image: bool,
    safety_prompt: str | None,
    placement: Placement,
    system_prompt: str | None,
    query_override: str | None,
) -> dict[str, object]:
    """A JSON-safe description of how records became prompts (stored with every artifact)."""
    return {
        "text_only_records": "blank white image" if blank_image else "no image (text-only turn)",
        "safety_prompt": safety_prompt,
        "safety_placement": placement if safety_prompt else None,
        "system_prompt": system_prompt,
        "query_override": query_override,
        "chat_template": "the adapter's own chat template, one user turn, generation prompt added",
    }
