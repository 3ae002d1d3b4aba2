#!/usr/bin/env python3
"""Time one A&E gradient pass against one plain sampling step on the same UNet: where does a pass's time go?

The UNet is ComfyUI's, built from random weights and loaded under ``inference_mode`` as the loader node does (the
real SD1.5 / SDXL layouts on CUDA; on a CPU by default their ``narrow`` twins, whose timings are host overhead:
see ``bench.py --model``). Interleaved, median of ``--repeats``:

- ``step``: one CFG forward at batch 2B under inference mode (the UNet's share of a plain sampling step);
- ``pass_forward``: the gradient pass's forward with autograd recording, up to its stop, plus the loss;
- ``pass``: forward and backward to the latent, with the sampler's own capture patches, stop, loss and weight
  aliases (only the bookkeeping of ComfyUI's ``calc_cond_batch`` around it is left out: on the narrow layouts it did
  not change a pass measurably).

On CUDA every measurement is repeated with cuDNN's benchmark mode on (autotuned convolution algorithms), and
``--profile DIR`` writes the operators of a few passes by device time. Output: JSON lines, then a Markdown table.

    python benchmarks/pass_timing.py --device cuda --arch sd15,sdxl --profile bench_out/pass_profile
    python benchmarks/pass_timing.py --device cpu --arch sd15,sdxl --threads 1
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (architectures, random weights, loader, ComfyUI set-up)

log = logging.getLogger("ae_pass_timing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--arch", type=bench._csv(str), default=["sd15", "sdxl"], help="sd15,sdxl")
    p.add_argument("--model", choices=("auto", "full", "narrow", "tiny"), default="auto",
                   help="UNet layout (auto: full on CUDA, narrow on the CPU)")
    p.add_argument("--size", type=int, default=0, help="image side in px (0: 512/1024 for full, else 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", type=bench._csv(str), default=["all", "down_mid"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--profile", type=Path, default=None, help="folder for the per-pass operator tables")
    p.add_argument("--comfy-root", default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--graph", action="store_true",
                   help="CUDA only: instead, time the eager pass against the same pass captured as a CUDA graph "
                        "(cuDNN benchmark mode off)")
    args = p.parse_args(argv)
    if args.graph and args.device != "cuda":
        p.error("--graph needs --device cuda")
    for arch in args.arch:
        if arch not in bench.ARCHS:
            p.error(f"unknown --arch {arch!r}; choose from {', '.join(bench.ARCHS)}")
    if args.repeats < 1 or args.batch < 1:
        p.error("--repeats and --batch must be positive")
    return args


class Subject:
    """One loaded UNet with the inputs of a sampling call and the sampler's pass machinery."""

    def __init__(self, arch: str, variant: str, size: int, batch: int, device, pack) -> None:
        import comfy.model_management
        import torch
        from comfy.ldm.modules import attention as comfy_attention

        self.torch, self.device, self.pack, self.batch = torch, device, pack, batch
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        sd = bench.random_state_dict(arch, variant, device, dtype, seed=0)
        with torch.inference_mode():
            self.patcher = bench.load_unet(sd, arch, variant, dtype)
            comfy.model_management.load_models_gpu([self.patcher])
        del sd
        self.unet = self.patcher.model.diffusion_model
        self.attention = comfy_attention.optimized_attention
        side = size // 8
        self.target_hw = pack.families.target_resolution((side, side), 0)
        gen = torch.Generator().manual_seed(1)
        cfg = bench.unet_config(arch, variant)

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device, dtype)

        with torch.inference_mode():
            self.x2, self.ctx2 = randn(2 * batch, 4, side, side), randn(2 * batch, bench.NUM_KEYS, cfg["context_dim"])
            self.y2 = randn(2 * batch, cfg["adm_in_channels"]) if cfg.get("adm_in_channels") else None
        self.t2 = torch.full((2 * batch,), 500.0, device=device, dtype=dtype)
        self.x = self.x2[:batch].clone()
        self.slots = pack.loss.slot_mask(bench.NUM_KEYS, "all_but_bos_last")
        self.weights = pack.weights.AutogradWeights([self.unet])

    def _call(self, x, n: int, attn2: dict):
        y = None if self.y2 is None else self.y2[:n]
        return self.unet(x, self.t2[:n], context=self.ctx2[:n], y=y,
                         transformer_options={"patches_replace": {"attn2": attn2}})

    def targets(self, blocks: str) -> list:
        """The layers the sampler's first pass finds: those of the selected blocks at the target level."""
        keys = self.pack.families.select_blocks(self.pack.capture.attn2_keys(self.unet), blocks)
        with self.torch.inference_mode():
            return bench.target_layers(lambda attn2: self._call(self.x, self.batch, attn2), self.pack,
                                       self.target_hw, keys, self.attention)

    def step(self) -> None:
        with self.torch.inference_mode():
            self._call(self.x2, 2 * self.batch, {})

    def _forward(self, targets: list):
        return bench.pass_forward(lambda x, attn2: self._call(x, self.batch, attn2), self.pack, self.target_hw,
                                  targets, self.attention, self.slots)

    def pass_forward(self, targets: list) -> None:
        torch = self.torch
        with self.weights.active(), torch.inference_mode(False), torch.enable_grad():
            self._forward(targets)(self.x.detach().clone().requires_grad_(True))

    def full_pass(self, targets: list) -> None:
        self.pack.guidance.loss_and_grad(self._forward(targets), self.x, self.weights)

    def graphed_pass(self, targets: list):
        """The full pass as the sampler replays it (``GraphedPass``): captured here, on the first call. Returns a
        function that copies the current latent into the graph's input and replays the pass; raises if the capture
        failed."""
        forward = self._forward(targets)
        graphed = self.pack.guidance.GraphedPass(lambda leaf, sigma: forward(leaf), self.weights)
        sigma = self.t2[:1]  # the bare pass takes its step from the UNet inputs, not from this
        graphed(self.x, sigma)
        if graphed.failure is not None:
            raise RuntimeError(graphed.failure)
        return functools.partial(graphed, self.x, sigma)


def time_all(subject: Subject, fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per function, the functions interleaved so that drifts hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    bench.sync(subject.device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            bench.sync(subject.device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def profile(subject: Subject, targets: list, path: Path) -> None:
    """Operators of three gradient passes by device time."""
    def run():
        for _ in range(3):
            subject.full_pass(targets)

    bench.profile_table(run, subject.device, path, row_limit=50)


def rows(args: argparse.Namespace, pack) -> list[dict[str, Any]]:
    import comfy.model_management
    import torch

    device = torch.device(args.device)
    variant = args.model if args.model != "auto" else ("full" if device.type == "cuda" else "narrow")
    out = []
    for arch in args.arch:
        size = args.size or ((512 if arch == "sd15" else 1024) if variant == "full" else 128)
        subject = Subject(arch, variant, size, args.batch, device, pack)
        targets = {blocks: subject.targets(blocks) for blocks in args.blocks}
        fns = {"step": subject.step}
        what = {"step": ("step", None)}
        for blocks, keys in targets.items():
            fns[f"pass_forward_{blocks}"] = functools.partial(subject.pass_forward, keys)
            fns[f"pass_{blocks}"] = functools.partial(subject.full_pass, keys)
            what[f"pass_forward_{blocks}"], what[f"pass_{blocks}"] = ("pass_forward", blocks), ("pass", blocks)
        base = {"arch": arch, "model": variant, "size": size, "batch": args.batch, "device": args.device,
                "level": f"{subject.target_hw[0]}x{subject.target_hw[1]}", **bench.backend_facts(device)}
        for cudnn_benchmark in ([] if args.graph else [False, True] if device.type == "cuda" else [None]):
            if cudnn_benchmark is not None:
                torch.backends.cudnn.benchmark = base["cudnn_benchmark"] = cudnn_benchmark
            ms = time_all(subject, fns, args.repeats, args.warmup)
            for name, value in ms.items():
                kind, blocks = what[name]
                row = {**base, "what": kind, "blocks": blocks, "ms": round(value, 3),
                       "vs_step": round(value / ms["step"], 3)}
                if blocks is not None:
                    row["layers"] = len(targets[blocks])
                out.append(row)
        if args.graph:
            out += graph_rows(subject, targets, args, base)
        if args.profile is not None:
            for blocks, keys in targets.items():
                profile(subject, keys, args.profile / f"pass_{arch}_{variant}_{blocks}.txt")
        del subject, fns
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    return out


def graph_rows(subject: Subject, targets: dict, args: argparse.Namespace, base: dict) -> list[dict[str, Any]]:
    """Eager pass vs the same pass replayed from a CUDA graph, with cuDNN benchmark mode off."""
    import torch

    torch.backends.cudnn.benchmark = False
    base = {**base, "cudnn_benchmark": False}
    fns: dict[str, Any] = {"step": subject.step}
    what: dict[str, tuple[str, str]] = {}
    for blocks, keys in targets.items():
        fns[f"pass_{blocks}"], what[f"pass_{blocks}"] = functools.partial(subject.full_pass, keys), ("pass", blocks)
        try:
            fns[f"pass_graph_{blocks}"] = subject.graphed_pass(keys)
            what[f"pass_graph_{blocks}"] = ("pass_graph", blocks)
        except RuntimeError as e:  # capture refused an operation: report it, time the rest
            log.warning("CUDA graph capture of the %s pass (%s) failed: %s", base["arch"], blocks, e)
    ms = time_all(subject, fns, args.repeats, args.warmup)
    out = []
    for name, value in ms.items():
        if name == "step":
            continue
        kind, blocks = what[name]
        out.append({**base, "what": kind, "blocks": blocks, "layers": len(targets[blocks]), "ms": round(value, 3),
                    "vs_step": round(value / ms["step"], 3)})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    return bench.simple_table([
        ("arch", lambda r: r["arch"]), ("model", lambda r: r["model"]), ("size", lambda r: f"{r['size']}²"),
        ("batch", lambda r: r["batch"]), ("level", lambda r: r["level"]),
        ("cuDNN benchmark", lambda r: bench._fmt(r.get("cudnn_benchmark"))), ("measured", lambda r: r["what"]),
        ("blocks", lambda r: r["blocks"] or "–"), ("layers", lambda r: r.get("layers", "–")),
        ("ms", lambda r: f"{r['ms']:.1f}"), ("× step", lambda r: f"{r['vs_step']:.2f}"),
    ], table)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    args = parse_args(argv)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # ComfyUI's own prints must not mix into the results
    try:
        bench.setup_comfy(args.comfy_root, cpu=args.device == "cpu")
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            log.error("--device cuda: torch sees no CUDA device")
            return 2
        pack = bench.import_pack()
        table = rows(args, pack)
    finally:
        sys.stdout = stdout
    bench.write_results(table, markdown(table), args.markdown, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
