"""Where a wrapped sampler's steps begin, so that A&E can edit the sampler's own latent inside one run of it.

A&E runs the wrapped sampler once over the whole schedule (its multistep history, ancestral noise and Brownian SDE
noise stay its own) and updates the latent in place at the first model evaluation of each guided step. Which model
call that is depends on the sampler: heun, dpm_2, dpmpp_2s_ancestral and dpmpp_sde evaluate twice per step, and the
second evaluation of step ``i`` happens at (or near) step ``i + 1``'s sigma. :func:`step_starts` finds out by a dry run
of the sampler with a stand-in model that costs no network evaluation: the first evaluation of step ``i`` is the
last model call before the sampler reports step ``i`` (its callback) whose sigma is the one that report names.

Samplers that choose their steps from the model's output (dpm_adaptive), take their own steps instead of the
schedule's (dpm_fast) or do not name the sigma of a step (uni_pc, whose evaluation of a step is at a predicted
latent that its corrector then replaces) cannot be guided this way: :class:`SamplerNotGuidable` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SamplerNotGuidable(ValueError):
    """The wrapped sampler's steps cannot be told apart from its model calls (see the module docstring)."""


@dataclass
class _DryRun:
    calls: list[float] = field(default_factory=list)  # sigma of each model call
    reports: list[tuple[int, float | None]] = field(default_factory=list)  # (calls so far, sigma) per callback


def _first_float(v) -> float | None:
    if v is None:
        return None
    return float(v.reshape(-1)[0]) if isinstance(v, torch.Tensor) else float(v)


class _StandIn:
    """The sampler's model for a dry run: ``denoised = scale * x``, and the post-CFG functions the sampler itself
    installed (CFG++ samplers read the uncond prediction through one) are called as the real model would."""

    def __init__(self, model, log: _DryRun, scale: float) -> None:
        self.model, self.log, self.scale = model, log, scale

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, sigma, **kwargs):
        self.log.calls.append(_first_float(sigma))
        out = x * self.scale
        mo = kwargs.get("model_options", {})
        for fn in mo.get("sampler_post_cfg_function", []):
            out = fn({"denoised": out, "cond_denoised": out, "uncond_denoised": out, "cond": None, "uncond": None,
                      "cond_scale": 1.0, "model": None, "sigma": sigma, "model_options": mo, "input": x})
        return out


def _dry_run(sampler, model, x, sigmas, extra_args: dict, scale: float) -> _DryRun:
    log = _DryRun()
    mo = dict(extra_args.get("model_options", {}))
    mo["sampler_post_cfg_function"] = []  # other nodes' post-CFG functions need a real model: none in a dry run
    args = {**extra_args, "model_options": mo}

    def report(d: dict) -> None:
        log.reports.append((len(log.calls), _first_float(d.get("sigma_hat", d.get("sigma")))))

    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # a sampler without a seed draws from the global generator
        sampler.sampler_function(_StandIn(model, log, scale), x.clone(), sigmas, extra_args=args, callback=report,
                                 disable=True, **sampler.extra_options)
    return log


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


def step_starts(sampler, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict, steps: int,
                name: str = "the sampler") -> list[tuple[int, float]]:
    """``(model call index, sigma)`` of the first evaluation of each of the first ``steps`` steps of ``sampler``
    (a ``KSAMPLER``) over ``sigmas``. Raises :class:`SamplerNotGuidable` where they cannot be found."""
    runs = [_dry_run(sampler, model, x, sigmas, extra_args, scale) for scale in (0.0, 0.5)]
    n = len(sigmas) - 1
    if [round(s, 6) for s in runs[0].calls] != [round(s, 6) for s in runs[1].calls]:
        raise SamplerNotGuidable(f"{name} chooses its steps from the model's output (adaptive step size), so there "
                                 f"is no fixed step for an A&E update")
    reports, calls = runs[0].reports, runs[0].calls
    if len(reports) != n:
        raise SamplerNotGuidable(f"{name} takes {len(reports)} steps of its own instead of the schedule's {n}")
    starts: list[tuple[int, float]] = []
    for i in range(steps):
        done, sigma = reports[i]
        if sigma is None:
            raise SamplerNotGuidable(f"{name} does not report the sigma of its steps (uni_pc evaluates the model at "
                                     f"a predicted latent that its corrector replaces)")
        at = [k for k in range(starts[-1][0] + 1 if starts else 0, done) if _close(calls[k], sigma)]
        if not at:
            raise SamplerNotGuidable(f"{name} reports step {i} at sigma {sigma:.4g} without evaluating the model there")
        starts.append((at[-1], calls[at[-1]]))
    return starts


class GuidedModel:
    """The sampler's model with an edit of the latent at given model calls.

    ``edit(step, x, sigma) -> x_new`` runs before the model call that begins each guided step, and its result is
    written into the sampler's own latent (``x.copy_``), so the sampler continues from it with its history and noise
    intact. Attribute reads fall through to the wrapped model (samplers read ``inner_model``, ``model_sampling``)."""

    def __init__(self, model, starts: list[tuple[int, float]], edit, name: str) -> None:
        self.model, self.edit, self.name = model, edit, name
        self.starts = {call: (step, sigma) for step, (call, sigma) in enumerate(starts)}
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, sigma, **kwargs):
        start = self.starts.get(self.calls)
        self.calls += 1
        if start is not None:
            step, expected = start
            got = _first_float(sigma)
            if not _close(got, expected):
                raise SamplerNotGuidable(f"{self.name} evaluated step {step} at sigma {got:.4g}, not at {expected:.4g} "
                                         f"as its dry run did; A&E stops rather than edit the wrong latent")
            x.copy_(self.edit(step, x, sigma))
        return self.model(x, sigma, **kwargs)
