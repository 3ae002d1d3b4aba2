"""ui_to_api: UI-format workflow (frontend save) -> API-format prompt. Pure; no ComfyUI needed."""

from __future__ import annotations

import copy

import pytest
from comfy_server import ui_to_api

# Minimal /object_info in ComfyUI 0.3.75's shape (only what the converter reads).
OBJECT_INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["tiny.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP", {}]}},
        "input_order": {"required": ["text", "clip"]},
    },
    "EmptyLatentImage": {
        "input": {
            "required": {
                "width": ["INT", {"default": 512}],
                "height": ["INT", {"default": 512}],
                "batch_size": ["INT", {"default": 1}],
            }
        },
        "input_order": {"required": ["width", "height", "batch_size"]},
    },
    "LatentUpscaleBy": {
        "input": {
            "required": {
                "samples": ["LATENT", {}],
                "upscale_method": [["nearest-exact", "bilinear"], {}],
                "scale_by": ["FLOAT", {"default": 1.5}],
            }
        },
        "input_order": {"required": ["samples", "upscale_method", "scale_by"]},
    },
    "KSampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0, "control_after_generate": True}],
                "steps": ["INT", {"default": 20}],
                "cfg": ["FLOAT", {"default": 8.0}],
                "sampler_name": [["euler", "ddim"], {}],
                "scheduler": [["normal", "karras"], {}],
                "positive": ["CONDITIONING", {}],
                "negative": ["CONDITIONING", {}],
                "latent_image": ["LATENT", {}],
                "denoise": ["FLOAT", {"default": 1.0}],
            }
        },
        "input_order": {
            "required": [
                "model",
                "seed",
                "steps",
                "cfg",
                "sampler_name",
                "scheduler",
                "positive",
                "negative",
                "latent_image",
                "denoise",
            ]
        },
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
        "input_order": {"required": ["samples", "vae"]},
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "input_order": {"required": ["images", "filename_prefix"]},
    },
    "PreviewImage": {
        "input": {"required": {"images": ["IMAGE", {}]}},
        "input_order": {"required": ["images"]},
    },
    "Demo": {  # V3-style COMBO, optional widget, forceInput socket, a non-"seed" control widget
        "input": {
            "required": {
                "mode": ["COMBO", {"options": ["a", "b"]}],
                "count": ["INT", {"control_after_generate": True}],
            },
            "optional": {"latent": ["LATENT", {}], "gain": ["FLOAT", {"forceInput": True}], "note": ["STRING", {}]},
        },
        "input_order": {"required": ["mode", "count"], "optional": ["latent", "gain", "note"]},
    },
}


def _node(nid: int, ntype: str, inputs=(), widgets=None, mode: int = 0, outputs=()) -> dict:
    return {
        "id": nid,
        "type": ntype,
        "mode": mode,
        "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
        "outputs": [{"name": t.lower(), "type": t} for t in outputs],
        "widgets_values": widgets if widgets is not None else [],
    }


def plain_workflow() -> dict:
    """Checkpoint -> 2 prompts -> empty latent -(bypassed upscale)-> KSampler -> reroute -> decode -> save."""
    nodes = [
        _node(4, "CheckpointLoaderSimple", widgets=["tiny.safetensors"], outputs=["MODEL", "CLIP", "VAE"]),
        _node(6, "CLIPTextEncode", [("clip", "CLIP", 3)], ["a cat and a dog"], outputs=["CONDITIONING"]),
        _node(7, "CLIPTextEncode", [("clip", "CLIP", 5)], [""], outputs=["CONDITIONING"]),
        _node(5, "EmptyLatentImage", widgets=[64, 64, 1], outputs=["LATENT"]),
        _node(12, "LatentUpscaleBy", [("samples", "LATENT", 11)], ["nearest-exact", 2.0], mode=4, outputs=["LATENT"]),
        _node(
            3,
            "KSampler",
            [
                ("model", "MODEL", 1),
                ("positive", "CONDITIONING", 4),
                ("negative", "CONDITIONING", 6),
                ("latent_image", "LATENT", 2),
            ],
            [42, "randomize", 2, 5.0, "euler", "normal", 1.0],
            outputs=["LATENT"],
        ),
        _node(10, "Reroute", [("", "*", 7)], outputs=["LATENT"]),
        _node(8, "VAEDecode", [("samples", "LATENT", 8), ("vae", "VAE", 9)], outputs=["IMAGE"]),
        _node(9, "SaveImage", [("images", "IMAGE", 10)], ["host_test"]),
        _node(13, "PreviewImage", [("images", "IMAGE", 12)], mode=2),
        _node(14, "Note", widgets=["remember the milk"]),
    ]
    links = [
        [1, 4, 0, 3, 0, "MODEL"],
        [3, 4, 1, 6, 0, "CLIP"],
        [5, 4, 1, 7, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [11, 5, 0, 12, 0, "LATENT"],
        [2, 12, 0, 3, 3, "LATENT"],
        [7, 3, 0, 10, 0, "*"],
        [8, 10, 0, 8, 0, "LATENT"],
        [9, 4, 2, 8, 1, "VAE"],
        [10, 8, 0, 9, 0, "IMAGE"],
        [12, 8, 0, 13, 0, "IMAGE"],
    ]
    return {"last_node_id": 14, "last_link_id": 12, "nodes": nodes, "links": links, "version": 0.4}


EXPECTED = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat and a dog", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 42,
            "steps": 2,
            "cfg": 5.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "host_test", "images": ["8", 0]}},
}


def test_plain_workflow() -> None:
    assert ui_to_api(plain_workflow(), OBJECT_INFO) == EXPECTED


def test_dict_links_are_accepted() -> None:
    wf = plain_workflow()
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    wf["links"] = [dict(zip(keys, link)) for link in wf["links"]]
    assert ui_to_api(wf, OBJECT_INFO) == EXPECTED


def test_input_does_not_mutate_workflow() -> None:
    wf = plain_workflow()
    before = copy.deepcopy(wf)
    ui_to_api(wf, OBJECT_INFO)
    assert wf == before


def test_linked_widget_and_primitive() -> None:
    """A widget input fed by a link takes the link; one fed by a PrimitiveNode keeps its widget value."""
    wf = plain_workflow()
    ksampler = next(n for n in wf["nodes"] if n["id"] == 3)
    ksampler["inputs"].append({"name": "steps", "type": "INT", "link": 20, "widget": {"name": "steps"}})
    ksampler["inputs"].append({"name": "cfg", "type": "FLOAT", "link": 21, "widget": {"name": "cfg"}})
    wf["nodes"].append(_node(20, "PrimitiveNode", widgets=[2, "fixed"], outputs=["INT"]))
    wf["nodes"].append(_node(21, "Demo", widgets=["b", 7, "increment", "hello"], outputs=["FLOAT"]))
    wf["links"] += [[20, 20, 0, 3, 1, "INT"], [21, 21, 0, 3, 1, "FLOAT"]]
    api = ui_to_api(wf, OBJECT_INFO)
    assert api["3"]["inputs"]["steps"] == 2
    assert api["3"]["inputs"]["cfg"] == ["21", 0]
    # V3 COMBO, control widget on a non-seed INT, forceInput skipped, optional widget after it
    assert api["21"]["inputs"] == {"mode": "b", "count": 7, "note": "hello"}


def test_bypassed_node_without_matching_input_drops_link() -> None:
    wf = plain_workflow()
    next(n for n in wf["nodes"] if n["id"] == 5)["mode"] = 4  # bypass the latent source itself
    api = ui_to_api(wf, OBJECT_INFO)
    assert "5" not in api
    assert "latent_image" not in api["3"]["inputs"]


def test_unknown_node_type_raises() -> None:
    wf = plain_workflow()
    wf["nodes"].append(_node(30, "NoSuchNode"))
    with pytest.raises(ValueError, match="NoSuchNode"):
        ui_to_api(wf, OBJECT_INFO)
