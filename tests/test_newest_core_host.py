"""What the newest ComfyUI cores do that cannot be run here, reproduced with stand-ins in the real host.

- An attention backend without a backward (int8/CK attention, SageAttention 3): the stand-in is ComfyUI's own
  attention run under ``torch.no_grad`` and installed as the selected backend, wrapped like core's backends (so
  ``optimized_attention_override`` reaches it). The gradient pass must still get a gradient.
- MultiGPU model clones: the newest ``calc_cond_batch`` runs the model in worker threads under ``torch.no_grad``
  when ``model_options`` holds ``multigpu_clones``. The stand-in wraps ``calc_cond_batch`` that way.
- A model that gives no gradient anyway (a wrapper that runs it under ``no_grad``): an error with a message, never a
  silent zero step.
Cast weights that are inference tensors and shared weight-function lists (dynamic VRAM) are covered without ComfyUI
in ``tests/test_newest_core.py``.
"""

from __future__ import annotations

import pytest
import torch
from host_helpers import ksample, load_host, no_leftovers

pytestmark = [pytest.mark.host, pytest.mark.slow]

STEPS = 4
SMALL = {"latent": {"samples": torch.zeros(1, 4, 16, 16)}, "steps": STEPS, "refinement": "", "seed": 2}


@pytest.fixture(scope="module")
def host(comfy_inprocess, tiny_checkpoint):
    return load_host(comfy_inprocess, tiny_checkpoint, "a photo of a cat and a frog", "cat, frog")


def raised_the_weakest_subject(ae, plain) -> bool:
    """The weakest subject's max attention at A&E's last guided step is higher than plain sampling's there."""
    step = [ae.guided_steps - 1]
    return float(ae.subject_maxima(step).min()) > float(plain.subject_maxima(step).min())


def test_an_attention_backend_without_backward_still_guides(host, monkeypatch):
    """Sampling uses the selected backend; the gradient passes never do (they use PyTorch's attention), so A&E gives
    the result it gives with a differentiable backend, bit for bit."""
    from comfy.ldm.modules import attention as comfy_attention

    original = comfy_attention.optimized_attention
    calls = {"sampling": 0, "gradient": 0}

    @comfy_attention.wrap_attn
    def no_backward(*args, **kwargs):
        calls["gradient" if torch.is_grad_enabled() else "sampling"] += 1
        with torch.no_grad():
            return original(*args, **kwargs)

    _, plain = ksample(host, scale_factor=0.0, **SMALL)
    differentiable, _ = ksample(host, **SMALL)
    monkeypatch.setattr(comfy_attention, "optimized_attention", no_backward)
    samples, record = ksample(host, **SMALL)
    assert calls["sampling"] > 0 and calls["gradient"] == 0
    assert torch.equal(samples, differentiable)
    assert raised_the_weakest_subject(record, plain)


def test_multigpu_clones_do_not_turn_the_pass_into_a_no_op(host, monkeypatch):
    import comfy.samplers

    original = comfy.samplers.calc_cond_batch
    seen = {"multigpu": 0, "grad": 0}

    def newest_calc_cond_batch(model, conds, x_in, timestep, model_options):
        if "multigpu_clones" in model_options:  # the newest core's worker threads run the model under no_grad
            seen["multigpu"] += 1
            with torch.no_grad():
                return original(model, conds, x_in, timestep, model_options)
        seen["grad"] += torch.is_grad_enabled()
        return original(model, conds, x_in, timestep, model_options)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", newest_calc_cond_batch)
    model = host["model"].clone()
    model.model_options["multigpu_clones"] = {}
    _, plain = ksample(host, model=model, scale_factor=0.0, **SMALL)
    samples, record = ksample(host, model=model, **SMALL)
    assert seen["multigpu"] > 0 and seen["grad"] == 2  # sampling kept the clones; each gradient pass dropped them
    assert raised_the_weakest_subject(record, plain)


def test_no_gradient_is_an_error_not_a_silent_zero_step(host):
    model = host["model"].clone()

    def detached(apply_model, args):
        with torch.no_grad():
            return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(detached)
    with pytest.raises(RuntimeError, match="produced no gradient for the latent"):
        ksample(host, model=model, **SMALL)
    assert no_leftovers([host["model"].model])
    samples, _ = ksample(host, **SMALL)  # the next run works
    assert torch.isfinite(samples).all()
