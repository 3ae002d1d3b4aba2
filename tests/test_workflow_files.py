"""The workflows in ``workflows/`` as ComfyUI's template browser shows them; no ComfyUI needed.

ComfyUI serves a pack's ``workflows/*.json`` as templates (``/api/workflow_templates/<pack>/<name>.json``) and its
front end (1.32.9 with ComfyUI 0.3.75; no later one reads anything else for custom nodes) shows each with
``<name>.jpg`` as its thumbnail and the file name as its title and description. So every workflow needs a
thumbnail (rendered by ``scripts/run_demo.py --thumbnails``) and a file name that reads as a title; the longer
description is the workflow's Note.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
TITLE_PREFIX = "A&E "
THUMBNAIL_PX = 512


def ids(paths: list[Path]) -> list[str]:
    return [p.stem.removeprefix(TITLE_PREFIX).replace(" ", "_") for p in paths]


def test_the_workflows_users_ask_for_are_there():
    uses = {w.stem: {n["type"] for n in json.loads(w.read_text())["nodes"]} for w in WORKFLOWS}
    wanted = {
        "SamplerCustomAdvanced with the A&E Sampler": {"SamplerCustomAdvanced", "AttendExciteSampler",
                                                       "BasicScheduler", "KSamplerSelect", "CFGGuider",
                                                       "RandomNoise"},
        "LoRA and ControlNet": {"LoraLoader", "ControlNetApplyAdvanced", "ControlNetLoader"},
        "image to image": {"LoadImage", "VAEEncode"},
        "Flux.1 dev": {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "KSampler", "AttendExciteKSampler"},
        "SD3.5": {"CheckpointLoaderSimple", "TripleCLIPLoader", "EmptySD3LatentImage", "KSampler",
                  "AttendExciteKSampler"},
    }
    for what, types in wanted.items():
        assert any(types <= used for used in uses.values()), what
    sdxl = [w for w in WORKFLOWS if "SDXL" in w.stem]
    assert sdxl and "sd_xl" in json.dumps(json.loads(sdxl[0].read_text())["nodes"])
    img2img = [n for w in WORKFLOWS for n in json.loads(w.read_text())["nodes"] if "VAEEncode" in uses[w.stem]
               and n["type"] == "AttendExciteKSampler"]
    assert img2img and all(0 < n["widgets_values"][6] < 1 for n in img2img)  # denoise below 1
    _flux_and_sd3()


def _joint(types: set[str]) -> dict[str, list[dict]]:
    """``{node type: nodes}`` of the one workflow that has all of ``types``."""
    (workflow,) = [w for w in WORKFLOWS if types <= {n["type"] for n in json.loads(w.read_text())["nodes"]}]
    nodes: dict[str, list[dict]] = {}
    for n in json.loads(workflow.read_text())["nodes"]:
        nodes.setdefault(n["type"], []).append(n)
    return nodes


def _same_seed_plain_and_ae(nodes: dict[str, list[dict]], cfg: float) -> None:
    """A plain KSampler and the A&E KSampler: same seed, steps, cfg, sampler and scheduler; 16-channel latent."""
    (plain,), (ae,) = nodes["KSampler"], nodes["AttendExciteKSampler"]
    # seed, control, steps, cfg, sampler_name, scheduler, denoise: the same widgets first on both
    assert plain["widgets_values"][:7] == ae["widgets_values"][:7] and ae["widgets_values"][3] == cfg
    assert ae["widgets_values"][7] > 0  # scale_factor
    (latent,) = nodes["EmptySD3LatentImage"]
    assert latent["widgets_values"][:2] == [1024, 1024]
    assert {"VAEDecode", "SaveImage", "AttendExciteVisualize", "AttendExciteReport", "Note"} <= set(nodes)
    assert len(nodes["SaveImage"]) == 3 and len(nodes["VAEDecode"]) == 2


def _flux_and_sd3() -> None:
    """Flux.1 dev loaded the usual way (diffusion model, CLIP-L + T5 of type flux, ae VAE) with FluxGuidance and
    cfg 1; SD3.5 medium with its text encoders from a TripleCLIPLoader, cfg 4.5; both plain and A&E, same seed."""
    flux = _joint({"UNETLoader", "DualCLIPLoader", "FluxGuidance", "AttendExciteKSampler"})
    (clip,) = flux["DualCLIPLoader"]
    assert clip["widgets_values"][:3] == ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux"]
    assert flux["UNETLoader"][0]["widgets_values"] == ["flux1-dev.safetensors", "default"]
    assert flux["VAELoader"][0]["widgets_values"] == ["ae.safetensors"]
    assert flux["FluxGuidance"][0]["widgets_values"] == [3.5]
    _same_seed_plain_and_ae(flux, cfg=1.0)  # guidance-distilled: one model call per step
    assert flux["KSampler"][0]["widgets_values"][4:6] == ["euler", "simple"]
    assert "double-stream" in flux["Note"][0]["widgets_values"][0]

    sd3 = _joint({"CheckpointLoaderSimple", "TripleCLIPLoader", "EmptySD3LatentImage", "AttendExciteKSampler"})
    assert sd3["CheckpointLoaderSimple"][0]["widgets_values"] == ["sd3.5_medium.safetensors"]
    assert sorted(sd3["TripleCLIPLoader"][0]["widgets_values"]) == ["clip_g.safetensors", "clip_l.safetensors",
                                                                   "t5xxl_fp16.safetensors"]
    _same_seed_plain_and_ae(sd3, cfg=4.5)
    assert sd3["KSampler"][0]["widgets_values"][4:6] == ["euler", "sgm_uniform"]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=ids(WORKFLOWS))
def test_workflow_has_a_title_a_note_and_a_thumbnail(workflow: Path):
    title = workflow.stem
    # the card shows about 26 characters of the title on one line (1.32.9, 1920-px window)
    assert title.startswith(TITLE_PREFIX) and "_" not in title and len(title) <= 26, title
    data = json.loads(workflow.read_text())
    notes = [n for n in data["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and len(notes[0]["widgets_values"][0]) > 80  # the description
    thumb = workflow.with_suffix(".jpg")
    assert thumb.is_file(), f"no thumbnail: run `python scripts/run_demo.py --thumbnails` ({thumb.name})"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size == (THUMBNAIL_PX, THUMBNAIL_PX)
    assert thumb.stat().st_size < 120_000


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=ids(WORKFLOWS))
def test_workflow_links_are_consistent(workflow: Path):
    data = json.loads(workflow.read_text())
    nodes = {n["id"]: n for n in data["nodes"]}
    assert len(nodes) == len(data["nodes"]) and max(nodes) <= data["last_node_id"]
    links = {link[0]: link for link in data["links"]}
    assert max(links) <= data["last_link_id"]
    for lid, src, src_slot, dst, dst_slot, kind in links.values():
        assert lid in nodes[src]["outputs"][src_slot]["links"]
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == lid and target["type"] == kind == nodes[src]["outputs"][src_slot]["type"]
    for node in nodes.values():
        assert all(i["link"] in links for i in node.get("inputs", []) if i.get("link") is not None)
        assert all(lid in links for o in node.get("outputs", []) for lid in o.get("links") or [])
