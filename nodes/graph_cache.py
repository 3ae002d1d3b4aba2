"""The captured gradient pass kept with the model between sampling runs, so that a run with the same model, latent
shape and pass settings replays it from its first pass (no warm-up, no capture).

ComfyUI owns the store: a :class:`GraphCache` attachment on the model's root ModelPatcher (the one the loader made;
every clone shares its weights, so one pass per model is kept and a second pool is never held). It is released

- when ComfyUI unloads the model's weights: an ``ON_DETACH`` callback on the patchers that sampled with it
  (``unpatch_all``; the detach that ``load_models_gpu`` does on every load of an already loaded model keeps the
  weights where they are and keeps the pass);
- when a gradient pass runs out of memory (the sampler frees it before its eager retry);
- when a run needs another pass (another shape or setting): the old one goes before the new capture.

A graph replays fixed kernels on fixed memory, so a kept pass is only replayed when everything it reads is where it
was: the same weight and buffer storages (:func:`weights_fingerprint`: addresses, shapes, dtypes), the same
structure of conds and model options (:func:`pass_key`), and the run's cond tensors copied into the ones the graph
reads (:func:`refill`). Anything this cannot vouch for (tensors or objects in the cond or the model options, weight
copies) keeps the graph to its run, as before.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import comfy.patcher_extension
import torch

KEY = "attend_excite.graph_cache"
_PLAIN = (int, float, str, bool, type(None))
# cond entries the pass does not read as such: a per-encode id, the subjects (keyed by indices and slots), and the
# encoder outputs that ``model_conds`` (keyed by shape, copied in by ``refill``) were made from
_COND_ELSEWHERE = frozenset({"uuid", "attend_excite", "cross_attn", "pooled_output", "model_conds"})
# model options the pass replaces (the graph blockers rule out other nodes' patches, wrappers and callbacks) or does
# not read (the run's sigma schedule: the pass takes its sigma as an input)
_OPTIONS_ELSEWHERE = frozenset({"transformer_options", "to_load_options", "patches", "patches_replace", "wrappers",
                                "callbacks", "sample_sigmas"})


@dataclass
class CachedPass:
    key: tuple
    weights: tuple
    graphed: object  # attention.guidance.GraphedPass
    cond: dict  # the cond whose model inputs the graph reads (tensors owned here, refilled per run)


class GraphCache:
    """At most one captured pass of one model (see the module docstring)."""

    def __init__(self) -> None:
        self.entry: CachedPass | None = None

    def take(self, key: tuple, weights: tuple) -> CachedPass | None:
        """The kept pass if it was captured for ``key`` on ``weights``; otherwise releases it and returns ``None``."""
        entry = self.entry
        if entry is not None and entry.key == key and entry.weights == weights:
            return entry
        self.release()
        return None

    def keep(self, entry: CachedPass) -> None:
        self.entry = entry

    def release(self) -> None:
        self.entry = None  # the graph, its memory pool and static buffers go with the last reference

    def on_detach(self, patcher, unpatch_all: bool) -> None:
        """``CallbacksMP.ON_DETACH``: the weights leave the device (``unpatch_all``): the pass cannot replay."""
        if unpatch_all:
            self.release()


def _root(patcher):
    while getattr(patcher, "parent", None) is not None:
        patcher = patcher.parent
    return patcher


def find_cache(patcher) -> GraphCache | None:
    """The model's cache, if a run made one (``patcher``: the ModelPatcher sampling; ``None`` outside a run)."""
    if patcher is None or not hasattr(patcher, "get_attachment"):
        return None
    return _root(patcher).get_attachment(KEY)


def ensure_cache(patcher) -> GraphCache | None:
    """The model's cache, made on first use, with the release callback on ``patcher`` (the one ComfyUI loads and
    unloads) and on the root; ``None`` where the host has no attachments."""
    if patcher is None or not hasattr(patcher, "set_attachments"):
        return None
    root = _root(patcher)
    cache = root.get_attachment(KEY)
    if cache is None:
        cache = GraphCache()
        root.set_attachments(KEY, cache)
    detach = comfy.patcher_extension.CallbacksMP.ON_DETACH
    for p in {id(patcher): patcher, id(root): root}.values():
        if not p.get_callbacks(detach, KEY):
            p.add_callback_with_key(detach, KEY, cache.on_detach)
    return cache


def others_entries(registry):
    """``registry`` (``{call_type: {key: [...]}}``: wrappers or callbacks in ``transformer_options``) without the
    entries of this module (its release callback is not a patch of the pass)."""
    if not isinstance(registry, dict):
        return registry
    return {t: {k: v for k, v in d.items() if k != KEY} if isinstance(d, dict) else d for t, d in registry.items()}


def weights_fingerprint(model: torch.nn.Module) -> tuple | None:
    """Where every parameter and buffer of ``model`` lives (address, dtype, shape, stride, device); ``None`` for
    tensor subclasses (their storage is not one plain address)."""
    out = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided:
            return None
        out.append((t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), str(t.device)))
    return tuple(out)


def _plain(v) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return isinstance(v, _PLAIN)


def _plain_items(d: dict, skip: frozenset) -> tuple | None:
    items = []
    for k, v in sorted(d.items(), key=lambda kv: str(kv[0])):
        if k in skip:
            continue
        if not _plain(v):
            return None
        items.append((k, repr(v)))
    return tuple(items)


def pass_key(passes, x: torch.Tensor) -> tuple | None:
    """What decides the captured pass of ``passes`` (a :class:`~nodes.gradient_pass.GradientPasses`) at ``x``, or
    ``None`` where it holds something whose effect on the pass this cannot tell (then it is not kept)."""
    p, subjects = passes.params, passes.subjects
    if passes.weights is None or passes.weights.copies:
        return None
    conds = []
    for name, c in sorted(subjects.cond.get("model_conds", {}).items()):
        t = getattr(c, "cond", None)
        if isinstance(t, torch.Tensor):
            conds.append((name, type(c).__name__, tuple(t.shape), t.dtype))
        elif _plain(t):
            conds.append((name, type(c).__name__, repr(t)))
        else:
            return None
    parts = (_plain_items(subjects.cond, _COND_ELSEWHERE), _plain_items(passes.model_options, _OPTIONS_ELSEWHERE),
             _plain_items(passes.model_options.get("transformer_options", {}), _OPTIONS_ELSEWHERE))
    if any(part is None for part in parts):
        return None
    return (id(passes.base), type(passes.graph_backend).__name__, tuple(x.shape), x.dtype, str(x.device),
            tuple(passes.target_hw), tuple(passes.keys), passes.recompute, p.attention_blocks, p.smoothing,
            p.kernel_size, p.smoothing_sigma, tuple(subjects.indices), tuple(bool(v) for v in subjects.slots.tolist()),
            tuple(conds), *parts)


def refill(static: dict, cond: dict) -> None:
    """Copy ``cond``'s model inputs into the tensors of ``static`` that a kept graph reads (same names and shapes:
    part of its key)."""
    with torch.inference_mode(False):
        for name, c in static.get("model_conds", {}).items():
            if isinstance(getattr(c, "cond", None), torch.Tensor):
                c.cond.copy_(cond["model_conds"][name].cond)
