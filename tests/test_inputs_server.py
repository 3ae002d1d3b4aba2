"""Through a real ComfyUI server over HTTP: bad inputs refused when the prompt is queued (HTTP 400, the message names
the input and the fix), the next prompt still runs; text shown on the nodes; a workflow saved before the expert
settings moved to the Options node still converts and runs."""

from __future__ import annotations

import copy
import json
import math
import urllib.error
from pathlib import Path

import pytest
from comfy_server import ComfyError, ui_to_api

pytestmark = [pytest.mark.host, pytest.mark.slow]

CKPT = "ae_tiny_sd15.safetensors"
EARLIER_WORKFLOW = Path(__file__).resolve().parent / "data" / "workflow_sd15_before_options_node.json"


def graph(steps: int = 2, size: int = 128, text: str = "a cat and a café 🐢") -> dict:
    """A small text-to-image prompt with every node of the pack."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "AttendExciteTextEncode",
              "inputs": {"clip": ["1", 1], "text": text, "subjects": "cat, 🐢"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "AttendExciteOptions",
              "inputs": {"max_refinement_steps": 2, "smoothing": True, "kernel_size": 3, "smoothing_sigma": 0.5,
                         "attention_resolution": 0, "token_slots": "auto", "record_maps": True,
                         "attention_blocks": "all", "cuda_graph": True}},
        "6": {"class_type": "AttendExciteKSampler",
              "inputs": {"model": ["1", 0], "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "denoise": 1.0, "scale_factor": 20.0, "guided_fraction": 0.5, "scale_start": 1.0,
                         "scale_end": 0.5, "refinement": "0:0.05", "options": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "AttendExciteVisualize",
              "inputs": {"attention_maps": ["6", 1], "image": ["7", 0], "start_percent": 0.0, "end_percent": 0.5,
                         "layers": "all", "alpha": 0.5}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "inputs/maps"}},
        "10": {"class_type": "AttendExciteReport", "inputs": {"attention_maps": ["6", 1], "threshold": 0.2}},
    }


OUTPUT_NODES = ("SaveImage", "AttendExciteReport", "PreviewAny")


def depends_on(prompt: dict, node: str, target: str) -> bool:
    links = [v[0] for v in prompt[node]["inputs"].values() if isinstance(v, list)]
    return node == target or any(depends_on(prompt, n, target) for n in links)


def refused(server, prompt: dict, node: str) -> dict:
    """``node_errors`` of a prompt that ComfyUI refuses at validation (HTTP 400). Outputs that do not depend on
    ``node`` are left out: ComfyUI runs the valid outputs of a prompt when there are any."""
    prompt = {k: v for k, v in prompt.items()
              if v["class_type"] not in OUTPUT_NODES or depends_on(prompt, k, node)}
    with pytest.raises(urllib.error.HTTPError) as err:
        server.post_json("/prompt", {"prompt": prompt, "client_id": "inputs-test"})
    assert err.value.code == 400
    return json.loads(err.value.read())["node_errors"]


# (node, input, value, start of the message)
BAD_INPUTS = [
    ("8", "start_percent", 0.8, "start_percent (0.8) is after end_percent (0.5). Give start_percent <= end_percent"),
    ("6", "scale_factor", math.nan, "scale_factor = nan is not a finite number. Give a number from 0 to 1000"),
    ("6", "scale_factor", math.inf, "scale_factor = inf is not a finite number."),
    ("6", "guided_fraction", math.nan, "guided_fraction = nan is not a finite number."),
    ("6", "cfg", -math.inf, "cfg = -inf is not a finite number."),
    ("6", "denoise", math.nan, "denoise = nan is not a finite number."),
    ("6", "sampler_name", "euler_fast", "sampler_name 'euler_fast' is not one of its options"),
    ("6", "scheduler", "linear", "scheduler 'linear' is not one of its options"),
    ("6", "refinement", "0.2-0.5", "refinement entry '0.2-0.5' is not 'fraction:threshold', e.g. '0.2:0.5'."),
    ("6", "refinement", "0.2:1.5", "refinement entry '0.2:1.5': fraction must be in [0, 1) and threshold in [0, 1]"),
    ("5", "kernel_size", 4, "kernel_size = 4 is even. Give an odd size such as 3"),
    ("5", "smoothing_sigma", math.nan, "smoothing_sigma = nan is not a finite number."),
    ("5", "token_slots", "everything", "token_slots 'everything' is not one of its options (auto, "),
    ("8", "alpha", math.nan, "alpha = nan is not a finite number."),
    ("10", "threshold", math.inf, "threshold = inf is not a finite number."),
]


def test_bad_inputs_are_refused_when_queued_and_the_next_prompt_runs(comfy_server):
    for node, name, value, message in BAD_INPUTS:
        prompt = graph()
        prompt[node]["inputs"][name] = value
        errors = refused(comfy_server, prompt, node)
        assert list(errors) == [node], (name, errors)
        details = [e["details"] for e in errors[node]["errors"]]
        assert details and all(message in d for d in details), (name, details)
        assert not any(d.split(" - ", 1)[-1].startswith("AttendExcite") for d in details)
    history = comfy_server.run(graph(), timeout=600)
    assert history["outputs"]["9"]["images"]


def test_the_sampler_nodes_sampler_name_is_refused_too(comfy_server):
    prompt = {
        "1": {"class_type": "AttendExciteSampler",
              "inputs": {"sampler_name": "eulr", "scale_factor": 20.0, "guided_fraction": 0.5, "scale_start": 1.0,
                         "scale_end": 0.5, "refinement": ""}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    details = [e["details"] for e in refused(comfy_server, prompt, "1")["1"]["errors"]]
    assert all("sampler_name 'eulr' is not one of its options" in d and "Did you mean 'euler'?" in d
               for d in details), details


def test_token_table_and_report_are_shown_on_their_nodes(comfy_server):
    history = comfy_server.run(graph(text="a cat and a café 🐢 on grass"), timeout=600)  # not cached
    table = history["outputs"]["2"]["text"][0].splitlines()
    assert table[:3] == ["- 1: a", "- 2: cat  ← excited", "- 3: and"]
    assert "- 5: café" in table and any(line.endswith("🐢  ← excited") for line in table)
    assert not any("</w>" in line for line in table)
    report = history["outputs"]["10"]["text"][0].splitlines()
    assert report[0].startswith("Max attention per subject at step 1 of 2")
    assert report[1].startswith("image 1: cat ") and ", 🐢 " in report[1]
    assert history["outputs"]["10"]["attend_excite"][0]["labels"] == ["cat", "🐢"]


def test_workflow_saved_before_the_options_node_converts_and_runs(comfy_server):
    workflow = json.loads(EARLIER_WORKFLOW.read_text())
    ae = next(n for n in workflow["nodes"] if n["id"] == 6)
    ae["widgets_values"][12] = 2  # max_refinement_steps, an expert setting saved on the sampler node
    prompt = ui_to_api(workflow, comfy_server.object_info())
    plain, guided = prompt["5"]["inputs"], prompt["6"]["inputs"]
    assert (plain["scale_factor"], guided["scale_factor"]) == (0.0, 20.0)
    assert guided["refinement"] == "0:0.05, 0.2:0.5, 0.4:0.8" and guided["seed"] == 42
    assert guided["max_refinement_steps"] == 2 and guided["attention_blocks"] == "all"  # passed on by name
    prompt["1"]["inputs"]["ckpt_name"] = CKPT
    prompt["4"]["inputs"].update(width=128, height=128)
    for node in ("5", "6"):
        prompt[node]["inputs"]["steps"] = 2
    history = comfy_server.run(prompt, timeout=600)
    assert all(history["outputs"][n]["images"] for n in ("11", "12", "13", "14"))


def test_earlier_settings_sent_through_the_api_are_honoured_and_checked(comfy_server):
    prompt = graph()
    ks = prompt["6"]["inputs"]
    del ks["options"]
    ks["record_maps"] = False  # the earlier input, on the sampler node itself
    with pytest.raises(ComfyError, match="attention_maps is empty: the run recorded no attention maps"):
        comfy_server.run(prompt, timeout=600)
    ks["record_maps"] = True
    ks["kernel_size"] = 4
    with pytest.raises(ComfyError, match="kernel_size = 4 is even"):
        comfy_server.run(prompt, timeout=600)
    good = copy.deepcopy(graph())
    assert comfy_server.run(good, timeout=600)["outputs"]["9"]["images"]
