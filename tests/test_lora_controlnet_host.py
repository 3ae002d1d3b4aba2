"""The A&E sampler combined with a LoRA and with a ControlNet in the real ComfyUI host, in-process.

Both are generated here with random but deterministic weights for the tiny SD1.5 checkpoint, and loaded by
ComfyUI's own loaders (``comfy.sd.load_lora_for_models``, ``comfy.controlnet.load_controlnet_state_dict``) and
applied as the ``LoraLoader`` / ``ControlNetApplyAdvanced`` nodes do. The A&E gradient pass goes through
ComfyUI's ``calc_cond_batch`` with the positive cond, so it must see the LoRA-patched weights and the cond's
ControlNet: the step-0 loss (computed before any sampler step, from the same latent) has to change with either.
"""

from __future__ import annotations

import math

import pytest
import torch
from host_helpers import ksample, load_host, no_leftovers, seeded_init, weights_fingerprint

pytestmark = [pytest.mark.host, pytest.mark.slow]

PROMPT, SUBJECTS = "a photo of a cat and a frog", "cat, frog"
STEPS, SEED = 2, 3  # one guided step (guided_fraction 0.5), one gradient pass (no refinement)

# cross-attention projections of the 8x8 level, the one A&E reads on a 32x32 latent
LORA_TARGETS = [f"diffusion_model.input_blocks.{b}.1.transformer_blocks.0.attn2.{p}"
                for b in (7, 8) for p in ("to_q", "to_k")]
LORA_RANK = 4


@pytest.fixture(scope="module")
def host(comfy_inprocess, tiny_checkpoint):
    loaded = load_host(comfy_inprocess, tiny_checkpoint, PROMPT, SUBJECTS)
    return {**loaded, "fingerprint": weights_fingerprint(loaded["model"])}


def run(host, seed=SEED, steps=STEPS, **kw):
    """One guided step without refinement: exactly one gradient pass."""
    return ksample(host, seed=seed, steps=steps, **{"refinement": "", **kw})


def step0_loss(record) -> float:
    assert len(record.losses[0]) == 1  # main pass only (no refinement)
    return float(record.losses[0][0][0])


def assert_guided_run_differs(host, plain_run, **kw):
    """One guided step with ``kw`` (a LoRA'd model, ControlNet conds): finite, one loss at step 0, and, from the
    same latent and sigma, a different loss and different samples than the plain run."""
    plain_samples, plain_loss = plain_run
    samples, record = run(host, **kw)
    assert torch.isfinite(samples).all()
    assert record.guided_steps == 1 and sorted(record.losses) == [0]
    loss = step0_loss(record)
    assert math.isfinite(loss)
    assert abs(loss - plain_loss) > 1e-4, (loss, plain_loss)
    assert not torch.equal(samples, plain_samples)


@pytest.fixture(scope="module")
def plain_run(host):
    """A&E without LoRA or ControlNet: the reference for both."""
    samples, record = run(host)
    assert torch.isfinite(samples).all()
    return samples, step0_loss(record)


# ---------------------------------------------------------------- LoRA


def make_lora(host) -> dict[str, torch.Tensor]:
    """Rank-4 LoRA (generic ``<module>.lora_up/.lora_down/.alpha`` keys) for ``LORA_TARGETS``."""
    sd = host["model"].model.diffusion_model.state_dict()
    gen = torch.Generator().manual_seed(7)
    lora = {}
    for key in LORA_TARGETS:
        out_f, in_f = sd[key[len("diffusion_model."):] + ".weight"].shape
        lora[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, in_f, generator=gen) / math.sqrt(in_f)
        lora[f"{key}.lora_up.weight"] = torch.randn(out_f, LORA_RANK, generator=gen) / math.sqrt(LORA_RANK)
        lora[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    return lora


@pytest.fixture(scope="module")
def lora_model(host):
    import comfy.sd

    model = host["model"]
    patches, uuid = {k: list(v) for k, v in model.patches.items()}, model.patches_uuid
    with torch.inference_mode():
        patched, _ = comfy.sd.load_lora_for_models(model, host["clip"], make_lora(host), 1.0, 0.0)
    assert patched is not model
    assert sorted(patched.patches) == sorted(f"{k}.weight" for k in LORA_TARGETS)
    # LoraLoader semantics: the input model is not patched, only its clone
    assert {k: list(v) for k, v in model.patches.items()} == patches and model.patches_uuid == uuid
    return patched


def test_ae_runs_with_a_lora_and_its_gradient_pass_sees_it(host, plain_run, lora_model):
    plain_samples, plain_loss = plain_run
    model = host["model"]
    patches, uuid = {k: list(v) for k, v in model.patches.items()}, model.patches_uuid

    # only the LoRA-patched weights can change the step-0 loss
    assert_guided_run_differs(host, plain_run, model=lora_model)

    # the un-LoRA'd model is left as found: no patches, and the next run on it is the plain run, bit for bit
    assert {k: list(v) for k, v in model.patches.items()} == patches and model.patches_uuid == uuid
    again, again_record = run(host)
    assert torch.equal(again, plain_samples)
    assert step0_loss(again_record) == plain_loss
    assert weights_fingerprint(model) == host["fingerprint"]
    assert no_leftovers([model.model])
    assert not any(p.grad is not None for p in model.model.parameters())


def test_plain_mode_with_a_lora_is_bit_identical_to_ksampler(host, lora_model):
    import nodes as comfy_nodes

    samples, record = run(host, model=lora_model, scale_factor=0.0, seed=11)
    assert not record.losses
    with torch.inference_mode():
        (ref,) = comfy_nodes.common_ksampler(lora_model, 11, STEPS, 5.0, "euler", "normal", host["pos"],
                                             host["neg"], {"samples": torch.zeros(1, 4, 32, 32)})
    assert torch.equal(samples, ref["samples"])


# ---------------------------------------------------------------- ControlNet


def make_controlnet_state_dict(host) -> dict[str, torch.Tensor]:
    """A ControlNet (ldm key layout) matching the checkpoint's UNet, every parameter initialised from a seed.

    Biases 0, 1-D weights (norms) 1, other weights normal(0, 1/sqrt(fan_in)); the zero-convs and
    ``middle_block_out`` get a quarter of that, so they are small but non-zero and the control signal counts.
    """
    import comfy.cldm.cldm
    import comfy.ops

    config = dict(host["model"].model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    net = comfy.cldm.cldm.ControlNet(**config)
    # zero convs small but not zero, so the control signal matters
    return seeded_init(net.state_dict(), 11,
                       lambda name: 0.25 if name.startswith(("zero_convs.", "middle_block_out.")) else 1.0)


@pytest.fixture(scope="module")
def controlnet(host):
    import comfy.controlnet

    sd = make_controlnet_state_dict(host)
    zero_conv = sd["zero_convs.0.0.weight"].clone()
    with torch.inference_mode():
        cnet = comfy.controlnet.load_controlnet_state_dict(sd)
    assert isinstance(cnet, comfy.controlnet.ControlNet)
    loaded = cnet.control_model.state_dict()
    assert set(loaded) == set(sd) and torch.equal(loaded["zero_convs.0.0.weight"], zero_conv)
    assert zero_conv.abs().sum() > 0
    return cnet


def apply_controlnet(host, cnet, strength=1.0):
    import nodes as comfy_nodes

    gen = torch.Generator().manual_seed(5)
    image = torch.rand(1, 256, 256, 3, generator=gen)  # IMAGE: (B, H, W, C) in [0, 1]
    with torch.inference_mode():
        return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(host["pos"], host["neg"], cnet, image,
                                                                     strength, 0.0, 1.0)


def test_ae_runs_with_a_controlnet_in_its_gradient_pass(host, plain_run, controlnet, caplog):
    from comfyui_attend_excite.nodes.sampling import COND_KEY

    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    pos, neg = apply_controlnet(host, controlnet)
    assert COND_KEY in pos[0][1] and pos[0][1]["control"] is neg[0][1]["control"]
    control_model = controlnet.control_model
    params = [(m, name, p) for m in control_model.modules() for name, p in m._parameters.items()]

    # same UNet: only the ControlNet's residuals can change the step-0 loss
    assert_guided_run_differs(host, plain_run, positive=pos, negative=neg)
    # per-step control inputs cannot be frozen into a CUDA graph: the passes stay eager, and the log says so
    assert "ControlNet" in caplog.text.split("no CUDA graph):", 1)[1].splitlines()[0]

    # the ControlNet (shared by every copy of the control object) is left as found
    assert no_leftovers([control_model])
    assert all(m._parameters[name] is p for m, name, p in params)
    assert not any(p.grad is not None for p in control_model.parameters())
    assert no_leftovers([host["model"].model])

    # the residuals the ControlNet adds in place are outside the transformer blocks: recomputed blocks agree
    stored, stored_rec = run(host, positive=pos, negative=neg, recompute="off")
    recomputed, rec = run(host, positive=pos, negative=neg, recompute="blocks")
    assert torch.allclose(recomputed, stored, atol=1e-6) and step0_loss(rec) == pytest.approx(step0_loss(stored_rec))
    assert no_leftovers([host["model"].model])

