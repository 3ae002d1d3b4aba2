"""AttendExciteReport on hand-made attention records (in-process ComfyUI, no sampling)."""

from __future__ import annotations

import sys

import pytest
import torch

from attention.loss import slot_mask

pytestmark = pytest.mark.host

CAT, FROG = 2, 5


@pytest.fixture(scope="module")
def report(comfy_inprocess):
    import comfy_inprocess as ci

    ci.load_pack()
    from comfyui_attend_excite.nodes import report as module

    return module


def make_record(num_steps: int, guided_steps: int, cat_step: int, steps=None):
    """Uniform maps (every subject max = 1/75 after the re-softmax over 75 slots), except at ``cat_step`` where all
    attention sits on the cat token (cat max ~ 1, frog ~ 0)."""
    # the node checks for the pack's own class (attention.record imported under the pack's package name)
    record_cls = sys.modules["comfyui_attend_excite.attention.record"].AttentionRecord
    rec = record_cls(subjects=(CAT, FROG), labels=("cat", "frog"), slots=slot_mask(77, "all_but_bos_last"),
                          num_steps=num_steps, guided_steps=guided_steps)
    for s in range(num_steps) if steps is None else steps:
        probs = torch.full((1, 4, 4, 77), 1 / 77)
        if s == cat_step:
            probs = torch.zeros(1, 4, 4, 77)
            probs[..., CAT] = 1.0
        rec.add_map(s, "input.7.0", probs)
    return rec


def test_guided_run_is_read_at_its_last_guided_step(report):
    out = report.AttendExciteReport.execute(make_record(4, 2, cat_step=1), 0.2)
    (entry,) = out.ui["attend_excite"]
    assert entry["labels"] == ["cat", "frog"] and entry["subjects"] == [CAT, FROG] and entry["step"] == 1
    (cat, frog), = entry["max_attention"]
    assert cat == pytest.approx(1.0, abs=1e-3) and frog == pytest.approx(0.0, abs=1e-3)
    assert entry["neglected"] == [True]


def test_plain_run_is_read_at_the_same_step_and_uniform_maps_are_neglected(report):
    entry = report.build_report(make_record(4, 0, cat_step=1), 0.2)
    assert entry["step"] == 1 and entry["max_attention"][0][0] == pytest.approx(1.0, abs=1e-3)
    entry = report.build_report(make_record(5, 0, cat_step=-1), 0.2)
    assert entry["step"] == 2  # round(2.5) = 3 guided steps, as the sampler rounds
    assert entry["max_attention"][0] == pytest.approx([1 / 75, 1 / 75], abs=1e-4)
    assert entry["neglected"] == [True]
    assert report.build_report(make_record(5, 0, cat_step=-1), 0.01)["neglected"] == [False]


def test_missing_steps_fall_back_and_empty_records_fail(report):
    rec = make_record(8, 4, cat_step=-1, steps=[0, 1])  # maps only at 0 and 1; last guided step is 3
    assert report.report_step(rec) == 1
    with pytest.raises(ValueError, match="record_maps"):
        report.build_report(make_record(4, 2, cat_step=-1, steps=[]), 0.2)
