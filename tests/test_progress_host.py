"""The node's progress bar during a run: the gradient passes of refinement move it, the sampler's steps continue it."""

from __future__ import annotations

import pytest
import torch
from host_helpers import ksample, load_host

pytestmark = [pytest.mark.host, pytest.mark.slow]


@pytest.fixture(scope="module")
def host(comfy_inprocess, tiny_checkpoint):
    return load_host(comfy_inprocess, tiny_checkpoint, "a photo of a cat and a frog", "cat, frog")


def test_refinement_moves_the_progress_bar(host, monkeypatch):
    import comfy.utils

    reports = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        reports.append(value / total))
    steps = 4
    ksample(host, steps=steps, latent={"samples": torch.zeros(1, 4, 16, 16)}, refinement="0:0.99",
            max_refinement_steps=3)
    assert reports == sorted(reports) and reports[-1] == 1.0  # one bar, forward only, to the end
    within_first_step = [r for r in reports if 0 < r < 1 / steps]
    assert len(within_first_step) >= 3  # the main pass and the refinement passes of step 0
    assert sum(r in {(i + 1) / steps for i in range(steps)} for r in reports) >= steps  # the sampler's own steps
