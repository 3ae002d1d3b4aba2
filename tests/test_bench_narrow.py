"""The benchmark's ``narrow`` layouts: the real SD1.5 / SDXL depths at width 32, for host-overhead timings on a CPU.

They only mean something if they are the real layouts in ComfyUI's eyes (same model class, same cross-attention
layers) and if the A&E gradient pass reads the same layers there as on the real 512² / 1024² models.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from host_helpers import load_bench, run_benchmark, sample_custom

pytestmark = [pytest.mark.host, pytest.mark.slow]


@pytest.fixture(scope="module")
def bench(comfy_inprocess):
    import comfy_inprocess as ci

    ci.load_pack()
    return load_bench("ae_bench_narrow_tests")


def _layers(family: str) -> list[str]:
    """Cross-attention layers at latent / 4 (16x16 at 512², 32x32 at 1024²), in execution order."""
    if family == "sd15":
        return ["input.7.0", "input.8.0", "output.3.0", "output.4.0", "output.5.0"]
    ten = range(10)
    return ([f"input.{b}.{i}" for b in (7, 8) for i in ten] + [f"middle.0.{i}" for i in ten]
            + [f"output.{b}.{i}" for b in (0, 1, 2) for i in ten])


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_narrow_twin_is_the_real_layout_and_ae_reads_the_same_layers(bench, arch):
    import comfy.model_base
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    sampling = importlib.import_module("comfyui_attend_excite.nodes.sampling")
    capture = importlib.import_module("comfyui_attend_excite.nodes.capture")
    record_mod = importlib.import_module("comfyui_attend_excite.attention.record")
    tokens = importlib.import_module("comfyui_attend_excite.attention.tokens")

    sd = bench.random_state_dict(arch, "narrow", torch.device("cpu"), torch.float32, seed=0)
    with torch.inference_mode():
        model = bench.load_unet(sd, arch, "narrow", torch.float32)
    family, model_class = {"sd15": (comfy.supported_models.SD15, comfy.model_base.BaseModel),
                           "sdxl": (comfy.supported_models.SDXL, comfy.model_base.SDXL)}[arch]
    assert type(model.model.model_config) is family and type(model.model) is model_class
    assert model.model.diffusion_model.model_channels == 32
    full = UNetModel(**bench.unet_config(arch, "full"), device="meta", operations=comfy.ops.disable_weight_init)
    assert capture.attn2_keys(model.model.diffusion_model) == capture.attn2_keys(full)
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())

    # two euler steps at 128 px (16x16 latent, level 4x4), one of them guided
    subjects = tokens.SubjectTokens(indices=(2, 5), labels=("a", "b"), prompt_positions=tuple(range(1, 7)),
                                    num_keys=77, family="l")
    gen = torch.Generator().manual_seed(1)
    extra = {"pooled_output": torch.randn(1, 1280, generator=gen)} if arch == "sdxl" else {}
    pos = [[torch.randn(1, 77, 64, generator=gen), {**extra, "attend_excite": subjects}]]
    neg = [[torch.randn(1, 77, 64, generator=gen), dict(extra)]]
    record = record_mod.AttentionRecord()
    sampler = sampling.make_sampler(sampling.AEParams(refinement=()), record)
    out = sample_custom(model, sampler, pos, neg, steps=2)
    assert torch.isfinite(out).all()
    assert sorted(record.losses) == [0]
    assert record.layers == _layers(arch)


def test_pass_timing_script_times_step_and_passes_and_profiles(comfy_root, tmp_path):
    """``benchmarks/pass_timing.py`` on the narrow SD1.5 twin: every measurement present, the layers each pass reads,
    and a profile table per pass (timings themselves are not asserted)."""
    table, _ = run_benchmark("pass_timing.py", "--arch", "sd15", "--repeats", "1", "--warmup", "0", "--profile",
                             str(tmp_path), comfy_root=comfy_root)
    rows = {(r["what"], r["blocks"]): r for r in table}
    assert set(rows) == {("step", None), ("pass_forward", "all"), ("pass", "all"), ("pass_forward", "down_mid"),
                         ("pass", "down_mid")}
    assert rows[("step", None)]["vs_step"] == 1.0 and rows[("step", None)]["model"] == "narrow"
    assert (rows[("pass", "all")]["layers"], rows[("pass", "down_mid")]["layers"]) == (5, 2)
    assert all(r["ms"] > 0 and r["level"] == "4x4" for r in rows.values())
    for blocks in ("all", "down_mid"):
        assert "aten::" in (tmp_path / f"pass_sd15_narrow_{blocks}.txt").read_text()


def test_bench_script_counts_every_gradient_pass_and_reports_ratios(comfy_root):
    """``benchmarks/bench.py`` end to end on the tiny SD1.5 layout: 4 steps = 2 guided steps; every gradient pass,
    refinement at its cap included, counted from the sampler's own log record; timed runs record maps as the nodes
    do."""
    table, stdout = run_benchmark("bench.py", "--device", "cpu", "--arch", "sd15", "--model", "tiny", "--size", "64",
                                  "--steps", "4", "--repeats", "1", "--threads", "1", "--record-maps",
                                  comfy_root=comfy_root)
    rows = {r["mode"]: r for r in table}
    assert set(rows) == {"plain", "ae_no_refine", "ae_refine_cap"}
    assert rows["plain"]["grad_passes"] == 0 and rows["ae_no_refine"]["grad_passes"] == 2
    assert rows["ae_refine_cap"]["grad_passes"] == rows["ae_refine_cap"]["cap_passes"] > 2
    assert rows["ae_no_refine"]["graph_replayed"] is False  # CPU: passes stay eager
    assert rows["plain"]["output_fingerprint"] != rows["ae_no_refine"]["output_fingerprint"]
    plain = rows["plain"]["median_s"]
    assert rows["ae_no_refine"]["ratio_to_plain"] == pytest.approx(rows["ae_no_refine"]["median_s"] / plain, rel=1e-3)
    assert "| comfyui | sd15 | tiny |" in stdout and "| ae_no_refine (maps recorded) |" in stdout
    assert rows["ae_refine_cap"]["record_maps"] is True
    assert all(r["gc"] == "freeze" and len(r["gc_s"]) == 1 and r["min_s"] == r["median_s"] for r in rows.values())
