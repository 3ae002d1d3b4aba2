"""The A&E sampler in the real ComfyUI host, in-process, on the tiny random-weight SD1.5 checkpoint.

Every node call runs under ``torch.inference_mode()`` as ComfyUI's executor does, with weights that the
checkpoint loader created. 256 px images (32x32 latents): the auto attention level is then 8x8 (latent / 4).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from fake_graph import FakeGraphBackend
from host_helpers import ksample, load_host, no_leftovers, sample_custom, weights_fingerprint

pytestmark = [pytest.mark.host, pytest.mark.slow]

PROMPT, SUBJECTS = "a photo of a cat and a frog", "cat, frog"


@pytest.fixture(scope="module")
def host(comfy_inprocess, tiny_checkpoint):
    return load_host(comfy_inprocess, tiny_checkpoint, PROMPT, SUBJECTS)


def min_subject_attention(record, step):
    return record.subject_maxima([step]).min(dim=-1).values


def test_encode_equals_cliptextencode_and_carries_subjects(host):
    import nodes as comfy_nodes

    with torch.inference_mode():
        (ref,) = comfy_nodes.CLIPTextEncode().encode(host["clip"], PROMPT)
    assert torch.equal(ref[0][0], host["pos"][0][0])
    assert host["pos"][0][1]["attend_excite"].indices == (5, 8)
    assert "- 5: cat  ← excited" in host["table"].splitlines()


def test_ae_raises_the_weakest_subjects_attention(host):
    _, plain = ksample(host, scale_factor=0.0)
    _, ae = ksample(host)
    last_guided = ae.guided_steps - 1
    assert ae.guided_steps == 4 and plain.guided_steps == 0
    p, a = min_subject_attention(plain, last_guided), min_subject_attention(ae, last_guided)
    assert (a > p).all(), (p.tolist(), a.tolist())
    # the loss was computed at every guided step and nowhere after
    assert sorted(ae.losses) == [0, 1, 2, 3]


def test_loss_falls_within_a_refinement_loop(host):
    _, rec = ksample(host, steps=8, max_refinement_steps=6, refinement="0:0.9")
    losses = [float(x[0]) for x in rec.losses[0]]
    assert len(losses) >= 3  # main pass, refinement passes, final recompute
    assert losses[-1] < losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:])), losses


def test_plain_mode_is_bit_identical_to_ksampler(host):
    import nodes as comfy_nodes

    samples, rec = ksample(host, scale_factor=0.0, seed=11, steps=4)
    with torch.inference_mode():
        (ref,) = comfy_nodes.common_ksampler(host["model"], 11, 4, 5.0, "euler", "normal", host["pos"],
                                             host["neg"], {"samples": torch.zeros(1, 4, 32, 32)})
    assert torch.equal(samples, ref["samples"])
    assert rec.steps == [0, 1, 2, 3] and not rec.losses  # maps recorded, no gradient pass


def test_identical_runs_are_bit_identical(host):
    a, _ = ksample(host, seed=5, steps=4)
    b, _ = ksample(host, seed=5, steps=4)
    assert torch.equal(a, b)


def test_input_model_is_left_as_found(host):
    model = host["model"]
    options = copy.deepcopy(model.model_options)
    before = weights_fingerprint(model)
    patches_uuid = model.patches_uuid
    ksample(host, steps=4)
    assert model.model_options == options
    assert model.patches_uuid == patches_uuid
    assert weights_fingerprint(model) == before
    assert no_leftovers([model.model])
    assert not any(p.requires_grad and p.grad is not None for p in model.model.parameters())


@pytest.mark.parametrize("blocks", ["all", "down_mid"])
def test_attention_blocks_choose_the_layers_and_where_the_gradient_pass_stops(host, blocks):
    unet = host["model"].model.diffusion_model
    grad_calls = {"input": 0, "output": 0}

    def counter(name):
        def hook(_module, _args):
            grad_calls[name] += torch.is_grad_enabled()  # only gradient passes run with autograd on
        return hook

    # the UNet calls the layers inside its blocks, not the block containers
    handles = [unet.input_blocks[0][0].register_forward_pre_hook(counter("input")),
               unet.output_blocks[0][0].register_forward_pre_hook(counter("output"))]
    try:
        _, rec = ksample(host, steps=4, refinement="", attention_blocks=blocks)
    finally:
        for h in handles:
            h.remove()
    assert sorted(rec.losses) == [0, 1] and grad_calls["input"] == 2  # one gradient pass per guided step
    encoder = ["input.7.0", "input.8.0"]  # the 8x8 level of the SD1.5 layout (the middle block is at 4x4)
    if blocks == "down_mid":  # the gradient passes never run the decoder
        assert rec.layers == encoder and grad_calls["output"] == 0
    else:
        assert rec.layers == encoder + ["output.3.0", "output.4.0", "output.5.0"]
        assert grad_calls["output"] == 2


def test_batch_of_two_gets_per_sample_losses(host):
    samples, rec = ksample(host, steps=4, latent={"samples": torch.zeros(2, 4, 32, 32)}, refinement="")
    assert samples.shape == (2, 4, 32, 32)
    assert all(loss.shape == (2,) for step in rec.losses.values() for loss in step)
    assert rec.subject_maxima([0]).shape == (2, 2)


def test_interrupt_inside_refinement_cleans_up(host):
    import comfy.model_management as mm

    model = host["model"]
    calls = {"n": 0}


    mm.interrupt_current_processing(False)
    original = mm.throw_exception_if_processing_interrupted
    with pytest.raises(mm.InterruptProcessingException):
        def flag_then_check():
            calls["n"] += 1
            if calls["n"] == 3:
                mm.interrupt_current_processing(True)
            original()

        mm.throw_exception_if_processing_interrupted = flag_then_check
        try:
            ksample(host, steps=4, refinement="0:0.99", max_refinement_steps=10)
        finally:
            mm.throw_exception_if_processing_interrupted = original
    assert calls["n"] == 3
    assert no_leftovers([model.model])
    # and the next run works
    samples, _ = ksample(host, steps=2, refinement="")
    assert torch.isfinite(samples).all()


def test_clear_errors(host):
    import nodes as comfy_nodes

    with torch.inference_mode():
        (plain_pos,) = comfy_nodes.CLIPTextEncode().encode(host["clip"], PROMPT)
    with pytest.raises(ValueError, match="AttendExciteTextEncode"):
        ksample(host, steps=2, positive=plain_pos)
    with pytest.raises(ValueError, match="attention_resolution 5 does not exist"):
        ksample(host, steps=2, attention_resolution=5)
    with pytest.raises(ValueError, match="refinement entry"):
        ksample(host, steps=2, refinement="zero:one")


def test_visualizer_renders_one_row_per_image(host):
    from comfyui_attend_excite.nodes.visualize import render

    samples, rec = ksample(host, steps=4, refinement="")
    with torch.inference_mode():
        images = host["vae"].decode(samples)
        strip = render(rec, images, 0.0, 0.5, "all", 0.5)
        one_layer = render(rec, images, 0.0, 1.0, rec.layers[0], 0.5)
    h, w = images.shape[1:3]
    assert strip.shape == (1, h, 3 * w, 3) and one_layer.shape == strip.shape
    assert 0.0 <= float(strip.min()) and float(strip.max()) <= 1.0
    with pytest.raises(ValueError, match="unknown layers"):
        render(rec, images, 0.0, 0.5, "nope.1.0", 0.5)


def test_why_passes_run_without_a_cuda_graph_is_logged(host, caplog):
    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    ksample(host, steps=4, refinement="")
    assert "gradient passes run eagerly (no CUDA graph): the model runs on cpu" in caplog.text
    caplog.clear()
    ksample(host, steps=4, refinement="", cuda_graph=False)
    assert "cuda_graph is off; the model runs on cpu" in caplog.text
    assert "(CUDA graph)" not in caplog.text


def test_graphed_passes_give_the_eager_result(host, caplog):
    """The sampler's CUDA-graph path on a CPU stand-in whose replay re-runs the captured pass: the first pass is the
    warm-up, the target layers' pass is captured right after it, every later pass (refinement included) is a replay
    on that pass's static inputs, and the result is the eager sampler's. A refused capture or a failed warm-up leaves
    eager passes. (Each run starts with the model unloaded: it releases the pass kept from the run before.)"""
    import comfy.model_management
    from comfyui_attend_excite.attention.record import AttentionRecord
    from comfyui_attend_excite.attention.schedule import parse_refinement
    from comfyui_attend_excite.nodes.sampling import AEParams, make_sampler

    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    params = AEParams(refinement=parse_refinement("0:0.99"), max_refinement_steps=3)

    def run(params, backend=None):
        comfy.model_management.unload_all_models()
        caplog.clear()
        record = AttentionRecord()
        sampler = make_sampler(params, record)
        sampler.extra_options["ae_graph_backend"] = backend
        out = sample_custom(host["model"], sampler, host["pos"], host["neg"], steps=4)
        losses = [float(v.flatten()[0]) for step in sorted(record.losses) for v in record.losses[step]]
        (passes,) = [r.ae_passes for r in caplog.records if hasattr(r, "ae_passes")]
        return out, losses, passes, caplog.text

    eager, eager_losses, eager_passes, _ = run(replace(params, cuda_graph=False))
    assert eager_passes == 2 + 2 + 1  # 2 guided steps; at step 0, 2 passes within 3 refinement steps, 1 recompute
    assert len(set(eager_losses)) > 3  # each pass saw a new latent
    for fail in ("", "capture", "warm-up"):
        backend = FakeGraphBackend(fail=fail == "capture", fail_warm_up=fail == "warm-up")
        out, losses, passes, text = run(params, backend)
        assert torch.allclose(out, eager, atol=1e-6), (fail, float((out - eager).abs().max()))
        assert losses == pytest.approx(eager_losses, abs=1e-6) and passes == eager_passes
        assert backend.warm_ups == 1 and len(backend.graphs) == (fail != "warm-up")
        if fail:
            assert backend.replays == 0 and "(CUDA graph)" not in text
            assert ("CUDA graph capture failed, gradient passes run eagerly" in text) == (fail == "capture")
            assert ("warm-up failed, running the pass eagerly: RuntimeError" in text) == (fail == "warm-up")
        else:
            assert backend.replays == passes - 1 and "gradient passes (CUDA graph)" in text


def test_pass_conds_are_copied_to_the_device_without_touching_the_callers(host):
    import comfy.sampler_helpers
    import comfy.samplers
    from comfyui_attend_excite.nodes.gradient_pass import _conds_on, _holds_any

    with torch.inference_mode():
        conds = comfy.samplers.encode_model_conds(host["model"].model.extra_conds, comfy.sampler_helpers.convert_cond(
            host["pos"]), torch.zeros(1, 4, 32, 32), torch.device("cpu"), "positive")
    cond = conds[0]
    before = {k: v.cond for k, v in cond["model_conds"].items()}
    moved = _conds_on(cond, torch.device("meta"))
    assert moved["model_conds"]["c_crossattn"].cond.device.type == "meta"
    assert all(cond["model_conds"][k].cond is t and t.device.type == "cpu" for k, t in before.items())
    assert moved["attend_excite"] is cond["attend_excite"]
    assert not _holds_any({"patches": {}, "wrappers": {"x": {"y": []}}}) and _holds_any({"a": [{"b": [len]}]})


def test_map_recorder_reads_each_model_calls_step_once(host):
    from comfyui_attend_excite.nodes.capture import MapRecorder

    class Sigmas:  # a model call's sigmas tensor that counts host reads
        def __init__(self, value):
            self.t, self.reads = torch.tensor([value, value]), 0

        def reshape(self, *shape):
            self.reads += 1
            return self.t.reshape(*shape)

    class Record:
        def __init__(self):
            self.maps = []

        def add_map(self, step, layer, probs):
            self.maps.append((step, layer, tuple(probs.shape)))

    def attention(q, k, v, heads, **kw):
        return q

    record = Record()
    rec = MapRecorder(record, (2, 2), [14.6, 3.0, 0.0], attention)
    q, k, v = torch.rand(2, 4, 8), torch.rand(2, 77, 8), torch.rand(2, 77, 8)
    layers = [rec.patch(("input", 1, 0)), rec.patch(("output", 3, 0))]
    first, second = Sigmas(14.6), Sigmas(3.0)
    for sig in (first, second):
        for patch in layers:
            out = patch(q, k, v, {"n_heads": 2, "sigmas": sig, "cond_or_uncond": [1, 0],
                                  "activations_shape": [2, 8, 2, 2]})
            assert out is q  # the output is ComfyUI's attention, untouched
    assert (first.reads, second.reads) == (1, 1)
    assert record.maps == [(0, "input.1.0", (1, 2, 2, 77)), (0, "output.3.0", (1, 2, 2, 77)),
                           (1, "input.1.0", (1, 2, 2, 77)), (1, "output.3.0", (1, 2, 2, 77))]
