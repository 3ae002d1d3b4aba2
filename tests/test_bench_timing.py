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
