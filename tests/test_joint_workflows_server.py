"""The Flux and SD3 workflows of ``workflows/`` on a real ComfyUI server, with their loader nodes replaced by the
test-only ``AETinyTransformerLoader`` (tiny random-weight models, ``scripts/tiny_dit.py``), at 64 px and 4 steps.

Each runs as saved otherwise (plain KSampler and A&E KSampler from the same seed, decode, save, Visualize, Report):
both images are written and differ, the maps strip has one panel per T5 subject word, the report names the same
words with attention values in [0, 1]. A subject that is not in the prompt fails on the encode node, naming the
word, and the server goes on serving the next prompt.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from comfy_server import ComfyError, ComfyServer
from PIL import Image
from run_demo import build_prompt, joint_family, with_tiny_loader

pytestmark = [pytest.mark.host, pytest.mark.slow]

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "workflows"
WORKFLOWS = {"flux": WORKFLOW_DIR / "A&E Flux.json", "sd3": WORKFLOW_DIR / "A&E SD3.json"}
SIZE, STEPS = 64, 4
SUBJECTS = ["cat", "frog"]


@pytest.fixture(scope="module")
def server(tiny_dit_server):
    """The shared test server with the pack and the tiny Flux/SD3 loader node (conftest)."""
    return tiny_dit_server


def tiny_prompt(server: ComfyServer, family: str) -> dict:
    """The workflow in API format (``ui_to_api``), tiny loader, 64 px, 4 steps, at most 2 refinement steps."""
    prompt = build_prompt(server, WORKFLOWS[family], "unused", steps=STEPS, size=SIZE, max_refinement_steps=2)
    assert joint_family(prompt) == family
    prompt = with_tiny_loader(prompt, family)
    assert not {"UNETLoader", "DualCLIPLoader", "VAELoader", "CheckpointLoaderSimple", "TripleCLIPLoader"} & {
        n["class_type"] for n in prompt.values()}
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = f"joint_{family}/{node['inputs']['filename_prefix'].split('/')[-1]}"
    return prompt


def node_of(prompt: dict, kind: str) -> str:
    (node_id,) = [k for k, n in prompt.items() if n["class_type"] == kind]
    return node_id


def saved(server: ComfyServer, prompt: dict, history: dict, family: str) -> dict[str, np.ndarray]:
    """``{plain, ae, ae_maps: RGB array}``: the images of the SaveImage nodes by file name prefix
    (``attend_excite/<family>_plain`` in the workflow)."""
    out = {}
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            (ref,) = history["outputs"][node_id]["images"]
            image = Image.open(io.BytesIO(server.image_bytes(ref))).convert("RGB")
            out[node["inputs"]["filename_prefix"].split("/")[-1].removeprefix(f"{family}_")] = np.asarray(image)
    return out


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_workflow_runs_on_the_tiny_model(server, family):
    prompt = tiny_prompt(server, family)
    history = server.run(prompt, timeout=300)
    images = saved(server, prompt, history, family)
    assert set(images) == {"plain", "ae", "ae_maps"}
    plain, ae, maps = images["plain"], images["ae"], images["ae_maps"]
    assert plain.shape == ae.shape == (SIZE, SIZE, 3)
    assert np.abs(plain.astype(int) - ae.astype(int)).max() > 0, "the A&E image equals the plain one"
    assert maps.shape == (SIZE, (1 + len(SUBJECTS)) * SIZE, 3)  # image | cat | frog
    assert not np.array_equal(maps[:, SIZE:2 * SIZE], maps[:, 2 * SIZE:]), "the two subjects' panels are the same"

    outputs = history["outputs"]
    (table,) = outputs[node_of(prompt, "AttendExciteTextEncode")]["text"]
    excited = [line for line in table.splitlines() if "excited" in line]
    # T5 splits "frog" into "▁", "f", "rog": the word is excited through its last token, shown as "rog (frog)"
    assert len(excited) == len(SUBJECTS) and all(w in line for w, line in zip(SUBJECTS, excited)), table
    report_node = outputs[node_of(prompt, "AttendExciteReport")]
    (report,) = report_node["attend_excite"]
    assert report["labels"] == SUBJECTS and len(report["subjects"]) == 2
    assert report["num_steps"] == STEPS and report["guided_steps"] == STEPS // 2 and report["step"] == 1
    (row,) = report["max_attention"]
    assert all(0.0 <= v <= 1.0 for v in row) and report["neglected"] == [min(row) < report["threshold"]]
    (text,) = report_node["text"]
    assert all(word in text for word in SUBJECTS) and "nan" not in text.lower(), text


def test_unknown_subject_fails_on_the_encode_node_and_the_server_goes_on(server):
    prompt = tiny_prompt(server, "sd3")
    encode = node_of(prompt, "AttendExciteTextEncode")
    prompt[encode]["inputs"]["subjects"] = "cat, zebra"
    with pytest.raises(ComfyError) as err:
        server.run(prompt, timeout=300)
    message = str(err.value)
    assert f"execution_error in node {encode} (AttendExciteTextEncode)" in message and "zebra" in message, message

    prompt[encode]["inputs"]["subjects"] = "frog"
    history = server.run(prompt, timeout=300)
    (report,) = history["outputs"][node_of(prompt, "AttendExciteReport")]["attend_excite"]
    assert report["labels"] == ["frog"]
    assert history["status"]["status_str"] == "success"
