"""The A&E gradient pass of one sampling run: a cond-only pass through ComfyUI's own ``calc_cond_batch`` (so LoRA,
ControlNet and other nodes' model patches apply) that captures the subject tokens' cross-attention maps and returns
the objective and its gradient with respect to the latent.

The layers that feed the loss are chosen by the model's family (:mod:`.families`: the cross-attention layers of one
UNet level, or joint-attention blocks of Flux and SD3); every pass runs only up to the last of them. The first pass
of a run is, on CUDA, the warm-up of the CUDA graph captured right after it; later passes are replayed from the
graph where allowed (UNets), and the graph is kept with the model for later runs (:mod:`.graph_cache`).

On UNets, the first transformer blocks of the pass may keep only their inputs for the backward and be run again
there (``recompute``; :func:`recompute_count` says how many, :func:`attention.guidance.recompute_blocks` does it).

A pass (or capture) that runs out of memory is not the end of the run: A&E frees what it holds (the graph and its
pool, the weight stand-ins), empties ComfyUI's cache and retries the pass in its lean form: eager (nothing kept
between passes) with every transformer block recomputed; only a retry that runs out of memory too raises
:class:`GradientPassOutOfMemory`, whose message says what to change.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..attention.guidance import CudaGraphBackend, GraphedPass, NoGradientError, loss_and_grad, recompute_blocks
from ..attention.loss import attend_excite_objective
from ..attention.weights import AutogradWeights
from . import graph_cache
from .capture import StopForward, graph_safe_block_patches
from .families import layer_label, reader_for
from .pass_memory import GradientPassOutOfMemory, first_line, out_of_memory_message

log = logging.getLogger(__name__)

RECOMPUTE_BUDGET = 0.3  # recompute = auto: a pass keeps at most this share of the model's weight bytes (estimated)


def _differentiable_attention(func, *args, **kwargs):
    """``optimized_attention_override`` of the gradient pass: PyTorch's attention (it has a backward) whatever
    backend the user chose for sampling (int8 or sage kernels have none)."""
    return comfy_attention.attention_pytorch(*args, **kwargs)


def _control_modules(cond: dict) -> list[torch.nn.Module]:
    mods, ctrl = [], cond.get("control")
    while ctrl is not None:
        for attr in ("control_model", "t2i_model"):
            m = getattr(ctrl, attr, None)
            if isinstance(m, torch.nn.Module):
                mods.append(m)
        ctrl = getattr(ctrl, "previous_controlnet", None)
    return mods


def _conds_on(cond: dict, device: torch.device, own: bool = False) -> dict:
    """A copy of ``cond`` whose model inputs already live on ``device`` (made once per run): the text encoder leaves
    them on the CPU, and a copy to the GPU inside each pass waits for the queued work (and cannot be captured in a
    graph). The cond objects are copied, never changed. ``own``: the tensors are always new ones (normal tensors,
    which a graph kept for later runs reads and :func:`~.graph_cache.refill` overwrites)."""
    model_conds = {}
    for name, c in cond.get("model_conds", {}).items():
        t = getattr(c, "cond", None)
        if isinstance(t, torch.Tensor) and (own or t.device != device):
            c = copy.copy(c)
            with torch.inference_mode(False) if own else contextlib.nullcontext():
                c.cond = t.to(device, copy=own)
        model_conds[name] = c
    return {**cond, "model_conds": model_conds}


def _clone_after_skip(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """The UNet adds ControlNet residuals to the stored skip tensors in place (``h += ctrl``), which autograd rejects
    when the next block saved the same tensor for backward. Feeding the next block a clone keeps the graph valid."""
    return h.clone()


def _holds_any(v) -> bool:
    """Whether a (nested) patch registry holds anything: empty dicts and lists inside do not count."""
    if isinstance(v, dict):
        return any(_holds_any(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_any(x) for x in v)
    return v is not None


def recompute_count(recompute: str, stored: list[int], weight_bytes: int) -> int:
    """How many of a pass's transformer blocks (the first ones it runs) ``recompute`` recomputes, given the
    activations each would keep (``stored``, bytes, in pass order) and the model's weight bytes."""
    if recompute != "auto":
        return len(stored) if recompute == "blocks" else 0
    n = 0
    while sum(stored[n:]) > RECOMPUTE_BUDGET * weight_bytes:
        n += 1
    return n


class GradientPasses:
    """``passes(x, sigma) -> (loss (B,), maxima (B, S), dL/dx)`` for one sampling run; nothing outlives the run.

    ``subjects``: the run's :class:`~nodes.subjects.RunSubjects` (cond, token indices, slots); ``params``: the
    sampler's ``AEParams``."""

    def __init__(self, base_model, subjects, params, model_options: dict, graph_backend=None, *,
                 latent_hw: tuple[int, int]) -> None:
        self.base, self.subjects, self.params = base_model, subjects, params
        self.reader = reader_for(base_model, params, latent_hw, subjects.spec.num_keys)  # the model family's layers
        self.target_hw = self.reader.target_hw
        self.model_options = model_options
        self.graph_backend = graph_backend if graph_backend is not None else CudaGraphBackend()
        self.keys = self.reader.keys
        self.target_keys: list | None = None  # set by the first pass
        self.weights: AutogradWeights | None = None  # made by the first pass (plain runs copy nothing)
        self.graphed: GraphedPass | None = None
        self.cond: dict | None = None  # the subjects' cond with its model inputs on the model's device
        self.graph_used = False
        self.graph_reused = False  # the first pass replayed a graph kept from an earlier run
        self.retries = 0  # passes retried eagerly after running out of memory
        self.recompute = 0  # how many of the pass's transformer blocks are recomputed in the backward (first pass sets)
        self.patcher = getattr(base_model, "current_patcher", None)  # the ModelPatcher sampling (owns the cache)

    # ---- the options of a pass ----

    def _options(self, capture, keys: list, grad: bool) -> dict:
        mo = dict(self.model_options)
        mo["transformer_options"] = to = dict(mo.get("transformer_options", {}))
        if grad:
            mo.pop("multigpu_clones", None)  # other devices' workers run under no_grad: the pass would be a no-op
            to["optimized_attention_override"] = _differentiable_attention
            mo["transformer_options"] = to = graph_safe_block_patches(to)
            if self.subjects.cond.get("control") is not None:
                patches = dict(to.get("patches", {}))
                patches["input_block_patch_after_skip"] = [*patches.get("input_block_patch_after_skip", []),
                                                           _clone_after_skip]
                to["patches"] = patches
        return self.reader.install(mo, capture, keys)

    def recording_options(self, recorder) -> dict:
        """The run's model options with ``recorder``'s patches on the layers that may feed the loss."""
        return self._options(recorder, self.keys, grad=False)

    def map_recorder(self, record, sigma_values: list[float]):
        return self.reader.recorder(record, sigma_values)

    def _forward(self, keys: list):
        """``(capture, forward)``: ``forward(leaf, sigma) -> (loss, maxima)`` runs the cond-only pass with ``capture``'s
        patches on ``keys``, stopped after the last of them."""
        capture = self.reader.grad_capture(keys)
        mo, p, s, cond = self._options(capture, keys, grad=True), self.params, self.subjects, self.cond
        blocks = self.reader.recomputed_blocks(keys)[: self.recompute] if self.recompute else []

        def forward(leaf: torch.Tensor, sigma: torch.Tensor):
            recomputing = recompute_blocks(blocks, (StopForward,), capture.replaying) if blocks else \
                contextlib.nullcontext()
            try:
                with self.reader.pass_context(), recomputing:
                    comfy.samplers.calc_cond_batch(self.base, [[cond]], leaf, sigma * leaf.new_ones(leaf.shape[0]),
                                                   mo)
            except StopForward:
                pass
            if not capture.maps:
                raise ValueError(self.reader.nothing_read(capture, keys, s.spec.num_keys))
            return attend_excite_objective(capture.aggregate(), s.indices, s.slots, smoothing=p.smoothing,
                                           kernel_size=p.kernel_size, smoothing_sigma=p.smoothing_sigma)

        return capture, forward

    # ---- passes ----

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor):
        comfy.model_management.throw_exception_if_processing_interrupted()
        try:
            return self._pass(x, sigma)
        except torch.OutOfMemoryError as e:
            error = first_line(e)
        # past the handler: its traceback, which holds the failed pass's tensors, is gone before memory is freed
        return self._retry_eagerly(x, sigma, error)

    def _pass(self, x: torch.Tensor, sigma: torch.Tensor):
        if self.target_keys is None:
            return self._first_pass(x, sigma)
        if self.graphed is not None:
            return self.graphed(x, sigma)
        _, forward = self._forward(self.target_keys)
        return loss_and_grad(lambda leaf: forward(leaf, sigma), x, self.weights)

    def _recomputes(self, x: torch.Tensor) -> int:
        """How many transformer blocks of the pass (the first ones it runs) recompute their activations in the
        backward: ``recompute`` = ``blocks`` all, ``off`` none, ``auto`` as few as keep the estimated stored
        activations within :data:`RECOMPUTE_BUDGET` of the model's weight bytes (SDXL at 1024 px: about two
        thirds of them; SD1.5 at 512 px: none)."""
        dtype = getattr(self.base, "manual_cast_dtype", None) or self.base.get_dtype()
        stored = self.reader.stored_block_bytes(self.keys, x.shape[0], dtype.itemsize)
        weights = sum(p.nbytes for p in self.base.diffusion_model.parameters())
        n = recompute_count(self.params.recompute, stored, weights)
        log.debug("%s: a stored gradient pass keeps about %.2f GiB; %d of its %d transformer blocks recomputed",
                  self.params.node, sum(stored) / 2**30, n, len(stored))
        return n

    def _weights(self, by_reference: bool) -> AutogradWeights:
        return AutogradWeights([self.base, *_control_modules(self.subjects.cond)], swap=not self._hooked(),
                               by_reference=by_reference)

    def _first_pass(self, x: torch.Tensor, sigma: torch.Tensor):
        """Where :meth:`graph_blockers` allows: replays the graph kept from an earlier run with the same key, or
        runs on a side stream as the warm-up of the CUDA graph captured right after it (and kept)."""
        self.weights = self._weights(self.params.weights_by_reference)
        self.recompute = self._recomputes(x)
        blockers = self.graph_blockers(x)
        key = None if blockers or self.patcher is None else graph_cache.pass_key(self, x)
        fingerprint = None if key is None else graph_cache.weights_fingerprint(self.base)
        cache = graph_cache.find_cache(self.patcher) if fingerprint is not None else None
        kept = cache.take(key, fingerprint) if cache is not None else None
        if kept is not None:
            return self._replay_kept(kept, x, sigma)
        self.cond = _conds_on(self.subjects.cond, x.device, own=fingerprint is not None)
        _, forward = self._forward(self.keys)
        run_pass = functools.partial(loss_and_grad, lambda leaf: forward(leaf, sigma), x, self.weights)
        if blockers:
            out = run_pass()
        else:
            try:
                out = self.graph_backend.warm_up(run_pass)
            except (NoGradientError, torch.OutOfMemoryError):
                raise
            except RuntimeError as e:  # the side-stream run failed: this run keeps eager passes (a model error recurs)
                log.warning("%s: CUDA graph warm-up failed, running the pass eagerly: %s: %s", self.params.node,
                            type(e).__name__, e)
                blockers, out = ["the warm-up failed"], run_pass()
        self.target_keys = list(self.keys)
        log.debug("%s: A&E reads %s", self.params.node, [layer_label(k) for k in self.target_keys])
        if blockers:
            log.info("%s: gradient passes run eagerly (no CUDA graph): %s", self.params.node, "; ".join(blockers))
        elif self.target_keys:
            self._capture_graph(x, sigma, None if fingerprint is None else (key, fingerprint))
        return out

    def _replay_kept(self, kept: graph_cache.CachedPass, x: torch.Tensor, sigma: torch.Tensor):
        graph_cache.refill(kept.cond, self.subjects.cond)
        self.cond, self.graphed, self.target_keys = kept.cond, kept.graphed, list(self.keys)
        self.graph_used = self.graph_reused = True
        log.info("%s: the gradient passes replay the CUDA graph kept from an earlier run", self.params.node)
        return self.graphed(x, sigma)

    def _capture_graph(self, x: torch.Tensor, sigma: torch.Tensor, keep: tuple | None) -> None:
        """Capture the pass; ``keep``: ``(key, weights fingerprint)`` under which the model keeps it for later runs."""
        graphed = GraphedPass(self._forward(self.target_keys)[1], self.weights, self.graph_backend)
        try:
            captured = graphed.capture(x, sigma)
        except torch.OutOfMemoryError as e:
            error = first_line(e)
        else:
            error = None
        if error is not None:  # the first pass's result stands; the passes run eagerly from here
            del graphed
            log.warning("%s: the CUDA graph capture ran out of memory (%s); A&E frees it and the gradient passes run "
                        "eagerly", self.params.node, error)
            self.release(passes=False)
        elif captured:
            self.graphed, self.graph_used = graphed, True
            cache = graph_cache.ensure_cache(self.patcher) if keep is not None else None
            if cache is not None:
                cache.keep(graph_cache.CachedPass(*keep, graphed, self.cond))
        else:
            log.warning("%s: CUDA graph capture failed, gradient passes run eagerly: %s", self.params.node,
                        graphed.failure)

    def _retry_eagerly(self, x: torch.Tensor, sigma: torch.Tensor, error: str):
        """The lean form of a pass that ran out of memory: after :meth:`release`, an eager pass on weight aliases
        (no graph pool, no weight copies); raises :class:`GradientPassOutOfMemory` if that runs out of memory too."""
        log.warning("%s: the gradient pass ran out of memory (%s); A&E frees its CUDA graph and weight stand-ins and "
                    "retries it eagerly", self.params.node, error)
        self.retries += 1
        self.release()
        keys = self.keys if self.target_keys is None else self.target_keys
        self.recompute = len(self.reader.recomputed_blocks(keys))
        try:
            self.cond, self.weights = _conds_on(self.subjects.cond, x.device), self._weights(by_reference=True)
            _, forward = self._forward(keys)
            out = loss_and_grad(lambda leaf: forward(leaf, sigma), x, self.weights)
        except torch.OutOfMemoryError as e:
            error = first_line(e)
        else:
            self.target_keys = list(keys)
            return out
        self.release()
        raise GradientPassOutOfMemory(out_of_memory_message(self.params.node, tuple(x.shape),
                                                            self.params.attention_blocks, self.target_hw,
                                                            self.reader.finest_encoder_side(x.shape[-2:]), error,
                                                            self.reader.joint_name))

    def release(self, passes: bool = True) -> None:
        """Free what A&E holds for the gradient passes: the graph and its memory pool (also the one the model keeps
        for later runs), with ``passes`` the weight stand-ins and conds too; then empty ComfyUI's cache."""
        if passes:
            self.close()
        cache = graph_cache.find_cache(self.patcher)
        if cache is not None:
            cache.release()
        comfy.model_management.soft_empty_cache()

    def close(self) -> None:
        """Drop what only this run's passes need (its references to the graph, weight stand-ins); idempotent. A graph
        kept with the model stays there."""
        self.graphed, self.weights, self.cond = None, None, None

    # ---- when a CUDA graph may replay the pass ----

    def _hooked(self) -> bool:
        """Hook keyframes may re-patch weights inside ``calc_cond_batch``."""
        return bool(getattr(self.base.current_patcher, "hook_patches", None)) or "hooks" in self.subjects.cond

    def graph_blockers(self, x: torch.Tensor) -> list[str]:
        """Why this run's gradient pass must not be replayed from a CUDA graph (empty: it may).

        A graph replays the kernels of one pass on the same memory: everything that decides on the host per step
        (ControlNet, hook keyframes, timestep ranges, other nodes' patches and wrappers) or moves weights (casting
        on the fly, low-VRAM loading) would be frozen at the captured step, so such runs keep eager passes."""
        out, cond = [], self.subjects.cond
        if not self.params.cuda_graph:
            out.append("cuda_graph is off")
        if self.reader.joint_name is not None:
            out.append(f"{self.reader.joint_name} (CUDA graphs are used on UNets only)")
        device = self.graph_backend.blocker(x.device)
        if device is not None:
            out.append(device)
        if cond.get("control") is not None:
            out.append("ControlNet")
        if self._hooked():
            out.append("hooks")
        if any(k in cond for k in ("timestep_start", "timestep_end")):
            out.append("a conditioning timestep range")
        if self.weights is not None and self.weights.streamed_modules(x.device):
            out.append("weights fetched or patched on the fly (low-VRAM loading, dynamic VRAM paging, LoRA)")
        to = self.model_options.get("transformer_options", {})
        foreign = [k for k, v in to.get("patches", {}).items() if _holds_any(v)]
        foreign += [f"{k} replace" for k, v in to.get("patches_replace", {}).items() if _holds_any(v)]
        foreign += [k for k in ("wrappers", "callbacks") if _holds_any(graph_cache.others_entries(to.get(k)))]
        foreign += [k for k in ("model_function_wrapper",) if self.model_options.get(k) is not None]
        callbacks = getattr(self.base.current_patcher, "get_all_callbacks", None)
        if callbacks is not None and callbacks(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE):
            foreign.append("prepare-state callbacks")
        if foreign:
            out.append("model patches of other nodes (" + ", ".join(foreign) + ")")
        return out
