"""The main job: run the bundled workflows in a real ComfyUI server and collect images and attention maps.

    python scripts/run_demo.py                       # tiny random-weight SD1.5 checkpoint, generated here
    python scripts/run_demo.py --checkpoint model.safetensors [--comfyui /path/to/ComfyUI]
    python scripts/run_demo.py --thumbnails          # every workflow, and its template thumbnail

Starts ComfyUI headless on a free local port with this pack loaded, converts
``workflows/A&E text to image (SD1.5).json`` (UI format) to an API prompt with the server's own node
definitions, runs it, and writes the plain and A&E images and their attention-map panels to the output folder it
prints.

``--thumbnails`` runs every workflow in ``workflows/`` instead (one subfolder of the output folder each), the LoRA
and ControlNet one with a tiny random LoRA and ControlNet and every ``LoadImage`` with a generated picture
(``scripts/tiny_addons.py``), and composes each run's inputs, images and attention maps into ``<workflow>.jpg``
next to the workflow: the thumbnail ComfyUI's template browser shows. The SDXL workflow's graph is model-agnostic
(checkpoint loader, A&E encode and sampler), so on the tiny SD1.5 checkpoint it runs as it is, at the demo's size.
The Flux and SD3 workflows run with their loader nodes replaced by the test-only ``AETinyTransformerLoader`` (a
tiny random-weight Flux or SD3 with its text encoders and VAE: ``scripts/tiny_dit.py``, :func:`with_tiny_loader`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_server import ComfyServer, _widget_inputs, default_comfy_root, ui_to_api  # noqa: E402
from tiny_checkpoint import ensure_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO / "workflows"
WORKFLOW = WORKFLOW_DIR / "A&E text to image (SD1.5).json"
THUMBNAIL_PX = 512
log = logging.getLogger("attend_excite.demo")

AE_SAMPLERS = ("AttendExciteKSampler", "AttendExciteSampler")
OPTIONS_NODE = "AttendExciteOptions"
TINY_LOADER = "AETinyTransformerLoader"  # test-only node: tests/fixtures/ae_tiny_loaders
# loader node type -> {its output slot: the tiny loader's output slot (MODEL 0, CLIP 1, VAE 2)}
TINY_LOADER_SLOTS = {"CheckpointLoaderSimple": {0: 0, 1: 1, 2: 2}, "UNETLoader": {0: 0}, "DualCLIPLoader": {0: 1},
                     "TripleCLIPLoader": {0: 1}, "CLIPLoader": {0: 1}, "VAELoader": {0: 2}}


def build_prompt(server: ComfyServer, workflow: Path, ckpt_name: str, steps: int | None = None,
                 size: int | None = None, seed: int | None = None, max_refinement_steps: int | None = None,
                 files: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """API prompt from the UI workflow, with the checkpoint and optional overrides applied.

    ``steps`` and ``seed`` go to the (A&E) KSampler and to ``BasicScheduler`` / ``RandomNoise``, ``size`` to
    ``EmptyLatentImage`` / ``EmptySD3LatentImage``, ``max_refinement_steps`` where :func:`cap_refinement` puts it;
    ``files`` maps a node type to input values (``{"LoraLoader": {"lora_name": ...}, "LoadImage": {"image": ...}}``).
    """
    info = server.object_info()
    prompt = ui_to_api(json.loads(workflow.read_text()), info)
    if max_refinement_steps is not None:
        cap_refinement(prompt, info, max_refinement_steps)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt_name
        if steps is not None and kind in ("AttendExciteKSampler", "KSampler", "BasicScheduler"):
            inputs["steps"] = steps
        if seed is not None and kind in ("AttendExciteKSampler", "KSampler"):
            inputs["seed"] = seed
        if seed is not None and kind == "RandomNoise":
            inputs["noise_seed"] = seed
        if size is not None and kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs["width"] = inputs["height"] = size
        inputs.update((files or {}).get(kind, {}))
    return prompt


def joint_family(prompt: Mapping[str, Any]) -> str | None:
    """``"flux"`` or ``"sd3"`` for a prompt that loads a Flux (``UNETLoader``, ``DualCLIPLoader`` of type flux) or an
    SD3 model (``TripleCLIPLoader``, ``DualCLIPLoader`` of type sd3), else ``None`` (an SD1.x/SDXL checkpoint)."""
    kinds = {(n["class_type"], n["inputs"].get("type")) for n in prompt.values()}
    if any(k == "UNETLoader" or (k == "DualCLIPLoader" and t == "flux") for k, t in kinds):
        return "flux"
    if any(k == "TripleCLIPLoader" or (k == "DualCLIPLoader" and t == "sd3") for k, t in kinds):
        return "sd3"
    return None


def with_tiny_loader(prompt: Mapping[str, Any], family: str, seed: int = 0) -> dict:
    """A copy of ``prompt`` whose loader nodes (``TINY_LOADER_SLOTS``) are replaced by one ``AETinyTransformerLoader``
    of ``family`` (``flux``/``sd3``), wired to the same consumers: MODEL, CLIP and VAE from the tiny models."""
    loaders = {k for k, n in prompt.items() if n["class_type"] in TINY_LOADER_SLOTS}
    tiny = str(max(int(k) for k in prompt) + 1)
    out = {k: {**n, "inputs": dict(n["inputs"])} for k, n in prompt.items() if k not in loaders}
    out[tiny] = {"class_type": TINY_LOADER, "inputs": {"family": family, "seed": seed}}
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in loaders:
                node["inputs"][name] = [tiny, TINY_LOADER_SLOTS[prompt[value[0]]["class_type"]][value[1]]]
    return out


def cap_refinement(prompt: dict, info: Mapping[str, Any], cap: int) -> None:
    """Set ``max_refinement_steps`` wherever the graph has it: on the nodes that take it as an input (an Options node,
    or sampler nodes that carry it themselves); a sampler with an unconnected ``options`` input gets an Options
    node with its defaults and this cap."""
    def takes(kind: str, name: str) -> bool:
        spec = info.get(kind, {}).get("input", {})
        return name in {**spec.get("required", {}), **spec.get("optional", {})}

    for node in list(prompt.values()):
        kind = node["class_type"]
        if takes(kind, "max_refinement_steps") or "max_refinement_steps" in node["inputs"]:
            node["inputs"]["max_refinement_steps"] = cap
        elif kind in AE_SAMPLERS and takes(kind, "options") and "options" not in node["inputs"]:
            options = {name: opts.get("default", opts.get("options", [None])[0])
                       for name, _, opts in _widget_inputs(info[OPTIONS_NODE])}
            new_id = str(max(int(k) for k in prompt) + 1)
            prompt[new_id] = {"class_type": OPTIONS_NODE, "inputs": {**options, "max_refinement_steps": cap}}
            node["inputs"]["options"] = [new_id, 0]


def saved_images(server: ComfyServer, prompt: Mapping[str, Any], history: Mapping[str, Any],
                 out: Path) -> dict[str, Path]:
    """``{filename_prefix: file}`` of the run's ``SaveImage`` nodes (fetched over HTTP where not on disk)."""
    written = {}
    for node_id, node in sorted(prompt.items(), key=lambda item: int(item[0])):  # the workflow's order
        if node["class_type"] != "SaveImage":
            continue
        for ref in history.get("outputs", {}).get(node_id, {}).get("images", []):
            path = out / ref.get("subfolder", "") / ref["filename"]
            if not path.is_file():  # a server with its own output folder
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(server.image_bytes(ref))
            written[node["inputs"]["filename_prefix"]] = path
    return written


def compose_thumbnail(inputs: list, images: list, maps: list, size: int = THUMBNAIL_PX):
    """A square picture of a run (PIL images): a row of its input pictures and results, then each maps strip.

    Every row is scaled to one width, the rows are stacked and the whole is fitted into ``size`` x ``size`` on a
    dark background.
    """
    from PIL import Image

    rows = []
    for row in ([*inputs, *images], *([m] for m in maps)):
        if not row:
            continue
        h = min(im.height for im in row)
        row = [im.convert("RGB").resize((round(im.width * h / im.height), h), Image.LANCZOS) for im in row]
        strip = Image.new("RGB", (sum(im.width for im in row), h))
        x = 0
        for im in row:
            strip.paste(im, (x, 0))
            x += im.width
        rows.append(strip)
    width = max(r.width for r in rows)
    rows = [r.resize((width, round(r.height * width / r.width)), Image.LANCZOS) for r in rows]
    gap = width // 64
    sheet = Image.new("RGB", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), (24, 24, 24))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + gap
    scale = size / max(sheet.size)
    sheet = sheet.resize((round(sheet.width * scale), round(sheet.height * scale)), Image.LANCZOS)
    thumb = Image.new("RGB", (size, size), (24, 24, 24))
    thumb.paste(sheet, ((size - sheet.width) // 2, (size - sheet.height) // 2))
    return thumb


def install_addons(server: ComfyServer, size: int = 256) -> dict[str, Any]:
    """Link the tiny LoRA and ControlNet into the server's model folders and write the input pictures into its
    input folder (``scripts/tiny_addons.py``); returns ``{"lora", "controlnet", "pictures"}``."""
    from tiny_addons import ensure_controlnet, ensure_lora, input_images

    models = server.base_dir / "models"
    lora, controlnet = ensure_lora(), ensure_controlnet()
    for path, folder in ((lora, "loras"), (controlnet, "controlnet")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        link = models / folder / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(path)
    pictures = input_images(size)
    for name, picture in pictures.items():
        picture.save(server.base_dir / "input" / name)
    return {"lora": lora.name, "controlnet": controlnet.name, "pictures": pictures}


def stand_in_prompt(server: ComfyServer, workflow: Path, ckpt_name: str, addons: Mapping[str, Any],
                    steps: int | None = None, size: int | None = None, seed: int | None = None,
                    max_refinement_steps: int | None = None) -> tuple[dict, list[str]]:
    """The workflow's API prompt with the user's model files replaced by the stand-ins of :func:`install_addons`
    (a ``LoadImage`` titled as a control image gets the line drawing, others the picture; Flux and SD3 loaders the
    tiny loader node, :func:`with_tiny_loader`), the outputs saved under ``<workflow>/``; returns the prompt and the
    input pictures it reads."""
    control, scene = sorted(addons["pictures"])  # ae_control_lines.png, ae_img2img_input.png
    ui = json.loads(workflow.read_text())
    loads = {str(n["id"]): control if "control" in (n.get("title") or "").lower() else scene
             for n in ui["nodes"] if n["type"] == "LoadImage"}
    prompt = build_prompt(server, workflow, ckpt_name, steps, size, seed, max_refinement_steps,
                          {"LoraLoader": {"lora_name": addons["lora"]},
                           "ControlNetLoader": {"control_net_name": addons["controlnet"]}})
    family = joint_family(prompt)
    if family is not None:
        prompt = with_tiny_loader(prompt, family)
    for node_id, picture in loads.items():
        prompt[node_id]["inputs"]["image"] = picture
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            prefix = node["inputs"]["filename_prefix"].split("/")[-1]
            node["inputs"]["filename_prefix"] = f"{workflow.stem}/{prefix}"
    return prompt, sorted(set(loads.values()))


def run_thumbnails(server: ComfyServer, args: argparse.Namespace, ckpt_name: str, out: Path) -> list[Path]:
    """Run every workflow of ``args.workflow_dir`` and write ``<workflow>.jpg`` next to each (see module doc)."""
    from PIL import Image

    addons = install_addons(server, args.size or 256)
    thumbs = []
    for workflow in sorted(args.workflow_dir.glob("*.json")):
        prompt, pictures = stand_in_prompt(server, workflow, ckpt_name, addons, args.steps, args.size, args.seed,
                                           args.max_refinement_steps)
        t0 = time.time()
        saved = saved_images(server, prompt, server.run(prompt, timeout=args.timeout), out)
        log.info("%s: %d images in %.1f s", workflow.name, len(saved), time.time() - t0)
        images = [Image.open(p) for k, p in saved.items() if not k.endswith("_maps")]
        maps = [Image.open(p) for k, p in saved.items() if k.endswith("_maps")]
        thumb = (args.thumbnail_dir or workflow.parent) / f"{workflow.stem}.jpg"
        thumb.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        compose_thumbnail([addons["pictures"][p] for p in pictures], images, maps).save(buf, "JPEG", quality=85,
                                                                                       optimize=True)
        thumb.write_bytes(buf.getvalue())
        thumbs.append(thumb)
    return thumbs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="an SD1.x checkpoint (.safetensors/.ckpt); default: the "
                    "generated tiny random-weight SD1.5 checkpoint")
    ap.add_argument("--comfyui", type=Path, default=None, help="an existing ComfyUI folder (default: the one "
                    "scripts/bootstrap.sh installs, or $COMFYUI_ROOT)")
    ap.add_argument("--python", default=sys.executable, help="Python that runs ComfyUI (default: this one)")
    ap.add_argument("--out", type=Path, default=REPO / "ae_output", help="output folder (default: ae_output/)")
    ap.add_argument("--workflow", type=Path, default=WORKFLOW)
    ap.add_argument("--steps", type=int, help="override the workflow's steps (tiny checkpoint default: 10)")
    ap.add_argument("--size", type=int, help="override the workflow's image size, square (tiny checkpoint default: "
                    "256, where A&E reads the 8x8 maps)")
    ap.add_argument("--seed", type=int, help="override the workflow's seed")
    ap.add_argument("--max-refinement-steps", type=int, help="override the A&E samplers' refinement cap "
                    "(--thumbnails on the tiny checkpoint: 3; random weights never meet the thresholds)")
    ap.add_argument("--thumbnails", action="store_true", help="run every workflow in --workflow-dir and write "
                    "its template thumbnail <workflow>.jpg")
    ap.add_argument("--workflow-dir", type=Path, default=WORKFLOW_DIR)
    ap.add_argument("--thumbnail-dir", type=Path, default=None, help="where the thumbnails go (default: next to "
                    "each workflow)")
    ap.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=None,
                    help="run ComfyUI with --cpu (default: on with the tiny checkpoint)")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    comfy = (args.comfyui or default_comfy_root()).resolve()
    if not (comfy / "main.py").is_file():
        ap.error(f"no ComfyUI at {comfy}: run `make setup` or pass --comfyui")
    ckpt = args.checkpoint.resolve() if args.checkpoint else ensure_checkpoint()
    if not ckpt.is_file():
        ap.error(f"checkpoint {ckpt} does not exist")
    cpu = args.cpu if args.cpu is not None else args.checkpoint is None
    if args.checkpoint is None:
        # The random-weight checkpoint runs on the CPU: 512 px x 50 steps would take over an hour there.
        args.steps = args.steps or 10
        args.size = args.size or 256
        if args.thumbnails and args.max_refinement_steps is None:
            args.max_refinement_steps = 3
        log.info("tiny checkpoint on the CPU: %d steps at %d px (override with --steps/--size)", args.steps,
                 args.size)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="ae_demo_"))
    node_dirs = [REPO]
    if args.thumbnails:  # the Flux and SD3 workflows run on the tiny loader node
        from tiny_dit import LOADER_NODE_DIR

        node_dirs.append(LOADER_NODE_DIR)
    server = ComfyServer(base, comfy_root=comfy, python=args.python, extra_args=["--output-directory", str(out)],
                         cpu=cpu, custom_node_dirs=node_dirs)
    name = server.link_checkpoint(ckpt)
    t0 = time.time()
    try:
        with server:
            log.info("ComfyUI %s serving at %s", comfy.name, server.url)
            if args.thumbnails:
                written = run_thumbnails(server, args, name, out)
            else:
                prompt = build_prompt(server, args.workflow, name, args.steps, args.size, args.seed,
                                      args.max_refinement_steps)
                written = list(saved_images(server, prompt, server.run(prompt, timeout=args.timeout), out).values())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    log.info("ran %s on %s in %.1f s", "the workflows" if args.thumbnails else args.workflow.name, ckpt.name,
             time.time() - t0)
    for p in written:
        log.info("  %s", p.relative_to(out) if p.is_relative_to(out) else p)
    print(f"images and attention maps written to: {out}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
