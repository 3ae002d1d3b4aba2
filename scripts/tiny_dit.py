"""Tiny random-weight Flux and SD3 models, text encoders and a 16-channel VAE, built with ComfyUI's own classes.

For tests of the pack on the transformer (DiT) families without downloading real weights. Works on ComfyUI 0.3.75
and 0.8.0. Everything is float32 on the CPU and deterministic: the weights come from a seeded generator, so two
builds with the same seed are identical.

In-process builders (ComfyUI must be importable; :func:`comfy_inprocess.setup` is called unless ``comfy`` is
already imported, as in a running server):

- :func:`flux_model` / :func:`sd3_model`: ``comfy.supported_models.Flux`` / ``SD3`` with a small ``unet_config``,
  their ``get_model`` and a ``ModelPatcher`` made as ComfyUI's loaders make it (so ``model_sampling`` is ComfyUI's
  flux one with a Flux-dev config's shift 1.15, or SD3's discrete-flow one with shift 3).
- :func:`flux_clip` / :func:`sd3_clip`: ``comfy.sd.CLIP`` with ComfyUI's ``FluxTokenizer`` / ``SD3Tokenizer`` and
  ``FluxClipModel`` / ``SD3ClipModel``. CLIP-L (and CLIP-G) stay at full size; the T5-XXL part is ComfyUI's own T5
  class with a small config, passed through ComfyUI's ``model_options["t5xxl_model_config"]`` (``SDClipModel``
  overrides its JSON config with ``model_options["<model_name>_model_config"]``).
- :func:`vae16`: ComfyUI's ``VAE`` around a TAESD with 16 latent channels.

Files that ComfyUI's model detection recognises (generated on demand under ``<repo>/.cache/models``, never
committed): :func:`write_flux_unet` (a diffusion-model file for ``UNETLoader``, the smallest Flux the detector
accepts) and :func:`write_sd3_checkpoint` (an all-in-one SD3 checkpoint for ``CheckpointLoaderSimple``).

Initialisation: biases 0, 1-D weights 1, other weights N(0, 1/sqrt(fan_in)) (``tiny_checkpoint.seeded_init``);
attention is sharpened by ``QK_GAIN`` (the q/k RMSNorm scales, and the q/k rows of fused ``qkv`` projections) so
that attention maps are not uniform; SD3's ``pos_embed`` is ComfyUI's 2-D sin-cos table.

Usage::

    python scripts/tiny_dit.py [--out-dir DIR] [--seed N]   # writes the Flux UNet and the SD3 checkpoint
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

_SCRIPTS = str(Path(__file__).resolve().parent)
if _SCRIPTS not in sys.path:  # importable both as a script and from tests (scripts/ on sys.path)
    sys.path.insert(0, _SCRIPTS)
from comfy_inprocess import comfy_root, repo_root, setup
from tiny_checkpoint import save_atomically, seeded_init

log = logging.getLogger(__name__)

QK_GAIN = 2.0  # like tiny_checkpoint.ATTN2_QK_GAIN: attention logits ~QK_GAIN**2 times larger
FLUX_T5_DIM = 64  # flux_clip's T5 width = flux_model's context_in_dim
SD3_CONTEXT_DIM = 4096  # SD3ClipModel zero-pads CLIP-L(+G) to 4096 and appends the T5 tokens after it
SD3_POOLED_DIM = 768 + 1280  # CLIP-L + CLIP-G pooled (G zeros when absent)
FLUX_UNET_NAME = "ae_tiny_flux_unet.safetensors"
SD3_CHECKPOINT_NAME = "ae_tiny_sd3.safetensors"
# the test-only node pack with AETinyTransformerLoader; pass it to ComfyServer(custom_node_dirs=...)
LOADER_NODE_DIR = repo_root() / "tests" / "fixtures" / "ae_tiny_loaders"


def _comfy() -> None:
    """Make ComfyUI importable in this process unless it already is (e.g. inside a running server)."""
    if "comfy" not in sys.modules:
        setup(comfy_root())


def default_dir() -> Path:
    """``<repo>/.cache/models`` (as ``tiny_checkpoint`` and ``tiny_addons``)."""
    return repo_root() / ".cache" / "models"


def flux_unet_path() -> Path:
    return default_dir() / "diffusion_models" / FLUX_UNET_NAME


def sd3_checkpoint_path() -> Path:
    return default_dir() / "checkpoints" / SD3_CHECKPOINT_NAME


# ------------------------------------------------------------------------------------------------ weights
def _random_state(module: Any, seed: int, dtype: Any = None) -> dict[str, Any]:
    """Seeded random values for every floating tensor of ``module.state_dict()`` (which may live on ``meta``)."""
    import torch

    shapes = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
    empty = {k: torch.empty(v.shape, dtype=dtype or v.dtype) for k, v in shapes.items()}
    out = seeded_init(empty, seed)
    with torch.no_grad():
        for name, t in out.items():
            if name.endswith(("query_norm.scale", "key_norm.scale", "attn.ln_q.weight", "attn.ln_k.weight")):
                t.mul_(QK_GAIN)  # q/k RMSNorm scale (a gain on the projection would be normalised away)
            elif name.endswith("attn.qkv.weight"):
                t[: 2 * t.shape[0] // 3].mul_(QK_GAIN)  # q and k rows of a fused qkv projection
            elif name == "pos_embed":  # SD3: fixed 2-D sin-cos table, as in the released weights
                from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

                side = round(t.shape[1] ** 0.5)
                t.copy_(torch.from_numpy(get_2d_sincos_pos_embed(t.shape[2], side)).reshape(t.shape))
            elif name == "vae_shift":
                t.zero_()
    return out


def _unet_config(family: str, **kw: Any) -> dict[str, Any]:
    """ComfyUI ``unet_config`` of a small model (the keys ``model_detection.detect_unet_config`` would produce)."""
    _comfy()
    if family == "flux":
        from comfy.ldm.flux.model import FluxParams

        cfg = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768, mlp_ratio=4.0,
                   theta=10000, qkv_bias=True, **kw)
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # 0.8.0 requires it ([] = Flux 1)
            cfg["txt_ids_dims"] = []
        return cfg
    depth, hidden, context_dim, max_size = kw["depth"], 64 * kw["depth"], kw["context_dim"], kw["pos_embed_max_size"]
    return dict(in_channels=16, out_channels=16, patch_size=2, depth=depth, input_size=None,
                adm_in_channels=SD3_POOLED_DIM, pos_embed_scaling_factor=None, pos_embed_max_size=max_size,
                num_patches=max_size * max_size, x_block_self_attn_layers=list(kw.get("x_block_self_attn_layers", [])),
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": context_dim, "out_features": hidden}},
                **({"qk_norm": "rms"} if kw.get("qk_norm") else {}))


def _build(family: str, unet_config: dict[str, Any], device: Any, dtype: Any) -> Any:
    """``model_config.get_model`` of ComfyUI's Flux/SD3 config (uninitialised weights)."""
    import comfy.supported_models

    config = {"flux": comfy.supported_models.Flux, "sd3": comfy.supported_models.SD3}[family](unet_config)
    config.set_inference_dtype(dtype, None)
    return config.get_model({}, "", device=device)


def _patcher(family: str, unet_config: dict[str, Any], seed: int) -> Any:
    """Build on the CPU in float32, load seeded weights strictly, wrap as ComfyUI's loaders do."""
    _comfy()
    import comfy.model_patcher
    import torch

    cpu = torch.device("cpu")
    model = _build(family, unet_config, cpu, torch.float32)
    model.diffusion_model.load_state_dict(_random_state(model.diffusion_model, seed), strict=True)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def flux_model(seed: int = 0, *, depth: int = 2, depth_single: int = 1, hidden: int = 96, heads: int = 2,
               context_dim: int = FLUX_T5_DIM, guidance_embed: bool = True) -> Any:
    """A small Flux (``comfy.supported_models.Flux``) as a ``ModelPatcher``; rope axes ``[d/6, 5d/12, 5d/12]``
    of the head dim ``d = hidden/heads`` (``[8, 20, 20]`` for 48)."""
    head = hidden // heads
    if hidden % heads or head % 24:
        raise ValueError(f"hidden/heads = {hidden}/{heads} must be a multiple of 24 (three even rope axes)")
    axes = [head // 6, 5 * head // 12, 5 * head // 12]
    cfg = _unet_config("flux", context_in_dim=context_dim, hidden_size=hidden, num_heads=heads, depth=depth,
                       depth_single_blocks=depth_single, axes_dim=axes, guidance_embed=guidance_embed)
    return _patcher("flux", cfg, seed)


def sd3_model(seed: int = 0, *, depth: int = 2, context_dim: int = SD3_CONTEXT_DIM, pos_embed_max_size: int = 64,
              qk_norm: bool = False, x_block_self_attn_layers: tuple[int, ...] = ()) -> Any:
    """A small SD3 MMDiT (``comfy.supported_models.SD3``) as a ``ModelPatcher``: hidden ``64*depth``, ``depth``
    heads (as ComfyUI derives them), context ``context_dim -> hidden``, pooled 2048; up to
    ``8*2*pos_embed_max_size`` px."""
    cfg = _unet_config("sd3", depth=depth, context_dim=context_dim, pos_embed_max_size=pos_embed_max_size,
                       qk_norm=qk_norm, x_block_self_attn_layers=x_block_self_attn_layers)
    return _patcher("sd3", cfg, seed)


# ------------------------------------------------------------------------------------------- text encoders
def t5_config(t5_dim: int) -> dict[str, int]:
    """Overrides of ComfyUI's ``t5_config_xxl.json`` (vocabulary and relative-attention settings kept)."""
    return {"d_model": t5_dim, "num_layers": 2, "num_heads": 2, "d_kv": 32, "d_ff": 128}


def _clip(target: Any, seed: int, t5_dim: int | None) -> Any:
    """``comfy.sd.CLIP`` of ``target`` on the CPU in float32 with seeded weights (loaded strictly)."""
    import comfy.sd
    import torch

    cpu = torch.device("cpu")
    options: dict[str, Any] = dict(dtype=torch.float32, load_device=cpu, offload_device=cpu, initial_device=cpu)
    if t5_dim is not None:
        options["t5xxl_model_config"] = t5_config(t5_dim)
    clip = comfy.sd.CLIP(target, model_options=options)
    clip.cond_stage_model.load_state_dict(_random_state(clip.cond_stage_model, seed), strict=True)
    return clip


def flux_clip(seed: int = 0, t5_dim: int = FLUX_T5_DIM) -> Any:
    """Flux text encoder: cond ``[1, 256, t5_dim]`` (T5 tokens; at least 256), pooled ``[1, 768]`` (CLIP-L)."""
    _comfy()
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                     comfy.text_encoders.flux.flux_clip())
    return _clip(target, seed, t5_dim)


def sd3_clip(seed: int = 0, t5_dim: int | None = SD3_CONTEXT_DIM, clip_g: bool = False) -> Any:
    """SD3 text encoder: CLIP-L (+ full-size CLIP-G if ``clip_g``) zero-padded to 4096, then a tiny T5 of width
    4096 (``t5_dim=None``: no T5). Cond ``[1, 77 + 77, 4096]`` (``[1, 77, 4096]`` without T5), pooled ``[1, 2048]``.

    Raises:
        ValueError: ``t5_dim`` other than 4096/None (``SD3ClipModel`` concatenates T5 after the 4096-wide CLIP part).
    """
    if t5_dim not in (None, SD3_CONTEXT_DIM):
        raise ValueError(f"SD3's T5 width must be {SD3_CONTEXT_DIM} (or None), not {t5_dim}")
    _comfy()
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip as sd3

    target = comfy.supported_models_base.ClipTarget(
        sd3.SD3Tokenizer, sd3.sd3_clip(clip_l=True, clip_g=clip_g, t5=t5_dim is not None))
    return _clip(target, seed, t5_dim)


def _taesd16_state(seed: int, dtype: Any = None) -> dict[str, Any]:
    import comfy.taesd.taesd

    return _random_state(comfy.taesd.taesd.TAESD(latent_channels=16), seed, dtype)


def vae16(seed: int = 0) -> Any:
    """ComfyUI's ``VAE`` around a random TAESD with 16 latent channels (Flux/SD3 latents)."""
    _comfy()
    import comfy.sd

    return comfy.sd.VAE(sd=_taesd16_state(seed))


# ---------------------------------------------------------------------------------------- detectable files
def write_flux_unet(path: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """The smallest Flux (dev, guidance embedding) that ComfyUI's detection accepts, bf16, no key prefix.

    The detector fixes hidden 3072, 24 heads, rope axes [16, 56, 56] and MLP ratio 4; it reads the depths and the
    ``txt_in``/``vector_in`` widths from the weights: here 1 double block, 0 single blocks, context 64 (=
    :func:`flux_clip`'s width), pooled 768. About 390 M parameters (~0.78 GB).
    """
    _comfy()
    import torch

    path = Path(path) if path is not None else flux_unet_path()
    t0 = time.perf_counter()
    cfg = _unet_config("flux", context_in_dim=FLUX_T5_DIM, hidden_size=3072, num_heads=24, depth=1,
                       depth_single_blocks=0, axes_dim=[16, 56, 56], guidance_embed=True)
    model = _build("flux", cfg, torch.device("meta"), torch.bfloat16)
    save_atomically(_random_state(model.diffusion_model, seed, torch.bfloat16), path, {"family": "flux", "seed": seed})
    log.info("wrote %s in %.1f s", path, time.perf_counter() - t0)
    return path


def write_sd3_checkpoint(path: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """An all-in-one SD3 checkpoint (fp16): ``model.diffusion_model.*`` (:func:`sd3_model`'s default architecture),
    ``first_stage_model.*`` (TAESD, 16 channels) and ``text_encoders.clip_l.*`` (full-size CLIP-L, no T5)."""
    _comfy()
    import comfy.sd1_clip
    import torch

    path = Path(path) if path is not None else sd3_checkpoint_path()
    t0 = time.perf_counter()
    half = torch.float16
    model = _build("sd3", _unet_config("sd3", depth=2, context_dim=SD3_CONTEXT_DIM, pos_embed_max_size=64),
                   torch.device("meta"), half)
    clip_l = comfy.sd1_clip.SDClipModel(device="meta", dtype=half, return_projected_pooled=False)
    parts = {"model.diffusion_model.": _random_state(model.diffusion_model, seed, half),
             "first_stage_model.": _taesd16_state(seed + 1, half),
             "text_encoders.clip_l.": _random_state(clip_l, seed + 2, half)}
    save_atomically({p + k: v for p, sd in parts.items() for k, v in sd.items()}, path, {"family": "sd3", "seed": seed})
    log.info("wrote %s in %.1f s", path, time.perf_counter() - t0)
    return path


def ensure_flux_unet(path: str | os.PathLike[str] | None = None) -> Path:
    """:func:`flux_unet_path` (or ``path``), generated first only if missing."""
    path = Path(path) if path is not None else flux_unet_path()
    return path if path.is_file() else write_flux_unet(path)


def ensure_sd3_checkpoint(path: str | os.PathLike[str] | None = None) -> Path:
    """:func:`sd3_checkpoint_path` (or ``path``), generated first only if missing."""
    path = Path(path) if path is not None else sd3_checkpoint_path()
    return path if path.is_file() else write_sd3_checkpoint(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="models folder (default: <repo>/.cache/models)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    base = args.out_dir or default_dir()
    write_flux_unet(base / "diffusion_models" / FLUX_UNET_NAME, args.seed)
    write_sd3_checkpoint(base / "checkpoints" / SD3_CHECKPOINT_NAME, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
