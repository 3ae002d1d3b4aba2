"""A&E together with other nodes' model patches, in-process on the tiny random-weight SD1.5 checkpoint.

Each stand-in is built the way its node pack builds it, on a ``clone()`` of the model under inference mode (as
ComfyUI's executor runs nodes): an IP-Adapter-style attn2 replace patch (text attention plus attention over image
tokens), PAG (core node: a post-CFG pass with an attn1 replace) and an attn1 replace on the clone, FreeU's output
block patch, a UNet function wrapper with a CFG function, and Kohya Deep Shrink (core ``PatchModelAddDownscale``).
For each: the A&E run succeeds and reads the layers of the attention level, the other node's patch is called (in
the gradient passes too where it is part of the model), A&E at ``scale_factor 0`` equals plain sampling with the
patch, the result differs from A&E without it, and the weakest subject's max attention at the last guided step is
above plain sampling's. 128 px images (16x16 latents: the attention level is 4x4), 8 steps of which 4 are guided.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from host_helpers import ksample, load_host, no_leftovers

pytestmark = [pytest.mark.host, pytest.mark.slow]

PROMPT, SUBJECTS = "a photo of a cat and a frog", "cat, frog"
SEED, STEPS, GUIDED = 3, 8, 4
AE = dict(refinement="0:0.05", max_refinement_steps=2)
SIDE = 16  # latent side
LEVEL_LAYERS = ["input.7.0", "input.8.0", "output.3.0", "output.4.0", "output.5.0"]  # 4x4 at a 16x16 latent
log = logging.getLogger(__name__)


class Calls:
    """How often a stand-in ran, in ordinary passes and in gradient passes (the only ones with autograd on)."""

    def __init__(self) -> None:
        self.plain = self.grad = 0
        self.cfg: Calls | None = None  # a second function of the same node

    def reset(self) -> None:
        self.plain = self.grad = 0
        if self.cfg is not None:
            self.cfg.reset()

    def __call__(self) -> None:
        if torch.is_grad_enabled():
            self.grad += 1
        else:
            self.plain += 1


class ImagePromptAttention:
    """IP-Adapter's attn2 replace (``Attn2Replace``): ComfyUI's attention over the text tokens plus ``weight`` times
    attention over image tokens, whose keys and values the adapter projects from image embeddings per call (cond
    chunks: the image's embeddings, uncond chunks: zeros)."""

    def __init__(self, calls: Calls, inner_dim: int, gen: torch.Generator, weight: float = 1.0,
                 tokens: int = 4, embed_dim: int = 768) -> None:
        self.calls, self.weight = calls, weight
        self.embeds = torch.randn(1, tokens, embed_dim, generator=gen)
        self.to_k = torch.randn(inner_dim, embed_dim, generator=gen) * (2.0 / embed_dim**0.5)
        self.to_v = torch.randn(inner_dim, embed_dim, generator=gen) / embed_dim**0.5

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        self.calls()
        heads = extra_options["n_heads"]
        out = optimized_attention(q, k, v, heads)
        chunks = extra_options["cond_or_uncond"]
        size = q.shape[0] // len(chunks)
        embeds = torch.cat([self.embeds if c == 0 else torch.zeros_like(self.embeds) for c in chunks])
        embeds = embeds.repeat_interleave(size, 0).to(q)
        ip_k, ip_v = F.linear(embeds, self.to_k.to(q)), F.linear(embeds, self.to_v.to(q))
        return out + self.weight * optimized_attention(q, ip_k, ip_v, heads)


def _cross_attention_dims(model) -> dict[tuple[str, int], int]:
    from comfyui_attend_excite.nodes.capture import attn2_keys

    unet = model.model.diffusion_model
    blocks = {"input": unet.input_blocks, "middle": [unet.middle_block], "output": unet.output_blocks}
    dims = {}
    for name, i, j in attn2_keys(unet):
        tb = next(m for m in blocks[name][i].modules() if hasattr(m, "transformer_blocks")).transformer_blocks[j]
        dims[(name, i)] = tb.attn2.to_q.weight.shape[0]
    return dims


def ip_adapter(model):
    """Every cross-attention block gets an image prompt, keyed ``(block name, block id)`` as IP-Adapter does on
    SD1.x (the lookup's fallback)."""
    calls, gen = Calls(), torch.Generator().manual_seed(7)
    m = model.clone()
    for (name, i), dim in _cross_attention_dims(model).items():
        m.set_model_attn2_replace(ImagePromptAttention(calls, dim, gen), name, i)
    return m, calls


def pag(model):
    """The core PerturbedAttentionGuidance node: a post-CFG cond pass with the middle block's attn1 replaced."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    calls = Calls()
    (m,) = PerturbedAttentionGuidance.execute(model, 2.0).args
    (post,) = m.model_options["sampler_post_cfg_function"]

    def counted(args):
        calls()
        return post(args)

    m.model_options["sampler_post_cfg_function"] = [counted]
    return m, calls


def attn1_replace(model):
    """Self-attention replaced on the clone (SAG/PAG-style ``set_model_attn1_replace``): sharper self-attention in
    the middle block and the decoder's 8x8 blocks, in every pass."""
    from comfy.ldm.modules.attention import optimized_attention

    calls = Calls()

    def sharper(q, k, v, extra_options):
        calls()
        return optimized_attention(q * 1.5, k, v, extra_options["n_heads"])

    m = model.clone()
    for name, i in (("middle", 0), ("output", 3), ("output", 4)):
        m.set_model_attn1_replace(sharper, name, i, 0)
    return m, calls


def freeu(model):
    """FreeU_V2's output block patch (backbone scaling of half the channels, in place, and a Fourier filter on the
    skip), keyed to the tiny model's channel count: the core node keys it to 4x and 2x ``model_channels``, which the
    tiny layout (one width) never has, so the core node leaves it unchanged."""
    from comfy_extras.nodes_freelunch import Fourier_filter

    calls, (b, s) = Calls(), (1.3, 0.9)
    channels = model.model.model_config.unet_config["model_channels"]

    def output_block_patch(h, hsp, transformer_options):
        if int(h.shape[1]) == channels:
            calls()
            mean = h.mean(1).unsqueeze(1)
            flat = mean.view(mean.shape[0], -1)
            lo, hi = flat.min(-1, keepdim=True)[0], flat.max(-1, keepdim=True)[0]
            mean = (mean - lo[..., None, None]) / (hi - lo)[..., None, None]
            h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((b - 1) * mean + 1)
            hsp = Fourier_filter(hsp, threshold=1, scale=s)
        return h, hsp

    m = model.clone()
    m.set_model_output_block_patch(output_block_patch)
    return m, calls


def wrapper_and_cfg(model):
    """A UNet function wrapper (scales the model's x0 prediction) and a CFG function (RescaleCFG's rescaling), in
    their single slots of ``model_options``."""
    calls, cfg_calls = Calls(), Calls()

    def unet_wrapper(apply_model, args):
        calls()
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.9

    def rescale_cfg(args):
        cfg_calls()
        cond, uncond = args["cond"], args["uncond"]
        x_cfg = uncond + args["cond_scale"] * (cond - uncond)
        ratio = cond.std(dim=(1, 2, 3), keepdim=True) / x_cfg.std(dim=(1, 2, 3), keepdim=True)
        return 0.7 * x_cfg * ratio + 0.3 * x_cfg

    m = model.clone()
    m.set_model_unet_function_wrapper(unet_wrapper)
    m.set_model_sampler_cfg_function(rescale_cfg)
    calls.cfg = cfg_calls
    return m, calls


def deep_shrink(model):
    """Core Kohya Deep Shrink: h halved after input block 3 for the first half of the schedule (the guided steps),
    so the 4x4 level's layers (input 7, 8, output 3-5) see 2x2 and the 8x8 level's see 4x4."""
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    (m,) = PatchModelAddDownscale.execute(model, 3, 2.0, 0.0, 0.5, True, "bicubic", "bicubic").args
    return m, Calls()


STAND_INS = {"ip_adapter": ip_adapter, "pag": pag, "attn1_replace": attn1_replace, "freeu": freeu,
             "wrapper_and_cfg": wrapper_and_cfg, "deep_shrink": deep_shrink}


@pytest.fixture(scope="module")
def host(comfy_inprocess, tiny_checkpoint):
    h = load_host(comfy_inprocess, tiny_checkpoint, PROMPT, SUBJECTS)
    h["ae"] = run(h, h["model"])[0]
    return h


def run(host, model, **ae):
    return ksample(host, SEED, STEPS, latent={"samples": torch.zeros(1, 4, SIDE, SIDE)}, model=model, **{**AE, **ae})


def weakest(record, step):
    return record.subject_maxima([step]).min(dim=-1).values


def plain_ksampler(host, model):
    import nodes as comfy_nodes

    with torch.inference_mode():
        (out,) = comfy_nodes.common_ksampler(model, SEED, STEPS, 5.0, "euler", "normal", host["pos"], host["neg"],
                                             {"samples": torch.zeros(1, 4, SIDE, SIDE)})
    return out["samples"]


@pytest.mark.parametrize("name", list(STAND_INS))
def test_other_nodes_patch_acts_together_with_ae(host, name, caplog):
    caplog.set_level("WARNING", logger="comfyui_attend_excite")
    with torch.inference_mode():
        model, calls = STAND_INS[name](host["model"])
    plain, plain_rec = run(host, model, scale_factor=0.0)
    assert torch.equal(plain, plain_ksampler(host, model))  # A&E at scale 0 is plain sampling with the patch
    calls.reset()
    samples, rec = run(host, model)
    assert torch.isfinite(samples).all()
    assert not torch.allclose(samples, host["ae"], atol=1e-4)  # the other node's effect is still there
    assert not torch.allclose(samples, plain, atol=1e-4)  # and so is A&E's
    assert rec.layers == plain_rec.layers == LEVEL_LAYERS
    assert sorted(rec.losses) == list(range(GUIDED))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("comfyui_attend")]
    p, a = weakest(plain_rec, GUIDED - 1), weakest(rec, GUIDED - 1)
    log.info("%s: weakest subject's max attention at the last guided step: plain %.4f, A&E %.4f", name,
             float(p), float(a))
    assert (a > p).all(), (p.tolist(), a.tolist())
    if name != "deep_shrink":
        assert calls.plain > 0
    if name in ("ip_adapter", "attn1_replace", "freeu", "wrapper_and_cfg"):  # part of the model: in the pass too
        assert calls.grad > 0
    if name == "pag":  # a guidance term, not the model: only in the CFG of the ordinary passes
        assert calls.grad == 0
    if name == "wrapper_and_cfg":
        assert calls.cfg.plain == STEPS and calls.cfg.grad == 0


@pytest.mark.parametrize("name", list(STAND_INS))
def test_recomputed_blocks_run_as_stored_ones_with_other_nodes_patches(host, name):
    """The blocks recomputed in the backward re-run the other node's patches inside them (IP-Adapter, PAG, attn1
    replace) and keep FreeU's and Deep Shrink's block patches outside: the run is the stored pass's."""
    with torch.inference_mode():
        model, _ = STAND_INS[name](host["model"])
    stored, stored_rec = run(host, model, recompute="off")
    recomputed, rec = run(host, model, recompute="blocks")
    assert torch.allclose(recomputed, stored, atol=1e-6), float((recomputed - stored).abs().max())
    assert sorted(rec.losses) == sorted(stored_rec.losses)
    assert no_leftovers([host["model"].model])


def test_deep_shrink_changes_the_levels_size_and_ae_follows_it(host):
    """The 4x4 level's layers see 2x2 maps in the guided steps; A&E reads those layers (not the 8x8 level's, which
    then see 4x4), resizes their maps to 4x4, and the gradient passes stop after the last of them."""
    with torch.inference_mode():
        model, _ = deep_shrink(host["model"])
    unet = host["model"].model.diffusion_model
    seen: dict[str, list[tuple[bool, tuple[int, int]]]] = {"input.7": [], "input.4": [], "output.6": []}

    def hook(name):
        def pre(_module, args):
            seen[name].append((torch.is_grad_enabled(), tuple(args[0].shape[-2:])))
        return pre

    spatial = {"input.7": unet.input_blocks[7][1], "input.4": unet.input_blocks[4][1],
               "output.6": unet.output_blocks[6][1]}
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in spatial.items()]
    try:
        _, rec = run(host, model, refinement="")
    finally:
        for h in handles:
            h.remove()
    grad_sizes = {n: {hw for g, hw in v if g} for n, v in seen.items()}
    assert grad_sizes["input.7"] == {(2, 2)} and grad_sizes["input.4"] == {(4, 4)}
    assert grad_sizes["output.6"] == set()  # the gradient passes stop after output 5
    plain_sizes = [hw for g, hw in seen["input.7"] if not g]  # one call per step, or per cond and uncond
    shrunk = plain_sizes.count((2, 2))
    assert shrunk and plain_sizes == [(2, 2)] * shrunk + [(4, 4)] * shrunk  # half the steps each
    assert rec.layers == LEVEL_LAYERS
    assert all(m.shape[1:3] == (4, 4) for step in rec.maps.values() for m in step.values())
