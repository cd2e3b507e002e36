"""Forward hooks that read last-input-token hidden states, always removed on exit.

Layer convention (the same as ``output_hidden_states``): layer 0 is the input of the first
language block (token + image embeddings), layer ``l >= 1`` is the output of block ``l - 1``.
For ``l < num_layers`` this equals ``outputs.hidden_states[l]``; Hugging Face replaces the last
entry with its final-norm output, whereas here layer ``num_layers`` is the raw residual stream.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Cache


class StopForward(Exception):
    """Raised by a hook after the deepest requested layer, to skip the rest of the forward."""


def hidden_of(output: object) -> torch.Tensor:
    """The hidden state in a block's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


def first_input(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The value of the first parameter of ``module.forward`` in a pre-hook's call.

    A decoder block's first parameter is its input hidden state; binding the call to the
    block's own signature finds it whether the caller passed it by position or by name.
    """
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    first = next(iter(inspect.signature(module.forward).parameters))
    return bound.arguments[first]


def cache_length(args: tuple, kwargs: Mapping[str, Any]) -> int:
    """Tokens already in the key/value cache handed to a language model's forward.

    Looks for a :class:`transformers.Cache` among the call's inputs by type, not by keyword
    (the keyword has changed across transformers releases: ``past_key_values``, ``cache``):
    no cache means the chunk starts at column 0.
    """
    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return int(value.get_seq_length())
    return 0


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    layers = [int(layer) for layer in layers]
    if not layers:
        raise ValueError("no layers requested")
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has layers 0..{num_layers}")
    return layers


@contextmanager
def capture_hidden(
    blocks: nn.ModuleList,
    layers: Sequence[int],
    positions: torch.Tensor | None = None,
    *,
    stop_after_deepest: bool = False,
    first_forward_only: bool = False,
) -> Iterator[dict[int, torch.Tensor]]:
    """Capture ``hidden[b, positions[b]]`` (default: the last position) at each layer.

    Yields a dict filled during the forward: ``{layer: tensor [batch, hidden]}``. Tensors stay
    in the autograd graph, so a loss on them back-propagates to the pixels. With
    ``stop_after_deepest`` the hook raises :class:`StopForward` once the deepest layer is read;
    run the forward inside :func:`run_until_stop`. With ``first_forward_only`` later forwards
    leave the store as it is: inside ``generate`` (left-padded) the first forward is the
    prefill, whose last position is every row's last input token, and decoding steps are not
    read.
    """
    layers = check_layers(layers, len(blocks))
    deepest = max(layers)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def keep(layer: int, hidden: torch.Tensor) -> None:
        if not (first_forward_only and layer in store):
            store[layer] = pick(hidden)

    def pick(hidden: torch.Tensor) -> torch.Tensor:
        if positions is None:
            return hidden[:, -1]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, positions.to(hidden.device)]

    def after_read(layer: int) -> None:
        if stop_after_deepest and layer == deepest:
            raise StopForward

    for layer in sorted(set(layers)):
        if layer == 0:

            def pre_hook(module, args, kwargs, layer=layer):
                keep(layer, first_input(module, args, kwargs))
                after_read(layer)

            handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def hook(module, args, output, layer=layer):
                keep(layer, hidden_of(output))
                after_read(layer)

            handles.append(blocks[layer - 1].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_until_stop(forward, /, **kwargs) -> object | None:
    """Call ``forward(**kwargs)``; a :class:`StopForward` from a hook ends it early (-> None)."""
    try:
        return forward(**kwargs)
    except StopForward:
        return None
