"""Bridge from a ComfyUI SD1.x/SD2.x UNet to diffusers' ``StableDiffusionAttendAndExcitePipeline``.

Test and benchmark instrumentation only: the node pack never imports diffusers. Used by the parity test
(``tests/test_parity.py``) and by benchmarks that compare this pack with the reference implementation on
identical weights.

- :func:`diffusers_unet_from_comfy`: a ``UNet2DConditionModel`` with the weights of a ComfyUI ModelPatcher's UNet.
- :func:`build_ae_pipeline`: the deprecated diffusers A&E pipeline around such a UNet, with the DDIM scheduler that
  matches ComfyUI's ``ddim`` sampler + ``ddim_uniform`` scheduler, and a tiny random VAE (use ``output_type="latent"``).
- :func:`record_losses`: collect every A&E loss the pipeline computes, tagged with the denoising step index.

ComfyUI must already be importable (``scripts/comfy_inprocess.setup()``) before these functions are called.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "DDIM_KWARGS",
    "build_ae_pipeline",
    "diffusers_unet_config",
    "diffusers_unet_from_comfy",
    "losses_by_step",
    "record_losses",
    "sd1_tokenizer_dir",
]

# DDIM settings whose timesteps equal ComfyUI's "ddim_uniform" schedule and whose last step lands on x0 (sigma 0).
DDIM_KWARGS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": True,
    "clip_sample": False,
}


def _as_list(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def _level_depths(depths: list[int], counts: list[int], what: str) -> list[int]:
    """One transformer depth per level from ComfyUI's flat per-block list (all blocks of a level must agree)."""
    out, pos = [], 0
    for level, count in enumerate(counts):
        block = depths[pos:pos + count]
        pos += count
        if len(set(block)) > 1:
            raise NotImplementedError(f"{what}: level {level} mixes transformer depths {block}; diffusers' "
                                      f"UNet2DConditionModel config cannot express that here")
        out.append(block[0] if block else 0)
    return out


def diffusers_unet_config(unet_config: dict) -> dict[str, Any]:
    """``UNet2DConditionModel`` config for a ComfyUI SD1.x/SD2.x ``unet_config`` (as ``detect_unet_config`` gives).

    Raises:
        NotImplementedError: layouts diffusers' plain text-to-image UNet config cannot express (SDXL's ``adm``
            conditioning, mixed depths inside one level, a first level wider than ``model_channels``).
    """
    uc = unet_config
    if uc.get("adm_in_channels") is not None or uc.get("num_classes") is not None:
        raise NotImplementedError("class/adm-conditioned UNets (SDXL, SD2 unCLIP) are not supported by this bridge")
    if uc.get("use_temporal_attention") or uc.get("use_temporal_resblock"):
        raise NotImplementedError("video UNets are not supported by this bridge")
    mc = int(uc["model_channels"])
    mult = list(uc["channel_mult"])
    if mult[0] != 1:
        raise NotImplementedError("channel_mult[0] != 1: diffusers ties the time projection width to the first block")
    n = len(mult)
    nrb = _as_list(uc["num_res_blocks"], n)
    channels = [mc * m for m in mult]
    down_depth = _level_depths(_as_list(uc["transformer_depth"], sum(nrb)), nrb, "transformer_depth")
    up_depth = _level_depths(_as_list(uc["transformer_depth_output"], sum(r + 1 for r in nrb)), [r + 1 for r in nrb],
                             "transformer_depth_output")
    mid_depth = uc.get("transformer_depth_middle")
    mid_depth = down_depth[-1] if mid_depth is None else int(mid_depth)
    if mid_depth < 1:
        raise NotImplementedError("a middle block without a transformer is not supported by this bridge")
    if down_depth[-1] not in (0, mid_depth):
        raise NotImplementedError("diffusers' middle block takes the deepest down level's transformer depth; "
                                  f"here they differ ({down_depth[-1]} vs {mid_depth})")
    if len(set(nrb)) > 1:
        raise NotImplementedError(f"num_res_blocks differs per level ({nrb}); diffusers' config has one value")
    heads, head_ch = int(uc.get("num_heads", -1)), int(uc.get("num_head_channels", -1))
    if heads > 0:
        attention_head_dim: Any = heads  # diffusers' historical name: this is the number of heads (SD1: 8)
    elif head_ch > 0:
        attention_head_dim = [c // head_ch for c in channels]  # SD2: channels / 64 heads per level
    else:
        raise ValueError("unet_config has neither num_heads nor num_head_channels")
    down_types = ["CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in down_depth]
    up_types = ["CrossAttnUpBlock2D" if d > 0 else "UpBlock2D" for d in reversed(up_depth)]
    # plain levels ignore their entry; give them the mid depth (diffusers' mid block reads the last entry)
    down_layers = [d if d > 0 else mid_depth for d in down_depth]
    up_layers = [d if d > 0 else mid_depth for d in reversed(up_depth)]
    return {
        "sample_size": 64,
        "in_channels": int(uc.get("in_channels", 4)),
        "out_channels": int(uc.get("out_channels", 4)),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": tuple(down_types),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple(up_types),
        "block_out_channels": tuple(channels),
        "layers_per_block": nrb[0],
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": int(uc["context_dim"]),
        "transformer_layers_per_block": tuple(down_layers),
        "reverse_transformer_layers_per_block": tuple(up_layers) if up_layers != down_layers[::-1] else None,
        "attention_head_dim": attention_head_dim if isinstance(attention_head_dim, int) else tuple(attention_head_dim),
        "use_linear_projection": bool(uc.get("use_linear_in_transformer", False)),
        "upcast_attention": False,
        "time_embedding_dim": mc * 4,
    }


def _normalised_unet_config(uc: dict) -> dict:
    """Copy with list-valued ``num_res_blocks``/depths, the form ``comfy.utils.unet_to_diffusers`` expects."""
    out = dict(uc)
    n = len(uc["channel_mult"])
    out["num_res_blocks"] = _as_list(uc["num_res_blocks"], n)
    out["transformer_depth"] = _as_list(uc["transformer_depth"], sum(out["num_res_blocks"]))
    out["transformer_depth_output"] = _as_list(uc["transformer_depth_output"],
                                               sum(r + 1 for r in out["num_res_blocks"]))
    if out.get("transformer_depth_middle") is None:
        out["transformer_depth_middle"] = out["transformer_depth"][-1]
    return out


def _heads_from_model(diffusion_model) -> dict[str, int]:
    """``num_heads`` or ``num_head_channels`` read off the model's cross-attention layers (for bare unet_configs)."""
    heads, dims = set(), set()
    for m in diffusion_model.modules():
        if hasattr(m, "heads") and hasattr(m, "dim_head") and hasattr(m, "to_k"):
            heads.add(int(m.heads))
            dims.add(int(m.dim_head))
    if len(heads) == 1:
        return {"num_heads": heads.pop(), "num_head_channels": -1}
    if len(dims) == 1:
        return {"num_heads": -1, "num_head_channels": dims.pop()}
    raise ValueError(f"cannot infer the attention head layout (heads {sorted(heads)}, head widths {sorted(dims)})")


def diffusers_unet_from_comfy(model_patcher, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers ``UNet2DConditionModel`` holding the UNet weights of a ComfyUI ``ModelPatcher``.

    The weights are the model's own parameters (patches such as LoRA that the ModelPatcher applies at load time are
    not included). Every diffusers parameter must be found; leftovers on either side raise.

    Args:
        model_patcher: ComfyUI ``ModelPatcher`` of an SD1.x/SD2.x model.
        device, dtype: where and in which precision the diffusers UNet lives.
    Returns:
        ``UNet2DConditionModel`` in eval mode.
    """
    import comfy.utils
    from diffusers import UNet2DConditionModel

    base = model_patcher.model
    uc = _normalised_unet_config(base.model_config.unet_config)
    if int(uc.get("num_heads", -1)) <= 0 and int(uc.get("num_head_channels", -1)) <= 0:
        uc.update(_heads_from_model(base.diffusion_model))
    key_map = comfy.utils.unet_to_diffusers(uc)  # diffusers key -> ComfyUI key
    comfy_sd = base.diffusion_model.state_dict()
    unet = UNet2DConditionModel(**diffusers_unet_config(uc))
    target = unet.state_dict()
    new_sd, missing = {}, []
    for key in target:
        src = key_map.get(key)
        if src is None or src not in comfy_sd:
            missing.append(key)
            continue
        w = comfy_sd[src]
        if w.shape != target[key].shape:
            if w.numel() == target[key].numel():  # 1x1 conv <-> linear projections
                w = w.reshape(target[key].shape)
            else:
                raise ValueError(f"shape mismatch for {key} <- {src}: {tuple(w.shape)} vs {tuple(target[key].shape)}")
        new_sd[key] = w.detach().to("cpu", torch.float32)
    if missing:
        raise ValueError(f"{len(missing)} diffusers UNet weights have no ComfyUI source, e.g. {missing[:5]}")
    used = {key_map[k] for k in new_sd}
    unused = [k for k in comfy_sd if k not in used]
    if unused:
        raise ValueError(f"{len(unused)} ComfyUI UNet weights were not used, e.g. {unused[:5]}")
    unet.load_state_dict(new_sd, strict=True)
    return _to(unet, device, dtype).eval().requires_grad_(False)


def _to(module, device, dtype):
    """Move ``module``; cast only when needed (a float32 -> float32 ``to(dtype)`` makes diffusers log a warning)."""
    module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def sd1_tokenizer_dir() -> str:
    """The CLIP tokenizer folder bundled with ComfyUI (``comfy/sd1_tokenizer``)."""
    import comfy.sd1_clip

    return os.path.join(os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__)), "sd1_tokenizer")


def _small_text_encoder(hidden_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden_size)
    torch.manual_seed(0)
    return CLIPTextModel(cfg)


def _small_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # four levels so that vae_scale_factor is 8, as for SD; tiny widths (only output_type="latent" is meant)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8,
                         scaling_factor=0.18215)


def build_ae_pipeline(unet, text_encoder=None, tokenizer=None, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32):
    """diffusers ``StableDiffusionAttendAndExcitePipeline`` around ``unet``.

    Scheduler: ``DDIMScheduler(**DDIM_KWARGS)``. VAE: a tiny random ``AutoencoderKL`` (decoding is meaningless: call
    with ``output_type="latent"``). Text encoder: a random one-layer ``CLIPTextModel`` unless given (pass
    ``prompt_embeds``/``negative_prompt_embeds``). Tokenizer: ComfyUI's bundled SD1 ``CLIPTokenizer`` unless given.
    No safety checker.
    """
    from diffusers import DDIMScheduler, StableDiffusionAttendAndExcitePipeline
    from transformers import CLIPTokenizer

    if tokenizer is None:
        tokenizer = CLIPTokenizer.from_pretrained(sd1_tokenizer_dir())
    if text_encoder is None:
        text_encoder = _small_text_encoder(int(unet.config.cross_attention_dim))
    vae = _small_vae(int(unet.config.in_channels))
    pipe = StableDiffusionAttendAndExcitePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**DDIM_KWARGS),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        _to(module, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_losses(pipe) -> list[tuple[int, float]]:
    """Instrument ``pipe`` so that every A&E loss it computes is appended to the returned list.

    Entries are ``(step, loss)``: ``step`` is the denoising loop index (counted through ``pipe.scheduler.step``,
    reset by ``scheduler.set_timesteps``), ``loss`` a float. Per step diffusers computes the main pass, then, if it
    refines, one loss per refinement iteration (the first one at the unchanged latent, i.e. a repeat of the main
    pass) and a final recompute. Call once per pipeline; the list collects across calls.
    """
    out: list[tuple[int, float]] = []
    state = {"step": 0}
    compute_loss = pipe._compute_loss
    scheduler = pipe.scheduler
    step_fn, set_timesteps = scheduler.step, scheduler.set_timesteps

    def _compute_loss(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        out.append((state["step"], float(loss.detach() if isinstance(loss, torch.Tensor) else loss)))
        return loss

    def _step(*args, **kwargs):
        result = step_fn(*args, **kwargs)
        state["step"] += 1
        return result

    def _set_timesteps(*args, **kwargs):
        state["step"] = 0
        return set_timesteps(*args, **kwargs)

    pipe._compute_loss = _compute_loss
    scheduler.step = _step
    scheduler.set_timesteps = _set_timesteps
    return out


def losses_by_step(records: list[tuple[int, float]]) -> dict[int, list[float]]:
    """Group :func:`record_losses` entries by step."""
    grouped: dict[int, list[float]] = {}
    for step, loss in records:
        grouped.setdefault(step, []).append(loss)
    return grouped
