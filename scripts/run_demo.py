"""The main job: run the bundled workflow in a real ComfyUI server and collect images and attention maps.

    python scripts/run_demo.py                       # tiny random-weight SD1.5 checkpoint, generated here
    python scripts/run_demo.py --checkpoint model.safetensors [--comfyui /path/to/ComfyUI]

Starts ComfyUI headless on a free local port with this pack loaded, converts
``workflows/Attend-and-Excite - SD1.5 text to image.json`` (UI format) to an API prompt with the server's own node definitions,
runs it, and writes the plain and A&E images and their attention-map panels to the output folder it prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_server import ComfyServer, default_comfy_root, ui_to_api  # noqa: E402
from tiny_checkpoint import ensure_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "Attend-and-Excite - SD1.5 text to image.json"
log = logging.getLogger("attend_excite.demo")


def build_prompt(server: ComfyServer, workflow: Path, ckpt_name: str, steps: int | None, size: int | None,
                 seed: int | None) -> dict:
    """API prompt from the UI workflow, with the checkpoint and optional overrides applied."""
    prompt = ui_to_api(json.loads(workflow.read_text()), server.object_info())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt_name
        if node["class_type"] == "AttendExciteKSampler":
            if steps is not None:
                inputs["steps"] = steps
            if seed is not None:
                inputs["seed"] = seed
        if node["class_type"] == "EmptyLatentImage" and size is not None:
            inputs["width"] = inputs["height"] = size
    return prompt


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
        log.info("tiny checkpoint on the CPU: %d steps at %d px (override with --steps/--size)", args.steps,
                 args.size)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="ae_demo_"))
    extra = ["--output-directory", str(out)] + ([] if cpu else ["--gpu-only"][:0])
    server = ComfyServer(base, comfy_root=comfy, python=args.python, extra_args=extra,
                         env={} if cpu else {"AE_DEMO_GPU": "1"})
    if not cpu:
        server.cpu = False  # honoured by ComfyServer when present
    name = server.link_checkpoint(ckpt)
    t0 = time.time()
    try:
        with server:
            log.info("ComfyUI %s serving at %s", comfy.name, server.url)
            prompt = build_prompt(server, args.workflow, name, args.steps, args.size, args.seed)
            history = server.run(prompt, timeout=args.timeout)
            written = []
            for _node_id, output in sorted(history.get("outputs", {}).items()):
                for ref in output.get("images", []):
                    path = out / ref.get("subfolder", "") / ref["filename"]
                    if not path.is_file():  # a server with its own output folder: fetch over HTTP
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(server.image_bytes(ref))
                    written.append(path)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    log.info("ran %s on %s in %.1f s", args.workflow.name, ckpt.name, time.time() - t0)
    for p in written:
        log.info("  %s", p.relative_to(out))
    print(f"images and attention maps written to: {out}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
