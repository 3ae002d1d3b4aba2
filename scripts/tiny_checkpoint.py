"""Generate a tiny random-weight checkpoint that ComfyUI 0.3.75 detects as SD1.5.

The file holds a shrunken SD1.5 UNet (``model_channels=320``, ``context_dim=768``, fewer blocks),
a full-size CLIP-L text encoder (ComfyUI always builds CLIP-L at full size) and a TAESD VAE.
All weights are random but deterministic (seeded generator), stored as fp16 safetensors.
Cross-attention query/key projections get a larger init scale so attention maps are not uniform.

Usage::

    python scripts/tiny_checkpoint.py [--out PATH] [--layout sd15_compat|sd15_tiny] [--seed N] [--force]

Layouts (see docs: comfyui-host notes, section 7):

- ``sd15_compat`` (default): exactly SD1.5's block indices (attention at input 1,2,4,5,7,8,
  middle 0, output 3-11), ~111 M UNet parameters, ~475 MB file.
- ``sd15_tiny``: two levels, ~44 M UNet parameters, ~341 MB file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

_SCRIPTS = str(Path(__file__).resolve().parent)
if _SCRIPTS not in sys.path:  # importable both as a script and from tests (scripts/ on sys.path)
    sys.path.insert(0, _SCRIPTS)
from comfy_inprocess import comfy_root, repo_root, setup

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NAME",
    "LAYOUTS",
    "build_state_dict",
    "comfy_root",
    "default_path",
    "ensure_checkpoint",
    "save_atomically",
    "write_checkpoint",
]

DEFAULT_NAME = "ae_tiny_sd15.safetensors"
DEFAULT_SEED = 1234
# std multiplier for attn2 (cross-attention) to_q/to_k weights, relative to 1/sqrt(fan_in)
ATTN2_QK_GAIN = 2.0

LAYOUTS: dict[str, dict[str, Any]] = {
    "sd15_compat": {
        "channel_mult": [1, 1, 1, 1],
        "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    },
    "sd15_tiny": {
        "channel_mult": [1, 1],
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
    },
}


def default_path() -> Path:
    """``<repo>/.cache/models/checkpoints/ae_tiny_sd15.safetensors``."""
    return repo_root() / ".cache" / "models" / "checkpoints" / DEFAULT_NAME


def _build_modules(layout: str) -> dict[str, Any]:
    """Instantiate ComfyUI's own UNet, CLIP-L and TAESD classes (uninitialised, fp32, CPU)."""
    import torch

    setup(comfy_root())
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules import openaimodel

    unet = openaimodel.UNetModel(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        context_dim=768,
        num_heads=8,
        num_head_channels=-1,
        use_linear_in_transformer=False,
        adm_in_channels=None,
        use_spatial_transformer=True,
        legacy=False,
        transformer_depth_middle=1,
        dtype=torch.float32,
        device="cpu",
        operations=comfy.ops.disable_weight_init,
        **LAYOUTS[layout],
    )
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32, return_projected_pooled=False)
    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    return {"model.diffusion_model.": unet, "cond_stage_model.": clip, "first_stage_model.": vae}


def _init_std(name: str, shape: tuple[int, ...]) -> float:
    fan_in = math.prod(shape[1:])
    gain = ATTN2_QK_GAIN if (".attn2.to_q." in name or ".attn2.to_k." in name) else 1.0
    return gain / math.sqrt(fan_in)


def build_state_dict(layout: str = "sd15_compat", seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Return the full checkpoint state dict (fp16 float tensors, contiguous).

    Initialisation (explicit, because ``comfy.ops.disable_weight_init`` leaves ``torch.empty``):
    biases 0; 0-/1-D weights (norms, scalars) 1; other weights normal(0, 1/sqrt(fan_in)),
    with ``ATTN2_QK_GAIN`` times that std for cross-attention ``to_q``/``to_k``;
    TAESD ``vae_scale`` = 1, ``vae_shift`` = 0.
    """
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {sorted(LAYOUTS)}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for prefix, module in _build_modules(layout).items():
            for name, tensor in module.state_dict(keep_vars=True).items():
                full = prefix + name
                t = tensor.detach()
                if t.is_floating_point():
                    if name == "vae_shift" or name.endswith("bias"):
                        t.zero_()
                    elif t.ndim <= 1:
                        t.fill_(1.0)
                    else:
                        t.normal_(0.0, _init_std(full, tuple(t.shape)), generator=gen)
                    t = t.to(torch.float16)
                state[full] = t.contiguous()
    return state


def save_atomically(state: Mapping[str, Any], path: str | os.PathLike[str], info: Mapping[str, Any] | None = None
                    ) -> Path:
    """Write ``state`` as safetensors atomically (temp file in the same folder, then rename), so that processes
    generating the same file at once never read a half-written one. ``info``: stored as one metadata entry,
    ``ae_tiny`` (safetensors writes several in random order: files would differ byte-wise)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp,
                  metadata=None if info is None else {"ae_tiny": json.dumps(info)})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_checkpoint(path: str | os.PathLike[str], layout: str = "sd15_compat", seed: int = DEFAULT_SEED) -> Path:
    """Generate the checkpoint and write it atomically (:func:`save_atomically`)."""
    t0 = time.perf_counter()
    state = build_state_dict(layout, seed)
    path = save_atomically(state, path, {"layout": layout, "seed": seed})
    log.info("wrote %s (%s, %d tensors) in %.1f s", path, layout, len(state), time.perf_counter() - t0)
    return path


def ensure_checkpoint(path: str | os.PathLike[str] | None = None, layout: str = "sd15_compat") -> Path:
    """Return the checkpoint path, generating it first only if it does not exist yet."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        write_checkpoint(path, layout)
    return path


def seeded_init(tensors: Mapping[str, Any], seed: int,
                gain: Callable[[str], float] = lambda name: 1.0) -> dict[str, Any]:
    """Deterministic init: biases 0, 1-D weights 1, others ``N(0, gain(name) / sqrt(fan_in))``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, t in tensors.items():
            t = t.detach().clone()
            if name.endswith("bias"):
                t.zero_()
            elif t.ndim <= 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, gain(name) / math.sqrt(math.prod(t.shape[1:])), generator=gen)
            out[name] = t
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help=f"output file (default: {default_path().relative_to(repo_root())})"
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="sd15_compat")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--force", action="store_true", help="regenerate even if the file exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.out if args.out is not None else default_path()
    t0 = time.perf_counter()
    if args.force or not out.is_file():
        write_checkpoint(out, args.layout, args.seed)
    print(f"{out} ({out.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
