"""SDXL in the real ComfyUI host: the tokenizers' shared positions and A&E sampling on a tiny random SDXL UNet.

The UNet has the SDXL family's layout features (ADM conditioning with pooled output + size embedding, context 2048,
several transformer blocks per level, no middle transformer) at width 320; ComfyUI detects it as SDXL. It is
loaded under inference mode as the loader nodes do. 128 px: 16x16 latent, attention level 4x4 (latent / 4).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from host_helpers import load_bench, sample_custom

pytestmark = [pytest.mark.host, pytest.mark.slow]

SUBJECTS = (2, 5)  # "a cat and a frog": 1 a, 2 cat, 3 and, 4 a, 5 frog


@pytest.fixture(scope="module")
def sdxl(comfy_inprocess):
    import comfy.sd
    import comfy_inprocess as ci

    ci.load_pack()
    bench = load_bench()
    sd = bench.random_state_dict("sdxl", "tiny", torch.device("cpu"), torch.float32, seed=0)
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    pack = {name: importlib.import_module(f"comfyui_attend_excite.{name}")
            for name in ("attention.tokens", "attention.record", "nodes.sampling")}
    gen = torch.Generator().manual_seed(1)
    spec = pack["attention.tokens"].SubjectTokens(indices=SUBJECTS, labels=("cat", "frog"),
                                               prompt_positions=tuple(range(1, 6)), num_keys=77, family="l")

    def cond(extra):
        return [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen),
                                                           **extra}]]

    return dict(pack=pack, model=model, pos=cond({"attend_excite": spec}), neg=cond({}))


def _run(sdxl, sampler, steps=4):
    """``sampler`` through ComfyUI's SamplerCustom entry point, 4 euler steps, CFG 5, seed 0."""
    return sample_custom(sdxl["model"], sampler, sdxl["pos"], sdxl["neg"], steps)


def _sample(sdxl, **ae):
    """The A&E sampler (no refinement) with ``ae``; ``(samples, record)``."""
    pack = sdxl["pack"]
    record = pack["attention.record"].AttentionRecord()
    params = pack["nodes.sampling"].AEParams(sampler_name="euler", refinement=(), **ae)
    return _run(sdxl, pack["nodes.sampling"].make_sampler(params, record)), record


def test_tiny_unet_is_detected_as_sdxl(sdxl):
    import comfy.model_base
    import comfy.supported_models

    # Segmind Vega's depths at width 320: ComfyUI's Segmind_Vega config, a subclass of SDXL, and SDXL's model class
    assert isinstance(sdxl["model"].model.model_config, comfy.supported_models.SDXL)
    assert type(sdxl["model"].model) is comfy.model_base.SDXL


def test_clip_l_and_clip_g_share_token_positions(comfy_inprocess):
    import comfy.sdxl_clip

    tokens = comfy.sdxl_clip.SDXLTokenizer().tokenize_with_weights("a photo of a cat and a frog, (red:1.2) hat")
    ids_l = [t[0] for t in tokens["l"][0]]
    ids_g = [t[0] for t in tokens["g"][0]]
    n = ids_l.index(49407)  # the end token closes the prompt in both; padding differs (end token vs 0)
    assert ids_l[:n + 1] == ids_g[:n + 1] and len(ids_l) == len(ids_g) == 77


@pytest.mark.parametrize("blocks", ["all", "down_mid"])
def test_ae_sampling_on_sdxl_reads_the_4x4_layers(sdxl, blocks):
    out, rec = _sample(sdxl, attention_blocks=blocks)
    assert torch.isfinite(out).all()
    assert sorted(rec.losses) == [0, 1]  # 2 guided steps of 4
    encoder = ["input.7.0", "input.7.1", "input.8.0", "input.8.1"]  # two transformer blocks per layer
    if blocks == "down_mid":
        assert rec.layers == encoder
    else:
        assert rec.layers == encoder + [f"output.{b}.{i}" for b in (0, 1, 2) for i in (0, 1)]


def test_ae_changes_the_sdxl_result_and_scale_zero_is_plain(sdxl):
    import comfy.samplers

    ae, _ = _sample(sdxl)
    off, rec = _sample(sdxl, scale_factor=0.0)
    plain = _run(sdxl, comfy.samplers.sampler_object("euler"))
    assert torch.equal(off, plain) and not rec.losses
    assert (ae - plain).abs().max() > 1e-4
