"""benchmarks/dit_bench.py at its smallest (tiny Flux and SD3.5-medium layouts, 64 px, 4 steps, CPU): the rows
carry the fields the GPU rows are read by, and the A&E runs took their gradient passes through the pack's sampler."""

from __future__ import annotations

import statistics

import pytest
from host_helpers import run_benchmark

pytestmark = [pytest.mark.host, pytest.mark.slow]

FIELDS = {"system", "arch", "model", "batch", "steps", "mode", "median_s", "times_s", "peak_gib", "ratio_to_plain",
          "paired_ratio_to_plain", "grad_passes", "text_tokens", "image_tokens", "read_blocks", "cfg",
          "model_calls_per_step", "output_finite", "commit", "device", "dtype", "peak_kind", "unet_config"}


@pytest.fixture(scope="module")
def rows(comfy_root):
    table, stdout = run_benchmark("dit_bench.py", "--device", "cpu", "--model", "tiny", "--size", "64", "--steps", "4",
                                  "--repeats", "3", "--threads", "1", comfy_root=comfy_root)
    assert "| flux | tiny | 64² | 256+16 | 4 | ae_no_refine |" in stdout
    return {(r["arch"], r["mode"]): r for r in table}


def test_rows_and_fields(rows):
    assert set(rows) == {(a, m) for a in ("flux", "sd35m") for m in ("plain", "ae_no_refine")}
    for row in rows.values():
        assert FIELDS <= set(row), FIELDS - set(row)
        assert row["output_finite"] and len(row["times_s"]) == 3 and row["device"] == "cpu"
    flux, sd3 = rows[("flux", "ae_no_refine")], rows[("sd35m", "ae_no_refine")]
    assert (flux["text_tokens"], flux["image_tokens"], flux["read_blocks"], flux["model_calls_per_step"]) == (
        256, 16, "double.0", 1)
    assert (sd3["text_tokens"], sd3["read_blocks"], sd3["model_calls_per_step"]) == (77 + 256, "joint.0", 2)
    assert flux["model_class"] == "Flux" and sd3["model_class"] == "SD3"


@pytest.mark.parametrize("arch", ["flux", "sd35m"])
def test_ae_took_gradient_passes(rows, arch):
    plain, ae = rows[(arch, "plain")], rows[(arch, "ae_no_refine")]
    assert plain["grad_passes"] == 0
    assert ae["grad_passes"] == ae["record_passes"] == ae["guided_steps"] == 2  # the first half of 4 steps
    assert ae["first_loss"] > 0
    # the ratio pairs each timed A&E run with the plain run of its round (a speed claim is the GPU rows', not a test's)
    pairs = [a / p for a, p in zip(ae["times_s"], plain["times_s"])]
    assert ae["paired_ratio_to_plain"] == pytest.approx(statistics.median(pairs), rel=1e-3)
    assert ae["peak_ratio_to_plain"] is not None and ae["targets"] == {"time": 1.8, "peak": 1.5}
    assert ae["output_fingerprint"] != plain["output_fingerprint"]  # the guidance moved the latent
