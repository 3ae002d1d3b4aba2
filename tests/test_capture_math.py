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


def test_another_nodes_patch_is_found_as_comfyui_looks_it_up():
    def a(*args):
        return None

    def b(*args):
        return None

    options = {"transformer_options": {"patches_replace": {"attn2": {("input", 7): a, ("output", 3, 0): b}}}}
    assert capture.replaced_attn2(options, ("input", 7, 0)) is a  # a (block name, block id) patch covers every depth
    assert capture.replaced_attn2(options, ("output", 3, 0)) is b
    assert capture.replaced_attn2(options, ("output", 3, 1)) is None
    assert capture.replaced_attn2({}, ("input", 7, 0)) is None
    options["transformer_options"]["patches_replace"]["attn2"][("input", 7, 0)] = b
    assert capture.replaced_attn2(options, ("input", 7, 0)) is b  # the exact key first


class _Attn2(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn2 = torch.nn.Identity()


class _Spatial(torch.nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_Attn2() for _ in range(depth)])


class Downsample(torch.nn.Identity):
    pass


class Upsample(torch.nn.Identity):
    pass


class ResBlock(torch.nn.Module):
    def __init__(self, down: bool = False) -> None:
        super().__init__()
        self.updown = down
        if down:
            self.h_upd, self.x_upd = Downsample(), Downsample()


def test_levels_come_from_the_unets_structure():
    """SD1.x-shaped: attention at input 1, 2 (level 0), 4, 5 (level 1; input 3 is a down-sampling ResBlock), middle
    (level 2), output 0, 1 (level 2, upsample at the end of output 1), output 2 (level 1), depth 2 at input 4."""
    seq = torch.nn.Sequential
    unet = torch.nn.Module()
    unet.input_blocks = torch.nn.ModuleList([
        seq(torch.nn.Identity()), seq(ResBlock(), _Spatial(1)), seq(ResBlock(), _Spatial(1)), seq(ResBlock(down=True)),
        seq(ResBlock(), _Spatial(2)), seq(ResBlock(), _Spatial(1)), seq(Downsample())])
    unet.middle_block = seq(ResBlock(), _Spatial(1), ResBlock())
    unet.output_blocks = torch.nn.ModuleList([
        seq(ResBlock(), _Spatial(1)), seq(ResBlock(), _Spatial(1), Upsample()), seq(ResBlock(), _Spatial(1))])
    levels = capture.attn2_levels(unet)
    assert levels == {("input", 1, 0): 0, ("input", 2, 0): 0, ("input", 4, 0): 1, ("input", 4, 1): 1,
                      ("input", 5, 0): 1, ("middle", 0, 0): 2, ("output", 0, 0): 2, ("output", 1, 0): 2,
                      ("output", 2, 0): 1}
    assert capture.attn2_keys(unet) == list(levels)


@pytest.mark.parametrize("hw", [(2, 2), (3, 2), (8, 8), (4, 4)])
def test_maps_at_another_size_are_resized_to_the_target(hw):
    torch.manual_seed(0)
    m = torch.softmax(torch.randn(2, hw[0] * hw[1], 5), -1).requires_grad_(True)
    out = capture.fit_map(m, hw, (4, 4))
    assert out.shape == (2, 16, 5)
    assert torch.allclose(out.sum(-1), torch.ones(2, 16), atol=1e-6)  # still probabilities at every position
    if hw == (4, 4):
        assert out is m
    elif hw == (8, 8):  # 2x2 area means
        grid = m.detach().reshape(2, 8, 8, 5)
        assert torch.allclose(out.detach().reshape(2, 4, 4, 5)[:, 1, 2], grid[:, 2:4, 4:6].mean((1, 2)), atol=1e-6)
    out[..., 0].sum().backward()
    assert m.grad is not None and torch.isfinite(m.grad).all()


def _layer(batch: int = 2, n: int = 4, heads: int = 2):
    torch.manual_seed(1)
    q, k, v = torch.randn(batch, n, 8), torch.randn(batch, 3, 8), torch.randn(batch, 3, 8)
    return q.requires_grad_(True), k, v


def test_grad_capture_keeps_the_other_nodes_output_and_reads_text_attention_on_the_side():
    q, k, v = _layer()
    image = torch.randn(2, 3, 8)

    def inner(q, k, v, extra_options):  # IP-Adapter-like: text attention plus attention over other tokens
        return q + image.sum(1, keepdim=True) * 0.1

    cap = capture.GradCapture((2, 2), None, lambda *a, **kw: None, targets=[("input", 7, 0)])
    options = {"n_heads": 2, "activations_shape": [2, 8, 1, 4]}  # the layer sees 1x4: resized to the 2x2 target
    out = cap.patch(("input", 7, 0), inner)(q, k, v, options)
    assert torch.equal(out, inner(q, k, v, options))
    probs = capture.attention_probs(q, k, 2).mean(1)
    assert torch.allclose(cap.maps[("input", 7, 0)], capture.fit_map(probs, (1, 4), (2, 2)))
    assert cap.seen[("input", 7, 0)] == (1, 4) and cap.aggregate().shape == (2, 2, 2, 3)
    cap.maps[("input", 7, 0)][..., 0].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    # a layer outside the targets defers to the other node's patch; the last target stops the pass
    other = capture.GradCapture((2, 2), ("input", 8, 0), lambda *a, **kw: None, targets=[("input", 8, 0)])
    assert torch.equal(other.patch(("input", 4, 0), inner)(q, k, v, options), inner(q, k, v, options))
    with pytest.raises(capture.StopForward):
        other.patch(("input", 8, 0), inner)(q, k, v, options)
    assert ("input", 8, 0) in other.maps and ("input", 4, 0) not in other.maps


def test_map_recorder_keeps_the_other_nodes_output_and_records_resized_maps():
    q, k, v = _layer()
    q = q.detach()
    maps = []

    class Record:
        def add_map(self, step, layer, probs):
            maps.append((step, layer, probs))

    sentinel = torch.zeros(2, 4, 8)
    rec = capture.MapRecorder(Record(), (2, 2), [10.0, 0.0], lambda *a, **kw: None, targets=[("output", 3, 0)])
    options = {"n_heads": 2, "sigmas": torch.tensor([10.0]), "cond_or_uncond": [1, 0],
               "activations_shape": [2, 8, 1, 4]}
    assert rec.patch(("output", 3, 0), lambda *a: sentinel)(q, k, v, options) is sentinel
    assert rec.patch(("output", 4, 0), lambda *a: sentinel)(q, k, v, options) is sentinel  # not a target: no map
    (step, layer, probs), = maps
    expected = capture.fit_map(capture.attention_probs(q[1:], k[1:], 2).mean(1), (1, 4), (2, 2))
    assert (step, layer) == (0, "output.3.0") and torch.allclose(probs, expected.reshape(1, 2, 2, 3))


def test_block_patches_that_update_in_place_keep_the_graph_valid():
    def freeu_like(h, hsp, transformer_options):  # FreeU's backbone scaling, in place
        mean = h.mean(1, keepdim=True)
        mean = (mean - mean.amin()) / (mean.amax() - mean.amin())
        h[:, :2] = h[:, :2] * (0.3 * mean + 1)
        return h, hsp

    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        freeu_like(x * 2, None, {})[0].sum().backward()
    options = {"patches": {"output_block_patch": [freeu_like]}, "other": 1}
    safe = capture.graph_safe_block_patches(options)
    assert options["patches"]["output_block_patch"] == [freeu_like] and safe["other"] == 1
    safe["patches"]["output_block_patch"][0](x * 2, None, {})[0].sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    h = ref * 2
    mean = h.mean(1, keepdim=True)
    mean = (mean - mean.amin()) / (mean.amax() - mean.amin())
    torch.cat([h[:, :2] * (0.3 * mean + 1), h[:, 2:]], 1).sum().backward()
    assert torch.allclose(x.grad, ref.grad, atol=1e-6)
