"""benchmarks/cost_model.py's memory options on the real SD1.5 layout (meta tensors, seconds on a CPU): recomputing
in the backward keeps less and costs more arithmetic, and every option reads the same layers."""

from __future__ import annotations

import pytest
from host_helpers import run_benchmark

pytestmark = [pytest.mark.host]


@pytest.fixture(scope="module")
def rows(comfy_root):
    table, stdout = run_benchmark("cost_model.py", "--arch", "sd15", "--blocks", "all", "--memory",
                                  "stored,ff_recompute,block_recompute", comfy_root=comfy_root)
    assert "| gradient_all+block_recompute |" in stdout
    return {r["pass"]: r for r in table}


def test_recomputing_keeps_less_and_costs_more(rows):
    stored, ff, block = (rows[n] for n in ("gradient_all", "gradient_all+ff_recompute",
                                           "gradient_all+block_recompute"))
    assert stored["memory"] == "stored" and block["memory"] == "block_recompute"
    assert stored["saved_gib"] > ff["saved_gib"] > block["saved_gib"] > 0
    assert stored["tflop"] < ff["tflop"] < block["tflop"] < 1.5 * stored["tflop"]  # at most one more forward
    assert all((r["layers"], r["last_layer"]) == (5, "output.5.0") for r in (stored, ff, block))


def test_the_feed_forward_activations_are_what_ff_recompute_drops(rows):
    gelu = ["gelu", [1, 4096, 1280], "float16", 2, round(2 * 4096 * 1280 * 2 / 1024**3, 4)]
    assert gelu in rows["gradient_all"]["saved_top"]
    assert not any(group[0] == "gelu" for group in rows["gradient_all+ff_recompute"]["saved_top"])
    assert rows["gradient_all"]["saved_gib"] - rows["gradient_all+ff_recompute"]["saved_gib"] > gelu[4]


def test_auto_recomputes_the_first_blocks_until_the_rest_fits(comfy_root):
    """SD1.5 at batch 4: the sampler's ``recompute = auto`` takes some of the 10 blocks, between ``off`` and
    ``blocks`` in memory and arithmetic; the estimate it decides by is near the counted bytes."""
    table, _ = run_benchmark("cost_model.py", "--arch", "sd15", "--batch", "4", "--blocks", "all", "--memory",
                             "stored,block_recompute,auto", comfy_root=comfy_root)
    stored, block, auto = ({r["pass"]: r for r in table}[n] for n in
                           ("gradient_all", "gradient_all+block_recompute", "gradient_all+auto"))
    assert (stored["blocks_recomputed"], block["blocks_recomputed"]) == (0, 10)
    assert 0 < auto["blocks_recomputed"] < auto["blocks_run"] == 10
    assert block["saved_gib"] < auto["saved_gib"] < stored["saved_gib"]
    assert stored["tflop"] < auto["tflop"] < block["tflop"]
    assert 0.7 < stored["stored_estimate_gib"] / stored["saved_gib"] < 1.3
