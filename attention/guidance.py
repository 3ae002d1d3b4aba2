"""The gradient island: the only place this pack runs autograd.

ComfyUI runs every node under ``torch.inference_mode()``; latents, conds and model weights are inference tensors,
which autograd can neither track nor save. Here we leave inference mode, make the latent a fresh leaf, and, for the
duration of each pass only, give the layers autograd-safe weights without copying them: parameters are swapped for
normal tensors aliasing the same storage, and layers that cast their weights anyway get a weight function that
keeps the cast copy safe to save. On CUDA a run's pass can be captured once as a CUDA graph and replayed
(:class:`GraphedPass`). Pure torch: the modules are duck-typed, so this runs without ComfyUI.
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
    - layers that cast their weights anyway (low-VRAM partial loading, LoRA applied on the fly, manual casting)
      get the weight-function trick of :func:`autograd_safe_weights`.

    ``swap=False`` uses the weight-function trick everywhere (needed when hooks may re-patch weights mid-run);
    ``by_reference=False`` swaps in copies made once per run instead of aliases (the model's size again in memory;
    kept for comparison in the benchmark).
    """

    def __init__(self, roots: Iterable[nn.Module], swap: bool = True, by_reference: bool = True) -> None:
        self.by_reference = by_reference
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

    def _stand_in(self, p: torch.Tensor) -> nn.Parameter:
        # tensor subclasses (quantized weights of other packs) may not expose a plain storage: those are copied
        plain = type(p) in (torch.Tensor, nn.Parameter) and p.layout == torch.strided
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


class CudaGraphBackend:
    """The CUDA pieces of :class:`GraphedPass` (a stand-in with the same four methods, whose graph re-runs the
    captured function on replay, lets tests check the bookkeeping on a CPU)."""

    def blocker(self, device: torch.device) -> str | None:
        """Why passes on ``device`` cannot be captured here (``None``: they can)."""
        if device.type != "cuda":
            return f"the model runs on {device.type}"
        if device.index is not None and device.index != torch.cuda.current_device():
            return f"the model runs on {device}, not on the current CUDA device"  # a capture follows that one
        return None

    def warm_up(self, fn: Callable[[], tuple]) -> tuple:
        """Run ``fn`` on a fresh side stream (the eager pass a capture needs first) and return its tensors, handed
        over to the current stream: it waits for the side stream, and the caching allocator learns that the tensors
        are used there (else their memory could be reused on the side stream while the current one still reads)."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                out = fn()
        finally:
            current.wait_stream(side)
        with torch.inference_mode(False):
            for t in out:
                t.record_stream(current)
        return out

    def new_graph(self) -> torch.cuda.CUDAGraph:
        return torch.cuda.CUDAGraph()

    def capture(self, graph: torch.cuda.CUDAGraph, fn: Callable[[], tuple]) -> tuple:
        """Record ``fn``'s kernels into ``graph`` (nothing runs); returns its outputs, which each replay refills.

        ``relaxed``: host-side CUDA calls a host framework makes on the way (free-memory queries, say) are allowed;
        a copy or sync on the captured stream still fails the capture."""
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):
            return fn()


class GraphedPass:
    """One run's gradient pass, captured once as a CUDA graph and replayed for every later pass.

    A pass launches thousands of small kernels, and on a GPU its time is mostly the host issuing them; replaying a
    captured graph issues them all at once. ``forward(leaf, sigma) -> (loss (B,), maxima (B, S))`` must take its
    step only from the ``sigma`` tensor it is given and must not copy data between host and device (a capture cannot
    hold that): a graph replays fixed kernels on fixed memory, so each call copies ``x`` and ``sigma`` into static
    buffers, replays, and clones the results out.

    A capture needs one eager run of the same kernels on a side stream first (lazy initialisation must not happen
    while capturing). A caller that already ran such a pass through ``backend.warm_up`` (the sampler's first pass)
    calls :meth:`capture` right after it; otherwise the first call does both and returns the warm-up's results.
    If the capture fails (an operation in the model that a graph cannot hold), the reason is kept in ``failure``
    and every call runs the pass eagerly through :func:`loss_and_grad`.
    """

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 weights: AutogradWeights | None, backend=None) -> None:
        self.forward, self.weights = forward, weights
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.graph = None
        self.failure: str | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def eager() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return loss_and_grad(lambda leaf: self.forward(leaf, sigma), x, self.weights)

        if self.failure is not None:
            return eager()
        if self.graph is None:
            result = self.backend.warm_up(eager)
            self.capture(x, sigma)
            return result
        static_x, static_sigma = self.static
        with torch.inference_mode(False):
            static_x.copy_(x)
            static_sigma.copy_(sigma)
        self.graph.replay()
        loss, maxima, grad = (t.clone() for t in self.outputs)  # the next replay overwrites the outputs
        return loss, maxima, grad

    def capture(self, x: torch.Tensor, sigma: torch.Tensor) -> bool:
        """Capture the pass on static copies of ``x`` and ``sigma`` (nothing runs); ``False`` if the capture failed
        (the reason is in ``failure``)."""
        with torch.inference_mode(False):
            static_x, static_sigma = x.detach().clone(), torch.as_tensor(sigma, device=x.device).detach().clone()

        def forward(leaf: torch.Tensor):
            return self.forward(leaf, static_sigma)

        graph = self.backend.new_graph()
        try:
            self.outputs = self.backend.capture(graph, lambda: loss_and_grad(forward, static_x, self.weights))
        except RuntimeError as e:  # the capture refused an operation: the passes run eagerly
            self.failure, self.outputs = f"{type(e).__name__}: {e}", ()
            return False
        self.graph, self.static = graph, (static_x, static_sigma)
        return True
