"""The Attend-and-Excite sampler: a k-diffusion-shaped sampler function that wraps any ComfyUI ``KSAMPLER``.

The wrapped sampler runs once over the whole schedule, so its multistep history, ancestral noise and SDE noise are
its own. At the first model evaluation of each guided step (found by :mod:`.sampler_steps`), the latent it is about
to evaluate gets the paper's update in place: a gradient pass, iterative refinement where the schedule asks for it,
and the step ``x <- x - alpha c(sigma)^2 grad_x L`` (:mod:`attention.step`: ``c^2 = sigma^2 + sigma_data^2`` for
EPS/v models, ``(1 - sigma)^2 + sigma^2`` for flow matching).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.samplers
import comfy.utils
import torch

from ..attention.inputs import joint_blocks_problem
from ..attention.loss import below_threshold, slot_mask
from ..attention.record import AttentionRecord
from ..attention.schedule import DEFAULT_REFINEMENT, GuidanceSchedule, build_schedule, parse_refinement
from ..attention.step import guarded_step
from ..attention.tokens import SubjectTokens
from .families import flow_matching
from .gradient_pass import GradientPasses
from .sampler_steps import GuidedModel, SamplerNotGuidable, step_starts

log = logging.getLogger(__name__)

COND_KEY = "attend_excite"
TOKEN_SLOT_MODES = ("auto", "all_but_bos_last", "prompt")
BLOCK_CHOICES = ("all", "down_mid")
RECOMPUTE_CHOICES = ("auto", "off", "blocks")


@dataclass(frozen=True)
class AEParams:
    """Attend-and-Excite parameters, named as the node inputs; defaults are the paper's (official code) values."""

    sampler_name: str = "euler"  # the sampler to wrap when no SAMPLER is connected
    guided_fraction: float = 0.5
    scale_factor: float = 20.0
    scale_start: float = 1.0
    scale_end: float = 0.5
    refinement: tuple[tuple[float, float], ...] = parse_refinement(DEFAULT_REFINEMENT)
    max_refinement_steps: int = 20
    smoothing: bool = True
    kernel_size: int = 3
    smoothing_sigma: float = 0.5
    attention_resolution: int = 0  # 0 = auto: the level at latent size / 4
    attention_blocks: str = "all"  # "down_mid": only the encoder and middle layers; the pass stops before the decoder
    joint_blocks: str = "auto"  # Flux / SD3: the joint-attention blocks read (auto = the family's default)
    token_slots: str = "auto"
    record_maps: bool = True
    cuda_graph: bool = True  # replay the gradient pass from a CUDA graph where that is safe
    recompute: str = "auto"  # UNet transformer blocks recomputed in the backward: blocks (all), off, auto (as needed)
    weights_by_reference: bool = True  # False: one weight copy per run instead of aliases (the model size again)
    node: str = field(default="AttendExciteSampler", compare=False)

    def validate(self) -> None:
        if self.sampler_name not in comfy.samplers.SAMPLER_NAMES:
            raise ValueError(f"unknown sampler_name {self.sampler_name!r}: choose one of ComfyUI's samplers.")
        if self.token_slots not in TOKEN_SLOT_MODES:
            raise ValueError(f"token_slots must be one of {TOKEN_SLOT_MODES}.")
        if self.attention_blocks not in BLOCK_CHOICES:
            raise ValueError(f"attention_blocks must be one of {BLOCK_CHOICES}.")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_CHOICES}.")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd (the paper uses 3).")
        problem = joint_blocks_problem(self.joint_blocks)
        if problem:
            raise ValueError(problem)

    def schedule(self, num_steps: int) -> GuidanceSchedule:
        return build_schedule(num_steps, self.guided_fraction, self.scale_factor, (self.scale_start, self.scale_end),
                              self.refinement)


@dataclass(frozen=True)
class RunSubjects:
    """The positive cond that carries the subjects, their key indices and the key slots of the re-softmax."""

    cond: dict
    spec: SubjectTokens
    slots: torch.Tensor

    @property
    def indices(self) -> tuple[int, ...]:
        return self.spec.indices


def run_subjects(guider, params: AEParams) -> RunSubjects:
    positive = [c for c in guider.conds.get("positive", []) if COND_KEY in c]
    if not positive:
        raise ValueError("positive: the conditioning carries no subject tokens. Encode the prompt with "
                         "AttendExciteTextEncode and connect it as positive.")
    if len(positive) > 1:
        log.warning("%s: %d positive conds carry subjects; the first one drives the guidance", params.node,
                    len(positive))
    spec: SubjectTokens = positive[0][COND_KEY]
    mode = params.token_slots
    if mode == "auto":
        mode = "prompt" if spec.family in ("h", "t5xxl") else "all_but_bos_last"
    return RunSubjects(positive[0], spec, slot_mask(spec.num_keys, mode, spec.prompt_positions))


class PassProgress:
    """Moves the node's progress bar during a guided step's gradient passes (refinement can take minutes on small
    GPUs): within step ``i`` of ``n`` the bar goes from ``i/n`` towards ``(i+1)/n`` in ``max_refinement_steps + 2``
    parts (the most passes a step takes); the sampler's own step reports then continue it as for plain sampling."""

    def __init__(self, num_steps: int, max_refinement_steps: int) -> None:
        self.parts = max_refinement_steps + 2
        self.bar = comfy.utils.ProgressBar(num_steps * self.parts)

    def __call__(self, step: int, passes: int) -> None:
        self.bar.update_absolute(step * self.parts + min(passes, self.parts - 1))


# ---- the paper's steps (Algorithm 1), at one guided step ----

@dataclass
class GuidedStep:
    """What the update of one guided step needs: the run's passes, the step size and where it is taken."""

    passes: GradientPasses
    params: AEParams
    record: AttentionRecord | None
    alpha: float
    sigma: torch.Tensor  # 0-dim
    sigma_data: float
    flow: bool  # flow-matching model (Flux, SD3): the step's flow scale (attention.step)
    index: int
    progress: PassProgress
    count: int = 0  # gradient passes taken
    skipped: torch.Tensor | bool = False  # (B,) bool once updated: samples whose update was skipped as not finite

    def gradient_pass(self, x: torch.Tensor):
        """Loss ``(B,)``, per-subject maxima ``(B, S)`` and ``dL/dx`` at ``x``."""
        out = self.passes(x, self.sigma)
        self.count += 1
        if self.record is not None:
            self.record.add_loss(self.index, out[0])
        self.progress(self.index, self.count)
        return out

    def update(self, x: torch.Tensor, grad: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``z <- z - alpha grad_z L`` in ComfyUI's x-space, for the samples in ``moving`` ``(B,)`` whose step is
        finite (the others keep ``x`` and are marked in ``skipped``)."""
        x, skipped = guarded_step(x, grad, self.alpha * moving.float(), self.sigma, self.sigma_data, self.flow)
        self.skipped = skipped | self.skipped
        return x


def refine(step: GuidedStep, x: torch.Tensor, loss, maxima, grad, threshold: float):
    """Iterative refinement: step while a subject's max attention is below ``threshold``, up to
    ``max_refinement_steps``; a sample that reached it stops moving. Returns ``x`` and the pass at it."""
    running = below_threshold(maxima, threshold)
    taken = 0
    while bool(running.any()):
        taken += 1
        x = step.update(x, grad, running & (loss != 0))
        running = running & below_threshold(maxima, threshold) & ~step.skipped  # a skipped sample stops
        if taken >= step.params.max_refinement_steps or not bool(running.any()):
            break
        new = step.gradient_pass(x)
        keep = running.to(new[0].device)
        loss, maxima, grad = (torch.where(keep.reshape(-1, *[1] * (old.ndim - 1)), n, old)
                              for n, old in zip(new, (loss, maxima, grad)))
    return x, (step.gradient_pass(x) if taken else (loss, maxima, grad))


def attend_and_excite(step: GuidedStep, x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """One guided step: gradient pass, refinement where the schedule has a threshold, update."""
    loss, maxima, grad = step.gradient_pass(x)
    if threshold is not None:
        x, (loss, maxima, grad) = refine(step, x, loss, maxima, grad, threshold)
    if log.isEnabledFor(logging.DEBUG):  # loss.tolist() syncs: only when it is logged
        log.debug("%s: step %d loss %s", step.params.node, step.index, loss.tolist())
    x = step.update(x, grad, loss != 0)
    if step.record is not None:
        step.record.add_skipped(step.index, step.skipped)
    return x


# ---- the sampler function ----

@torch.no_grad()
def sample_attend_excite(model, x, sigmas, extra_args=None, callback=None, disable=None,
                         ae_params: AEParams = AEParams(), ae_sampler=None, ae_record: AttentionRecord | None = None,
                         ae_graph_backend=None):
    """Attend-and-Excite (Chefer et al. 2023) inside one run of ``ae_sampler`` (a ``KSAMPLER``; default: the one
    named by ``ae_params.sampler_name``). ``ae_graph_backend``: what captures and replays CUDA graphs (default
    :class:`~attention.guidance.CudaGraphBackend`; tests pass a stand-in that replays on a CPU)."""
    params, record = ae_params, ae_record
    sampler = ae_sampler if ae_sampler is not None else comfy.samplers.sampler_object(params.sampler_name)
    extra_args = {} if extra_args is None else dict(extra_args)
    sched = params.schedule(len(sigmas) - 1)
    passes = start_run(model, x, sigmas, extra_args, params, record, sched, ae_graph_backend)
    x = x.clone()  # the sampler's latent is edited in place: never the caller's tensor
    run = GuidedRun(passes, params, record, sched)
    guided = run.guide(model, sampler, x, sigmas, extra_args, ae_sampler is None) if sched.guided_steps else model
    try:
        x = sampler.sampler_function(guided, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                     **sampler.extra_options)
    finally:  # also on error or interrupt
        passes.close()
    run.finish()
    return x


def start_run(model, x, sigmas, extra_args: dict, params: AEParams, record: AttentionRecord | None,
              sched: GuidanceSchedule, graph_backend) -> GradientPasses:
    """The run's gradient passes; resets ``record`` and, when maps are recorded, puts the recorder's patches into
    ``extra_args``' model options (a copy)."""
    subjects = run_subjects(model.inner_model, params)
    latent_hw = tuple(x.shape[-2:])
    passes = GradientPasses(model.inner_model.inner_model, subjects, params, extra_args.get("model_options", {}),
                            graph_backend, latent_hw=latent_hw)
    if record is not None:
        record.reset(subjects=subjects.indices, labels=subjects.spec.labels, slots=subjects.slots,
                     smoothing=params.smoothing, kernel_size=params.kernel_size,
                     smoothing_sigma=params.smoothing_sigma, num_steps=sched.num_steps,
                     guided_steps=sched.guided_steps)
        if params.record_maps:
            extra_args["model_options"] = passes.recording_options(passes.map_recorder(record, sigmas.tolist()))
    return passes


@dataclass
class GuidedRun:
    """The guided steps of one run: which model calls begin them, and the update at each."""

    passes: GradientPasses
    params: AEParams
    record: AttentionRecord | None
    sched: GuidanceSchedule
    count: int = 0  # gradient passes taken
    skipped: torch.Tensor | int = 0  # (B,) per sample, guided steps whose update was skipped (on the device)

    def guide(self, model, sampler, x, sigmas, extra_args: dict, by_name: bool) -> GuidedModel:
        """``model`` with the A&E update at the first evaluation of each guided step of ``sampler``."""
        name = self.params.sampler_name if by_name else _label(sampler)
        try:
            starts = step_starts(sampler, model, x, sigmas, extra_args, self.sched.guided_steps, name)
        except SamplerNotGuidable as e:
            raise ValueError(f"{e}. Choose another sampler (e.g. dpmpp_2m, euler_ancestral) or set scale_factor "
                             f"to 0.") from None
        sampling = model.inner_model.inner_model.model_sampling
        sigma_data, flow = float(getattr(sampling, "sigma_data", 1.0)), flow_matching(sampling)
        progress = PassProgress(self.sched.num_steps, self.params.max_refinement_steps)

        def edit(i: int, latent: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            step = GuidedStep(self.passes, self.params, self.record, self.sched.step_sizes[i], sigma.reshape(-1)[0],
                              sigma_data, flow, i, progress)
            out = attend_and_excite(step, latent, self.sched.refinement.get(i))
            self.count += step.count
            self.skipped = self.skipped + step.skipped
            if i == self.sched.guided_steps - 1:
                self.passes.close()  # weight stand-ins go before the unguided steps (a graph kept with the model stays)
            return out

        return GuidedModel(model, starts, edit, name)

    def finish(self) -> None:
        if self.sched.guided_steps:
            p = self.passes
            how = (" (CUDA graph kept from an earlier run)" if p.graph_reused else " (CUDA graph)") * p.graph_used
            if p.recompute:
                how += f", {p.recompute} transformer blocks recomputed in the backward"
            log.info("%s: %d guided steps, %d gradient passes%s", self.params.node, self.sched.guided_steps,
                     self.count, how, extra={"ae_passes": self.count, "ae_graphed": p.graph_used,
                                             "ae_graph_reused": p.graph_reused, "ae_retries": p.retries,
                                             "ae_recomputed": p.recompute})
            _warn_skipped(self.params.node, self.skipped)
        if self.record is not None:
            self.record.finish()


def _warn_skipped(node: str, skipped) -> None:
    """One warning per run for the images whose A&E update was skipped at some guided step as not finite."""
    counts = skipped.tolist() if isinstance(skipped, torch.Tensor) else []
    for b, n in enumerate(counts):
        if n:
            log.warning("%s: image %d: the A&E update of %d guided step(s) was not finite (NaN/inf: fp16 overflow "
                        "with a large scale_factor, or a degenerate attention map) and was skipped; that image "
                        "kept the unguided latent there. Lower scale_factor if this recurs.", node, b + 1, n,
                        extra={"ae_skipped": counts})


def _label(sampler) -> str:
    name = getattr(sampler.sampler_function, "__name__", "")
    return name.removeprefix("sample_") or "the wrapped sampler"


def make_sampler(params: AEParams, record: AttentionRecord | None,
                 sampler: comfy.samplers.Sampler | None = None) -> comfy.samplers.KSAMPLER:
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced: A&E around ``sampler`` (a ``KSAMPLER``, e.g. from
    KSamplerSelect or SamplerDPMPP_2M_SDE) or, when none is given, around ``params.sampler_name``."""
    params.validate()
    inner = sampler if sampler is not None else comfy.samplers.sampler_object(params.sampler_name)
    if not isinstance(inner, comfy.samplers.KSAMPLER):
        raise ValueError(f"sampler: A&E wraps k-diffusion samplers (KSAMPLER: every core sampler node makes one); "
                         f"got {type(inner).__name__}. Connect a KSamplerSelect or a core sampler node instead.")
    return comfy.samplers.KSAMPLER(sample_attend_excite,
                                   extra_options={"ae_params": params, "ae_sampler": sampler, "ae_record": record},
                                   inpaint_options=getattr(inner, "inpaint_options", {}))
