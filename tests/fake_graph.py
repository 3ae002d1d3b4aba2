"""A CPU stand-in for :class:`attention.guidance.CudaGraphBackend`: its graph re-runs the captured function on replay
and writes into the captured outputs, as a real replay refills the same memory. It lets tests check the bookkeeping
of captured passes (static inputs, cloned outputs, one warm-up, replays) without a GPU."""

from __future__ import annotations

import torch


class ReplayGraph:
    def __init__(self) -> None:
        self.fn, self.outputs, self.replays = None, (), 0

    def replay(self) -> None:
        self.replays += 1
        for out, new in zip(self.outputs, self.fn()):
            out.copy_(new)


def _capture_out_of_memory() -> None:
    """How CUDA can report an allocation failure inside a capture: the capture's own error, raised while handling the
    out-of-memory error."""
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.OutOfMemoryError:
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture") from None


class FakeGraphBackend:
    """Captures on any device; ``fail=True``: every capture is refused, as CUDA refuses an uncapturable operation;
    ``fail_warm_up=True``: the side-stream warm-up raises before running anything. ``oom``: where an allocation
    fails (``torch.OutOfMemoryError``): ``"warm-up"`` (before running), ``"capture"``, or ``"capture-chained"``
    (the capture's own error with the allocation failure as its context)."""

    def __init__(self, fail: bool = False, fail_warm_up: bool = False, oom: str = "") -> None:
        self.fail, self.fail_warm_up, self.oom, self.graphs, self.warm_ups = fail, fail_warm_up, oom, [], 0

    def blocker(self, device) -> str | None:
        return None

    def warm_up(self, fn):
        self.warm_ups += 1
        if self.fail_warm_up:
            raise RuntimeError("CUDA error: invalid resource handle")
        if self.oom == "warm-up":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fn()

    def new_graph(self) -> ReplayGraph:
        self.graphs.append(ReplayGraph())
        return self.graphs[-1]

    def capture(self, graph: ReplayGraph, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        if self.oom == "capture":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.oom == "capture-chained":
            _capture_out_of_memory()
        graph.fn, graph.outputs = fn, fn()
        return graph.outputs

    @property
    def replays(self) -> int:
        return sum(g.replays for g in self.graphs)
