"""The harmfulness vector: last-input-token activations, per-layer directions, and the artifact.

DAVSP supervises the model in activation space: ``v_l = unit(mean_malicious - mean_benign)`` of
the hidden state of the last input token at layer ``l``, and ``s(x) = v_l . h_l(x)``.

- :func:`extract` runs an adapter over records in batches and returns :class:`Activations`
  (float64, on the CPU). The adapter's forward stops after the deepest requested layer, so asking
  for fewer / shallower layers is cheaper.
- :func:`fit_vector` turns activations into a :class:`HarmfulnessVector`, which knows the model
  and layers it belongs to (repeng-style) and saves as ``.safetensors`` + ``.json`` (no pickle).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from davsp_lib.data.records import Record
from davsp_lib.models.adapters.base import VLMAdapter
from davsp_lib.models.adapters.hooks import check_layers
from davsp_lib.models.conversation import Placement
from davsp_lib.models.inputs import describe_template, iter_batches
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import artifact_paths, read_artifact, write_artifact

VECTOR_FORMAT = "davsp-harmfulness-vector/1"
TOKEN_POSITION = "last input token"
TENSOR_KEYS = ("directions", "mean_malicious", "mean_benign")
#: adapter.info() keys that pin the exact weights; both present and different -> refused
CHECKSUM_KEYS = ("revision", "gguf_sha256")


class VectorMismatchError(ValueError):
    """A saved vector used with a model it was not fitted on."""


def _json_safe(obj: Any) -> Any:
    """Round-trip through JSON so that in-memory metadata equals what a reload gives."""
    return json.loads(json.dumps(obj, default=str))


# ------------------------------------------------------------------------------ activations


@dataclass
class Activations:
    """Hidden states ``states[i, j]`` of record ``ids[i]`` at layer ``layers[j]`` (float64).

    ``labels`` is a bool array, True for malicious. ``meta`` says how they were made (model
    info, prompt template, token position).
    """

    ids: list[str]
    labels: np.ndarray
    layers: list[int]
    states: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=bool)
        self.layers = [int(layer) for layer in self.layers]
        n = len(self.ids)
        if self.states.ndim != 3 or self.states.shape[:2] != (n, len(self.layers)):
            raise ValueError(
                f"states must be [N={n}, n_layers={len(self.layers)}, D], "
                f"got {tuple(self.states.shape)}"
            )
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {self.labels.shape}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"duplicate layers {self.layers}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def hidden_size(self) -> int:
        return int(self.states.shape[-1])

    def column(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise KeyError(f"layer {layer} not extracted; have {self.layers}") from None

    def at(self, layer: int) -> torch.Tensor:
        """``[N, D]`` states at one layer."""
        return self.states[:, self.column(layer)]

    def select(self, which: np.ndarray | Sequence[int] | Sequence[bool]) -> Activations:
        """A subset by bool mask or indices (meta kept)."""
        index = np.asarray(which)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64)
        return Activations(
            ids=[self.ids[i] for i in index],
            labels=self.labels[index],
            layers=list(self.layers),
            states=self.states[torch.from_numpy(index)],
            meta=dict(self.meta),
        )

    @property
    def malicious(self) -> Activations:
        return self.select(self.labels)

    @property
    def benign(self) -> Activations:
        return self.select(~self.labels)


def concat_activations(parts: Sequence[Activations]) -> Activations:
    """Stack activations extracted at the same layers (meta of the first is kept)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    layers, size = parts[0].layers, parts[0].hidden_size
    for part in parts[1:]:
        if part.layers != layers or part.hidden_size != size:
            raise ValueError(
                f"cannot concatenate activations at layers {part.layers} (D={part.hidden_size}) "
                f"with layers {layers} (D={size})"
            )
    return Activations(
        ids=[i for part in parts for i in part.ids],
        labels=np.concatenate([part.labels for part in parts]),
        layers=list(layers),
        states=torch.cat([part.states for part in parts]),
        meta=dict(parts[0].meta),
    )


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"all"`` -> ``0..num_layers``; ``"4, 8,12"`` -> ``[4, 8, 12]`` (checked, sorted, unique)."""
    text = spec.strip().lower()
    if text == "all":
        return list(range(num_layers + 1))
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"layers must be 'all' or a comma list of ints, got {spec!r}") from None
    return check_layers(layers, num_layers)


def extract(
    adapter: VLMAdapter,
    records: Iterable[Record],
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 8,
    safety_prompt: str | None = None,
    placement: Placement = "prefix",
    system_prompt: str | None = None,
    query_override: str | None = None,
    blank_image: bool = False,
    progress: bool = True,
    desc: str = "extract",
) -> Activations:
    """Last-input-token hidden states of every record at every requested layer.

    ``layers`` defaults to all, ``0..num_layers`` (0 = embeddings). Batched (left padding is
    the adapter's job), under ``torch.no_grad``, copied to the CPU in float64 as each batch
    finishes, so memory is ``N x n_layers x D x 8`` bytes. See
    :func:`davsp_lib.models.inputs.iter_batches` for the other arguments.
    """
    records = list(records)
    if not records:
        raise ValueError("no records to extract")
    chosen = list(range(adapter.num_layers + 1)) if layers is None else list(layers)
    chosen = check_layers(chosen, adapter.num_layers)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"duplicate layers {chosen}")
    states = torch.empty(len(records), len(chosen), adapter.hidden_size, dtype=torch.float64)
    batches = iter_batches(
        adapter,
        records,
        batch_size,
        safety_prompt=safety_prompt,
        placement=placement,
        system_prompt=system_prompt,
        query_override=query_override,
        blank_image=blank_image,
    )
    row = 0
    with (
        torch.no_grad(),
        tqdm(total=len(records), desc=desc, unit="rec", disable=not progress) as bar,
    ):
        for chunk, images, conversations in batches:
            out = adapter.hidden_states(images, conversations, chosen)
            states[row : row + len(chunk)] = out.detach().to("cpu", torch.float64)
            row += len(chunk)
            bar.update(len(chunk))
    template = describe_template(
        blank_image=blank_image,
        safety_prompt=safety_prompt,
        placement=placement,
        system_prompt=system_prompt,
        query_override=query_override,
    )
    meta = {
        "model": _json_safe(adapter.info()),
        "token_position": TOKEN_POSITION,
        "template": template,
        "dtype": {"model": str(adapter.dtype).removeprefix("torch."), "stored": "float64"},
    }
    return Activations(
        ids=[r.id for r in records],
        labels=np.array([r.is_malicious for r in records], dtype=bool),
        layers=chosen,
        states=states,
        meta=meta,
    )


# ------------------------------------------------------------------------------ the vector


def unit_rows(diff: torch.Tensor) -> torch.Tensor:
    """Each row divided by its norm; a zero row stays zero (no direction, projections are 0)."""
    norms = diff.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, diff / torch.where(norms > 0, norms, 1), torch.zeros_like(diff))


@dataclass
class HarmfulnessVector:
    """Per-layer unit directions ``v_l = unit(mean_mal - mean_ben)`` for one model.

    ``directions``, ``mean_malicious`` and ``mean_benign`` are float64 ``[n_layers, D]``, row
    ``j`` for layer ``layers[j]``; ``counts`` holds the number of records behind each mean;
    ``metadata`` (JSON-safe) ties the vector to its model, prompt template and data.
    """

    layers: list[int]
    directions: torch.Tensor
    mean_malicious: torch.Tensor
    mean_benign: torch.Tensor
    counts: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [int(layer) for layer in self.layers]
        shape = (len(self.layers), self.hidden_size)
        for key in TENSOR_KEYS:
            tensor = getattr(self, key)
            if tuple(tensor.shape) != shape or tensor.dtype != torch.float64:
                raise ValueError(
                    f"{key} must be float64 {list(shape)}, got {tensor.dtype} {list(tensor.shape)}"
                )

    # -- identity ------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.directions.shape[-1])

    @property
    def model_id(self) -> str | None:
        return self.metadata.get("model", {}).get("model_id")

    @property
    def num_layers(self) -> int | None:
        return self.metadata.get("model", {}).get("num_layers")

    def row(self, layer: int) -> int:
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise KeyError(f"the vector has no layer {layer}; it has {self.layers}") from None

    # -- use -----------------------------------------------------------------------------------
    def direction(
        self,
        layer: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``v_l`` ``[D]`` (float64 unless ``dtype`` is given)."""
        return self.directions[self.row(layer)].to(device=device, dtype=dtype or torch.float64)

    def project(self, states: torch.Tensor | Activations, layer: int) -> torch.Tensor:
        """``s = v_l . h_l`` for hidden states ``[..., D]`` at ``layer`` (or Activations).

        Computed in float64 for float64 states and at least float32 otherwise; differentiable
        in ``states`` (the DAVSP projection loss uses it).
        """
        if isinstance(states, Activations):
            states = states.at(layer)
        if states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"states have hidden size {states.shape[-1]}, the vector {self.hidden_size}"
            )
        dtype = torch.promote_types(states.dtype, torch.float32)
        return states.to(dtype) @ self.direction(layer, dtype=dtype, device=states.device)

    def check_compatible(self, adapter: VLMAdapter, *, source: str | Path | None = None) -> None:
        """Refuse a model other than the one the vector was fitted on (clear message)."""
        where = f"{source}: " if source is not None else ""
        info = adapter.info()
        if self.model_id != info.get("model_id") or self.hidden_size != adapter.hidden_size:
            raise VectorMismatchError(
                f"{where}this harmfulness vector was fitted on model {self.model_id!r} "
                f"(hidden size {self.hidden_size}); the adapter is {info.get('model_id')!r} "
                f"(hidden size {adapter.hidden_size}). Directions do not transfer between "
                "models: extract a new vector for this one."
            )
        saved = self.metadata.get("model", {})
        for key in CHECKSUM_KEYS:
            if saved.get(key) and info.get(key) and saved[key] != info[key]:
                raise VectorMismatchError(
                    f"{where}model {self.model_id!r}: the vector records {key} {saved[key]!r}, "
                    f"the loaded weights have {info[key]!r}; extract a new vector"
                )
        beyond = [layer for layer in self.layers if layer > adapter.num_layers]
        if beyond:
            raise VectorMismatchError(
                f"{where}layers {beyond} do not exist in {info.get('model_id')!r} "
                f"(layers 0..{adapter.num_layers})"
            )

    # -- files ---------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {key: getattr(self, key).contiguous() for key in TENSOR_KEYS}
        tensors["layers"] = torch.tensor(self.layers, dtype=torch.int64)
        return tensors

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path.with_suffix('.safetensors')`` then ``.json`` (:func:`write_artifact`)."""
        fields = {
            "model_id": self.model_id,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "layers": self.layers,
            "counts": dict(self.counts),
        }
        return write_artifact(
            path, self.tensors(), format=VECTOR_FORMAT, fields=fields, metadata=self.metadata
        )

    @classmethod
    def load(cls, path: str | Path, adapter: VLMAdapter | None = None) -> HarmfulnessVector:
        """Read a saved vector; bad files raise :class:`DataError` naming the file.

        With ``adapter``, a vector fitted on another model (id, hidden size, checksum) or
        with layers the model lacks raises :class:`VectorMismatchError`.
        """
        tensor_path, json_path = artifact_paths(path)
        header, tensors = read_artifact(path, format=VECTOR_FORMAT, what="harmfulness vector")
        _check_header(header, json_path)
        _check_tensors(tensors, header, tensor_path, json_path)
        vector = cls(
            layers=list(header["layers"]),
            directions=tensors["directions"],
            mean_malicious=tensors["mean_malicious"],
            mean_benign=tensors["mean_benign"],
            counts={k: int(v) for k, v in header["counts"].items()},
            metadata=header["metadata"],
        )
        if adapter is not None:
            vector.check_compatible(adapter, source=json_path)
        return vector


def _check_header(header: dict[str, Any], json_path: Path) -> None:
    layers = header.get("layers")
    if not isinstance(layers, list) or not layers or not all(_is_int(x) for x in layers):
        raise DataError(json_path, f"'layers' must be a non-empty list of ints, got {layers!r}")
    if not _is_int(header.get("hidden_size")) or header["hidden_size"] < 1:
        size = header.get("hidden_size")
        raise DataError(json_path, f"'hidden_size' must be a positive int, got {size!r}")
    counts = header.get("counts")
    if not isinstance(counts, dict) or not all(_is_int(v) for v in counts.values()):
        raise DataError(json_path, f"'counts' must map labels to ints, got {counts!r}")
    if not isinstance(header.get("metadata"), dict):
        raise DataError(json_path, "'metadata' must be an object")
    if not isinstance(header.get("tensors"), dict):
        raise DataError(json_path, "'tensors' must be an object with the tensor file's sha256")


def _check_tensors(
    tensors: Mapping[str, torch.Tensor], header: Mapping[str, Any], tensor_path: Path,
    json_path: Path,
) -> None:  # fmt: skip
    missing = [key for key in (*TENSOR_KEYS, "layers") if key not in tensors]
    if missing:
        raise DataError(tensor_path, f"missing tensor(s) {missing}; has {sorted(tensors)}")
    shape = (len(header["layers"]), int(header["hidden_size"]))
    for key in TENSOR_KEYS:
        tensor = tensors[key]
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float64:
            raise DataError(
                tensor_path,
                f"tensor {key!r} is {tensor.dtype} {list(tensor.shape)}; {json_path.name} "
                f"expects float64 {list(shape)}",
            )
        if not torch.isfinite(tensor).all():
            raise DataError(tensor_path, f"tensor {key!r} has non-finite values")
    if tensors["layers"].tolist() != list(header["layers"]):
        raise DataError(
            tensor_path,
            f"layers {tensors['layers'].tolist()} differ from {json_path.name}'s "
            f"{header['layers']}",
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fit_vector(acts: Activations, metadata: Mapping[str, Any] | None = None) -> HarmfulnessVector:
    """Means per class and ``v_l = unit(mean_mal - mean_ben)`` at every extracted layer.

    The vector's metadata is ``acts.meta`` (model, template, token position, dtype) plus the
    data ids, the per-layer norm of the mean difference and ``metadata`` (e.g. the seed and a
    description of the data), made JSON-safe.
    """
    malicious = torch.from_numpy(acts.labels)
    n_mal, n_ben = int(malicious.sum()), int((~malicious).sum())
    if n_mal == 0 or n_ben == 0:
        raise ValueError(f"need malicious and benign records, got {n_mal} and {n_ben}")
    states = acts.states.to(torch.float64)
    mean_malicious = states[malicious].mean(0)
    mean_benign = states[~malicious].mean(0)
    diff = mean_malicious - mean_benign
    meta = {
        **acts.meta,
        "layers": list(acts.layers),
        "direction": "unit(mean_malicious - mean_benign) per layer; zero where the means coincide",
        "mean_difference_norm": diff.norm(dim=-1).tolist(),
        "data_ids": {
            "malicious": [i for i, m in zip(acts.ids, acts.labels, strict=True) if m],
            "benign": [i for i, m in zip(acts.ids, acts.labels, strict=True) if not m],
        },
        **(metadata or {}),
    }
    return HarmfulnessVector(
        layers=list(acts.layers),
        directions=unit_rows(diff),
        mean_malicious=mean_malicious,
        mean_benign=mean_benign,
        counts={"malicious": n_mal, "benign": n_ben},
        metadata=_json_safe(meta),
    )
