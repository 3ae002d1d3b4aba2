"""The gradient island: the only place this pack runs autograd.

ComfyUI runs every node under ``torch.inference_mode()``; latents, conds and model weights are inference tensors,
which autograd can neither track nor save. Here we leave inference mode, make the latent a fresh leaf, and make
every comfy-op module cast a normal copy of its weights for the duration of the pass (a function appended to its
``weight_function``/``bias_function`` lists forces that copy path in ``comfy.ops``). Pure torch: the modules are
duck-typed, so this runs without ComfyUI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn


class _DetachedWeight:
    """Weight function that makes a cast weight safe to save for backward.

    On ComfyUI 0.3.75 the cast already returns a fresh tensor; newer cores may return views into reused cast
    buffers, which a later layer would overwrite before backward: clone those.
    """

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return w.clone() if w._is_view() else w


def comfy_op_modules(roots: Iterable[nn.Module]) -> list[nn.Module]:
    """Modules of ``roots`` that carry ComfyUI's ``weight_function``/``bias_function`` lists (comfy.ops layers)."""
    seen: dict[int, nn.Module] = {}
    for root in roots:
        for m in root.modules():
            wf, bf = getattr(m, "weight_function", None), getattr(m, "bias_function", None)
            if isinstance(wf, list) and isinstance(bf, list):
                seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def autograd_safe_weights(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Append one weight function to every module for the ``with`` body; always remove exactly it afterwards.

    The modules are shared by every clone of a ModelPatcher, so nothing may be left behind, even on interrupt.
    """
    fn = _DetachedWeight()
    touched: list[list] = []
    try:
        for m in modules:
            for lst in (m.weight_function, m.bias_function):
                lst.append(fn)
                touched.append(lst)
        yield
    finally:
        for lst in touched:
            for i in range(len(lst) - 1, -1, -1):
                if lst[i] is fn:
                    del lst[i]
                    break


def loss_and_grad(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    modules: Iterable[nn.Module] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``forward(x_leaf) -> (loss (B,), maxima (B, S))`` with autograd and return detached results.

    Per-sample losses are summed before differentiating: samples do not interact in the UNet (group norm and
    attention are per sample), so each sample's gradient is that of its own loss, in one batched pass.

    Returns:
        ``(loss (B,), maxima (B, S), grad (like x))``; the gradient is zero where the loss does not depend on x.
    """
    with autograd_safe_weights(list(modules)), torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        loss, maxima = forward(leaf)
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        else:
            grad = torch.zeros_like(leaf)
        return loss.detach().clone(), maxima.detach().clone(), grad.detach()
