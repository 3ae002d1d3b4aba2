"""The attention record keeps one step's maps together and sends them to the host as one tensor."""

from __future__ import annotations

import torch

from attention.record import AttentionRecord


class CountingRecord(AttentionRecord):
    """Counts the transfers to the host (one per step is the point)."""

    def __init__(self) -> None:
        super().__init__()
        self.transfers: list[tuple[int, ...]] = []

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        self.transfers.append(tuple(t.shape))
        return super()._to_host(t)


def _map(value: float) -> torch.Tensor:
    return torch.full((1, 2, 2, 5), value)


def test_one_transfer_per_step_and_the_last_map_of_a_layer_wins():
    rec = CountingRecord()
    rec.add_map(0, "a", _map(0.1))
    rec.add_map(0, "b", _map(0.2))
    rec.add_map(1, "a", _map(0.3))  # a two-call sampler (heun) records step 1 twice: the later map replaces it
    rec.add_map(1, "b", _map(0.4))
    rec.add_map(1, "a", _map(0.5))
    rec.add_map(2, "b", _map(0.6))
    assert rec.transfers == [(2, 1, 2, 2, 5), (2, 1, 2, 2, 5)]  # steps 0 and 1 went as one stacked tensor each
    rec.finish()
    assert rec.transfers[-1] == (1, 1, 2, 2, 5) and len(rec.transfers) == 3
    got = {s: {n: float(m.float().mean()) for n, m in layers.items()} for s, layers in rec.maps.items()}
    expected = {0: {"a": 0.1, "b": 0.2}, 1: {"a": 0.5, "b": 0.4}, 2: {"b": 0.6}}
    assert got.keys() == expected.keys()
    for s in expected:
        assert got[s] == {n: torch.tensor(v).half().item() for n, v in expected[s].items()}
    assert all(m.dtype == torch.float16 and m.shape == (1, 2, 2, 5) for layers in rec.maps.values()
               for m in layers.values())
    assert rec.steps == [0, 1, 2] and rec.layers == ["a", "b"]


def test_reading_maps_sends_the_held_step_and_reset_drops_it():
    rec = CountingRecord()
    rec.add_map(0, "a", _map(0.25))
    assert rec.transfers == []
    assert float(rec.maps[0]["a"].float().mean()) == 0.25  # a read does not wait for the next step
    rec.add_map(1, "a", _map(0.5))
    rec.reset()
    rec.finish()
    assert rec.maps == {} and len(rec.transfers) == 1


def test_maps_of_different_shapes_go_one_by_one():
    rec = CountingRecord()
    rec.add_map(0, "a", _map(0.1))
    rec.add_map(0, "b", torch.zeros(1, 4, 4, 5))
    rec.finish()
    assert rec.transfers == [(1, 2, 2, 5), (1, 4, 4, 5)]
    assert rec.maps[0]["b"].shape == (1, 4, 4, 5)
