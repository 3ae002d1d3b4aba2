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


class AutogradWeights:
    """Makes a model's weights usable by autograd for the gradient passes of one sampling run.

    Two ways, per module:
    - modules that run ComfyUI's plain fast path get a **normal-tensor copy** of their inference-tensor parameters,
      made once per run and swapped in only for the duration of each gradient pass (one copy per run instead of one
      per pass and op; restored in ``finally``);
    - modules that cast their weights anyway (low-VRAM partial loading, LoRA applied on the fly, manual casting)
      get the weight-function trick of :func:`autograd_safe_weights` for each pass.

    ``swap=False`` uses the weight-function trick everywhere (needed when hooks may re-patch weights mid-run).
    """

    def __init__(self, roots: Iterable[nn.Module], swap: bool = True) -> None:
        self.swaps: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        self.cast_modules: list[nn.Module] = []
        seen: set[int] = set()
        with torch.inference_mode(False):
            for root in roots:
                for m in root.modules():
                    if id(m) in seen:
                        continue
                    seen.add(id(m))
                    wf, bf = getattr(m, "weight_function", None), getattr(m, "bias_function", None)
                    casts = bool(getattr(m, "comfy_cast_weights", False) or wf or bf)
                    if isinstance(wf, list) and isinstance(bf, list) and (casts or not swap):
                        self.cast_modules.append(m)
                        continue
                    for name, p in m._parameters.items():
                        if p is not None and p.is_inference():
                            copy = nn.Parameter(p.detach().clone(), requires_grad=False)
                            self.swaps.append((m, name, p, copy))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        swapped = []
        try:
            for m, name, original, copy in self.swaps:
                m._parameters[name] = copy
                swapped.append((m, name, original))
            with autograd_safe_weights(self.cast_modules):
                yield
        finally:
            for m, name, original in swapped:
                m._parameters[name] = original


def loss_and_grad(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    weights: AutogradWeights | Iterable[nn.Module] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``forward(x_leaf) -> (loss (B,), maxima (B, S))`` with autograd and return detached results.

    ``weights``: an :class:`AutogradWeights` of the model, or modules for the per-pass weight-function trick.
    Per-sample losses are summed before differentiating: samples do not interact in the UNet (group norm and
    attention are per sample), so each sample's gradient is that of its own loss, in one batched pass.

    Returns:
        ``(loss (B,), maxima (B, S), grad (like x))``; the gradient is zero where the loss does not depend on x.
    """
    ctx = weights.active() if isinstance(weights, AutogradWeights) else autograd_safe_weights(list(weights))
    with ctx, torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        loss, maxima = forward(leaf)
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        else:
            grad = torch.zeros_like(leaf)
        return loss.detach().clone(), maxima.detach().clone(), grad.detach()
