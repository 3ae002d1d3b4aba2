"""The attention record keeps one step's maps together and sends them to the host as one tensor, into one buffer per
run; losses go to the host once, when the run ends."""

from __future__ import annotations

import pytest
import torch

from attention.record import AttentionRecord


class CountingRecord(AttentionRecord):
    """Counts the transfers to the host (one per step is the point)."""

    def __init__(self) -> None:
        super().__init__()
        self.transfers: list[tuple[int, ...]] = []

    def _to_host(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self.transfers.append(tuple(t.shape))
        return super()._to_host(t, out)


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


def test_maps_of_a_run_share_one_buffer_and_a_new_run_gets_its_own():
    rec = CountingRecord()
    rec.reset(num_steps=3)
    for step in range(3):
        rec.add_map(step, "a", _map(0.1 * step))
        rec.add_map(step, "b", _map(0.2 * step))
    first = rec.maps
    assert len(rec.transfers) == 3
    assert len({m.untyped_storage().data_ptr() for layers in first.values() for m in layers.values()}) == 1
    assert [float(first[s]["b"].float().mean()) for s in range(3)] == [torch.tensor(0.2 * s).half().item()
                                                                       for s in range(3)]
    rec.reset(num_steps=3)
    rec.add_map(0, "a", _map(0.9))
    rec.finish()
    assert float(first[0]["a"].float().mean()) == 0.0  # the earlier run's maps are untouched
    assert rec.maps[0]["a"].untyped_storage().data_ptr() != first[0]["a"].untyped_storage().data_ptr()


def test_steps_the_buffer_cannot_hold_get_their_own_copy():
    rec = CountingRecord()
    rec.reset(num_steps=1)
    rec.add_map(0, "a", _map(0.1))
    rec.add_map(5, "a", _map(0.5))  # beyond num_steps
    rec.add_map(0, "a", _map(0.3))  # step 0 again after another step
    rec.finish()
    assert float(rec.maps[5]["a"].float().mean()) == torch.tensor(0.5).half().item()
    assert float(rec.maps[0]["a"].float().mean()) == torch.tensor(0.3).half().item()


def test_losses_go_to_the_host_once_in_order_when_read():
    rec = CountingRecord()
    rec.reset(num_steps=2)
    rec.add_loss(0, torch.tensor([0.5, 0.25]))
    rec.add_loss(0, torch.tensor([0.4, 0.2]))
    rec.add_loss(1, torch.tensor([0.1, 0.0]))
    assert rec.transfers == []  # nothing leaves the device per gradient pass
    got = {s: [v.tolist() for v in vs] for s, vs in rec.losses.items()}
    assert got == {0: [[0.5, 0.25], pytest.approx([0.4, 0.2])], 1: [pytest.approx([0.1, 0.0])]}
    assert rec.transfers == [(3, 2)]
    rec.add_loss(1, torch.tensor([0.05, 0.0]))  # a read mid-run, then more passes: appended after the first ones
    assert [v.tolist() for v in rec.losses[1]] == [pytest.approx([0.1, 0.0]), pytest.approx([0.05, 0.0])]
    rec.reset()
    assert rec.losses == {}
