"""Attend-and-Excite on joint-attention transformers (Flux, SD3) in the real host, on tiny random models built with
ComfyUI's own classes (scripts/tiny_dit.py): the captured maps, the gradient, the stop rule, continuity with plain
sampling for several samplers, the token stream, the block choice and the refusal of other models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytestmark = [pytest.mark.host, pytest.mark.slow]

PROMPT, SUBJECTS = "a red cat and a blue frog", "cat, frog"
LATENT = (1, 16, 16, 16)  # 128 px: an 8 x 8 grid of image tokens
CFG = {"flux": 1.0, "sd3": 4.0}  # guidance-distilled Flux: one model call per step


@pytest.fixture(scope="module")
def pack(comfy_inprocess):
    import comfy_inprocess as ci

    ci.load_pack()
    import sys

    return sys.modules["comfyui_attend_excite"]


@pytest.fixture(scope="module")
def tiny(pack):
    import tiny_dit

    out = {}
    for family, build, clip in (("flux", tiny_dit.flux_model, tiny_dit.flux_clip),
                                ("sd3", tiny_dit.sd3_model, tiny_dit.sd3_clip)):
        c = clip(0)
        with torch.inference_mode():
            pos, table, spec = pack.nodes.encode.encode_subjects(c, PROMPT, SUBJECTS)
            neg = c.encode_from_tokens_scheduled(c.tokenize(""))
        out[family] = dict(model=build(0), clip=c, pos=pos, neg=neg, spec=spec, table=table, build=build)
    return out


class MapStore:
    """A stand-in for the run's AttentionRecord: keeps the recorder's maps in float32."""

    def __init__(self):
        self.maps = {}

    def add_map(self, step, name, probs):
        self.maps[name] = probs.float().clone()


def _spy(inner, store: list):
    """An attention override that stores ``(block, q, k)`` of the joint calls ComfyUI makes, then runs ``inner``."""
    def override(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        store.append((to.get("block_type"), to.get("block_index"), args[0].detach().clone(),
                      args[1].detach().clone(), kwargs.get("skip_reshape", False), args[3] if len(args) > 3
                      else kwargs["heads"]))
        return inner(func, *args, **kwargs)

    return override


def _explicit(q, k, heads, skip_reshape, n_text, text_first, grid):
    """Explicit softmax over all keys, restricted to the image rows and text columns, mean over heads."""
    if not skip_reshape:
        q, k = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
    p = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    n = k.shape[-2]
    image, text = (slice(n_text, n), slice(0, n_text)) if text_first else (slice(0, n - n_text), slice(n - n_text, n))
    m = p[:, :, image, text].mean(1)
    return m.reshape(m.shape[0], *grid, n_text)


def _reader(pack, model, spec, **params):
    p = pack.nodes.sampling.AEParams(**params)
    return pack.nodes.families.reader_for(model.model, p, LATENT[-2:], spec.num_keys)


def _cond_batch(model, conds, x, sigma, mo):
    """ComfyUI's cond-only model call (as the gradient pass makes it) on ``x`` at ``sigma``."""
    import comfy.samplers

    c = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, x, x.device, "positive")
    model.model.current_patcher = model  # as ComfyUI's sampling sets it
    return comfy.samplers.calc_cond_batch(model.model, [c], x, sigma.expand(x.shape[0]), mo)


def _as_sampler_cond(entry):
    import comfy.sampler_helpers

    return comfy.sampler_helpers.convert_cond(entry["pos"])


@pytest.mark.parametrize("family,flipped", [("flux", False), ("flux", True), ("sd3", False)])
def test_captured_block_equals_explicit_softmax_and_gradient_reaches_the_latent(pack, tiny, family, flipped):
    t = tiny[family]
    model = t["build"](0)
    if flipped:  # image tokens first in the first double block, as in HunyuanVideo-style blocks
        model.model.diffusion_model.double_blocks[0].flipped_img_txt = True
    spec = t["spec"]
    reader = _reader(pack, model, spec, joint_blocks="all")
    grid = reader.target_hw
    x = torch.randn(LATENT, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7])
    cond = _as_sampler_cond(t)

    # the ordinary pass: the recorder's maps, and the q, k ComfyUI's own attention received (RoPE applied)
    store, seen = MapStore(), []
    rec = reader.recorder(store, [0.7, 0.0])
    mo = reader.install({"transformer_options": {}}, rec, reader.keys)
    mo["transformer_options"]["optimized_attention_override"] = _spy(rec.override, seen)
    with torch.no_grad():
        _cond_batch(model, cond, x, sigma, mo)
    joint = [s for s in seen if s[2].shape[-2 if s[4] else 1] > grid[0] * grid[1]]
    assert len(joint) == len(reader.keys)
    explicit = {}
    for key, (_, _, q, k, skip, heads) in zip(reader.keys, joint):
        text_first = reader.family.text_first(model.model.diffusion_model, key)
        assert text_first == (not (flipped and key == ("double", 0)))
        explicit[key] = _explicit(q, k, heads, skip, spec.num_keys, text_first, grid)
    # the recorder keeps one map per step: the mean over the read blocks
    label = pack.nodes.joint_capture.blocks_label(reader.keys)
    assert list(store.maps) == [label] and label == ("joint.0-1" if family == "sd3" else "double.0-1,single.0")
    torch.testing.assert_close(store.maps[label], torch.stack(list(explicit.values())).mean(0), rtol=1e-4, atol=1e-6)

    # the gradient pass (RoPE applied by the capture on Flux): the same maps, in the graph of the latent
    capture = reader.grad_capture(reader.keys)
    mo = reader.install({"transformer_options": {"optimized_attention_override": None}}, capture, reader.keys)
    leaf = x.clone().requires_grad_(True)
    with torch.enable_grad(), torch.inference_mode(False), reader.pass_context():
        try:
            _cond_batch(model, cond, leaf, sigma, mo)
        except pack.nodes.capture.StopForward:
            pass
        for key in reader.keys:  # per block, in the graph
            torch.testing.assert_close(capture.maps[key].detach(), explicit[key], rtol=1e-4, atol=1e-6)
        loss, maxima = pack.attention.loss.attend_excite_objective(capture.aggregate(), spec.indices,
                                                                   torch.ones(spec.num_keys, dtype=torch.bool))
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert maxima.shape == (1, 2) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_pass_stops_after_the_last_read_block(pack, tiny):
    t = tiny["flux"]
    reader = _reader(pack, t["model"], t["spec"])  # auto: the double-stream blocks
    assert reader.keys == [("double", 0), ("double", 1)]
    seen = []
    capture = reader.grad_capture(reader.keys)
    mo = reader.install({"transformer_options": {}}, capture, reader.keys)
    mo["transformer_options"]["optimized_attention_override"] = _spy(capture.override, seen)
    leaf = torch.zeros(LATENT).requires_grad_(True)
    with torch.enable_grad(), torch.inference_mode(False), reader.pass_context():
        with pytest.raises(pack.nodes.capture.StopForward):
            _cond_batch(t["model"], _as_sampler_cond(t), leaf, torch.tensor([0.5]), mo)
    assert [(s[0], s[1]) for s in seen] == [("double", 0), ("double", 1)]  # the single block never ran


def _run(pack, t, sampler_name: str, scale_factor: float, record=None, steps: int = 4):
    import comfy.sample
    import comfy.samplers

    model = t["model"]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
    latent = torch.zeros(LATENT)
    family = "flux" if t["spec"].num_keys == 256 else "sd3"
    if scale_factor is None:
        sampler = comfy.samplers.sampler_object(sampler_name)
    else:
        params = pack.nodes.sampling.AEParams(sampler_name=sampler_name, scale_factor=scale_factor,
                                              refinement=((0.0, 0.9),), max_refinement_steps=3,
                                              record_maps=record is not None)
        sampler = pack.nodes.sampling.make_sampler(params, record)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 3), CFG[family], sampler, sigmas,
                                          t["pos"], t["neg"], latent, disable_pbar=True, seed=3)


CONTINUITY_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "lcm")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_vanishing_step_is_plain_sampling_for_every_sampler(pack, tiny, family):
    t = tiny[family]
    options = copy.deepcopy({k: v for k, v in t["model"].model_options.items() if k != "transformer_options"})
    pos_before = t["pos"][0][0].clone()
    for name in CONTINUITY_SAMPLERS:
        plain = _run(pack, t, name, None)
        assert torch.equal(_run(pack, t, name, 0.0), plain), name
        tiny_step = _run(pack, t, name, 1e-6)
        rel = float((tiny_step - plain).norm() / plain.norm())
        assert rel < 1e-5, (name, rel)
    assert not t["model"].model_options.get("transformer_options", {}).get("optimized_attention_override")
    assert {k: v for k, v in t["model"].model_options.items() if k != "transformer_options"}.keys() == options.keys()
    assert torch.equal(t["pos"][0][0], pos_before)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_guidance_moves_the_latent_and_refinement_lowers_the_loss(pack, tiny, family):
    t = tiny[family]
    record = pack.attention.record.AttentionRecord()
    guided = _run(pack, t, "euler", 20.0, record)
    plain = _run(pack, t, "euler", None)
    assert float((guided - plain).norm() / plain.norm()) > 1e-3
    first = [float(v[0]) for v in record.losses[0]]
    assert len(first) >= 2 and first[-1] < first[0], first  # refinement at step 0: each pass lowers the loss
    step0 = record.maps[0]
    grid = (LATENT[-2] // 2, LATENT[-1] // 2)
    assert step0 and all(m.shape == (1, *grid, t["spec"].num_keys) for m in step0.values())
    assert record.labels == ("cat", "frog")


def test_token_streams(pack, tiny):
    import tiny_dit

    flux, sd3 = tiny["flux"]["spec"], tiny["sd3"]["spec"]
    assert (flux.family, flux.num_keys) == ("t5xxl", 256) and min(flux.prompt_positions) == 0
    assert (sd3.family, sd3.num_keys) == ("t5xxl", 154) and min(sd3.prompt_positions) == 77  # T5 after CLIP
    assert "cat  ← excited" in tiny["flux"]["table"] and "rog (frog)  ← excited" in tiny["flux"]["table"]
    with torch.inference_mode():
        _, _, clip_only = pack.nodes.encode.encode_subjects(tiny_dit.sd3_clip(0, t5_dim=None), PROMPT, SUBJECTS)
    assert (clip_only.family, clip_only.num_keys) == ("l", 77)  # SD3 without T5: its CLIP stream
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        pack.nodes.encode.encode_subjects(tiny["flux"]["clip"], PROMPT, "horse")


def test_block_choice_and_unsupported_models(pack, tiny):
    fam = pack.nodes.families
    flux_dm, sd3_dm = tiny["flux"]["model"].model.diffusion_model, tiny["sd3"]["model"].model.diffusion_model
    assert fam.FLUX.choose(flux_dm, "all") == [("double", 0), ("double", 1), ("single", 0)]
    assert fam.FLUX.choose(flux_dm, "single") == [("single", 0)]
    assert fam.FLUX.choose(flux_dm, "1-2") == [("double", 1), ("single", 0)]
    with pytest.raises(ValueError, match="has blocks 0-2"):
        fam.FLUX.choose(flux_dm, "5")
    with pytest.raises(ValueError, match="SD3 has no double blocks"):
        fam.SD3.choose(sd3_dm, "double")
    assert fam.SD3.default([("joint", i) for i in range(24)]) == [("joint", i) for i in range(6, 9)]

    class HunyuanVideo:  # another transformer family, no UNet cross-attention
        diffusion_model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"HunyuanVideo models are not supported.*Flux.1 .* SD3"):
        fam.family_of(HunyuanVideo())


def test_flux_loaded_from_a_diffusion_model_file(pack, tiny):
    """The detectable Flux file (full width, one double block) through ComfyUI's loader: A&E takes its passes."""
    import comfy.sd
    import tiny_dit

    model = comfy.sd.load_diffusion_model(str(tiny_dit.ensure_flux_unet()))
    t = {**tiny["flux"], "model": model}
    record = pack.attention.record.AttentionRecord()
    out = _run(pack, t, "euler", 20.0, record, steps=2)
    assert torch.isfinite(out).all() and len(record.losses[0]) >= 2


def test_sd3_maps_follow_the_blocks_when_another_node_skips_one(pack, tiny):
    """Skip Layer Guidance and similar nodes skip SD3 blocks through ``dit`` replace patches: the recorder tags the
    read blocks instead of counting calls, so the map of block 1 is still block 1's when block 0 does not run."""
    t = tiny["sd3"]
    model = t["model"]
    reader = _reader(pack, model, t["spec"], joint_blocks="all")
    store, seen = MapStore(), []
    rec = reader.recorder(store, [0.7, 0.0])

    def skip(args, extra):  # what SkipLayerGuidanceSD3 installs for a skipped block
        return {"img": args["img"], "txt": args["txt"]}

    others = {"transformer_options": {"patches_replace": {"dit": {("double_block", 0): skip}}}}
    mo = reader.install(others, rec, reader.keys)
    mo["transformer_options"]["optimized_attention_override"] = _spy(rec.override, seen)
    x = torch.randn(LATENT, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _cond_batch(model, _as_sampler_cond(t), x, torch.tensor([0.7]), mo)
    joint = [s for s in seen if s[2].shape[1] > reader.target_hw[0] * reader.target_hw[1]]
    assert len(joint) == 1  # block 0 was skipped
    _, _, q, k, skip_reshape, heads = joint[0]
    (label, got), = store.maps.items()
    want = _explicit(q, k, heads, skip_reshape, t["spec"].num_keys, True, reader.target_hw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # block 1's map, as one of one read block
