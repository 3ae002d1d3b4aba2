"""The gradient island: the only place this pack runs autograd.

ComfyUI runs every node under ``torch.inference_mode()``; latents, conds and model weights are inference tensors,
which autograd can neither track nor save. Here we leave inference mode, make the latent a fresh leaf, and, for the
duration of each pass only, give the layers autograd-safe weights without copying them: parameters are swapped for
normal tensors aliasing the same storage, and layers that cast their weights anyway get a weight function that
keeps the cast copy safe to save. On CUDA a run's pass can be captured once as a CUDA graph and replayed
(:class:`GraphedPass`). Pure torch: the modules are duck-typed, so this runs without ComfyUI.

Newest cores (dynamic VRAM, ``ModelPatcherDynamic``) differ in three ways, all handled here:

- every comfy-ops layer casts (``comfy_cast_weights = True``) and the cast may hand back cached resident tensors
  made under inference mode, views or not, which the host may evict between layers: the weight function clones
  any cast weight that is an inference tensor or a view (:class:`_DetachedWeight`);
- small layers keep the class-level ``weight_function``/``bias_function`` lists, one list object shared by many
  layers of every loaded model: each distinct list gets exactly one entry, removed by identity afterwards
  (:func:`autograd_safe_weights`);
- a pass whose loss carries no gradient to the latent (worker threads running the model under ``no_grad``, an
  attention backend without backward, a detached latent) raises :class:`NoGradientError` instead of stepping by
  zero; a gradient that is zero because the loss is flat there stays a zero step.

Which cast layers fetch their weights per forward (and so rule out a CUDA graph) is
:meth:`AutogradWeights.streamed_modules`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn


class NoGradientError(RuntimeError):
    """The gradient pass produced no gradient for the latent: guidance would silently do nothing."""


_NO_GRADIENT = (
    "The gradient pass produced no gradient for the latent, so Attend-and-Excite cannot steer it. Likely causes: "
    "an attention backend without backward (int8/CK attention, SageAttention 3 and similar: select a "
    "differentiable one such as PyTorch attention), the model run under torch.no_grad (e.g. by multi-GPU model "
    "clones in worker threads), or another node that detaches the latent before the model."
)


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


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is, or was raised while handling, a ``torch.OutOfMemoryError`` (a CUDA graph capture that runs out
    of memory can end in another error, the capture's, with the allocation failure as its context)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _leaf_gradient(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """``d loss.sum() / d leaf``; raises :class:`NoGradientError` when the loss does not depend on ``leaf`` at all
    (a loss that depends on it but is flat there gives zeros)."""
    if not loss.requires_grad:
        raise NoGradientError(_NO_GRADIENT)
    (grad,) = torch.autograd.grad(loss.sum(), leaf, allow_unused=True)
    if grad is None:
        raise NoGradientError(_NO_GRADIENT)
    return grad


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
        ``(loss (B,), maxima (B, S), grad (like x))``; the gradient is zero where the loss is flat in x.

    Raises:
        NoGradientError: no gradient reached ``x`` (the loss does not depend on it through autograd).
    """
    with weights.active() if weights is not None else contextlib.nullcontext(), torch.inference_mode(False), \
            torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        loss, maxima = forward(leaf)
        grad = _leaf_gradient(loss, leaf)
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
        except (NoGradientError, torch.OutOfMemoryError):  # the pass itself is broken, or memory ran out: the caller's
            raise
        except RuntimeError as e:  # the capture refused an operation: the passes run eagerly
            if out_of_memory(e):  # an allocation failed inside the capture, reported as the capture's own failure
                raise torch.OutOfMemoryError(f"CUDA graph capture: {e}") from None
            self.failure, self.outputs = f"{type(e).__name__}: {e}", ()
            return False
        self.graph, self.static = graph, (static_x, static_sigma)
        return True


# ---- autograd helpers of joint-attention passes (Flux, SD3) ----

def _clone_activation(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.requires_grad else t


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def clone_saved_activations():
    """Context for a forward whose layers update their hidden states in place after saving them for the backward
    (Flux's blocks: ``img += ...``), which autograd refuses: the activations saved in the graph are cloned when
    saved (weights and other tensors without a gradient are not), so the backward sees the values the forward used."""
    return torch.autograd.graph.saved_tensors_hooks(_clone_activation, _same)


def recompute_in_backward(fn: Callable, *args):
    """``fn(*args)`` whose intermediates are recomputed in the backward (non-reentrant checkpoint) instead of
    kept. Its inputs are kept by reference, also inside :func:`clone_saved_activations`: a chunked computation over
    one shared tensor (all keys of an attention) must not copy that tensor once per chunk."""
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

