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
import torch.nn.functional as F
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


class _LinearByRef(torch.autograd.Function):
    """``F.linear`` whose backward (to the input only) reads the weight by reference instead of saving it.

    Autograd refuses to *save* inference tensors; keeping a plain reference for ``grad_x = grad_y W`` is safe
    because the weights are frozen during the pass. No copy of the weight is made.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.weight, None, None


class _Conv2dByRef(torch.autograd.Function):
    """``F.conv2d`` with an input-only backward that reads the weight by reference (see :class:`_LinearByRef`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.weight, ctx.shape, ctx.conf = weight, x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        grad = torch.nn.grad.conv2d_input(ctx.shape, ctx.weight, grad_out, *ctx.conf)
        return grad, None, None, None, None, None, None


def _by_ref_forward(m: nn.Module):
    """A forward for ``m`` that differentiates to its input without saving its weights, or ``None``."""
    if isinstance(m, nn.Linear):
        return lambda x: _LinearByRef.apply(x, m.weight, m.bias)
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return lambda x: _Conv2dByRef.apply(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    return None


class AutogradWeights:
    """Makes a model's weights usable by autograd for the gradient passes of one sampling run.

    Per module, for the duration of each gradient pass only (always restored in ``finally``):
    - linear and conv layers on ComfyUI's plain fast path run a forward whose backward reads the weight by
      reference (no copy at all);
    - other layers with inference-tensor parameters (norms, ...) get normal-tensor copies, made once per run;
    - layers that cast their weights anyway (low-VRAM partial loading, LoRA applied on the fly, manual casting)
      get the weight-function trick of :func:`autograd_safe_weights`.

    ``swap=False`` uses the weight-function trick everywhere (needed when hooks may re-patch weights mid-run);
    ``by_reference=False`` copies linear/conv weights too (one copy per run: more memory, fewer Python calls).
    """

    def __init__(self, roots: Iterable[nn.Module], swap: bool = True, by_reference: bool = True) -> None:
        self.forwards: list[tuple[nn.Module, Callable]] = []
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
                    params = [(n, p) for n, p in m._parameters.items() if p is not None and p.is_inference()]
                    if not params:
                        continue
                    fwd = _by_ref_forward(m) if by_reference and "forward" not in m.__dict__ else None
                    if fwd is not None:
                        self.forwards.append((m, fwd))
                        continue
                    for name, p in params:
                        self.swaps.append((m, name, p, nn.Parameter(p.detach().clone(), requires_grad=False)))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        overridden: list[nn.Module] = []
        try:
            for m, fwd in self.forwards:
                m.forward = fwd
                overridden.append(m)
            for m, name, original, copy in self.swaps:
                m._parameters[name] = copy
                swapped.append((m, name, original))
            with autograd_safe_weights(self.cast_modules):
                yield
        finally:
            for m in overridden:
                del m.forward
            for m, name, original in swapped:
                m._parameters[name] = original


def loss_and_grad(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    weights: AutogradWeights | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``forward(x_leaf) -> (loss (B,), maxima (B, S))`` with autograd and return detached results.

    ``weights``: the model's :class:`AutogradWeights` (``None``: the model's weights are already autograd-safe).
    Per-sample losses are summed before differentiating: samples do not interact in the UNet (group norm and
    attention are per sample), so each sample's gradient is that of its own loss, in one batched pass.

    Returns:
        ``(loss (B,), maxima (B, S), grad (like x))``; the gradient is zero where the loss does not depend on x.
    """
    with weights.active() if weights is not None else contextlib.nullcontext(), torch.inference_mode(False), \
            torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        loss, maxima = forward(leaf)
        if loss.requires_grad:
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        else:
            grad = torch.zeros_like(leaf)
        return loss.detach().clone(), maxima.detach().clone(), grad.detach()
