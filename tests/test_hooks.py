"""capture_hidden on a toy stack of blocks: exact values, early stop, hooks always removed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from davsp_lib.models.adapters.hooks import (
    StopForward,
    capture_hidden,
    check_layers,
    run_until_stop,
)


class AddOne(nn.Module):
    def forward(self, hidden):
        return (hidden + 1,)  # HF decoder layers may return tuples


def toy():
    blocks = nn.ModuleList([AddOne() for _ in range(4)])

    def forward(hidden):
        for block in blocks:
            hidden = block(hidden)[0]
        return hidden

    return blocks, forward


def test_values_and_positions_are_exact():
    blocks, forward = toy()
    x = torch.arange(12.0).reshape(2, 3, 2)
    with capture_hidden(blocks, [0, 2, 4], positions=torch.tensor([0, 2])) as store:
        out = forward(x)
    assert torch.equal(store[0], torch.stack([x[0, 0], x[1, 2]]))
    assert torch.equal(store[2], store[0] + 2)
    assert torch.equal(store[4], store[0] + 4)
    assert torch.equal(out, x + 4)
    with capture_hidden(blocks, [1]) as store:
        forward(x)
    assert torch.equal(store[1], x[:, -1] + 1)


def test_stop_after_deepest_skips_later_blocks():
    blocks, forward = toy()
    ran = []
    blocks[3].register_forward_hook(lambda *_: ran.append(3))
    with capture_hidden(blocks, [2], stop_after_deepest=True) as store:
        assert run_until_stop(forward, hidden=torch.zeros(1, 1, 1)) is None
    assert ran == [] and store[2].item() == 2.0


def test_hooks_removed_on_error():
    blocks, forward = toy()
    with pytest.raises(StopForward), capture_hidden(blocks, [1, 3], stop_after_deepest=True):
        forward(torch.zeros(1, 1, 1))
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)


def test_layer_range_checked():
    assert check_layers([0, 4], 4) == [0, 4]
    with pytest.raises(ValueError, match=r"layers \[5\] out of range: this model has layers 0..4"):
        check_layers([1, 5], 4)
    with pytest.raises(ValueError, match="no layers"):
        check_layers([], 4)


def test_first_forward_only_keeps_the_first_pass():
    blocks, forward = toy()
    x = torch.arange(12.0).reshape(2, 3, 2)
    with capture_hidden(blocks, [0, 3], first_forward_only=True) as store:
        forward(x)
        forward(x + 100)  # a decoding step: not read
    assert torch.equal(store[0], x[:, -1]) and torch.equal(store[3], x[:, -1] + 3)
    with capture_hidden(blocks, [3]) as store:
        forward(x)
        forward(x + 100)
    assert torch.equal(store[3], x[:, -1] + 103)
