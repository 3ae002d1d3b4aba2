"""Continuity inside every ComfyUI sampler: A&E with a vanishing step is plain sampling with the same seed.

The A&E sampler runs the wrapped sampler once over the whole schedule and edits its latent in place at the start of
each guided step, so with ``scale_factor`` -> 0 every sampler (multistep history, ancestral and SDE noise, extra
evaluations per step) must give plain sampling's latent; ``scale_factor`` 0 must be bit-identical. Samplers that
cannot be guided that way must say so on the node. In-process on the tiny SD1.5 checkpoint, 128 px, 4 steps.
"""

from __future__ import annotations

import logging

import pytest
import torch
from host_helpers import AE_DEFAULTS, load_host

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.host, pytest.mark.slow]

PROMPT, SUBJECTS = "a photo of a cat and a frog", "cat, frog"
STEPS, SEED, SIDE, CFG = 4, 7, 16, 5.0
NOT_GUIDABLE = {"dpm_fast": "steps of its own", "dpm_adaptive": "adaptive step size",
                "uni_pc": "does not report the sigma", "uni_pc_bh2": "does not report the sigma"}


def scheduler_for(name: str) -> str:
    """A scheduler each sampler is meant for."""
    if name.startswith(("dpmpp", "res_multistep", "er_sde", "seeds", "sa_solver")):
        return "karras"
    if name == "ddim":
        return "ddim_uniform"
    if name == "lcm":
        return "sgm_uniform"
    return "normal"


@pytest.fixture(scope="module")
def host(comfy_inprocess, tiny_checkpoint):
    return load_host(comfy_inprocess, tiny_checkpoint, PROMPT, SUBJECTS)


def side_for(name: str) -> int:
    """The latent side: 8 for the samplers A&E refuses (only scale_factor 0 runs; dpm_adaptive takes hundreds of
    model calls on a random model), else ``SIDE``."""
    return 8 if name in NOT_GUIDABLE else SIDE


def plain(host, sampler_name: str) -> torch.Tensor:
    import nodes as comfy_nodes

    side = side_for(sampler_name)
    with torch.inference_mode():
        (out,) = comfy_nodes.common_ksampler(host["model"], SEED, STEPS, CFG, sampler_name, scheduler_for(sampler_name),
                                             host["pos"], host["neg"], {"samples": torch.zeros(1, 4, side, side)})
    return out["samples"]


def attend_excite(host, sampler_name: str, scale_factor: float) -> torch.Tensor:
    from comfyui_attend_excite.nodes.samplers import AttendExciteKSampler

    params = {**AE_DEFAULTS, "scale_factor": scale_factor, "refinement": ""}
    side = side_for(sampler_name)
    with torch.inference_mode():
        out = AttendExciteKSampler.execute(host["model"], SEED, STEPS, CFG, sampler_name, scheduler_for(sampler_name),
                                           host["pos"], host["neg"], {"samples": torch.zeros(1, 4, side, side)}, 1.0,
                                           **params)
    return out.args[0]["samples"]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per name in the host's ``comfy.samplers.SAMPLER_NAMES`` (newer cores add names)."""
    if metafunc.function.__name__ == "test_sampler_is_continuous_at_a_vanishing_step":
        metafunc.parametrize("sampler_name", sampler_names())


def sampler_names() -> list[str]:
    import comfy_inprocess

    if not (comfy_inprocess.comfy_root() / "main.py").is_file():
        return ["euler"]  # the host fixture skips
    comfy_inprocess.setup()
    import comfy.samplers

    return list(comfy.samplers.SAMPLER_NAMES)


def test_sampler_is_continuous_at_a_vanishing_step(host, sampler_name):
    reference = plain(host, sampler_name)
    assert torch.equal(attend_excite(host, sampler_name, 0.0), reference), "scale_factor 0 is not plain sampling"
    if sampler_name in NOT_GUIDABLE:
        with pytest.raises(ValueError, match=NOT_GUIDABLE[sampler_name] + ".*Choose another sampler"):
            attend_excite(host, sampler_name, 1e-6)
        return
    diff = relative_difference(attend_excite(host, sampler_name, 1e-6), reference)
    log.info("continuity %s/%s: relative difference %.2e", sampler_name, scheduler_for(sampler_name), diff)
    assert diff <= 1e-3


@pytest.mark.parametrize("sampler_name", ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_ancestral", "lcm"])
def test_a_real_step_moves_the_sampler(host, sampler_name):
    """The edit reaches the sampler's latent: a real step moves the result far more than a vanishing one (an edit
    of a copy of the latent would move nothing)."""
    reference = plain(host, sampler_name)
    vanishing = relative_difference(attend_excite(host, sampler_name, 1e-6), reference)
    real = relative_difference(attend_excite(host, sampler_name, 20.0), reference)
    assert real > 1e-3 and real > 100 * vanishing, (real, vanishing)


def test_a_connected_sampler_node_is_wrapped(host):
    """AttendExciteSampler wraps the SAMPLER of core's SamplerDPMPP_2M_SDE node (eta 0.5, not the default): at a
    vanishing step the result is that sampler's alone, and not what sampler_name would give."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerDPMPP_2M_SDE
    from comfyui_attend_excite.nodes.samplers import AttendExciteSampler

    (sde,) = SamplerDPMPP_2M_SDE.execute("midpoint", 0.5, 1.0, "cpu").args
    (default_sde,) = SamplerDPMPP_2M_SDE.execute("midpoint", 1.0, 1.0, "cpu").args
    params = {**AE_DEFAULTS, "scale_factor": 1e-6, "refinement": ""}
    model = host["model"]

    def run(sampler):
        with torch.inference_mode():
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", STEPS).cpu()
            latent = torch.zeros(1, 4, SIDE, SIDE)
            return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, SEED), 5.0, sampler, sigmas,
                                              host["pos"], host["neg"], latent, disable_pbar=True, seed=SEED)

    wrapped, _ = AttendExciteSampler.execute("euler", sampler=sde, **params).args
    alone = run(sde)
    assert relative_difference(run(wrapped), alone) <= 1e-3
    assert relative_difference(run(default_sde), alone) > 1e-2  # eta matters: the wrapper did not fall back


def test_a_sampler_that_is_not_a_ksampler_is_refused_on_the_node(host):
    import comfy.samplers
    from comfyui_attend_excite.nodes.samplers import AttendExciteSampler

    class OwnLoop(comfy.samplers.Sampler):
        def sample(self, *args, **kwargs):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="^sampler: A&E wraps k-diffusion samplers"):
        AttendExciteSampler.execute("euler", sampler=OwnLoop(), **AE_DEFAULTS)
