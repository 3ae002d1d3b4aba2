"""The benchmark's timing loop: garbage-collector pauses are measured per run, and objects that existed before the
timed runs are frozen only while they run."""

from __future__ import annotations

import gc

import torch
from host_helpers import load_bench


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_gc_pauses_count_full_collections_and_their_time():
    bench = load_bench("ae_bench_timing_tests")
    with bench.GcPauses() as paused:
        gc.collect()
    assert paused.full == 1 and paused.total > 0
    assert paused not in gc.callbacks
    with bench.GcPauses() as quiet:
        sum(range(10))
    assert quiet.full == 0 and quiet.total == 0.0


def test_timed_runs_freeze_what_exists_before_and_report_each_run():
    bench = load_bench("ae_bench_timing_tests")
    frozen_during: list[int] = []

    def run():
        frozen_during.append(gc.get_freeze_count())
        _Cycle()
        gc.collect()  # one full collection inside each timed run
        return torch.ones(2)

    device = torch.device("cpu")
    times, peak, out, pauses = bench.timed_runs(run, 3, device, bench.PeakMemory(device), bench.Deadline(0))
    assert len(times) == len(pauses) == 3 and all(p > 0 for p in pauses) and torch.equal(out, torch.ones(2))
    assert min(frozen_during) > 1000 and gc.get_freeze_count() == 0  # frozen while timing only
    frozen_during.clear()
    bench.timed_runs(run, 1, device, bench.PeakMemory(device), bench.Deadline(0), freeze_gc=False)
    assert frozen_during == [0]


class _Scripted:
    """Stands in for the benchmark's per-mode steps: logs the calls, fails where told, ends the budget where told."""

    def __init__(self, bench, fail: tuple[str, str] | None = None, budget_after: int | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail, self.budget_after, self.timed = fail, budget_after, 0
        self.deadline = bench.Deadline(0)
        self.failed = False

    def step(self, what: str, st) -> None:
        self.calls.append((what, st.mode))
        if self.fail == (what, st.mode):
            raise RuntimeError("scripted failure")

    def comfy_warm_up(self, ctx, st) -> None:
        self.step("warm", st)

    def comfy_timed_run(self, st, repeats: int) -> None:
        for r in range(repeats):  # as timed_runs: every repeat after the first waits for the budget
            if r and self.deadline.passed():
                break
            self.step("run", st)
            st.times.append(1.0)
            self.timed += 1
            if self.budget_after is not None and self.timed == self.budget_after:
                self.deadline.end = 0.0  # passed from now on

    def comfy_row(self, ctx, st, plain) -> None:
        self.step("row", st)
        assert plain is None or plain.mode == "plain"


def _schedule(order: str, repeats: int = 2, **script):
    bench = load_bench("ae_bench_timing_tests")
    runner = _Scripted(bench, **script)
    runner.args = bench.parse_args(["--order", order, "--repeats", str(repeats)])
    runner.device = torch.device("cpu")
    bench.Bench.measure_comfy_modes(runner, (None, "sd15", 1), ["plain", "ae_no_refine", "ae_refine_cap"])
    return runner


def test_interleaved_runs_go_in_rounds_after_every_warm_up():
    r = _schedule("interleaved")
    modes = ["plain", "ae_no_refine", "ae_refine_cap"]
    assert r.calls == ([("warm", m) for m in modes] + [("run", m) for m in modes] * 2 + [("row", m) for m in modes])
    r = _schedule("sequential")
    assert r.calls == [c for m in modes for c in (("warm", m), ("run", m), ("run", m), ("row", m))]


def test_a_failing_mode_is_left_out_and_the_budget_ends_the_rounds():
    r = _schedule("interleaved", repeats=3, fail=("run", "ae_no_refine"))
    assert r.failed and ("row", "ae_no_refine") not in r.calls
    assert r.calls.count(("run", "ae_refine_cap")) == 3 and ("row", "ae_refine_cap") in r.calls
    r = _schedule("interleaved", repeats=3, budget_after=4)  # the budget ends inside round 2: that round finishes
    assert [m for what, m in r.calls if what == "run"] == ["plain", "ae_no_refine", "ae_refine_cap"] * 2
    assert [m for what, m in r.calls if what == "row"] == ["plain", "ae_no_refine", "ae_refine_cap"]
