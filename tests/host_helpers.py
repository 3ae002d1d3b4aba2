"""Shared pieces of the in-process host tests: loading the pack with the tiny checkpoint, seeded random init."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tiny_checkpoint import seeded_init  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent

AE_DEFAULTS = dict(scale_factor=20.0, guided_fraction=0.5, scale_start=1.0, scale_end=0.5,
                   refinement="0:0.05, 0.2:0.5, 0.4:0.8", max_refinement_steps=4, smoothing=True, kernel_size=3,
                   smoothing_sigma=0.5, attention_resolution=0, token_slots="auto", record_maps=True,
                   attention_blocks="all")


def load_host(comfy_inprocess, tiny_checkpoint, prompt: str, subjects: str) -> dict:
    """Import the pack as ComfyUI does, load the tiny checkpoint and encode ``prompt`` (+ an empty negative)."""
    import comfy_inprocess as ci

    ci.load_pack()
    from comfyui_attend_excite.nodes.encode import encode_subjects

    model, clip, vae = comfy_inprocess.load_checkpoint(tiny_checkpoint)
    with torch.inference_mode():
        pos, table, spec = encode_subjects(clip, prompt, subjects)
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return dict(pack=sys.modules["comfyui_attend_excite"], model=model, clip=clip, vae=vae, pos=pos, neg=neg,
                spec=spec, table=table)


def load_bench(name: str = "ae_bench_for_tests"):
    """``benchmarks/bench.py`` as a module (its architectures, random weights and loader)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_benchmark(script: str, *args: str, comfy_root) -> tuple[list[dict], str]:
    """Run ``benchmarks/<script>`` in a subprocess (one thread) on the test ComfyUI; ``(JSON-line rows, stdout)``."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--comfy-root", str(comfy_root)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")], out.stdout


def sample_custom(model, sampler, positive, negative, steps: int, side: int = 16) -> torch.Tensor:
    """``sampler`` through ComfyUI's SamplerCustom entry point under inference mode: ``steps`` steps of the normal
    schedule from a zero ``side`` x ``side`` latent, CFG 5, seed 0."""
    import comfy.sample
    import comfy.samplers

    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()
        latent = torch.zeros(1, 4, side, side)
        return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 0), 5.0, sampler, sigmas,
                                          positive, negative, latent, disable_pbar=True, seed=0)


def ksample(host: dict, seed: int = 3, steps: int = 8, latent: dict | None = None, positive=None, negative=None,
            model=None, **ae):
    """Run ``AttendExciteKSampler`` under inference mode (as ComfyUI's executor does); ``(samples, record)``."""
    from comfyui_attend_excite.nodes.samplers import AttendExciteKSampler

    params = {**AE_DEFAULTS, **ae}
    latent = latent or {"samples": torch.zeros(1, 4, 32, 32)}
    with torch.inference_mode():
        out = AttendExciteKSampler.execute(model or host["model"], seed, steps, 5.0, "euler", "normal",
                                           positive or host["pos"], negative or host["neg"], latent, 1.0, **params)
    lat, record = out.args
    return lat["samples"], record


def weights_fingerprint(model) -> list[tuple[str, float, tuple[int, ...]]]:
    """Per-tensor sums of a ModelPatcher's weights: equal before and after a run that left them alone."""
    return [(k, float(v.float().sum()), tuple(v.shape)) for k, v in model.model.state_dict().items()]


def no_leftovers(roots) -> bool:
    """No comfy-op module keeps a weight/bias function or a forward override from a gradient pass, and no module a
    forward hook (recomputed blocks)."""
    from attention.weights import comfy_op_modules

    mods = comfy_op_modules(roots)
    hooked = [m for root in roots for m in root.modules() if m._forward_hooks or m._forward_pre_hooks]
    return bool(mods) and not hooked and all(not m.weight_function and not m.bias_function
                                             and "forward" not in m.__dict__ for m in mods)
