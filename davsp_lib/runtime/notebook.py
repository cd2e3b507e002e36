"""Small helpers the notebooks share: parameter checks, figure saving, results JSON.

Notebooks stay thin: a typed ``parameters`` cell, one :func:`parameters` call that validates it,
then calls into the library. Everything a notebook writes goes through the atomic writers here.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import platform
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from davsp_lib.runtime.io import atomic_write_bytes, atomic_write_json


class ParameterError(ValueError):
    """A notebook parameter with a wrong type or value (message names the parameter)."""


def check(
    name: str,
    value: Any,
    kind: type | tuple[type, ...],
    *,
    choices: Iterable[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_none: bool = False,
    finite: bool = False,
) -> Any:
    """Validate one papermill parameter and return it (ints pass as floats).

    ``finite``: refuse NaN and infinities (which pass ``minimum`` and ``maximum`` unnoticed).
    """
    if value is None:
        if allow_none:
            return None
        raise ParameterError(f"parameter {name!r} must be set (got None)")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (bool not in kinds and isinstance(value, bool)) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise ParameterError(
            f"parameter {name!r} must be {expected}, got {type(value).__name__} {value!r}"
        )
    if finite and isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"parameter {name!r} must be finite, got {value!r}")
    if choices is not None and value not in (allowed := list(choices)):
        raise ParameterError(f"parameter {name!r} must be one of {allowed}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ParameterError(f"parameter {name!r} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ParameterError(f"parameter {name!r} must be <= {maximum}, got {value!r}")
    return value


DTYPES = ("auto", "float32", "bfloat16", "float16")
#: parameters that several notebooks share, with their checks (:func:`parameters` applies them)
COMMON_PARAMETERS: dict[str, tuple[type, dict[str, Any]]] = {
    "model": (str, {}),
    "dtype": (str, {"choices": DTYPES}),
    "device": (str, {}),
    "data_root": (str, {}),
    "use_mirror": (bool, {}),
    "vector_path": (str, {}),
    "batch_size": (int, {"minimum": 1}),
    "seed": (int, {"minimum": 0}),
}


def at_least(minimum: float) -> dict[str, Any]:
    """A :func:`parameters` rule: ``steps=nb.at_least(1)``."""
    return {"minimum": minimum}


def between(minimum: float, maximum: float) -> dict[str, Any]:
    """A :func:`parameters` rule: ``q_plus=nb.between(0.0, 1.0)`` (both ends allowed)."""
    return {"minimum": minimum, "maximum": maximum}


def one_of(*choices: Any) -> dict[str, Any]:
    """A :func:`parameters` rule: ``optimizer=nb.one_of("adam", "sign")``."""
    return {"choices": list(choices)}


#: cell parameters that say where a run writes, not what it computes (left out of the record)
OUTPUT_PARAMETERS = ("output_dir", "figures_dir")


def _check_typed(name: str, value: Any, annotation: Any, rules: Mapping[str, Any]) -> None:
    """:func:`check` ``value`` against ``annotation``; ``list[T]`` / ``dict[str, T]``: each item."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is None and isinstance(annotation, type):
        check(name, value, annotation, **rules)
        return
    if origin not in (list, dict) or len(args) != (1 if origin is list else 2):  # also strings
        raise TypeError(f"parameter {name!r}: unsupported annotation {annotation!r}")
    check(name, value, origin)
    if origin is list:
        for index, item in enumerate(value):
            check(f"{name}[{index}]", item, args[0], **rules)
        return
    for key, item in value.items():
        check(f"{name} key", key, args[0])
        check(f"{name}[{key!r}]", item, args[1], **rules)


def parameters(
    namespace: Mapping[str, Any],
    annotations: Mapping[str, Any],
    **rules: Mapping[str, Any],
) -> dict[str, Any]:
    """Validate a notebook's typed parameters cell in one call; returns the values to record.

    Call it right after the ``parameters`` cell as
    ``parameters = nb.parameters(globals(), __annotations__, n_gap={"minimum": 1})``: each
    annotated name is checked against its annotation (``int``, ``float``, ``str``, ``bool``,
    ``list``, ``dict``, ``list[T]``, ``dict[str, T]``) with the shared rules of
    :data:`COMMON_PARAMETERS` plus the notebook's own ``rules`` (:func:`check`'s keywords; for a
    ``list[T]`` or ``dict[str, T]`` they apply to each item). The values come from
    ``namespace``, where papermill's injected cell has put them. Returns ``{name: value}`` in
    the cell's order without :data:`OUTPUT_PARAMETERS` (the values are not converted).
    """
    unknown = sorted(set(rules) - set(annotations))
    if unknown:
        raise KeyError(f"rules for {unknown}, which the parameters cell does not declare")
    for name, annotation in annotations.items():
        if name not in namespace:
            raise ParameterError(f"parameter {name!r} is declared but has no value")
        shared = COMMON_PARAMETERS.get(name, (None, {}))[1]
        _check_typed(name, namespace[name], annotation, {**shared, **rules.get(name, {})})
    return {name: namespace[name] for name in annotations if name not in OUTPUT_PARAMETERS}


def mirror_root(use_mirror: bool, data_root: str = "") -> Path | None:
    """The benchmark mirror to read (``data_root``, else the default), or None when unused.

    A missing mirror is not an error in a notebook: it prints why and the notebook continues
    with the built-in dataset.
    """
    if not use_mirror:
        return None
    from davsp_lib.data.datasets import data_root as find_data_root
    from davsp_lib.runtime.errors import DataError

    try:
        return find_data_root(data_root or None)
    except DataError as error:
        print(f"no benchmark mirror: {error}\n-> continuing with the built-in dataset only")
        return None


def save_figure(fig: Any, figures_dir: str | Path, name: str, *, dpi: int = 120) -> list[Path]:
    """Save a matplotlib figure as PNG and SVG (atomically); returns both paths."""
    figures_dir = Path(figures_dir)
    paths = []
    for extension in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=extension, dpi=dpi, bbox_inches="tight")
        paths.append(atomic_write_bytes(figures_dir / f"{name}.{extension}", buffer.getvalue()))
    return paths


def environment() -> dict[str, str]:
    """Versions that a result depends on."""
    import torch
    import transformers

    import davsp_lib

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "davsp_lib": davsp_lib.__version__,
        "machine": platform.machine(),
        "cuda": str(torch.cuda.is_available()),
    }


def write_results(
    path: str | Path,
    *,
    notebook: str,
    parameters: Mapping[str, Any],
    results: Mapping[str, Any],
    headline: str | None = None,
) -> Path:
    """Write a notebook's results JSON: parameters, environment, results and a one-line headline.

    ``headline`` is what the pipeline report shows for this notebook; it must say which data,
    model and judge produced any number in it.
    """
    payload = {
        "notebook": notebook,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parameters": dict(parameters),
        "environment": environment(),
        "headline": headline,
        "results": dict(results),
    }
    return atomic_write_json(path, payload)
