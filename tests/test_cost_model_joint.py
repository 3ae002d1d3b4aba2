"""benchmarks/cost_model.py on the joint-attention transformers, checked by hand on the tiny Flux layout of
``benchmarks/dit_bench.py`` (1 double + 1 single block, hidden 192, 2 heads of 96; meta tensors, seconds).

At 128 px the model sees IMG = 64 image tokens (8x8 after the 2x2 patches) and T = 256 T5 tokens, N = 320.
"""

from __future__ import annotations

import pytest
from host_helpers import run_benchmark

pytestmark = [pytest.mark.host]

H, HEADS, IMG, T = 192, 2, 64, 256
N = IMG + T
CHUNK = 8192  # logits per chunk: 8192 // (2 heads x 320 keys) = 12 image rows, 6 chunks for 64 rows


@pytest.fixture(scope="module")
def rows(comfy_root):
    table, _ = run_benchmark("cost_model.py", "--arch", "flux", "--joint-model", "tiny", "--size", "128",
                             "--text-tokens", str(T), "--chunk-elements", str(CHUNK), comfy_root=comfy_root)
    return {r["pass"]: r for r in table}


def test_plain_step_flops_are_the_layers_matmuls(rows):
    """Every matmul of one Flux call (2 x in x out per token and linear layer, 4 N^2 H per attention)."""
    embed = 2 * IMG * 64 * H + 2 * T * 4096 * H + 2 * 2 * (256 * H + H * H) + 2 * (768 * H + H * H)
    double = 2 * 2 * 6 * H * H + 2 * N * H * (3 * H + H + 8 * H) + 4 * N * N * H  # mods, qkv, proj, mlp, attention
    single = 2 * 3 * H * H + 2 * N * H * (7 * H) + 2 * N * (5 * H) * H + 4 * N * N * H
    final = 2 * H * 2 * H + 2 * IMG * H * 64
    step = rows["plain_step"]
    assert step["flop"] == embed + double + single + final
    assert step["saved_bytes"] == 0 and step["model_calls_per_step"] == 1  # guidance-distilled: no uncond call


def test_pass_reads_the_double_block_and_stops_there(rows):
    g = rows[f"gradient_joint+chunk{CHUNK}"]
    assert (g["layers"], g["read_blocks"], g["last_layer"]) == (1, "double.0", "double.0")
    assert g["flop"] < rows["plain_step"]["flop"]  # the single block and the final layer never run
    assert (g["image_tokens"], g["text_tokens"], g["tokens"], g["heads"]) == (IMG, T, N, HEADS)
    assert (g["chunk_rows"], g["chunks_per_block"]) == (12, 6)
    assert g["full_matrix_f32_gib_per_block"] == pytest.approx(HEADS * N * N * 4 / 1024**3, abs=1e-4)
    assert g["guided_passes"] == 14 and g["time_ratio_estimate"] == pytest.approx(1 + 0.5 * g["tflop_vs_step"],
                                                                                 abs=1e-3)


def test_chunk_inputs_are_kept_once_under_the_pass_hook(rows):
    """The pack's capture under its cloning saved-tensor hook keeps the keys and image queries once per block, as
    a capture that saves its inputs by reference: PyTorch's checkpoint of each chunk must not copy the whole key
    tensor once per chunk (6 chunks here: 6 key copies before the capture kept its chunks' inputs itself)."""
    as_is, once = rows[f"gradient_joint+chunk{CHUNK}"], rows[f"gradient_joint+inputs_once+chunk{CHUNK}"]
    assert as_is["saved_bytes"] == once["saved_bytes"]
    assert as_is["flop"] == once["flop"]
