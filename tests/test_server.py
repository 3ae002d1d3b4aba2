"""The pack in a real ComfyUI server, driven over its HTTP API like a user's frontend would."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from comfy_server import ComfyError
from PIL import Image
from run_demo import build_prompt

pytestmark = [pytest.mark.host, pytest.mark.slow]

WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "A&E text to image (SD1.5).json"
OUR_NODES = ("AttendExciteTextEncode", "AttendExciteSampler", "AttendExciteKSampler", "AttendExciteOptions",
             "AttendExciteVisualize", "AttendExciteReport")
CKPT = "ae_tiny_sd15.safetensors"


def pixels(server, ref) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(server.image_bytes(ref))).convert("RGB"))


def workflow_prompt(server, seed=42, steps=4, size=256, subjects=None):
    """The shipped workflow as the demo builds it, with a refinement cap of 3 and optionally other subjects."""
    prompt = build_prompt(server, WORKFLOW, CKPT, steps, size, seed)
    for node in prompt.values():
        if node["class_type"] == "AttendExciteKSampler":
            node["inputs"]["max_refinement_steps"] = 3
        elif node["class_type"] == "AttendExciteTextEncode" and subjects is not None:
            node["inputs"]["subjects"] = subjects
    return prompt


def outputs_by_prefix(server, prompt, history) -> dict[str, np.ndarray]:
    out = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            ref = history["outputs"][node_id]["images"][0]
            out[node["inputs"]["filename_prefix"].split("/")[-1]] = pixels(server, ref)
    return out


def test_nodes_are_registered_with_tooltips(comfy_server):
    info = comfy_server.object_info()
    for node_id in OUR_NODES:
        assert node_id in info, node_id
        assert info[node_id]["category"] == "attend_excite"
        assert info[node_id]["description"]
    ks = info["AttendExciteKSampler"]["input"]["required"]
    for name in ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                 "latent_image", "denoise", "scale_factor", "refinement"):
        assert name in ks, name
    assert info["AttendExciteKSampler"]["input"]["optional"]["options"][0] == "ATTEND_EXCITE_OPTIONS"
    assert "attention_resolution" in info["AttendExciteOptions"]["input"]["required"]
    assert ks["scale_factor"][1]["default"] == 20.0 and ks["guided_fraction"][1]["default"] == 0.5
    for node_id in OUR_NODES:
        inputs = info[node_id]["input"]
        for key, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{node_id}.{key}"
        assert all(info[node_id]["output_tooltips"]), node_id


def test_shipped_workflow_runs_and_repeats_bit_identically(comfy_server):
    a = workflow_prompt(comfy_server, seed=42)
    first = outputs_by_prefix(comfy_server, a, comfy_server.run(a, timeout=900))
    assert set(first) == {"plain", "ae", "plain_maps", "ae_maps"}
    h, w, _ = first["ae"].shape
    assert (h, w) == (256, 256)
    assert first["ae_maps"].shape == (h, 3 * w, 3)  # image | cat | frog
    assert not np.array_equal(first["plain"], first["ae"])  # A&E moved the latent
    # another prompt in between, then the first again: recomputed (not cached) and bit-identical
    b = workflow_prompt(comfy_server, seed=7)
    comfy_server.run(b, timeout=900)
    again = outputs_by_prefix(comfy_server, a, comfy_server.run(workflow_prompt(comfy_server, seed=42), timeout=900))
    for key in first:
        assert np.array_equal(first[key], again[key]), key


def test_bad_subject_fails_on_the_node_and_the_server_keeps_serving(comfy_server):
    with pytest.raises(ComfyError, match="'horse'.*not in the prompt"):
        comfy_server.run(workflow_prompt(comfy_server, steps=1, subjects="horse"), timeout=600)
    ok = workflow_prompt(comfy_server, steps=1, seed=3)
    assert set(outputs_by_prefix(comfy_server, ok, comfy_server.run(ok, timeout=600))) == {
        "plain", "ae", "plain_maps", "ae_maps"}


def test_sampler_custom_with_the_ae_sampler(comfy_server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "AttendExciteTextEncode",
              "inputs": {"clip": ["1", 1], "text": "a (cat:1.2) and a frog", "subjects": "cat, frog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "5": {"class_type": "AttendExciteSampler",
              "inputs": {"sampler_name": "euler_ancestral", "scale_factor": 20.0, "guided_fraction": 0.5,
                         "scale_start": 1.0, "scale_end": 0.5, "refinement": "0:0.05", "max_refinement_steps": 2,
                         "smoothing": True, "kernel_size": 3, "smoothing_sigma": 0.5, "attention_resolution": 0,
                         "token_slots": "auto", "record_maps": True}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 4,
                                                          "denoise": 1.0}},
        "7": {"class_type": "SamplerCustom",
              "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 1, "cfg": 5.0, "positive": ["2", 0],
                         "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "AttendExciteVisualize",
              "inputs": {"attention_maps": ["5", 1], "image": ["8", 0], "start_percent": 0.0, "end_percent": 1.0,
                         "layers": "all", "alpha": 0.5}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "custom/maps"}},
        # listed first among the outputs and fed only by the A&E Sampler's maps and the sampled latent: the latent
        # makes it wait for the sampling that fills the maps
        "0": {"class_type": "AttendExciteReport",
              "inputs": {"attention_maps": ["5", 1], "threshold": 0.2, "samples": ["7", 0]}},
    }
    history = comfy_server.run(prompt, timeout=600)
    maps = pixels(comfy_server, history["outputs"]["10"]["images"][0])
    assert maps.shape == (256, 3 * 256, 3)
    (report,) = history["outputs"]["0"]["attend_excite"]
    assert report["labels"] == ["cat", "frog"] and len(report["max_attention"][0]) == 2
