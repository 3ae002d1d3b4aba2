"""Tiny random-weight LoRA and ControlNet for the tiny SD1.5 checkpoint, and the input images of the workflows.

The LoRA and ControlNet workflows in ``workflows/`` need a LoRA file, a ControlNet file and input images; for the
demo (``scripts/run_demo.py --thumbnails``) and the HTTP tests these are generated here, deterministically, for the
``sd15_compat`` layout of ``scripts/tiny_checkpoint.py``:

- LoRA (generic ``<module>.lora_up/.lora_down/.alpha`` keys, rank 4) on the cross-attention ``to_q``/``to_k`` of
  every attention layer of the encoder; no ComfyUI needed.
- ControlNet: ComfyUI's own ``comfy.cldm.cldm.ControlNet`` class for the same UNet layout, in the original ldm key
  layout ``ControlNetLoader`` detects; biases 0, norms 1, other weights normal(0, 1/sqrt(fan_in)), the zero
  convolutions at a quarter of that so that the control signal is small but not zero.
- input images (Pillow): a picture for img2img and a line drawing (white edges on black) for the ControlNet.

Usage::

    python scripts/tiny_addons.py [--out-dir DIR]     # writes loras/, controlnet/ and input/ under DIR
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

_SCRIPTS = str(Path(__file__).resolve().parent)
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)
from comfy_inprocess import comfy_root, repo_root, setup
from tiny_checkpoint import LAYOUTS, save_atomically, seeded_init

log = logging.getLogger(__name__)

LORA_NAME = "ae_tiny_lora.safetensors"
CONTROLNET_NAME = "ae_tiny_controlnet.safetensors"
IMG2IMG_IMAGE = "ae_img2img_input.png"
CONTROL_IMAGE = "ae_control_lines.png"
LAYOUT = "sd15_compat"
LORA_RANK = 4
# cross-attention layers of the sd15_compat encoder (SD1.5's own indices); query width 320, context 768
LORA_BLOCKS = (1, 2, 4, 5, 7, 8)


def default_dir() -> Path:
    """``<repo>/.cache/models`` (the tiny checkpoint lives in its ``checkpoints/``)."""
    return repo_root() / ".cache" / "models"


def lora_state_dict(seed: int = 7) -> dict:
    """Rank-4 LoRA on ``attn2.to_q``/``to_k`` of the encoder's attention layers (fp16)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for block in LORA_BLOCKS:
        for proj, in_f in (("to_q", 320), ("to_k", 768)):
            key = f"diffusion_model.input_blocks.{block}.1.transformer_blocks.0.attn2.{proj}"
            out[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, in_f, generator=gen) / math.sqrt(in_f)
            out[f"{key}.lora_up.weight"] = torch.randn(320, LORA_RANK, generator=gen) / math.sqrt(LORA_RANK)
            out[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    return {k: v.to(torch.float16).contiguous() for k, v in out.items()}


def controlnet_state_dict(seed: int = 11) -> dict:
    """A ControlNet for the tiny checkpoint's UNet layout, built with ComfyUI's class (fp16, ldm keys)."""
    import torch

    setup(comfy_root())
    import comfy.cldm.cldm
    import comfy.ops

    layout = {k: v for k, v in LAYOUTS[LAYOUT].items() if k != "transformer_depth_output"}
    net = comfy.cldm.cldm.ControlNet(
        image_size=32, in_channels=4, model_channels=320, hint_channels=3, context_dim=768, num_heads=8,
        num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None, use_spatial_transformer=True,
        legacy=False, transformer_depth_middle=1, dtype=torch.float32, device="cpu",
        operations=comfy.ops.disable_weight_init, **layout)
    init = seeded_init(net.state_dict(), seed,
                       lambda name: 0.25 if name.startswith(("zero_convs.", "middle_block_out.")) else 1.0)
    return {name: t.to(torch.float16).contiguous() for name, t in init.items()}


def input_images(size: int = 256) -> dict:
    """``{file name: PIL image}``: a simple scene for img2img and a line drawing for the ControlNet."""
    from PIL import Image, ImageDraw

    scene = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(scene)
    for y in range(size):  # sky to grass
        c = (int(110 + 90 * y / size), int(160 + 40 * y / size), int(230 - 120 * y / size))
        draw.line((0, y, size, y), fill=c)
    s = size / 256
    draw.ellipse((40 * s, 120 * s, 120 * s, 200 * s), fill=(230, 150, 60))   # an orange cat-ish blob
    draw.ellipse((150 * s, 150 * s, 220 * s, 210 * s), fill=(70, 160, 70))   # a green frog-ish blob
    lines = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(lines)
    width = max(2, round(3 * s))
    draw.ellipse((40 * s, 120 * s, 120 * s, 200 * s), outline="white", width=width)
    draw.ellipse((150 * s, 150 * s, 220 * s, 210 * s), outline="white", width=width)
    draw.line((0, 215 * s, size, 215 * s), fill="white", width=width)
    return {IMG2IMG_IMAGE: scene, CONTROL_IMAGE: lines}


def _save(state: dict, path: Path) -> Path:
    save_atomically(state, path)
    log.info("wrote %s (%d tensors)", path, len(state))
    return path


def ensure_lora(folder: Path | None = None) -> Path:
    """``<folder>/loras/ae_tiny_lora.safetensors``, generated if missing."""
    path = (folder or default_dir()) / "loras" / LORA_NAME
    return path if path.is_file() else _save(lora_state_dict(), path)


def ensure_controlnet(folder: Path | None = None) -> Path:
    """``<folder>/controlnet/ae_tiny_controlnet.safetensors``, generated if missing (imports ComfyUI)."""
    path = (folder or default_dir()) / "controlnet" / CONTROLNET_NAME
    return path if path.is_file() else _save(controlnet_state_dict(), path)


def write_input_images(folder: Path) -> list[Path]:
    """Write the workflows' input images into ``folder`` (a ComfyUI input directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, image in input_images().items():
        image.save(folder / name)
        out.append(folder / name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=None, help="default: .cache/models")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = args.out_dir or default_dir()
    for path in (ensure_lora(folder), ensure_controlnet(folder), *write_input_images(folder / "input")):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
