#!/usr/bin/env python3
"""Speed and memory of Attend-and-Excite sampling on the joint-attention transformers (Flux.1, SD3.5 medium), against
plain ComfyUI sampling: the rows of ``benchmarks/bench.py`` (same JSON lines, timing helpers, interleaved rounds and
paired ratios) for the DiT families.

Random-weight models are built with ComfyUI's own classes (``comfy.supported_models.Flux`` / ``SD3`` with a
``unet_config``, their ``get_model``, a ``ModelPatcher``), under inference mode as ComfyUI's loaders build them:

- ``flux``: Flux.1 dev (guidance-distilled: CFG 1, one model call per step, guidance 3.5), hidden 3072, 24 heads,
  19 double + 38 single blocks, T5 context 4096 (``--text-tokens``, default 256 as ComfyUI's Flux tokenizer pads to,
  512 for a long prompt), pooled CLIP-L 768;
- ``sd35m``: SD3.5 medium (CFG 4.5: cond and uncond, two model calls per step in one batch), depth 24 (hidden 1536,
  24 heads), the second self-attention in blocks 0-12, RMS q/k norm, context 4096 of CLIP-L/G 77 + T5 256 tokens,
  pooled 2048.

Layouts (``--model``): ``full`` the real sizes (``--device cuda``: bfloat16, 1024², 28 steps); ``reduced`` fewer
blocks at a CPU-sized width (flux 2 double + 2 single blocks at hidden 768 / 6 heads of 128, sd35m 4 blocks at
hidden 512 / 8 heads of 64, blocks 0-2 with the second attention); ``tiny`` the smallest (flux 1 + 1 blocks at 192 /
2 heads, sd35m 2 blocks at 128 / 2 heads) for the test suite. ``auto``: full on CUDA, reduced on the CPU. Text and
pooled widths stay the real ones (4096, 768 / 2048).

Modes: ``plain`` (the built-in euler sampler, ``simple`` schedule) and ``ae_no_refine`` (this pack's sampler through
``make_sampler`` / ``AEParams``, scale_factor 20, no refinement; ``ae_refine_cap`` on request). The positive cond
carries the pack's ``SubjectTokens`` in the T5 stream (``family="t5xxl"``, subjects at T5 positions 2 and 5 of a
7-token prompt, after the 77 CLIP tokens for SD3). Targets on a GPU: A&E without refinement within 1.8x plain time
and 1.5x plain peak memory (``meets_targets``).

Output: JSON lines on stdout (``bench.py``'s fields, plus ``peak_ratio_to_plain``, the blocks read and the token
counts), then the Markdown table.

    python benchmarks/dit_bench.py --device cpu --arch flux,sd35m --steps 4 --repeats 1 --threads 1
    python benchmarks/dit_bench.py --device cuda --arch flux,sd35m --steps 28 --repeats 1
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (JSON-lines output, timing helpers, the A&E sampler factory, ComfyUI set-up)

log = logging.getLogger("ae_dit_bench")
MODES = ("plain", "ae_no_refine", "ae_refine_cap")
TARGETS = {"time": 1.8, "peak": 1.5}  # A&E without refinement against plain sampling, on a GPU
SUBJECT_POSITIONS = (2, 5)  # within the T5 prompt tokens
PROMPT_LENGTH = 7  # T5 tokens of the prompt (no start token; its end token and padding follow)
CLIP_TOKENS = 77  # SD3: CLIP-L/G tokens before the T5 ones


def sd35m_self_attn_layers(blocks: int) -> list[int]:
    """Blocks with SD3.5 medium's second (image-only) self-attention: 0-12 of 24, the same share of fewer blocks."""
    return list(range(math.ceil(13 * blocks / 24)))


ARCHS: dict[str, dict[str, Any]] = {
    "flux": {
        "family": "flux", "cfg": 1.0, "text_tokens": 256, "pooled": 768, "guidance": 3.5, "clip_tokens": 0,
        "cost_text_tokens": [512, 256],  # T5 tokens of the cost model's rows
        "full": {"depth": 19, "depth_single": 38, "hidden": 3072, "heads": 24},
        "reduced": {"depth": 2, "depth_single": 2, "hidden": 768, "heads": 6},
        "tiny": {"depth": 1, "depth_single": 1, "hidden": 192, "heads": 2},
        "auto_size": {"cuda": 1024, "cpu": 128},
    },
    "sd35m": {
        "family": "sd3", "cfg": 4.5, "text_tokens": CLIP_TOKENS + 256, "pooled": 2048, "guidance": None,
        "cost_text_tokens": [256],
        "clip_tokens": CLIP_TOKENS,
        # width_depth: ComfyUI's MMDiT ``depth`` (hidden = 64 * depth, heads = depth); blocks: ``num_blocks``
        "full": {"width_depth": 24, "blocks": 24, "pos_embed_max_size": 384},
        "reduced": {"width_depth": 8, "blocks": 4, "pos_embed_max_size": 64},
        "tiny": {"width_depth": 2, "blocks": 2, "pos_embed_max_size": 64},
        "auto_size": {"cuda": 1024, "cpu": 128},
    },
}
CONTEXT_DIM = 4096


def flux_axes(head: int) -> list[int]:
    """Rotary axes of a Flux head: ``[16, 56, 56]`` for the real 128, the same split of other widths."""
    first = head // 8
    rest = (head - first) // 2
    if head % 32 or first + 2 * rest != head:
        raise ValueError(f"a Flux head of {head} channels cannot be split into three even rotary axes (use 32k)")
    return [first, rest, rest]


def unet_config(arch: str, variant: str) -> dict[str, Any]:
    """ComfyUI ``unet_config`` of ``arch`` in layout ``variant`` (the keys ``model_detection`` produces)."""
    v = ARCHS[arch][variant]
    if ARCHS[arch]["family"] == "flux":
        import dataclasses

        from comfy.ldm.flux.model import FluxParams

        cfg = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768,
                   context_in_dim=CONTEXT_DIM, hidden_size=v["hidden"], mlp_ratio=4.0, num_heads=v["heads"],
                   depth=v["depth"], depth_single_blocks=v["depth_single"],
                   axes_dim=flux_axes(v["hidden"] // v["heads"]), theta=10000, qkv_bias=True, guidance_embed=True)
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # ComfyUI 0.8.0 ([] = Flux 1)
            cfg["txt_ids_dims"] = []
        return cfg
    hidden, size = 64 * v["width_depth"], v["pos_embed_max_size"]
    return dict(in_channels=16, out_channels=16, patch_size=2, depth=v["width_depth"], num_blocks=v["blocks"],
                input_size=None, adm_in_channels=2048, pos_embed_scaling_factor=None, pos_embed_max_size=size,
                num_patches=size * size, x_block_self_attn_layers=sd35m_self_attn_layers(v["blocks"]), qk_norm="rms",
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": CONTEXT_DIM, "out_features": hidden}})


def model_config(arch: str, variant: str, dtype):
    """ComfyUI's model config (``comfy.supported_models.Flux`` / ``SD3``) for the layout, at ``dtype``."""
    import comfy.supported_models

    cls = {"flux": comfy.supported_models.Flux, "sd3": comfy.supported_models.SD3}[ARCHS[arch]["family"]]
    config = cls(unet_config(arch, variant))
    config.set_inference_dtype(dtype, None)
    return config


def build_model(arch: str, variant: str, device, dtype, seed: int):
    """A ModelPatcher of a random-weight model: built on ``device`` in inference mode (as ComfyUI's loaders build
    it: the weights are inference tensors), then filled in place as ``bench.random_state_dict`` fills a UNet
    (biases 0, 1-D weights 1, others ``N(0, min(0.02, fan_in^-1/2))``)."""
    import comfy.model_management
    import comfy.model_patcher
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        model = model_config(arch, variant, dtype).get_model({}, "", device=device)
        for key, t in model.diffusion_model.state_dict().items():
            if not t.is_floating_point():
                continue
            if key.endswith("bias"):
                t.zero_()
            elif t.dim() <= 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, min(0.02, math.prod(t.shape[1:]) ** -0.5), generator=gen)
    model.eval()
    offload = comfy.model_management.unet_offload_device() if device.type == "cuda" else device
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--arch", type=bench._csv(str), default=["flux", "sd35m"], help="comma list of flux, sd35m")
    p.add_argument("--model", choices=("auto", "full", "reduced", "tiny"), default="auto",
                   help="layout: full = the real architecture, reduced = a few blocks at CPU width, tiny = the "
                        "smallest; auto = full on CUDA, reduced on the CPU")
    p.add_argument("--batch", type=bench._csv(int), default=[1])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode (median reported)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="steps of the untimed warm-up run per mode (0 = same as --steps)")
    p.add_argument("--size", default="auto",
                   help="image side in px (latent = size / 8); auto: 1024 on CUDA, 128 on CPU")
    p.add_argument("--text-tokens", type=int, default=0,
                   help="T5 tokens (flux: 256 or 512; sd35m: after the 77 CLIP tokens, 256 or 77); 0 = the arch's")
    p.add_argument("--modes", type=bench._csv(str), default=["plain", "ae_no_refine"],
                   help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved")
    p.add_argument("--gc", choices=("freeze", "on"), default="freeze")
    p.add_argument("--record-maps", action="store_true", help="timed A&E runs record maps as the nodes do")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no new measurement after this many seconds")
    p.add_argument("--out", type=Path, help="write the JSON lines here too")
    p.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    p.add_argument("--markdown", type=Path, help="write the Markdown table here too")
    p.add_argument("--comfy-root", help="ComfyUI source folder (default: $COMFYUI_ROOT, else <repo>/.comfyui)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    bench.check_args(p, args, ARCHS, MODES, 16)
    # what bench.Bench reads and the DiT rows do not vary
    args.weights, args.blocks, args.cuda_graph, args.recompute = "reference", "all", "on", "auto"
    args.check_graph, args.profile, args.diffusers = False, None, False
    return args


def text_tokens(arch: str, requested: int) -> int:
    spec = ARCHS[arch]
    return spec["text_tokens"] if requested <= 0 else spec["clip_tokens"] + requested


class DitBench(bench.Bench):
    """``bench.Bench`` on Flux / SD3 models: its interleaved timed runs, rows and A&E sampler factory; the model, its
    conds and the CFG scale are the family's."""

    def __init__(self, args: argparse.Namespace, emitter: bench.Emitter) -> None:
        super().__init__(args, emitter)
        if self.device.type == "cuda":  # Flux and SD3.5 run in bfloat16 (ComfyUI's first choice for both)
            self.dtype = self.torch.bfloat16
            self.meta["dtype"] = "bfloat16"
        self.plain_peak: dict[tuple, float | None] = {}

    def row(self, system, arch, batch, mode, times, peak_gib, plain, passes, **extra) -> dict:
        out = super().row(system, arch, batch, mode, times, peak_gib, plain, passes, **extra)
        if mode == "plain":
            self.plain_peak[(arch, batch)] = peak_gib
            return out
        base = self.plain_peak.get((arch, batch))
        out["peak_ratio_to_plain"] = round(peak_gib / base, 4) if peak_gib and base else None
        time_ratio = out.get("paired_ratio_to_plain") or out.get("ratio_to_plain")
        out["targets"] = TARGETS
        if mode == "ae_no_refine" and self.device.type == "cuda" and time_ratio and out["peak_ratio_to_plain"]:
            out["meets_targets"] = time_ratio <= TARGETS["time"] and out["peak_ratio_to_plain"] <= TARGETS["peak"]
        return out

    def run_arch(self, arch: str) -> None:
        import comfy.model_management
        import comfy.samplers

        torch, args, spec = self.torch, self.args, ARCHS[arch]
        variant = args.model if args.model != "auto" else ("full" if self.device.type == "cuda" else "reduced")
        size = spec["auto_size"][self.device.type] if args.size == "auto" else int(args.size)
        side = size // 8
        n_text = text_tokens(arch, args.text_tokens)
        t0 = time.perf_counter()
        model = build_model(arch, variant, self.device, self.dtype, args.seed)
        free_memory = bench.free_memory
        free_memory(self.device)
        dm = model.model.diffusion_model
        params = sum(p.numel() for p in dm.parameters())
        families = self.pack.families
        family = families.family_of(model.model)
        read = family.choose(dm, "auto")
        grid = (side // 2, side // 2)
        log.info("%s/%s: ComfyUI model %s, %.1f M parameters, %s, latent %dx%d, %d text + %d image tokens, reads %s "
                 "(built in %.1f s)", arch, variant, type(model.model.model_config).__name__, params / 1e6,
                 self.meta["dtype"], side, side, n_text, grid[0] * grid[1], _blocks_label(read),
                 time.perf_counter() - t0)
        info = {"model": variant, "model_class": type(model.model.model_config).__name__,
                "unet_params_m": round(params / 1e6, 1), "size": size, "latent": side, "sampler": "euler/simple",
                "cfg": spec["cfg"], "model_calls_per_step": 1 if spec["cfg"] == 1.0 else 2,
                "text_tokens": n_text, "image_tokens": grid[0] * grid[1], "read_blocks": _blocks_label(read),
                "blocks": len(family.blocks(dm)), "joint_blocks": "auto", "weights": args.weights,
                "record_maps": args.record_maps, "gc": args.gc, "unet_config": _config_summary(arch, variant)}
        ms = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(ms, "simple", args.steps).cpu()
        warm_sigmas = comfy.samplers.calculate_sigmas(ms, "simple", args.warmup_steps or args.steps).cpu()
        sched = self.pack.schedule.build_schedule(args.steps)
        cap = bench.cap_passes(sched, self.pack.sampling.AEParams())
        info["guided_steps"] = sched.guided_steps
        for batch in args.batch:
            with torch.inference_mode():
                inputs = self.dit_inputs(arch, batch, side, n_text)
            ctx = (model, arch, batch, inputs, sigmas, warm_sigmas, info, grid, cap)
            self.measure_comfy_modes(ctx, [m for m in MODES if m in args.modes])
        del model, dm
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        free_memory(self.device)

    def dit_inputs(self, arch: str, batch: int, side: int, n_text: int):
        """Random conds of the family's shapes; the positive one carries the subjects (T5 stream)."""
        import comfy.sample

        torch, spec = self.torch, ARCHS[arch]
        gen = torch.Generator().manual_seed(self.args.seed + 1)
        off = spec["clip_tokens"]
        subjects = self.pack.tokens.SubjectTokens(
            indices=tuple(off + i for i in SUBJECT_POSITIONS), labels=("a", "b"),
            prompt_positions=tuple(off + i for i in range(PROMPT_LENGTH)), num_keys=n_text, family="t5xxl")
        conds = []
        for positive in (True, False):
            extra: dict[str, Any] = {"pooled_output": torch.randn(1, spec["pooled"], generator=gen)}
            if spec["guidance"] is not None:
                extra["guidance"] = spec["guidance"]
            if positive:
                extra["attend_excite"] = subjects
            conds.append([[torch.randn(1, n_text, CONTEXT_DIM, generator=gen), extra]])
        latent = torch.zeros(batch, 16, side, side)
        return conds[0], conds[1], latent, comfy.sample.prepare_noise(latent, self.args.seed)

    def comfy_warm_up(self, ctx: tuple, st) -> None:
        """``bench.Bench.comfy_warm_up`` at the family's CFG scale."""
        import comfy.sample

        model, arch, batch, inputs, sigmas, warm_sigmas = ctx[:6]
        torch, args, cfg = self.torch, self.args, ARCHS[arch]["cfg"]
        pos, neg, latent, noise = inputs
        st.make = self.sampler_factory(st.mode)

        def run(sampler, sig=sigmas):
            with torch.inference_mode():
                return comfy.sample.sample_custom(model, noise, cfg, sampler, sig, pos, neg, latent,
                                                  disable_pbar=True, seed=args.seed)

        st.run = run
        st.record = self.pack.record.AttentionRecord() if st.mode != "plain" else None
        counter = bench.PassCounter(self.pack.sampling.log)
        try:
            tw = time.perf_counter()
            run(st.make(st.record), warm_sigmas)
            bench.sync(self.device)
            log.info("comfyui %s b%d %s: warm-up %.2f s", arch, batch, st.mode, time.perf_counter() - tw)
        finally:
            counter.close()
        st.warm_forwards = counter.count
        st.sampler = st.make(self.pack.record.AttentionRecord() if args.record_maps and st.mode != "plain" else None)


def _blocks_label(keys: list) -> str:
    """``double.0-18``-style label of block keys, as the pack names its recorded maps."""
    import importlib

    return importlib.import_module(f"{bench.PACK}.nodes.joint_capture").blocks_label(keys)


def _config_summary(arch: str, variant: str) -> dict[str, Any]:
    v = ARCHS[arch][variant]
    if ARCHS[arch]["family"] == "flux":
        return {"double": v["depth"], "single": v["depth_single"], "hidden": v["hidden"], "heads": v["heads"]}
    return {"blocks": v["blocks"], "hidden": 64 * v["width_depth"], "heads": v["width_depth"],
            "x_block_self_attn_layers": len(sd35m_self_attn_layers(v["blocks"])), "qk_norm": "rms"}


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_no measurements_\n"
    head = rows[0]
    title = (f"Device: {head.get('device_name')}; torch {head.get('torch')}; commit {head.get('commit')}; weights "
             f"{head.get('dtype')}; peak = {head.get('peak_kind')}\n\n")
    return title + bench.simple_table([
        ("arch", lambda r: r["arch"]), ("model", lambda r: r.get("model")), ("size", lambda r: f"{r.get('size')}²"),
        ("tokens text+image", lambda r: f"{r.get('text_tokens')}+{r.get('image_tokens')}"),
        ("steps", lambda r: r["steps"]), ("mode", lambda r: r["mode"]), ("reads", lambda r: r.get("read_blocks")),
        ("median s", lambda r: bench._fmt(r.get("median_s"), 3)),
        ("paired × plain", lambda r: bench._fmt(r.get("paired_ratio_to_plain") or r.get("ratio_to_plain"))),
        ("grad passes", lambda r: r.get("grad_passes")), ("peak GiB", lambda r: bench._fmt(r.get("peak_gib"))),
        ("× plain peak", lambda r: bench._fmt(r.get("peak_ratio_to_plain"))),
    ], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger(bench.PACK).setLevel(logging.WARNING)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # anything else that prints must not mix into the results
    try:
        return bench.run_architectures(args, stdout, DitBench, markdown_table)
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())

