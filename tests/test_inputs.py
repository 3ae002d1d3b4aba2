"""Input checks the nodes run at validation time, and the report's text (pure, no ComfyUI needed)."""

from __future__ import annotations

import math

from attention.inputs import choice_problem, number_problem, odd_problem, order_problem, refinement_problem, verdict
from attention.metrics import report_text


def test_numbers_must_be_finite_and_in_range():
    assert number_problem("scale_factor", 20.0, 0.0, 1000.0, 20.0) is None
    assert number_problem("scale_factor", math.nan, 0.0, 1000.0, 20.0) == (
        "scale_factor = nan is not a finite number. Give a number from 0 to 1000 (default 20).")
    assert number_problem("cfg", math.inf, 0.0, 100.0, 7.5).startswith("cfg = inf is not a finite number.")
    assert number_problem("guided_fraction", 1.5, 0.0, 1.0, 0.5) == (
        "guided_fraction = 1.5 is above its maximum 1. Give a number from 0 to 1 (default 0.5).")
    assert "below its minimum 0" in number_problem("denoise", -0.1, 0.0, 1.0, 1.0)
    assert number_problem("steps", "many", 1, 10000, 50).startswith("steps = 'many' is not a number.")


def test_kernel_size_must_be_odd():
    assert odd_problem("kernel_size", 3) is None
    assert odd_problem("kernel_size", 4) == "kernel_size = 4 is even. Give an odd size such as 3 (the paper's)."


def test_combo_values_come_from_the_list_with_a_suggestion():
    names = ["euler", "euler_ancestral", "heun", "dpmpp_2m"]
    assert choice_problem("sampler_name", "heun", names) is None
    msg = choice_problem("sampler_name", "eulr", names)
    assert msg.startswith("sampler_name 'eulr' is not one of its options (euler, euler_ancestral, heun, dpmpp_2m).")
    assert "Did you mean 'euler'?" in msg
    many = [f"s{i}" for i in range(40)]
    assert "(40 names; see the node's list)" in choice_problem("scheduler", "nope", many)


def test_range_order_and_refinement_text():
    assert order_problem("start_percent", 0.0, "end_percent", 0.5) is None
    assert order_problem("start_percent", 0.8, "end_percent", 0.2).startswith(
        "start_percent (0.8) is after end_percent (0.2). Give start_percent <= end_percent")
    assert refinement_problem("0:0.05, 0.2:0.5") is None and refinement_problem("") is None
    assert refinement_problem("0.2-0.5") == ("refinement entry '0.2-0.5' is not 'fraction:threshold', e.g. "
                                             "'0.2:0.5'. Leave refinement empty to turn refinement off.")
    assert "fraction must be in [0, 1)" in refinement_problem("nan:0.5")


def test_verdict_is_true_or_every_problem():
    assert verdict(None, None) is True
    assert verdict("a = 1 is wrong.", None, "b = 2 is wrong.") == "a = 1 is wrong. b = 2 is wrong."


def test_report_text_one_line_per_image():
    report = {"labels": ["cat", "frog"], "subjects": [2, 5], "step": 24, "num_steps": 50, "guided_steps": 25,
              "threshold": 0.2, "max_attention": [[0.634, 0.121], [0.55, 0.41]], "neglected": [True, False]}
    assert report_text(report).splitlines() == [
        "Max attention per subject at step 25 of 50 (the last guided step); neglected below 0.20.",
        "image 1: cat 0.63, frog 0.12  ← neglected",
        "image 2: cat 0.55, frog 0.41",
    ]
    plain = {**report, "guided_steps": 0}
    assert "(plain run)" in report_text(plain).splitlines()[0]
