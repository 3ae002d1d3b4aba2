"""The explicit attention maps of the capture patches: precision rules on small tensors (no ComfyUI needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("ae_capture_for_tests",
                                               Path(__file__).resolve().parent.parent / "nodes" / "capture.py")
capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capture)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def test_probabilities_are_the_softmax_of_scaled_scores():
    # one head of size 4: scores q.k / 2; q = [2,0,0,0] against keys e0, e1 -> logits [1, 0]
    q = torch.tensor([[[2.0, 0, 0, 0]]])
    k = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    p = capture.attention_probs(q, k, heads=1)
    e = torch.e
    assert p.dtype == torch.float32 and p.shape == (1, 1, 1, 2)
    assert torch.allclose(p.flatten(), torch.tensor([e / (e + 1), 1 / (e + 1)]), atol=1e-6)


def test_fp16_models_keep_half_precision_scores_unless_float32_is_asked_for():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 8).half(), torch.randn(2, 5, 8).half()
    qh, kh = _heads(q, 2), _heads(k, 2)
    half = torch.softmax((qh * 0.5) @ kh.transpose(-1, -2), dim=-1, dtype=torch.float32)
    full = torch.softmax((qh.float() * 0.5) @ kh.float().transpose(-1, -2), dim=-1)
    got_half = capture.attention_probs(q, k, 2, attn_precision=None)
    got_full = capture.attention_probs(q, k, 2, attn_precision=torch.float32)
    assert got_half.dtype == got_full.dtype == torch.float32
    assert torch.equal(got_half, half) and torch.allclose(got_full, full, atol=1e-6)
    assert torch.allclose(got_half, got_full, atol=2e-3)
    # bfloat16 (8-bit mantissa) always gets float32 scores
    bf = capture.attention_probs(q.bfloat16(), k.bfloat16(), 2, attn_precision=None)
    assert torch.allclose(bf, capture.attention_probs(q.bfloat16(), k.bfloat16(), 2), atol=0)


def test_float32_precision_keeps_large_scores_finite():
    # q.k = 4 * 200 * 200 = 160000 overflows float16 (max 65504); scaled by 1/2 it is 80000: still too large
    q = torch.full((1, 1, 4), 200.0).half()
    k = torch.stack([torch.full((4,), 200.0), torch.full((4,), -200.0)])[None].half()
    assert not torch.isfinite(capture.attention_probs(q, k, 1, attn_precision=None)).all()
    p = capture.attention_probs(q, k, 1, attn_precision=torch.float32)
    assert torch.equal(p.flatten(), torch.tensor([1.0, 0.0]))


def test_grad_capture_asks_for_the_layers_effective_precision():
    seen = []

    def precision(attn_precision, dtype):
        seen.append((attn_precision, dtype))
        return torch.float32

    cap = capture.GradCapture((2, 2), None, lambda *a, **kw: None, precision)
    q, k, v = torch.randn(1, 4, 8).half(), torch.randn(1, 3, 8).half(), torch.randn(1, 3, 8).half()
    out = cap.patch(("input", 1, 0))(q, k, v, {"n_heads": 2, "attn_precision": None, "activations_shape": [1, 8, 2, 2]})
    assert seen == [(None, torch.float16)] and out.shape == q.shape and out.dtype == torch.float16
    expected = capture.attention_probs(q, k, 2, torch.float32).mean(1)
    assert torch.equal(cap.maps[("input", 1, 0)], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_maps_stay_differentiable(dtype):
    q = torch.randn(1, 4, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 3, 8, dtype=dtype)
    capture.attention_probs(q, k, 2, attn_precision=None)[..., 0].sum().backward()
    assert q.grad is not None and q.grad.dtype == dtype and torch.isfinite(q.grad).all()
