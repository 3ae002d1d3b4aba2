"""Transformer blocks recomputed in the backward (:func:`attention.guidance.recompute_blocks`), on small pure-torch
blocks: the same gradient as a stored pass, the blocks' activations gone between forward and backward, a pass that
ends inside a block, options the host changes in place, inputs changed in place, and no hook left behind."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from attention.guidance import recompute_blocks


class Stop(Exception):
    pass


class Block(nn.Module):
    """Residual GELU feed-forward; reads a per-call option the way ComfyUI's blocks read ``transformer_options``."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.calls = 0
        self.hidden: weakref.ref | None = None  # the block's widest activation of its last forward

    def forward(self, x, transformer_options=None):
        self.calls += 1
        h = torch.nn.functional.gelu(self.up(x))
        self.hidden = weakref.ref(h)
        scale = transformer_options["scale"] if transformer_options else 1.0
        if transformer_options and transformer_options.get("stop_in") is self:
            raise Stop()
        return x + scale * self.down(h)


def stack(n: int = 3, width: int = 8) -> nn.ModuleList:
    return nn.ModuleList(Block(width, seed=i) for i in range(n))


def run(blocks, x, stop_in=None):
    """The host's loop: one options dict, changed in place before each call (like ComfyUI's block_index)."""
    to = {"scale": 0.0, "stop_in": stop_in}
    outs = []
    try:
        for i, b in enumerate(blocks):
            to["scale"] = 1.0 + i
            x = b(x, transformer_options=to)
            outs.append(x)
    except Stop:
        pass
    return outs


def loss_of(outs) -> torch.Tensor:
    return sum((o**2).mean() for o in outs)


def grad(blocks, x0, recompute: bool, stop_in=None) -> torch.Tensor:
    x = x0.clone().requires_grad_(True)
    ctx = recompute_blocks(blocks, (Stop,)) if recompute else torch.enable_grad()
    with ctx:
        outs = run(blocks, x, stop_in)
    (g,) = torch.autograd.grad(loss_of(outs), x)
    return g


def test_recomputed_blocks_give_the_stored_gradient():
    blocks, x0 = stack(), torch.randn(2, 5, 8)
    stored = grad(blocks, x0, recompute=False)
    calls = [b.calls for b in blocks]
    recomputed = grad(blocks, x0, recompute=True)
    assert torch.allclose(recomputed, stored, rtol=0, atol=1e-6)
    assert [b.calls - c for b, c in zip(blocks, calls)] == [2, 2, 2]  # the forward and one recompute each


def test_a_blocks_activations_are_gone_between_forward_and_backward():
    blocks, x = stack(), torch.randn(2, 5, 8, requires_grad=True)
    for recompute, alive in ((False, True), (True, False)):
        with recompute_blocks(blocks, (Stop,)) if recompute else torch.enable_grad():
            outs = run(blocks, x)
        gc.collect()
        assert all((b.hidden() is not None) == alive for b in blocks)
        torch.autograd.grad(loss_of(outs), x)


def test_a_pass_that_ends_inside_a_block_recomputes_up_to_there():
    blocks, x0 = stack(), torch.randn(2, 5, 8)
    stored = grad(blocks, x0, recompute=False, stop_in=blocks[2])
    recomputed = grad(blocks, x0, recompute=True, stop_in=blocks[2])
    assert torch.allclose(recomputed, stored, rtol=0, atol=1e-6) and stored.abs().sum() > 0


def test_the_recompute_sees_the_options_of_its_own_call():
    blocks, x0 = stack(), torch.randn(2, 5, 8)
    # without the snapshot the recompute would read the last block's scale (3.0) in every block
    assert torch.allclose(grad(blocks, x0, recompute=True), grad(blocks, x0, recompute=False), atol=1e-6)


def test_an_input_changed_in_place_after_the_block_is_an_error():
    blocks, x = stack(1), torch.randn(2, 5, 8, requires_grad=True)
    inp = x * 1.0
    with recompute_blocks(blocks, (Stop,)):
        out = blocks[0](inp, transformer_options={"scale": 1.0})
    with torch.no_grad():
        inp.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place.*recompute to off"):
        torch.autograd.grad((out**2).sum(), x)


def test_no_hook_is_left_on_the_blocks_after_the_pass_or_an_error():
    blocks, x = stack(), torch.randn(2, 5, 8, requires_grad=True)
    with pytest.raises(ValueError):
        with recompute_blocks(blocks, ()):
            run(blocks, x, stop_in=blocks[1])  # an exception raised inside a block (not one of its stops)
            raise ValueError("interrupted")
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)
    with torch.enable_grad():  # saved-tensor hooks are gone too: this forward stores as usual
        outs = run(blocks, x)
    gc.collect()
    assert all(b.hidden() is not None for b in blocks) and outs
