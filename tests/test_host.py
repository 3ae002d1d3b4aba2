"""The development host works: tiny checkpoint detection/loading, server start, a plain e2e prompt."""

from __future__ import annotations

import io
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.host


def test_tiny_checkpoint_detected_as_sd15(comfy_inprocess: types.SimpleNamespace, tiny_checkpoint: Path) -> None:
    import comfy.model_detection
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(tiny_checkpoint))
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(config).__name__ == "SD15"
    assert config.unet_config["transformer_depth"] == [1, 1, 1, 1, 1, 1, 0, 0]

    model, clip, vae = comfy_inprocess.load_checkpoint(tiny_checkpoint)
    assert model is not None and clip is not None and vae is not None


def test_server_lists_core_nodes(comfy_server) -> None:
    info = comfy_server.object_info()
    assert "CheckpointLoaderSimple" in info
    assert "SamplerCustom" in info
    ckpts = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "ae_tiny_sd15.safetensors" in ckpts


def plain_prompt(ckpt_name: str, size: int = 64, steps: int = 2) -> dict:
    """CheckpointLoaderSimple -> 2x CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat and a dog", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 1,
                "steps": steps,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "host_test"}},
    }


def test_plain_graph_over_http(comfy_server) -> None:
    from PIL import Image

    history = comfy_server.run(plain_prompt("ae_tiny_sd15.safetensors"), timeout=300)
    images = history["outputs"]["7"]["images"]
    assert len(images) == 1
    data = comfy_server.image_bytes(images[0])
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(data))
    assert img.size == (64, 64)
    lo, hi = img.convert("L").getextrema()
    assert hi > lo, "decoded image is constant (NaN/inf in the tiny model?)"


def test_invalid_prompt_reports_node_errors(comfy_server) -> None:
    import comfy_server as cs

    prompt = plain_prompt("does_not_exist.safetensors")
    with pytest.raises(cs.ComfyError, match="node_errors"):
        comfy_server.queue(prompt)
