"""The gradient island: the only place this pack runs autograd.

ComfyUI runs every node under ``torch.inference_mode()``; latents, conds and model weights are inference tensors,
which autograd can neither track nor save. Here we leave inference mode, make the latent a fresh leaf and run the
pass with the model's autograd-safe weights (:class:`~.weights.AutogradWeights`, no copies). On CUDA a run's pass
can be captured once as a CUDA graph and replayed (:class:`GraphedPass`). A pass whose loss carries no gradient to
the latent (worker threads running the model under ``no_grad``, an attention backend without backward, a detached
latent) raises :class:`NoGradientError` instead of stepping by zero; a gradient that is zero because the loss is
flat there stays a zero step. Pure torch: the modules are duck-typed, so this runs without ComfyUI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from .weights import AutogradWeights


class NoGradientError(RuntimeError):
    """The gradient pass produced no gradient for the latent: guidance would silently do nothing."""


_NO_GRADIENT = (
    "The gradient pass produced no gradient for the latent, so Attend-and-Excite cannot steer it. Likely causes: "
    "an attention backend without backward (int8/CK attention, SageAttention 3 and similar: select a "
    "differentiable one such as PyTorch attention), the model run under torch.no_grad (e.g. by multi-GPU model "
    "clones in worker threads), or another node that detaches the latent before the model."
)


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



# ---- recomputation inside the pass (UNet transformer blocks) ----

class _BlockCall:
    """One call of a recomputed block in a pass: its inputs (kept by reference) and the count of tensors its forward
    saved; those are recomputed together, by calling the block again, when the backward first needs one of them."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict, stops: tuple[type[BaseException], ...],
                 replay: Callable[[], contextlib.AbstractContextManager]) -> None:
        # a shallow copy of the option dicts: the host updates them in place between block calls (ComfyUI's block_index)
        self.module, self.args = module, args
        self.kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        self.inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        self.versions = [t._version for t in self.inputs]
        self.stops, self.replay = stops, replay
        self.count = 0  # tensors the forward saved so far
        self.recomputed: dict[int, torch.Tensor] = {}

    def pack(self, t: torch.Tensor) -> tuple:
        i, self.count = self.count, self.count + 1
        if isinstance(t, nn.Parameter) or any(t is x for x in self.inputs):  # alive anyway: no memory to win
            return None, t
        return self, i

    def recompute(self) -> None:
        if any(t._version != v for t, v in zip(self.inputs, self.versions)):
            raise RuntimeError(f"an input of {type(self.module).__name__} was changed in place after the block ran, "
                               "so its activations cannot be recomputed for the gradient pass; set recompute to off")
        saved: list[torch.Tensor] = []

        def keep(t: torch.Tensor) -> None:
            saved.append(t)
            if len(saved) == self.count:  # all back: the rest of the block's forward is not needed
                raise _AllRecomputed()

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, _unused), self.replay():
            try:
                self.module.forward(*self.args, **self.kwargs)
            except (_AllRecomputed, *self.stops):  # or the pass ended inside this block, with as many saved
                pass
        if len(saved) != self.count:
            raise RuntimeError(f"{type(self.module).__name__} saved {len(saved)} tensors when recomputed and "
                               f"{self.count} in the forward; set recompute to off for this model")
        self.recomputed = dict(enumerate(saved))


class _AllRecomputed(Exception):
    """Raised by a recompute once it has every tensor its block's forward saved."""


def _unused(_):
    raise RuntimeError("a recomputed block's own backward needs no saved tensors")


def _unpack(packed: tuple) -> torch.Tensor:
    call, i = packed
    if call is None:
        return i
    if i not in call.recomputed:  # first use in this backward (or a second backward of a retained graph)
        call.recompute()
    return call.recomputed.pop(i)


@contextlib.contextmanager
def recompute_blocks(modules: Iterable[nn.Module], stops: tuple[type[BaseException], ...] = (),
                     replay: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     ) -> Iterator[None]:
    """Within the ``with`` body, each call of one of ``modules`` keeps only its inputs for the backward, and its
    saved tensors are recomputed there by calling it again (activation checkpointing without changing the model:
    PyTorch forward hooks, removed on exit, and saved-tensor hooks active only inside the blocks). The peak memory
    of a pass falls from every block's activations to one block's; the price is one more forward of the blocks.

    ``stops``: exceptions a block may raise to end the pass early (the recompute stops at the same point);
    ``replay()``: a context each recompute runs in (the pass's capture keeps the maps of the forward). A block must be
    deterministic and must not change its inputs in place; either is checked when recomputing."""
    calls: list[tuple[_BlockCall, contextlib.AbstractContextManager]] = []

    def enter(module, args, kwargs):
        call = _BlockCall(module, args, kwargs, stops, replay)
        hooks = torch.autograd.graph.saved_tensors_hooks(call.pack, _unpack)
        hooks.__enter__()
        calls.append((call, hooks))

    def leave(module, args, output):
        if calls and calls[-1][0].module is module:
            calls.pop()[1].__exit__(None, None, None)

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(m.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        while calls:
            calls.pop()[1].__exit__(None, None, None)
