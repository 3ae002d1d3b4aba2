"""Check that A&E works the same under ComfyUI's full, low-VRAM and no-VRAM loading (run once per mode).

    python benchmarks/vram_check.py --mode normal --out a.json
    python benchmarks/vram_check.py --mode novram --out b.json
    python benchmarks/vram_check.py --compare a.json b.json

Each run builds the random SD1.5-architecture UNet of ``bench.py`` (ComfyUI's memory mode is a process-wide
setting, hence one process per mode), runs 10 euler steps with A&E (refinement at 0 %, cap 5) and writes the
per-pass losses, a checksum of the final latent and whether every weight function was removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def run(mode: str, device: str, steps: int) -> dict:
    bench.register_bare_packages()
    import importlib

    inprocess = importlib.import_module(f"{bench.PACK}.scripts.comfy_inprocess")
    inprocess.setup(None, cpu=device == "cpu")
    import comfy.cli_args

    comfy.cli_args.args.lowvram = mode == "lowvram"
    comfy.cli_args.args.novram = mode == "novram"
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import torch

    pack = bench.import_pack()
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    variant = "full" if dev.type == "cuda" else "tiny"
    sd = bench.random_state_dict("sd15", variant, dev, dtype, 0)
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    del sd
    side = 64 if dev.type == "cuda" else 32
    gen = torch.Generator().manual_seed(1)
    spec = pack.tokens.SubjectTokens(indices=(2, 5), labels=("a", "b"), prompt_positions=tuple(range(1, 7)),
                                     num_keys=77, family="l")
    pos = [[torch.randn(1, 77, 768, generator=gen), {"attend_excite": spec}]]
    neg = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(1, 4, side, side)
    record = pack.record.AttentionRecord()
    params = pack.sampling.AEParams(sampler_name="euler", refinement=((0.0, 0.99),), max_refinement_steps=5)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, 0)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()
        out = comfy.sample.sample_custom(model, noise, 7.5, pack.sampling.make_sampler(params, record), sigmas, pos,
                                         neg, latent, disable_pbar=True, seed=0)
    from comfyui_attend_excite.attention.weights import comfy_op_modules

    mods = comfy_op_modules([model.model])
    return {
        "mode": mode, "vram_state": str(mm.vram_state), "device": str(dev),
        "loaded_partially": any(getattr(m, "comfy_cast_weights", False) for m in mods),
        "losses": {str(k): [float(x[0]) for x in v] for k, v in record.losses.items()},
        "latent_sum": float(out.float().sum()), "latent_abs": float(out.float().abs().mean()),
        "finite": bool(torch.isfinite(out).all()),
        "weight_functions_left": sum(len(m.weight_function) + len(m.bias_function) for m in mods),
    }


def compare(a: dict, b: dict) -> dict:
    la = [x for v in a["losses"].values() for x in v]
    lb = [x for v in b["losses"].values() for x in v]
    dl = max((abs(x - y) for x, y in zip(la, lb)), default=float("nan"))
    rel = abs(a["latent_abs"] - b["latent_abs"]) / max(abs(a["latent_abs"]), 1e-12)
    ok = len(la) == len(lb) and dl < 2e-2 and rel < 2e-2 and a["finite"] and b["finite"] \
        and a["weight_functions_left"] == 0 and b["weight_functions_left"] == 0
    return {"compare": [a["mode"], b["mode"]], "passes": [len(la), len(lb)], "max_abs_dloss": dl,
            "latent_abs_rel_diff": rel, "ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("normal", "lowvram", "novram"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path)
    args = ap.parse_args()
    if args.compare:
        result = compare(*(json.loads(p.read_text()) for p in args.compare))
    else:
        result = run(args.mode, args.device, args.steps)
        if args.out:
            args.out.write_text(json.dumps(result))
    print(json.dumps(result))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
