"""Cross-attention capture through ModelPatcher ``attn2`` replace patches, installed per call on a copy of
``model_options`` (never on the caller's ModelPatcher).

Two patch kinds:
- ``GradCapture``: the gradient pass. On the layers that feed the loss it computes softmax(q k^T / sqrt(d))
  explicitly (float32) so the map stays in the autograd graph, and stops the forward right after the last of them.
- ``MapRecorder``: the ordinary denoising passes. Output comes from ComfyUI's optimized attention unchanged (plain
  sampling stays bit-identical); the cond branch's probabilities are recomputed on the side without gradients.

Composition with other nodes: a layer that another node already replaces (IP-Adapter, InstantID, ...: found with
:func:`replaced_attn2`) is patched with that node's patch as ``inner``: the layer's output is ``inner``'s (its image
prompt still acts, in the gradient pass too), and A&E computes the text-token probabilities from the same ``q`` and
``k`` on the side.

Which layers are read is decided by the UNet's structure (:func:`attn2_levels`), not by the size of the map a layer
happens to see: nodes that resize the hidden state inside the UNet (Kohya Deep Shrink: a smaller ``h`` after an
input block for the early steps, scaled back in an output block patch) change the size of a level's maps, not which
layers form the level. A map that arrives at another size than the level's is resized to it (:func:`fit_map`)
before the layers are averaged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LayerKey = tuple[str, int, int]  # (block name, block id, block_index) as in ComfyUI's attn2 replace keys

BLOCK_PATCHES = ("input_block_patch", "input_block_patch_after_skip", "middle_patch", "output_block_patch")


class StopForward(Exception):
    """Raised after the last layer that feeds the loss: nothing later in the UNet can change it."""


def layer_name(key: LayerKey) -> str:
    return f"{key[0]}.{key[1]}.{key[2]}"


def _resampling(layer: torch.nn.Module) -> int:
    """+1 for a layer that halves the hidden state (``Downsample``, a down-sampling ``ResBlock``), -1 for one that
    doubles it, else 0."""
    kind = type(getattr(layer, "h_upd", None) if getattr(layer, "updown", False) else layer).__name__
    return {"Downsample": 1, "Upsample": -1}.get(kind, 0)  # ComfyUI's UNet layers that halve / double the state


def transformer_blocks(diffusion_model: torch.nn.Module) -> dict[LayerKey, tuple[torch.nn.Module, int]]:
    """Every transformer block with a cross-attention layer of a ComfyUI UNet, in execution order, keyed like its
    ``attn2`` layer, with its level: the number of 2x downsamplings ahead of it (encoder ``Downsample`` layers and
    down-sampling ``ResBlock``\\ s, less the decoder's ``Upsample`` layers before it). In an ordinary forward the maps
    of level ``k`` are the latent's sides halved ``k`` times (``ceil(n / 2)`` each), whatever another node does to
    the hidden state in between."""
    found: dict[LayerKey, tuple[torch.nn.Module, int]] = {}
    level = 0
    groups = (("input", getattr(diffusion_model, "input_blocks", [])),
              ("middle", [getattr(diffusion_model, "middle_block", None)]),
              ("output", getattr(diffusion_model, "output_blocks", [])))
    for name, blocks in groups:
        for i, block in enumerate(blocks):
            if block is None:
                continue
            for layer in (list(block.children()) or [block]):
                for m in layer.modules():
                    tbs = getattr(m, "transformer_blocks", None)
                    if tbs is not None:
                        for j in range(len(tbs)):
                            if getattr(tbs[j], "attn2", None) is not None:
                                found.setdefault((name, i, j), (tbs[j], level))
                level += _resampling(layer)
    return found


def attn2_levels(diffusion_model: torch.nn.Module) -> dict[LayerKey, int]:
    """Every cross-attention layer of a ComfyUI UNet, in execution order, with its level
    (:func:`transformer_blocks`)."""
    return {k: level for k, (_, level) in transformer_blocks(diffusion_model).items()}


def attn2_keys(diffusion_model: torch.nn.Module) -> list[LayerKey]:
    """Every cross-attention layer of a ComfyUI UNet, in execution order, found by walking its blocks."""
    return list(attn2_levels(diffusion_model))


def replaced_attn2(model_options: dict, key: LayerKey) -> Callable | None:
    """Another node's attn2 replace patch for the layer ``key`` in ``model_options``, or ``None``. Looked up as
    ComfyUI's ``BasicTransformerBlock`` does: ``(block name, block id, block index)`` first, then
    ``(block name, block id)`` (a patch for every depth of a block, as IP-Adapter registers on SD1.x)."""
    patches = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for k in (tuple(key), tuple(key[:2])):
        if k in patches:
            return patches[k]
    return None


def _clone_saved(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def graph_safe(fn: Callable) -> Callable:
    """``fn`` run with clones of the tensors it saves for backward. Patches written for inference may update the
    hidden state in place after using it (FreeU: ``h[:, :k] = h[:, :k] * s``, where ``s`` depends on ``h``), which
    invalidates what autograd saved; the clones are taken when saved, so the gradient is the out-of-place one."""
    def call(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(_clone_saved, _unpack):
            return fn(*args, **kwargs)

    return call


def graph_safe_block_patches(transformer_options: dict) -> dict:
    """A copy of ``transformer_options`` for a gradient pass whose UNet block patches (``BLOCK_PATCHES``: other
    nodes' input, middle and output block patches, e.g. FreeU, Deep Shrink) run through :func:`graph_safe`. The
    caller's dicts and lists are not changed."""
    patches = dict(transformer_options.get("patches", {}))
    for name in BLOCK_PATCHES:
        if patches.get(name):
            patches[name] = [graph_safe(p) for p in patches[name]]
    return {**transformer_options, "patches": patches}


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int,
                    attn_precision: torch.dtype | None = torch.float32) -> torch.Tensor:
    """``(B, heads, N, T)`` float32 softmax probabilities from projected ``q (B, N, h*d)``, ``k (B, T, h*d)``.

    The softmax always runs in float32. The logits stay in half precision only for float16 ``q`` when
    ``attn_precision`` (the layer's, after ComfyUI's upcast flags) is not float32: the precision of ComfyUI's own
    attention for SD1.x/SDXL and of diffusers' A&E reference (fp16 scores, upcast softmax), without the casts and the
    fp32 matrix products; ``q`` is scaled first, so the products are as large as the logits. SD2.x asks for float32
    (fp16 logits can overflow there); bfloat16 (8-bit mantissa) always gets float32 logits."""
    qh, kh = _split_heads(q, heads), _split_heads(k, heads)
    if not (q.dtype == torch.float16 and attn_precision != torch.float32):
        qh, kh = qh.float(), kh.float()
    return torch.softmax((qh * qh.shape[-1] ** -0.5) @ kh.transpose(-1, -2), dim=-1, dtype=torch.float32)


def fit_map(m: torch.Tensor, hw: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """``(B, h*w, T)`` maps of an ``hw`` layer as ``(B, H*W, T)`` at ``target_hw``: area averages where the layer
    saw a finer grid (adaptive average pooling), bilinear interpolation where it saw a coarser one (Deep Shrink's
    early steps). Both are convex combinations of the layer's positions: each position's probabilities still sum to
    one, and the result stays in the autograd graph."""
    if tuple(hw) == tuple(target_hw):
        return m
    b, _, t = m.shape
    grid = m.transpose(1, 2).reshape(b, t, *hw)
    if hw[0] >= target_hw[0] and hw[1] >= target_hw[1]:
        grid = F.adaptive_avg_pool2d(grid, target_hw)
    else:
        grid = F.interpolate(grid, size=target_hw, mode="bilinear", align_corners=False)
    return grid.reshape(b, t, -1).transpose(1, 2)


def _same(attn_precision, dtype):
    return attn_precision


def _hw(extra_options: dict, n: int) -> tuple[int, int]:
    shape = extra_options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == n:
        return int(shape[-2]), int(shape[-1])
    side = int(round(n**0.5))
    return side, n // max(side, 1)


class GradCapture:
    """Collects the cond-branch maps of one gradient pass (all samples of the batch).

    ``targets``: the layers that feed the loss (their maps are resized to ``target_hw`` where they arrive at another
    size). ``None``: the layers whose maps arrive at ``target_hw``; the pass then also stops at the first decoder
    layer finer than that, once a map was read."""

    def __init__(self, target_hw: tuple[int, int], stop_after: LayerKey | None,
                 optimized_attention: Callable, precision: Callable = _same,
                 targets: Collection[LayerKey] | None = None) -> None:
        self.target_hw = target_hw
        self.stop_after = stop_after
        self.optimized_attention = optimized_attention
        self.precision = precision  # (layer's attn_precision, q dtype) -> effective one (ComfyUI's upcast flags)
        self.targets = None if targets is None else frozenset(targets)
        self.maps: dict[LayerKey, torch.Tensor] = {}  # (B, N, T) at target_hw, mean over heads, in the graph
        self.seen: dict[LayerKey, tuple[int, int]] = {}
        self.replay = False  # a block is being recomputed in the backward: compute as before, keep no map

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Context of a transformer block recomputed in the backward (:func:`attention.guidance.recompute_blocks`):
        its read layer computes what it did in the forward, and the map it made then stays the one the loss used."""
        self.replay = True
        try:
            yield
        finally:
            self.replay = False

    def _attend(self, q, k, v, extra_options, inner):
        if inner is not None:
            return inner(q, k, v, extra_options)
        return self.optimized_attention(q, k, v, extra_options["n_heads"],
                                        attn_precision=extra_options.get("attn_precision"),
                                        transformer_options=extra_options)

    def patch(self, key: LayerKey, inner: Callable | None = None) -> Callable:
        """The replace patch for ``key``; ``inner``: another node's replace patch of that layer, whose output the
        layer keeps (it runs in the graph, so the loss's gradient also flows through it)."""
        def attn2(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            hw = _hw(extra_options, q.shape[1])
            self.seen[key] = hw
            area = hw[0] * hw[1]
            if self.targets is None:
                if key[0] == "output" and self.maps and area > self.target_hw[0] * self.target_hw[1]:
                    raise StopForward()  # the decoder only gets finer from here: no later layer is at the target
                reads = hw == self.target_hw
            else:
                reads = key in self.targets
            if not reads:
                if key == self.stop_after:
                    raise StopForward()  # nothing of this layer feeds the loss
                return self._attend(q, k, v, extra_options, inner)
            probs = attention_probs(q, k, heads, self.precision(extra_options.get("attn_precision"), q.dtype))
            m = fit_map(probs.mean(1), hw, self.target_hw)
            if not self.replay:
                self.maps[key] = m
            if key == self.stop_after:
                raise StopForward()
            if inner is not None:
                return inner(q, k, v, extra_options)
            return (probs.to(v.dtype) @ _split_heads(v, heads)).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

        return attn2

    def aggregate(self) -> torch.Tensor:
        """``(B, H, W, T)`` mean over the captured layers."""
        if not self.maps:
            raise RuntimeError("no cross-attention layer at the target resolution was captured")
        h, w = self.target_hw
        m = torch.stack(list(self.maps.values())).mean(0)
        return m.reshape(m.shape[0], h, w, m.shape[-1])


class MapRecorder:
    """Records cond-branch maps at the target resolution during the ordinary sampling passes.

    ``sigma_values``: the run's schedule as host floats (read once per run). The step of a model call is found from
    its sigma once per call, not once per layer: every layer of a call sees the same ``sigmas`` tensor, and reading
    a GPU tensor on the host waits for the queued work. ``targets``: the layers to record (maps at another size are
    resized to ``target_hw``); ``None``: the layers whose maps arrive at ``target_hw``.
    """

    def __init__(self, record, target_hw: tuple[int, int], sigma_values: list[float],
                 optimized_attention: Callable, precision: Callable = _same,
                 targets: Collection[LayerKey] | None = None) -> None:
        self.record = record
        self.target_hw = target_hw
        self.sigmas = list(sigma_values)
        self.optimized_attention = optimized_attention
        self.precision = precision
        self.targets = None if targets is None else frozenset(targets)
        self._last: tuple[torch.Tensor, int | None] | None = None  # (sigmas tensor of the last call, its step)

    def _step(self, extra_options: dict) -> int | None:
        sig = extra_options.get("sigmas")
        if sig is None:
            return None
        if self._last is not None and self._last[0] is sig:
            return self._last[1]
        s = float(sig.reshape(-1)[0])
        step = None
        for i, ref in enumerate(self.sigmas[:-1]):
            if abs(s - ref) <= 1e-5 * max(1.0, abs(ref)):
                step = i
                break
        self._last = (sig, step)
        return step

    def _cond_rows(self, options: dict, batch: int) -> tuple[int, slice] | None:
        """``(step, rows of the cond branch)`` of a call with ``batch`` rows, or ``None`` when the call has no
        cond branch or is at no step of the run's schedule."""
        step = self._step(options)
        chunks = options.get("cond_or_uncond") or [0]
        if step is None or 0 not in chunks:
            return None
        size = batch // len(chunks)
        return step, slice(chunks.index(0) * size, (chunks.index(0) + 1) * size)

    def patch(self, key: LayerKey, inner: Callable | None = None) -> Callable:
        """The replace patch for ``key``; ``inner``: another node's replace patch of that layer, whose output the
        layer keeps (plain sampling with that node stays bit-identical)."""
        name = layer_name(key)

        def attn2(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            if inner is not None:
                out = inner(q, k, v, extra_options)
            else:
                out = self.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)
            hw = _hw(extra_options, q.shape[1])
            if (hw != self.target_hw) if self.targets is None else (key not in self.targets):
                return out
            found = self._cond_rows(extra_options, q.shape[0])
            if found is None:
                return out
            step, rows = found
            precision = self.precision(extra_options.get("attn_precision"), q.dtype)
            with torch.no_grad():
                probs = fit_map(attention_probs(q[rows], k[rows], heads, precision).mean(1), hw, self.target_hw)
            h, w = self.target_hw
            self.record.add_map(step, name, probs.reshape(probs.shape[0], h, w, -1))
            return out

        return attn2
