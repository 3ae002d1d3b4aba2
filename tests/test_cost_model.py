"""benchmarks/cost_model.py on the real SD1.5 layout (meta tensors: no weights, seconds on a CPU).

It drives the sampler's own capture patches, early stop and loss, so these are also checks of where the
gradient pass stops and what it keeps for the backward.
"""

from __future__ import annotations

import pytest
from host_helpers import run_benchmark

pytestmark = [pytest.mark.host]


@pytest.fixture(scope="module")
def rows(comfy_root):
    table, stdout = run_benchmark("cost_model.py", "--arch", "sd15", "--batch", "1,2", comfy_root=comfy_root)
    assert "| sd15 | 512² | 1 | 16x16 | gradient_all |" in stdout
    return {(r["batch"], r["pass"]): r for r in table}


def test_gradient_pass_reads_the_16x16_layers_and_stops_after_the_last(rows):
    full, down = rows[(1, "gradient_all")], rows[(1, "gradient_down_mid")]
    assert (full["layers"], full["last_layer"]) == (5, "output.5.0")  # input 7, 8 and output 3, 4, 5
    assert (down["layers"], down["last_layer"]) == (2, "input.8.0")


def test_the_cut_pass_costs_less_than_a_whole_forward_and_backward(rows):
    step, full, down = rows[(1, "plain_step")], rows[(1, "gradient_all")], rows[(1, "gradient_down_mid")]
    # a whole-UNet forward + backward at batch 1 would be about 3 batch-1 forwards = 1.5 plain (batch-2) steps
    assert 0.3 < full["tflop"] / step["tflop"] < 0.8
    assert down["tflop"] < full["tflop"] and down["saved_gib"] < full["saved_gib"] and down["ops"] < full["ops"]
    assert step["saved_gib"] == 0  # plain sampling keeps nothing for a backward


def test_costs_scale_with_the_batch(rows):
    for name in ("plain_step", "gradient_all"):
        one, two = rows[(1, name)], rows[(2, name)]
        assert two["tflop"] == pytest.approx(2 * one["tflop"], rel=0.01)
    assert rows[(2, "gradient_all")]["ops"] < 1.2 * rows[(1, "gradient_all")]["ops"]  # one batched pass, no loop


def test_saved_memory_is_attributed_to_the_operators_that_made_it(rows):
    full = rows[(1, "gradient_all")]
    assert sum(group[4] for group in full["saved_top"]) <= full["saved_gib"] + 1e-3
    # the two 64x64 transformer blocks (input 1, 2): GEGLU keeps its GELU output, 4096 tokens x 1280 fp16 each
    assert ["gelu", [1, 4096, 1280], "float16", 2, round(2 * 4096 * 1280 * 2 / 1024**3, 4)] in full["saved_top"]
    assert rows[(1, "plain_step")]["saved_top"] == []
