"""Every workflow in ``workflows/`` against a real ComfyUI server: it validates as saved (only the model and
picture files a user supplies are missing), and it runs with stand-ins for them (the tiny checkpoint, LoRA,
ControlNet and generated pictures of ``scripts/tiny_addons.py``), as ``scripts/run_demo.py --thumbnails`` runs it.

The SDXL workflow's graph is model-agnostic (checkpoint loader, A&E encode, A&E KSampler), so it runs here on the
tiny SD1.5 checkpoint at 128 px; on SDXL weights it is what the template says.
"""

from __future__ import annotations

import io
import json
import urllib.error
import uuid
from pathlib import Path

import numpy as np
import pytest
from comfy_server import ui_to_api
from PIL import Image
from run_demo import install_addons, joint_family, stand_in_prompt
from tiny_checkpoint import DEFAULT_NAME as CKPT

pytestmark = [pytest.mark.host, pytest.mark.slow]

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
# the inputs a user fills with their own files; everything else must validate as saved
USER_FILES = {"ckpt_name", "unet_name", "clip_name1", "clip_name2", "clip_name3", "vae_name", "lora_name",
              "control_net_name", "image"}
MODEL_FILES = {"ckpt_name", "unet_name"}


def ids(paths: list[Path]) -> list[str]:
    return [p.stem.removeprefix("A&E ").replace(" ", "_") for p in paths]


@pytest.fixture(scope="module")
def addons(comfy_server):
    return install_addons(comfy_server, size=128)


def node_errors(server, prompt: dict) -> dict:
    """``POST /prompt``; the validation errors (empty dict when the prompt was queued)."""
    try:
        answer = server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    except urllib.error.HTTPError as err:
        assert err.code == 400
        return json.loads(err.read()).get("node_errors", {})
    server.wait(answer["prompt_id"], timeout=600)
    return {}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=ids(WORKFLOWS))
def test_workflow_validates_as_saved_but_for_the_users_files(comfy_server, workflow):
    prompt = ui_to_api(json.loads(workflow.read_text()), comfy_server.object_info())
    errors = node_errors(comfy_server, prompt)
    assert errors, "the saved workflow names model files that the test server does not have"
    found = []
    for node_id, entry in errors.items():
        for error in entry["errors"]:
            name = error.get("extra_info", {}).get("input_name")
            found.append(name)
            # a combo value not in the list; LoadImage checks its file itself
            assert error["type"] in ("value_not_in_list", "custom_validation_failed"), (node_id, error)
            assert name in USER_FILES, (node_id, entry["class_type"], error)
    assert MODEL_FILES & set(found)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=ids(WORKFLOWS))
def test_workflow_runs_with_stand_in_files(comfy_server, addons, workflow):
    if joint_family(ui_to_api(json.loads(workflow.read_text()), comfy_server.object_info())):
        pytest.skip("Flux / SD3 workflows run on the tiny transformers in test_joint_workflows_server.py")
    prompt, pictures = stand_in_prompt(comfy_server, workflow, CKPT, addons, steps=2, size=128, seed=3,
                                       max_refinement_steps=2)
    history = comfy_server.run(prompt, timeout=900)
    saves = {k: n for k, n in prompt.items() if n["class_type"] == "SaveImage"}
    assert saves
    for node_id, node in saves.items():
        (ref,) = history["outputs"][node_id]["images"]
        image = np.asarray(Image.open(io.BytesIO(comfy_server.image_bytes(ref))).convert("RGB"))
        h, w, _ = image.shape
        assert h == 128, (node["inputs"]["filename_prefix"], image.shape)
        if node["inputs"]["filename_prefix"].endswith("_maps"):
            assert w == 3 * h  # image | cat | frog
        else:
            assert w == h
    if any(n["class_type"] == "LoadImage" for n in prompt.values()):
        assert pictures
