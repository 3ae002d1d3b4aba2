"""scripts/tiny_dit.py in the real ComfyUI host: detection of the written Flux/SD3 files, the tiny in-process models
and text encoders (one KSampler step at 64 px, deterministic per seed), and the test-only loader node over HTTP."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.host, pytest.mark.slow]

PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def td(comfy_inprocess):
    import tiny_dit

    return tiny_dit


@pytest.fixture(scope="module")
def clips(td):
    return {"flux": td.flux_clip(0), "sd3": td.sd3_clip(0)}


def _encode(clip, text: str = PROMPT):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _step(model, positive, negative, seed: int = 0) -> torch.Tensor:
    """One euler step of ComfyUI's KSampler (``nodes.common_ksampler``) on an empty 64 x 64 px latent, CFG 3."""
    import nodes

    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, 1, 3.0, "euler", "simple", positive, negative,
                                    {"samples": torch.zeros(1, 16, 8, 8)})
    return out[0]["samples"]


def test_flux_unet_file_is_detected_as_flux(td):
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(td.ensure_flux_unet()))
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config) is comfy.supported_models.Flux
    unet = config.unet_config
    assert (unet["hidden_size"], unet["depth"], unet["depth_single_blocks"]) == (3072, 1, 0)
    assert (unet["context_in_dim"], unet["vec_in_dim"], unet["guidance_embed"]) == (td.FLUX_T5_DIM, 768, True)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}


def test_sd3_checkpoint_loads_as_sd3(td, comfy_inprocess):
    import comfy.model_base

    model, clip, vae = comfy_inprocess.load_checkpoint(td.ensure_sd3_checkpoint())
    assert type(model.model.model_config).__name__ == "SD3" and isinstance(model.model, comfy.model_base.SD3)
    assert clip is not None and vae.latent_channels == 16
    cond = _encode(clip)
    assert cond[0][0].shape == (1, 77, td.SD3_CONTEXT_DIM) and cond[0][1]["pooled_output"].shape == (1, 2048)
    assert torch.isfinite(_step(model, cond, _encode(clip, ""))).all()


def test_clip_cond_shapes(td, clips):
    flux, sd3 = _encode(clips["flux"]), _encode(clips["sd3"])
    assert flux[0][0].shape == (1, 256, td.FLUX_T5_DIM) and flux[0][1]["pooled_output"].shape == (1, 768)
    assert sd3[0][0].shape == (1, 77 + 77, td.SD3_CONTEXT_DIM) and sd3[0][1]["pooled_output"].shape == (1, 2048)
    assert not sd3[0][0][:, :77, 768:].any()  # CLIP-L zero-padded to 4096 by ComfyUI, T5 tokens after it
    t5 = clips["flux"].cond_stage_model.t5xxl.transformer
    assert tuple(t5.shared.weight.shape) == (32128, td.FLUX_T5_DIM) and t5.num_layers == 2
    assert torch.equal(_encode(td.flux_clip(0))[0][0], flux[0][0])  # seeded: a second build encodes the same


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_tiny_model_ksampler_step(td, clips, family):
    import comfy.model_sampling

    build = td.flux_model if family == "flux" else td.sd3_model
    model = build(0)
    sampling = model.get_model_object("model_sampling")
    if family == "flux":
        assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux) and sampling.shift == 1.15
    else:
        assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow) and sampling.shift == 3.0
    pos, neg = _encode(clips[family]), _encode(clips[family], "")
    first = _step(model, pos, neg)
    assert first.shape == (1, 16, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(_step(build(0), pos, neg), first)  # a second build with the same seed
    assert not torch.equal(_step(build(1), pos, neg), first)
    with torch.inference_mode():
        image = td.vae16(0).decode(first)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_loader_node_in_server(tiny_dit_server):
    """The test-only node pack loads in a ComfyUI server and its models run a KSampler graph end to end."""
    server = tiny_dit_server
    info = server.object_info("AETinyTransformerLoader")["AETinyTransformerLoader"]
    assert info["output"] == ["MODEL", "CLIP", "VAE"]
    for family in ("flux", "sd3"):
        history = server.run(_graph(family), timeout=300)
        assert history["outputs"]["7"]["images"], family


def _graph(family: str) -> dict:
    """AETinyTransformerLoader -> 2x CLIPTextEncode -> EmptySD3LatentImage (64 px) -> KSampler -> VAEDecode -> Save."""
    return {
        "1": {"class_type": "AETinyTransformerLoader", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "ae_tiny_dit"}},
    }
