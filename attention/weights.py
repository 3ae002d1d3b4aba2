"""Autograd-safe weights for the gradient passes, without copying them (used by :mod:`.guidance`).

ComfyUI runs every node under ``torch.inference_mode()``; model weights are inference tensors, which autograd can
neither track nor save. For the duration of each pass only, parameters are swapped for normal tensors aliasing the
same storage, and layers that cast their weights anyway get a weight function that keeps the cast copy safe to
save. Pure torch: the modules are duck-typed, so this runs without ComfyUI.

Newest cores (dynamic VRAM, ``ModelPatcherDynamic``) differ in two ways handled here:

- every comfy-ops layer casts (``comfy_cast_weights = True``) and the cast may hand back cached resident tensors
  made under inference mode, views or not, which the host may evict between layers: the weight function clones
  any cast weight that is an inference tensor or a view (:class:`_DetachedWeight`);
- small layers keep the class-level ``weight_function``/``bias_function`` lists, one list object shared by many
  layers of every loaded model: each distinct list gets exactly one entry, removed by identity afterwards
  (:func:`autograd_safe_weights`).

Which cast layers fetch their weights per forward (and so rule out a CUDA graph) is
:meth:`AutogradWeights.streamed_modules`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class _DetachedWeight:
    """Weight function that makes a cast weight safe to save for backward.

    On ComfyUI 0.3.75 the cast already returns a fresh normal tensor, passed through. Newer cores may return views
    into reused cast buffers (a later layer overwrites them before backward) and, with dynamic VRAM, cached
    resident tensors made under inference mode (autograd refuses to save them; the host may evict them between
    layers): those are cloned. A clone made outside inference mode is a normal tensor.
    """

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return w.clone() if w.is_inference() or w._is_view() else w


def comfy_op_modules(roots: Iterable[nn.Module]) -> list[nn.Module]:
    """Modules of ``roots`` that carry ComfyUI's ``weight_function``/``bias_function`` lists (comfy.ops layers)."""
    seen: dict[int, nn.Module] = {}
    for root in roots:
        for m in root.modules():
            wf, bf = getattr(m, "weight_function", None), getattr(m, "bias_function", None)
            if isinstance(wf, list) and isinstance(bf, list):
                seen.setdefault(id(m), m)
    return list(seen.values())


def function_lists(modules: Iterable[nn.Module]) -> list[list]:
    """The distinct ``weight_function``/``bias_function`` list objects of ``modules``, each once (by identity).

    Comfy-ops layers that no loader gave lists of their own share the class-level lists: one list object for many
    layers, across models."""
    lists: dict[int, list] = {}
    for m in modules:
        for lst in (m.weight_function, m.bias_function):
            lists.setdefault(id(lst), lst)
    return list(lists.values())


def _remove_by_identity(lst: list, fn: object) -> None:
    """Delete the last entry of ``lst`` that is ``fn`` itself (equal but different entries stay)."""
    for i in range(len(lst) - 1, -1, -1):
        if lst[i] is fn:
            del lst[i]
            return


@contextlib.contextmanager
def autograd_safe_weights(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Append one weight function to every distinct function list of ``modules`` for the ``with`` body; always
    remove exactly it afterwards.

    The modules are shared by every clone of a ModelPatcher, so nothing may be left behind, even on interrupt.
    A shared class-level list gets the function once, which makes every layer using that list take its cast path
    for the pass (one weight copy per such layer on older cores; a clone of resident weights with dynamic VRAM).
    """
    fn = _DetachedWeight()
    touched: list[list] = []
    try:
        for lst in function_lists(modules):
            lst.append(fn)
            touched.append(lst)
        yield
    finally:
        for lst in touched:
            _remove_by_identity(lst, fn)


def alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor that shares ``t``'s storage: no copy is made.

    Autograd refuses to save inference tensors for backward, but it may save this alias. Safe here because the
    weights are frozen while a gradient pass runs. Call outside inference mode.
    """
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class AutogradWeights:
    """Makes a model's weights usable by autograd for the gradient passes of one sampling run.

    Per module, for the duration of each gradient pass only (always restored in ``finally``):
    - parameters that are inference tensors are swapped for normal tensors that alias the same storage
      (:func:`alias`: no copy, the layers keep their native forward and backward);
    - layers that cast their weights anyway (low-VRAM partial loading, LoRA applied on the fly, manual casting,
      every comfy-ops layer under dynamic VRAM) get the weight-function trick of :func:`autograd_safe_weights`.

    ``swap=False`` uses the weight-function trick everywhere (needed when hooks may re-patch weights mid-run);
    ``by_reference=False`` swaps in copies made once per run instead of aliases (the model's size again in memory;
    kept for comparison in the benchmark).
    """

    def __init__(self, roots: Iterable[nn.Module], swap: bool = True, by_reference: bool = True) -> None:
        self.by_reference = by_reference
        self.copies = False  # whether some stand-in is a copy (not an alias of the model's own storage)
        self.swaps: list[list] = []  # [module, name, original parameter, stand-in]
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
                            self.swaps.append([m, name, p, self._stand_in(p)])

    def streamed_modules(self, device: torch.device) -> list[nn.Module]:
        """Cast layers whose weights the host fetches or patches anew on every forward, for a model computing on
        ``device``: a captured CUDA graph would replay the first fetch, so any of them rules the graph out.

        The other cast layers hold their weights on ``device`` and only cast dtype (manual casting) or cast by
        flag: dynamic VRAM sets ``comfy_cast_weights`` on every layer but loads small layers fully; those replay
        fine. Layers that dynamic VRAM pages (``_v``, a slot in its virtual VRAM buffer) count as streamed even
        while resident: each forward asks the host whether the slot is still resident (``vbar_fault``), pins it,
        refills it if it was evicted, and unpins it after the layer; a replay would skip all of that and read an
        evicted slot. Replaying them would need the host to keep every slot pinned for the whole run (fault and
        pin all of them before capture, unpin after the run) and to check their residency signatures before each
        replay, falling back to eager passes when one changed; ComfyUI offers no call for that.
        """
        return [m for m in self.cast_modules if _streams_weights(m, device)]

    def _stand_in(self, p: torch.Tensor) -> nn.Parameter:
        # tensor subclasses (quantized weights of other packs) may not expose a plain storage: those are copied
        plain = type(p) in (torch.Tensor, nn.Parameter) and p.layout == torch.strided
        self.copies |= not (self.by_reference and plain)
        data = alias(p) if self.by_reference and plain else p.detach().clone()
        return nn.Parameter(data, requires_grad=False)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        try:
            with torch.inference_mode(False):
                for entry in self.swaps:
                    m, name, original, stand_in = entry
                    current = m._parameters[name]
                    if current is not original:  # re-patched since the run began: follow the module's parameter
                        entry[2], entry[3] = current, self._stand_in(current)
                        original, stand_in = entry[2], entry[3]
                    m._parameters[name] = stand_in
                    swapped.append((m, name, original))
            with autograd_safe_weights(self.cast_modules):
                yield
        finally:
            for m, name, original in swapped:
                m._parameters[name] = original


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` lives on ``device`` (an index-less ``device`` matches any index of its type)."""
    return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))


def _streams_weights(m: nn.Module, device: torch.device) -> bool:
    """Whether a cast layer fetches or patches its weights on each forward (see
    :meth:`AutogradWeights.streamed_modules`)."""
    if hasattr(m, "_v"):  # paged by dynamic VRAM
        return True
    if m.weight_function or m.bias_function:  # patches applied per forward (LoRA on low-VRAM loads)
        return True
    return any(p is not None and not _on_device(p, device) for p in m._parameters.values())  # low-VRAM loading
