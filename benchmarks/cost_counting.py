"""The counters of the cost model (``benchmarks/cost_model.py``, ``benchmarks/cost_model_joint.py``): arithmetic,
dispatched operators and the tensors autograd keeps for the backward, of a pass run on the meta device."""

from __future__ import annotations

from typing import Any

import bench

GIB = 1024**3


def families_module():
    """The pack's ``nodes.families`` (where the sampler finds its layers), imported as the benchmark imports the
    pack."""
    import importlib

    return importlib.import_module(f"{bench.PACK}.nodes.families")


class OpCounter:
    """Counts dispatched non-view ATen operators (a proxy for kernel launches)."""

    SKIP = {"detach", "empty", "empty_like", "empty_strided", "lift_fresh", "new_empty", "new_empty_strided",
            "_to_copy_meta", "alias", "clone_meta"}

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.count = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view and func.overloadpacket.__name__ not in cls.SKIP:
                    self.count += 1
                return func(*args, **(kwargs or {}))

        return _Mode()


class Producers:
    """Remembers which ATen operator made each storage (views are skipped: they share their base's memory)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self) -> None:
                super().__init__()
                self.made: dict[int, tuple[str, tuple[int, ...], str]] = {}

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not func.is_view:
                    for t in out if isinstance(out, (tuple, list)) else (out,):
                        if hasattr(t, "untyped_storage"):  # a storage freed and made again is re-labelled
                            self.made[t.untyped_storage()._cdata] = (func.overloadpacket.__name__, tuple(t.shape),
                                                                     str(t.dtype).removeprefix("torch."))
                return out

        return _Mode()


def measure(fn, param_storages: set[int], top: int = 8, transform=None, probs_keys: int | None = None
            ) -> dict[str, Any]:
    """Counts of ``fn(hold)``; ``hold(t)`` counts ``t`` as kept for the backward (an activation checkpoint's input:
    autograd's hooks do not see it). ``transform``: what the pass's own saved-tensor hook does to a saved tensor
    (the joint pass clones activations, :func:`attention.guidance.clone_saved_activations`): the result is what is kept,
    labelled by the operator that made the original. ``probs_keys``: the key count of the probabilities counted in
    ``probs_f32_gib`` (default: 77, the UNets' cross-attention softmax)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    saved: dict[int, tuple[int, tuple]] = {}  # storage -> (bytes, producer): views of one tensor count once
    producers = Producers()

    def hold(t, made=None):
        storage = t.untyped_storage()
        if storage._cdata not in param_storages and storage._cdata not in saved:
            saved[storage._cdata] = (storage.nbytes(), made or producers.made.get(storage._cdata, ("?", (), "?")))

    def pack_hook(t):
        if transform is None:
            hold(t)
            return t
        made = producers.made.get(t.untyped_storage()._cdata)
        kept = transform(t)
        hold(kept, made if kept is not t else None)
        return kept

    flops = FlopCounterMode(display=False)
    ops = OpCounter()
    with flops, ops, producers, torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fn(hold)
    groups: dict[tuple, list[int]] = {}
    for nbytes, made in saved.values():
        g = groups.setdefault(made, [0, 0])
        g[0], g[1] = g[0] + 1, g[1] + nbytes
    largest = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    if probs_keys is None:
        probs = sum(n for n, (op, shape, dtype) in saved.values()
                    if op == "_softmax" and dtype == "float32" and shape and shape[-1] == bench.NUM_KEYS)
    else:  # the joint capture's image x text block and what the loss makes of it
        probs = sum(n for n, (op, shape, dtype) in saved.values()
                    if dtype == "float32" and shape and shape[-1] == probs_keys)
    total = sum(n for n, _ in saved.values())
    return {"tflop": flops.get_total_flops() / 1e12, "flop": int(flops.get_total_flops()), "ops": ops.count,
            "saved_gib": total / GIB, "saved_bytes": total, "probs_f32_gib": probs / GIB,
            "saved_top": [[op, list(shape), dtype, count, round(nbytes / GIB, 4)]
                          for (op, shape, dtype), (count, nbytes) in largest]}
