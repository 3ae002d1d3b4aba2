"""The Attend-and-Excite sampler: a k-diffusion-shaped sampler function that wraps any ComfyUI sampler.

During the guided steps it takes the A&E gradient step on the latent (cond-only pass through ComfyUI's own
``calc_cond_batch``, so LoRA, ControlNet and model patches apply), then lets the wrapped sampler take one step;
after the guided steps the wrapped sampler runs the rest of the schedule in one call.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..attention.guidance import AutogradWeights, CudaGraphBackend, GraphedPass, loss_and_grad
from ..attention.loss import ae_loss, slot_mask, subject_max_attention
from ..attention.record import AttentionRecord
from ..attention.schedule import DEFAULT_REFINEMENT, build_schedule, parse_refinement
from ..attention.step import x_space_step
from ..attention.tokens import SubjectTokens
from .capture import GradCapture, LayerKey, MapRecorder, StopForward, attn2_keys, layer_name

log = logging.getLogger(__name__)

COND_KEY = "attend_excite"
TOKEN_SLOT_MODES = ("auto", "all_but_bos_last", "prompt")
BLOCK_CHOICES = ("all", "down_mid")


@dataclass(frozen=True)
class AEConfig:
    """Attend-and-Excite parameters; defaults are the paper's (official code) values."""

    sampler_name: str = "euler"
    guided_fraction: float = 0.5
    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    refinement: tuple[tuple[float, float], ...] = parse_refinement(DEFAULT_REFINEMENT)
    max_refinement_steps: int = 20
    smooth: bool = True
    kernel_size: int = 3
    sigma: float = 0.5
    attention_resolution: int = 0  # 0 = auto: the level at latent size / 4
    attention_blocks: str = "all"  # "down_mid": only the encoder and middle layers; the pass stops before the decoder
    token_slots: str = "auto"
    record_maps: bool = True
    weights_by_reference: bool = True  # False: one weight copy per run instead of aliases (the model size again)
    cuda_graph: bool = True  # replay the gradient pass from a CUDA graph where that is safe (see _Run.graph_blockers)
    node: str = field(default="AttendExciteSampler", compare=False)

    def validate(self) -> None:
        if self.sampler_name not in comfy.samplers.SAMPLER_NAMES:
            raise ValueError(f"{self.node}: unknown sampler {self.sampler_name!r}.")
        if self.token_slots not in TOKEN_SLOT_MODES:
            raise ValueError(f"{self.node}: token_slots must be one of {TOKEN_SLOT_MODES}.")
        if self.attention_blocks not in BLOCK_CHOICES:
            raise ValueError(f"{self.node}: attention_blocks must be one of {BLOCK_CHOICES}.")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{self.node}: kernel_size must be odd (the paper uses 3).")


def _level(side: int, ds: int) -> int:
    while ds > 1:
        side, ds = math.ceil(side / 2), ds // 2
    return side


def target_resolution(latent_hw: tuple[int, int], resolution: int, node: str) -> tuple[int, int]:
    """Map side of the attention level to use: ``auto`` (0) = latent / 4, else the level whose longer side is
    ``resolution``."""
    h, w = latent_hw
    levels = [(_level(h, 2**k), _level(w, 2**k)) for k in range(7)]
    if resolution == 0:
        return levels[2]
    for hw in levels:
        if max(hw) == resolution:
            return hw
    raise ValueError(f"{node}: attention_resolution {resolution} does not exist for a {h}x{w} latent; levels are "
                     f"{sorted({max(x) for x in levels}, reverse=True)}. Use one of them or 0 (auto).")


def select_blocks(keys: list[LayerKey], blocks: str) -> list[LayerKey]:
    """The cross-attention layers whose maps may feed the loss: ``all``, or ``down_mid`` (encoder and middle
    block only, so the gradient pass never runs the decoder)."""
    if blocks == "down_mid":
        return [k for k in keys if k[0] != "output"]
    return list(keys)


def _control_modules(conds: list[dict]) -> list[torch.nn.Module]:
    mods = []
    for c in conds:
        ctrl = c.get("control")
        while ctrl is not None:
            for attr in ("control_model", "t2i_model"):
                m = getattr(ctrl, attr, None)
                if isinstance(m, torch.nn.Module):
                    mods.append(m)
            ctrl = getattr(ctrl, "previous_controlnet", None)
    return mods


class _Run:
    """State of one sampling run (created per call of the sampler function; nothing outlives it)."""

    def __init__(self, model, x: torch.Tensor, sigma_values: list[float], extra_args: dict, cfg: AEConfig,
                 record: AttentionRecord | None, graph_backend=None) -> None:
        self.cfg = cfg
        self.graph_backend = graph_backend if graph_backend is not None else CudaGraphBackend()
        guider = model.inner_model
        self.base = guider.inner_model
        positive = [c for c in guider.conds.get("positive", []) if COND_KEY in c]
        if not positive:
            raise ValueError(f"{cfg.node}: the positive conditioning carries no subject tokens. Encode the prompt "
                             f"with AttendExciteTextEncode and connect it as positive.")
        if len(positive) > 1:
            log.warning("%s: %d positive conds carry subjects; the first one drives the guidance", cfg.node,
                        len(positive))
        self.cond = positive[0]
        self.spec: SubjectTokens = self.cond[COND_KEY]
        mode = cfg.token_slots
        if mode == "auto":
            mode = "prompt" if self.spec.family == "h" else "all_but_bos_last"
        self.slots = slot_mask(self.spec.num_keys, mode, self.spec.prompt_positions)
        self.model_options = extra_args.get("model_options", {})
        self.target_hw = target_resolution(tuple(x.shape[-2:]), cfg.attention_resolution, cfg.node)
        replaced = self.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        self.keys: list[LayerKey] = []
        for key in select_blocks(attn2_keys(self.base.diffusion_model), cfg.attention_blocks):
            if key in replaced or key[:2] in replaced:
                log.warning("%s: attn2 of %s is already replaced by another node; A&E leaves it alone and does "
                            "not read its map", cfg.node, layer_name(key))
            else:
                self.keys.append(key)
        self.target_keys: list[LayerKey] | None = None
        self.weights: AutogradWeights | None = None  # made at the first gradient pass (plain runs copy nothing)
        self.graphed: GraphedPass | None = None  # captured after the first gradient pass where graph_blockers allows
        self.pass_cond: dict | None = None  # self.cond with its model inputs on the model's device
        self.recorder = None if record is None else MapRecorder(record, self.target_hw, sigma_values,
                                                                comfy_attention.optimized_attention, _precision)

    def _options(self, patch_for, keys, grad: bool = False) -> dict:
        mo = dict(self.model_options)
        mo["transformer_options"] = dict(mo.get("transformer_options", {}))
        if grad and self.cond.get("control") is not None:
            patches = dict(mo["transformer_options"].get("patches", {}))
            patches["input_block_patch_after_skip"] = [*patches.get("input_block_patch_after_skip", []),
                                                       _clone_after_skip]
            mo["transformer_options"]["patches"] = patches
        for key in keys:
            mo = comfy.model_patcher.set_model_options_patch_replace(mo, patch_for(key), "attn2", *key)
        return mo

    def recording_options(self) -> dict:
        return self._options(self.recorder.patch, self.target_keys or self.keys)

    def _pass_forward(self, keys: list[LayerKey]):
        """``(capture, forward)``: ``forward(leaf, sigma) -> (loss (B,), maxima (B, S))`` is the cond-only pass through
        ``calc_cond_batch`` on ``pass_cond`` with ``capture``'s patches on ``keys``, stopped after the last of them."""
        capture = GradCapture(self.target_hw, keys[-1] if keys else None, comfy_attention.optimized_attention,
                              _precision)
        mo = self._options(capture.patch, keys, grad=True)
        cfg, cond = self.cfg, self.pass_cond

        def forward(leaf: torch.Tensor, sigma: torch.Tensor):
            try:
                comfy.samplers.calc_cond_batch(self.base, [[cond]], leaf, sigma * leaf.new_ones(leaf.shape[0]), mo)
            except StopForward:
                pass
            if not capture.maps:
                seen = sorted({f"{h}x{w}" for h, w in capture.seen.values()})
                raise ValueError(f"{cfg.node}: no cross-attention layer works at {self.target_hw[0]}x"
                                 f"{self.target_hw[1]}; this model has {seen}. Set attention_resolution to one "
                                 f"of those sides.")
            m = subject_max_attention(capture.aggregate(), self.spec.indices, self.slots, smooth=cfg.smooth,
                                      kernel_size=cfg.kernel_size, sigma=cfg.sigma)
            return ae_loss(m), m

        return capture, forward

    def _hooked(self) -> bool:
        """Hook keyframes may re-patch weights inside ``calc_cond_batch``."""
        return bool(getattr(self.base.current_patcher, "hook_patches", None)) or "hooks" in self.cond

    def graph_blockers(self, x: torch.Tensor) -> list[str]:
        """Why this run's gradient pass must not be replayed from a CUDA graph (empty: it may).

        A graph replays the kernels of one pass on the same memory: everything that decides on the host per step
        (ControlNet, hook keyframes, timestep ranges, other nodes' patches and wrappers) or moves weights (casting
        on the fly, low-VRAM loading) would be frozen at the captured step, so such runs keep eager passes."""
        out = []
        if not self.cfg.cuda_graph:
            out.append("cuda_graph is off")
        device = self.graph_backend.blocker(x.device)
        if device is not None:
            out.append(device)
        if self.cond.get("control") is not None:
            out.append("ControlNet")
        if self._hooked():
            out.append("hooks")
        if any(k in self.cond for k in ("timestep_start", "timestep_end")):
            out.append("a conditioning timestep range")
        if self.weights is not None and self.weights.cast_modules:
            out.append("weights cast on the fly (low-VRAM loading, LoRA or manual casting)")
        to = self.model_options.get("transformer_options", {})
        foreign = [k for k, v in to.get("patches", {}).items() if _holds_any(v)]
        foreign += [f"{k} replace" for k, v in to.get("patches_replace", {}).items() if _holds_any(v)]
        foreign += [k for k in ("wrappers", "callbacks") if _holds_any(to.get(k))]
        foreign += [k for k in ("model_function_wrapper",) if self.model_options.get(k) is not None]
        callbacks = getattr(self.base.current_patcher, "get_all_callbacks", None)
        if callbacks is not None and callbacks(comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE):
            foreign.append("prepare-state callbacks")
        if foreign:
            out.append("model patches of other nodes (" + ", ".join(foreign) + ")")
        return out

    def end_guidance(self) -> bool:
        """Drop what only the gradient passes need (the graph and its memory pool, weight copies in copy mode) before
        the unguided rest of the schedule. Returns whether the passes were replayed from a graph."""
        graphed = self.graphed is not None and self.graphed.graph is not None
        self.graphed, self.weights, self.pass_cond = None, None, None
        return graphed

    def gradient_pass(self, x: torch.Tensor, sigma: torch.Tensor):
        """Loss ``(B,)``, maxima ``(B, S)`` and ``dL/dx`` at ``x``.

        The first pass also finds the target layers and, where :meth:`graph_blockers` allows, runs on a side stream
        as the warm-up of the CUDA graph captured right after it (the target layers' pass): every later pass of the
        run is a replay."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.graphed is not None:
            return self.graphed(x, sigma)
        first = self.target_keys is None
        keys = self.keys if first else self.target_keys
        if self.pass_cond is None:
            self.pass_cond = _conds_on(self.cond, x.device)
        capture, forward = self._pass_forward(keys)
        if self.weights is None:
            self.weights = AutogradWeights([self.base, *_control_modules([self.cond])], swap=not self._hooked(),
                                           by_reference=self.cfg.weights_by_reference)
        blockers = self.graph_blockers(x) if first else None
        run_pass = functools.partial(loss_and_grad, lambda leaf: forward(leaf, sigma), x, self.weights)
        if first and not blockers:
            try:
                out = self.graph_backend.warm_up(run_pass)
            except RuntimeError as e:  # the side-stream run failed: this run keeps eager passes (a model error recurs)
                log.warning("%s: CUDA graph warm-up failed, running the pass eagerly: %s: %s", self.cfg.node,
                            type(e).__name__, e)
                blockers = ["the warm-up failed"]
                out = run_pass()
        else:
            out = run_pass()
        if first:
            self.target_keys = [k for k in keys if capture.seen.get(k) == self.target_hw]
            log.debug("%s: A&E reads %s", self.cfg.node, [layer_name(k) for k in self.target_keys])
            if blockers:
                log.info("%s: gradient passes run eagerly (no CUDA graph): %s", self.cfg.node, "; ".join(blockers))
            elif self.target_keys:
                self._capture_graph(x, sigma)
        return out

    def _capture_graph(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """Capture the target layers' pass (the first pass, just run on the side stream, was its warm-up)."""
        graphed = GraphedPass(self._pass_forward(self.target_keys)[1], self.weights, self.graph_backend)
        if graphed.capture(x, sigma):
            self.graphed = graphed
        else:
            log.warning("%s: CUDA graph capture failed, gradient passes run eagerly: %s", self.cfg.node,
                        graphed.failure)


def _precision(attn_precision, dtype):
    """A layer's attention precision after ComfyUI's ``--force-upcast-attention`` / ``--dont-upcast-attention``."""
    resolve = getattr(comfy_attention, "get_attn_precision", None)
    return attn_precision if resolve is None else resolve(attn_precision, dtype)


def _holds_any(v) -> bool:
    """Whether a (nested) patch registry holds anything: empty dicts and lists inside do not count."""
    if isinstance(v, dict):
        return any(_holds_any(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_any(x) for x in v)
    return v is not None


def _conds_on(cond: dict, device: torch.device) -> dict:
    """A copy of ``cond`` whose model inputs already live on ``device`` (made once per run): the text encoder leaves
    them on the CPU, and a copy to the GPU inside each pass waits for the queued work (and cannot be captured in a
    graph). The cond objects are copied, never changed."""
    model_conds = {}
    for name, c in cond.get("model_conds", {}).items():
        t = getattr(c, "cond", None)
        if isinstance(t, torch.Tensor) and t.device != device:
            c = copy.copy(c)
            c.cond = t.to(device)
        model_conds[name] = c
    return {**cond, "model_conds": model_conds}


def _clone_after_skip(h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """The UNet adds ControlNet residuals to the stored skip tensors in place (``h += ctrl``), which autograd rejects
    when the next block saved the same tensor for backward. Feeding the next block a clone keeps the graph valid."""
    return h.clone()


def _shift(callback, offset: int):
    if callback is None:
        return None
    return lambda d: callback({**d, "i": d["i"] + offset})


@torch.no_grad()
def sample_attend_excite(model, x, sigmas, extra_args=None, callback=None, disable=None,
                         ae_config: AEConfig = AEConfig(), ae_record: AttentionRecord | None = None,
                         ae_graph_backend=None):
    """Attend-and-Excite (Chefer et al. 2023) around the ComfyUI sampler ``ae_config.sampler_name``.

    ``ae_graph_backend``: what captures and replays CUDA graphs (default :class:`CudaGraphBackend`; tests pass a
    stand-in that replays on a CPU)."""
    extra_args = {} if extra_args is None else extra_args
    cfg = ae_config
    base = comfy.samplers.sampler_object(cfg.sampler_name)
    n = len(sigmas) - 1
    sched = build_schedule(n, cfg.guided_fraction, cfg.scale_factor, cfg.scale_range, cfg.refinement)
    sigma_values = sigmas.tolist()  # one host sync here instead of one per guided step
    run = _Run(model, x, sigma_values, extra_args, cfg, ae_record if cfg.record_maps else None, ae_graph_backend)
    if ae_record is not None:
        ae_record.reset(subjects=run.spec.indices, labels=run.spec.labels, slots=run.slots, smooth=cfg.smooth,
                        kernel_size=cfg.kernel_size, sigma=cfg.sigma, num_steps=n, guided_steps=sched.guided_steps)
    ms = run.base.model_sampling
    sigma_data = float(getattr(ms, "sigma_data", 1.0))
    seed = extra_args.get("seed")
    passes = 0
    debug = log.isEnabledFor(logging.DEBUG)  # loss.tolist() in a log call would sync even when not logged

    def args_for(i: int) -> dict:
        ea = dict(extra_args)
        if seed is not None and i > 0:
            ea["seed"] = seed + i  # split calls must not replay the same ancestral noise
        if run.recorder is not None:
            ea["model_options"] = run.recording_options()
        return ea

    try:
        for i in range(sched.guided_steps):
            sigma = sigmas[i]
            if sigma_values[i] <= 0:
                break
            alpha = sched.step_sizes[i]
            loss, maxima, grad = run.gradient_pass(x, sigma)
            passes += 1
            if ae_record is not None:
                ae_record.add_loss(i, loss)
            thr = sched.refinement.get(i)
            if thr is not None:
                target = max(0.0, 1.0 - thr)
                running = loss > target
                iters = 0
                while bool(running.any()):
                    iters += 1
                    x = x_space_step(x, grad, alpha * (running & (loss != 0)).float(), sigma, sigma_data)
                    running = running & (loss > target)
                    if iters >= cfg.max_refinement_steps or not bool(running.any()):
                        break
                    new_loss, new_max, new_grad = run.gradient_pass(x, sigma)
                    passes += 1
                    keep = running.to(new_loss.device)
                    loss = torch.where(keep, new_loss, loss)
                    grad = torch.where(keep.reshape(-1, *[1] * (grad.ndim - 1)), new_grad, grad)
                    if ae_record is not None:
                        ae_record.add_loss(i, new_loss)
                if iters:
                    loss, maxima, grad = run.gradient_pass(x, sigma)
                    passes += 1
                    if ae_record is not None:
                        ae_record.add_loss(i, loss)
                    if debug:
                        log.debug("%s: step %d refinement %d iterations, loss %s", cfg.node, i, iters, loss.tolist())
            x = x_space_step(x, grad, alpha * (loss != 0).float(), sigma, sigma_data)
            if debug:
                log.debug("%s: step %d loss %s", cfg.node, i, loss.tolist())
            x = base.sampler_function(model, x, sigmas[i:i + 2], extra_args=args_for(i), callback=_shift(callback, i),
                                      disable=disable, **base.extra_options)
    finally:  # the graph pool and weight copies go before the unguided steps, also on error or interrupt
        graphed = run.end_guidance()
    start = min(sched.guided_steps, n)
    if start < n:
        x = base.sampler_function(model, x, sigmas[start:], extra_args=args_for(start),
                                  callback=_shift(callback, start), disable=disable, **base.extra_options)
    if sched.guided_steps:
        log.info("%s: %d guided steps, %d gradient passes%s", cfg.node, sched.guided_steps, passes,
                 " (CUDA graph)" if graphed else "", extra={"ae_passes": passes, "ae_graphed": graphed})
    if ae_record is not None:
        ae_record.finish()
    return x


def make_sampler(cfg: AEConfig, record: AttentionRecord | None) -> comfy.samplers.KSAMPLER:
    """A SAMPLER object for SamplerCustom / SamplerCustomAdvanced."""
    cfg.validate()
    inner = comfy.samplers.sampler_object(cfg.sampler_name)
    return comfy.samplers.KSAMPLER(sample_attend_excite, extra_options={"ae_config": cfg, "ae_record": record},
                                   inpaint_options=getattr(inner, "inpaint_options", {}))
