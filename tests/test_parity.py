"""Parity of the Attend-and-Excite sampler with diffusers' ``StableDiffusionAttendAndExcitePipeline``.

One random-weight SD1.x UNet (two levels, detected by ComfyUI as SD15) runs in ComfyUI through ``make_sampler`` and,
with the same weights, in diffusers (``benchmarks/diffusers_bridge.py``): same prompt/uncond embeddings, same initial
noise, DDIM (ComfyUI ``ddim`` + ``ddim_uniform``), CFG 7.5, fp32 on the CPU, 32x32 latent, attention maps at 16x16.
Checked: the A&E loss of every gradient pass at every guided step, and the final latent.

Mapping and deliberate differences:
- Schedule: our fractions are chosen so that they resolve to diffusers' loop indices (``guided_fraction`` 0.5 of
  5 steps = ``max_iter_to_alter`` 3; refinement fractions 0 and 0.4 = ``thresholds`` keys 0 and 2).
- Refinement: diffusers' first refinement iteration recomputes the loss at the unchanged latent (a repeat of the
  main pass); we skip that pass. The repeat is checked against the main loss and then dropped. diffusers hard-codes a
  cap of 20 iterations; the test passes our ``max_refinement_steps`` to it.
- diffusers runs a conditional gradient pass (and records its loss) at every step, also after ``max_iter_to_alter``;
  we stop gradient passes after the guided steps. Only the guided steps are compared.
- Initial latent: ComfyUI starts at ``sigma_0 * noise``; diffusers gets ``noise * sqrt(1 - alphas_cumprod[t0])``.
- Latent convention: ComfyUI's LATENT is ``z0 / 0.18215``; diffusers' ``output_type="latent"`` is ``z0``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from host_helpers import seeded_init

pytestmark = [pytest.mark.host, pytest.mark.slow, pytest.mark.parity,
              pytest.mark.filterwarnings("ignore:torch.meshgrid")]  # diffusers' GaussianSmoothing

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

STEPS = 5  # must divide 1000: ComfyUI's ddim_uniform and diffusers' "leading" DDIM then share the timesteps
LATENT = 32  # latent side; A&E reads the 16x16 level (input 3, middle, output 0-2 of the test UNet)
ATTN_RES = 16
CFG = 7.5
SCALE_FACTOR = 20.0
SEED = 7
SUBJECTS = (2, 5)
ATTN2_QK_GAIN = 2.0  # std multiplier for attn2 to_q/to_k so the cross-attention maps have structure
LOSS_TOL = 1e-4
LATENT_RTOL = 1e-3

GUIDED = 3  # guided_fraction 0.5 of 5 steps (rounded half up) = diffusers' max_iter_to_alter
# case -> (refinement as (fraction, threshold), max_refinement_steps); fraction 0 = step 0, 0.4 = step 2 of 5.
# With refinement, step 0 stops when its loss falls below 1 - 0.25 (before the cap), step 2 runs into the cap.
CASES = {
    "no_refinement": ((), 20),
    "refinement": (((0.0, 0.25), (0.4, 0.97)), 5),
}


def _build_state_dict(seed: int = 0) -> dict:
    """Deterministic random SD1.x UNet: biases 0, norm weights 1, other weights N(0, 1/fan_in)."""
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules import openaimodel

    unet = openaimodel.UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, context_dim=768, num_heads=8,
        num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None, use_spatial_transformer=True,
        legacy=False, transformer_depth_middle=1, channel_mult=[1, 1], num_res_blocks=[1, 1], transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1], dtype=torch.float32, device="cpu",
        operations=comfy.ops.disable_weight_init)
    gain = lambda name: ATTN2_QK_GAIN if (".attn2.to_q." in name or ".attn2.to_k." in name) else 1.0  # noqa: E731
    sd = {"model.diffusion_model." + k: v for k, v in seeded_init(unet.state_dict(), seed, gain).items()}
    return sd


@pytest.fixture(scope="module")
def parity(comfy_inprocess: types.SimpleNamespace) -> types.SimpleNamespace:
    """ComfyUI model, diffusers pipeline on the same weights, embeddings and noise."""
    pytest.importorskip("diffusers")
    import comfy.model_management
    import comfy.samplers
    import comfy.sd
    import comfy_inprocess as inprocess
    import torch

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import diffusers_bridge

    inprocess.load_pack()
    model = comfy.sd.load_diffusion_model_state_dict(_build_state_dict(), model_options={"dtype": torch.float32})
    assert type(model.model.model_config).__name__ == "SD15"
    comfy.model_management.load_model_gpu(model)
    unet = diffusers_bridge.diffusers_unet_from_comfy(model, "cpu", torch.float32)
    pipe = diffusers_bridge.build_ae_pipeline(unet, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(1, 77, 768, generator=gen)
    uncond = torch.randn(1, 77, 768, generator=gen)
    noise = torch.randn((1, 4, LATENT, LATENT), generator=torch.manual_seed(SEED))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS)
    return types.SimpleNamespace(model=model, pipe=pipe, bridge=diffusers_bridge, cond=cond, uncond=uncond,
                                 noise=noise, sigmas=sigmas)


def run_comfy(ctx: types.SimpleNamespace, refinement, max_refinement_steps: int):
    """Our sampler: returns (AttentionRecord, LATENT samples)."""
    import comfy.sample
    import torch
    from comfyui_attend_excite.attention.record import AttentionRecord
    from comfyui_attend_excite.attention.tokens import SubjectTokens
    from comfyui_attend_excite.nodes.sampling import AEParams, make_sampler

    spec = SubjectTokens(indices=SUBJECTS, labels=("a", "b"), prompt_positions=tuple(range(1, 8)), num_keys=77,
                         family="l")
    params = AEParams(sampler_name="ddim", scale_factor=SCALE_FACTOR, attention_resolution=ATTN_RES,
                   token_slots="all_but_bos_last", refinement=tuple(refinement),
                   max_refinement_steps=max_refinement_steps)  # record_maps on: the production path
    record = AttentionRecord()
    positive = [[ctx.cond.clone(), {"attend_excite": spec}]]
    negative = [[ctx.uncond.clone(), {}]]
    latent = torch.zeros_like(ctx.noise)
    with torch.inference_mode():
        out = comfy.sample.sample_custom(ctx.model, ctx.noise.clone(), CFG, make_sampler(params, record), ctx.sigmas,
                                         positive, negative, latent, disable_pbar=True, seed=SEED)
    return record, out.detach().clone().float()


def run_diffusers(ctx: types.SimpleNamespace, refinement, max_refinement_steps: int):
    """diffusers' pipeline with the schedule mapped to loop indices: returns ({step: [losses]}, z0)."""
    import functools

    import torch
    from comfyui_attend_excite.attention.schedule import build_schedule

    pipe = ctx.pipe
    sched = build_schedule(STEPS, 0.5, SCALE_FACTOR, (1.0, 0.5), refinement)
    records = ctx.bridge.record_losses(pipe)
    refine = type(pipe)._perform_iterative_refinement_step
    pipe._perform_iterative_refinement_step = functools.partial(refine, pipe,
                                                                max_refinement_steps=max_refinement_steps)
    try:
        pipe.scheduler.set_timesteps(STEPS)
        t0 = int(pipe.scheduler.timesteps[0])
        latents = ctx.noise * torch.sqrt(1.0 - pipe.scheduler.alphas_cumprod[t0])
        out = pipe(prompt=None, prompt_embeds=ctx.cond.clone(), negative_prompt_embeds=ctx.uncond.clone(),
                   token_indices=list(SUBJECTS), height=LATENT * 8, width=LATENT * 8, num_inference_steps=STEPS,
                   guidance_scale=CFG, latents=latents, output_type="latent", max_iter_to_alter=sched.guided_steps,
                   thresholds=dict(sched.refinement), scale_factor=int(SCALE_FACTOR),
                   attn_res=(ATTN_RES, ATTN_RES)).images
    finally:
        del pipe._perform_iterative_refinement_step
    return ctx.bridge.losses_by_step(records), out.detach().clone().float(), sched


def compare(ctx: types.SimpleNamespace, case: str) -> types.SimpleNamespace:
    """Run both sides for ``case``; returns the aligned loss lists and the measured errors."""
    refinement, cap = CASES[case]
    record, ours_latent = run_comfy(ctx, refinement, cap)
    theirs, theirs_latent, sched = run_diffusers(ctx, refinement, cap)
    ours = {i: [float(v[0]) for v in record.losses.get(i, [])] for i in range(sched.guided_steps)}
    aligned = {}
    for i in range(sched.guided_steps):
        ref = list(theirs.get(i, []))
        if len(ref) > 1:  # refinement ran: the first refinement iteration repeats the main pass
            assert abs(ref[1] - ref[0]) <= 1e-6, f"step {i}: diffusers' repeated main pass differs"
            ref = [ref[0], *ref[2:]]
        aligned[i] = ref
    diffs = [abs(a - b) for i in aligned for a, b in zip(ours[i], aligned[i], strict=False)]
    z0 = ours_latent * 0.18215
    rel = float((z0 - theirs_latent).norm() / theirs_latent.norm())
    return types.SimpleNamespace(ours=ours, theirs=aligned, max_dloss=max(diffs) if diffs else 0.0, latent_rel=rel,
                                 sched=sched)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(parity: types.SimpleNamespace, case: str) -> None:
    res = compare(parity, case)
    guided = res.sched.guided_steps
    assert guided == GUIDED
    for i in range(guided):
        assert len(res.ours[i]) == len(res.theirs[i]), (
            f"step {i}: {len(res.ours[i])} gradient passes here, {len(res.theirs[i])} in diffusers "
            f"(ours {res.ours[i]}, diffusers {res.theirs[i]})")
    assert res.max_dloss <= LOSS_TOL, f"max |dloss| {res.max_dloss:.3g}: ours {res.ours}, diffusers {res.theirs}"
    assert res.latent_rel <= LATENT_RTOL, f"final latent relative error {res.latent_rel:.3g}"
    losses = [v for i in range(guided) for v in res.ours[i]]
    assert 0.0 < min(losses) and max(losses) < 1.0, f"degenerate losses {losses}: the test would not test much"
    if case == "refinement":
        cap = CASES[case][1]
        passes = {i: len(v) for i, v in res.ours.items()}  # main + (iterations - 1) + final recompute
        assert 2 < passes[0] < cap + 1, f"step 0 should refine and stop at its threshold: {passes}"
        assert res.ours[0][-2] <= 1.0 - 0.25 < res.ours[0][-3]
        assert passes[1] == 1
        assert passes[2] == cap + 1, f"step 2 should refine up to the cap: {passes}"
    else:
        assert all(len(v) == 1 for v in res.ours.values())
