"""A step that is not finite is skipped per sample (pure torch): the latent keeps its value, the sample is marked, and
the record collects the marks once, when the run ends."""

from __future__ import annotations

import math

import pytest
import torch

from attention.record import AttentionRecord
from attention.step import finite_samples, guarded_step, x_space_step


def _batch(n: int = 3) -> torch.Tensor:
    return torch.arange(n * 4 * 2 * 2, dtype=torch.float32).reshape(n, 4, 2, 2) / 10


def test_finite_samples_is_per_sample():
    t = torch.zeros(3, 2, 2)
    t[1, 0, 1], t[2, 1, 1] = math.nan, -math.inf
    assert finite_samples(t).tolist() == [True, False, False]


def test_a_finite_step_is_the_plain_step():
    x, g = _batch(), torch.randn(3, 4, 2, 2)
    out, skipped = guarded_step(x, g, torch.tensor([0.5, 1.0, 2.0]), torch.tensor(3.0))
    assert torch.equal(out, x_space_step(x, g, torch.tensor([0.5, 1.0, 2.0]), torch.tensor(3.0)))
    assert skipped.tolist() == [False, False, False]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_gradient_keeps_that_samples_latent(bad):
    x, g = _batch(), torch.ones(3, 4, 2, 2)
    g[1, 2, 0, 1] = bad
    out, skipped = guarded_step(x, g, 1.0, torch.tensor([1.0, 1.0, 1.0]))
    assert skipped.tolist() == [False, True, False]
    assert torch.equal(out[1], x[1]) and torch.isfinite(out).all()
    assert torch.equal(out[[0, 2]], x_space_step(x, g, 1.0, torch.tensor(1.0))[[0, 2]])


def test_a_sample_that_does_not_move_is_never_skipped_whatever_its_gradient():
    x, g = _batch(2), torch.full((2, 4, 2, 2), math.inf)
    out, skipped = guarded_step(x, g, torch.tensor([0.0, 0.0]), torch.tensor(1.0))  # 0 * inf would be NaN
    assert torch.equal(out, x) and skipped.tolist() == [False, False]


def test_an_fp16_overflow_of_the_step_is_skipped():
    x = torch.ones(2, 4, 2, 2, dtype=torch.float16)
    g = torch.ones(2, 4, 2, 2, dtype=torch.float16)
    out, skipped = guarded_step(x, g, torch.tensor([1.0, 1e4]), torch.tensor(14.6))  # 1e4 * 214 > fp16 max
    assert skipped.tolist() == [False, True] and out.dtype == torch.float16
    assert torch.isfinite(out).all() and torch.equal(out[1], x[1]) and not torch.equal(out[0], x[0])


def test_the_record_collects_skipped_steps_per_sample_at_the_end():
    rec = AttentionRecord()
    rec.reset(num_steps=4, guided_steps=3)
    for step, mask in enumerate(([False, False], [False, True], [True, True])):
        rec.add_skipped(step, torch.tensor(mask))
    assert rec._skipped == []  # nothing read on the host before the run ends
    rec.finish()
    assert rec.skipped_steps == [[2], [1, 2]]
    rec.reset(num_steps=4)
    assert rec.skipped_steps == []
