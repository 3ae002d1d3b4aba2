"""Unit tests of the pure A&E math on small tensors with hand-checkable answers (no ComfyUI needed)."""

from __future__ import annotations

import math

import pytest
import torch

from attention.loss import ae_loss, resoftmax, slot_mask, slot_runs, subject_columns, subject_max_attention
from attention.schedule import build_schedule, parse_refinement
from attention.smoothing import reference_kernel_1d, reference_kernel_2d, smooth_maps
from attention.step import x_space_step


def test_reference_kernel_values_match_the_official_quirk():
    # exp(-((x-mu)/(2*0.5))^2) at x-mu = -1, 0, 1 -> [e^-1, 1, e^-1] / (1 + 2/e)
    e = math.exp(-1)
    expected = torch.tensor([e, 1.0, e]) / (1 + 2 * e)
    assert torch.allclose(reference_kernel_1d(3, 0.5), expected, atol=1e-6)
    assert torch.allclose(reference_kernel_1d(3, 0.5), torch.tensor([0.2119, 0.5761, 0.2119]), atol=1e-4)
    k = reference_kernel_2d(3, 0.5)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert k[0, 0].item() == pytest.approx(0.0449, abs=1e-4)  # corner
    assert k[0, 1].item() == pytest.approx(0.1221, abs=1e-4)  # edge
    assert k[1, 1].item() == pytest.approx(0.3319, abs=1e-4)  # centre


def test_smoothing_a_delta_gives_the_kernel_and_keeps_constants():
    delta = torch.zeros(1, 5, 5)
    delta[0, 2, 2] = 1.0
    out = smooth_maps(delta)
    assert torch.allclose(out[0, 1:4, 1:4], reference_kernel_2d(), atol=1e-6)
    assert out[0, 0].abs().max() == 0
    const = torch.full((2, 4, 4), 0.25)
    assert torch.allclose(smooth_maps(const), const)


def test_smoothing_reflects_at_the_border():
    # reflect padding: a peak on the border sees itself mirrored only through its neighbours
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0] = 1.0
    out = smooth_maps(m)
    g = reference_kernel_1d()
    assert out[0, 0, 0].item() == pytest.approx(float(g[1] * g[1]), abs=1e-6)  # centre weight only
    assert out[0, 1, 1].item() == pytest.approx(float(g[0] * g[0]), abs=1e-6)


def test_slot_mask_official_sd1_and_prompt_modes():
    m = slot_mask(77, "all_but_bos_last")
    assert m.sum() == 75 and not m[0] and not m[76] and m[1] and m[75]
    m2 = slot_mask(154, "all_but_bos_last")
    assert m2.sum() == 150 and not m2[77] and not m2[153] and m2[78]
    p = slot_mask(77, "prompt", [1, 2, 3])
    assert p.nonzero().flatten().tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="77-token CLIP chunks"):
        slot_mask(76, "all_but_bos_last")
    assert slot_mask(256, "prompt", [0, 3]).nonzero().flatten().tolist() == [0, 3]  # a T5 stream: any length
    with pytest.raises(ValueError):
        slot_mask(0, "prompt", [1])
    with pytest.raises(ValueError):
        slot_mask(77, "nope")


def test_subject_columns_shift_by_the_dropped_start_token():
    m = slot_mask(77, "all_but_bos_last")
    assert subject_columns([2, 5], m) == [1, 4]  # the reference's `index - 1`
    with pytest.raises(ValueError):
        subject_columns([0], m)
    with pytest.raises(ValueError):
        subject_columns([76], m)


def test_resoftmax_by_hand():
    attn = torch.tensor([0.5, 0.01, 0.02, 0.47])  # T = 4
    slots = torch.tensor([False, True, True, False])
    out = resoftmax(attn, slots, temperature=100.0)
    # softmax([1, 2]) = [1, e] / (1 + e)
    assert torch.allclose(out, torch.tensor([1.0, math.e]) / (1 + math.e), atol=1e-6)


def test_slot_runs_are_the_spans_of_selected_slots():
    assert slot_runs(torch.tensor([False, True, True, False, True])) == [(1, 3), (4, 5)]
    assert slot_runs(slot_mask(154, "all_but_bos_last")) == [(1, 76), (78, 153)]
    with pytest.raises(ValueError):
        slot_runs(torch.zeros(4, dtype=torch.bool))


def test_resoftmax_over_several_runs_equals_selecting_the_slots():
    attn = torch.rand(2, 3, 3, 154)
    slots = slot_mask(154, "prompt", [1, 2, 3, 80, 81])
    expected = torch.softmax(attn[..., slots] * 100.0, dim=-1)
    assert torch.allclose(resoftmax(attn, slots), expected, atol=1e-6)


def test_subject_max_attention_and_loss_by_hand():
    # 2x2 map, T = 77; subject 2 owns pixel (0, 0) strongly, subject 5 nothing special
    attn = torch.full((1, 2, 2, 77), 0.0)
    attn[0, 0, 0, 2] = 1.0
    m = subject_max_attention(attn, [2, 5], slot_mask(77, "all_but_bos_last"), smoothing=False)
    # pixel (0,0): softmax over 75 slots of [100, 0, ...] -> e^100/(e^100 + 74) ~ 1
    # subject 5 everywhere uniform: 1/75 at best (pixels without a peak)
    assert m.shape == (1, 2)
    assert m[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert m[0, 1].item() == pytest.approx(1 / 75, rel=1e-5)
    loss = ae_loss(m)
    assert loss.item() == pytest.approx(1 - 1 / 75, rel=1e-6)


def test_loss_is_max_over_subjects_of_one_minus_max_and_clamped():
    assert ae_loss(torch.tensor([[0.3, 0.8], [1.2, 0.9]])).tolist() == pytest.approx([0.7, 0.1])


def test_schedule_reproduces_the_paper_at_50_steps():
    s = build_schedule(50)
    assert s.guided_steps == 25
    assert s.refinement == {0: 0.05, 10: 0.5, 20: 0.8}
    assert s.step_sizes[0] == pytest.approx(20.0)
    assert s.step_sizes[10] == pytest.approx(20 * math.sqrt(1 - 0.5 * 10 / 49))
    assert s.step_sizes[49] == pytest.approx(20 * math.sqrt(0.5))
    assert build_schedule(50, scale_factor=0).guided_steps == 0
    # refinement points beyond the guided part are dropped: no gradient pass after it
    assert build_schedule(10, guided_fraction=0.2).refinement == {0: 0.05}


def test_parse_refinement():
    assert parse_refinement("0:0.05, 0.2:0.5") == ((0.0, 0.05), (0.2, 0.5))
    assert parse_refinement("") == ()
    for bad in ("0.2", "x:1", "1.5:0.5", "0.1:2"):
        with pytest.raises(ValueError):
            parse_refinement(bad)


def test_x_space_step_by_hand():
    x = torch.ones(1, 1, 1, 1)
    # x - alpha (sigma^2 + 1) g = 1 - 3 * 5 * 1
    assert x_space_step(x, torch.ones_like(x), 3.0, torch.tensor([2.0])).item() == pytest.approx(-14.0)
    # per-sample alpha: a zero alpha leaves that sample untouched
    xb = torch.ones(2, 1, 1, 1)
    out = x_space_step(xb, torch.ones_like(xb), torch.tensor([0.0, 1.0]), torch.tensor(1.0))
    assert out.flatten().tolist() == [1.0, -1.0]


def test_x_space_step_equals_the_papers_z_space_step():
    torch.manual_seed(0)
    sigma, alpha = torch.tensor(3.0), 20.0
    z = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    w = torch.randn_like(z)
    # L(z) = sum(w * z^2) ; the paper steps z <- z - alpha dL/dz
    z_new = z - alpha * 2 * w * z
    x = (z * torch.sqrt(sigma**2 + 1)).requires_grad_(True)
    loss = (w * (x / torch.sqrt(sigma**2 + 1)) ** 2).sum()
    (gx,) = torch.autograd.grad(loss, x)
    x_new = x_space_step(x.detach(), gx, alpha, sigma)
    assert torch.allclose(x_new / torch.sqrt(sigma**2 + 1), z_new, atol=1e-10)
