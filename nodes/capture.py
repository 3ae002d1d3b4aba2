"""Cross-attention capture through ModelPatcher ``attn2`` replace patches, installed per call on a copy of
``model_options`` (never on the caller's ModelPatcher).

Two patch kinds:
- ``GradCapture``: the gradient pass. At the target resolution it computes softmax(q k^T / sqrt(d)) explicitly
  (float32) so the map stays in the autograd graph, and stops the forward right after the last target layer (or,
  while the target layers are not known yet, at the first decoder layer finer than the target level). Elsewhere it
  defers to ComfyUI's optimized attention.
- ``MapRecorder``: the ordinary denoising passes. Output comes from ComfyUI's optimized attention unchanged (plain
  sampling stays bit-identical); the cond branch's probabilities are recomputed on the side without gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

LayerKey = tuple[str, int, int]  # (block name, block id, block_index) as in ComfyUI's attn2 replace keys


class StopForward(Exception):
    """Raised after the last layer that feeds the loss: nothing later in the UNet can change it."""


def layer_name(key: LayerKey) -> str:
    return f"{key[0]}.{key[1]}.{key[2]}"


def attn2_keys(diffusion_model: torch.nn.Module) -> list[LayerKey]:
    """Every cross-attention layer of a ComfyUI UNet, in execution order, found by walking its blocks."""
    keys: list[LayerKey] = []
    groups = (("input", getattr(diffusion_model, "input_blocks", [])),
              ("middle", [getattr(diffusion_model, "middle_block", None)]),
              ("output", getattr(diffusion_model, "output_blocks", [])))
    for name, blocks in groups:
        for i, block in enumerate(blocks):
            if block is None:
                continue
            for m in block.modules():
                tbs = getattr(m, "transformer_blocks", None)
                if tbs is not None:
                    keys += [(name, i, j) for j in range(len(tbs)) if getattr(tbs[j], "attn2", None) is not None]
    return keys


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


def _same(attn_precision, dtype):
    return attn_precision


def _hw(extra_options: dict, n: int) -> tuple[int, int]:
    shape = extra_options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == n:
        return int(shape[-2]), int(shape[-1])
    side = int(round(n**0.5))
    return side, n // max(side, 1)


class GradCapture:
    """Collects the cond-branch maps of one gradient pass (all samples of the batch)."""

    def __init__(self, target_hw: tuple[int, int], stop_after: LayerKey | None,
                 optimized_attention: Callable, precision: Callable = _same) -> None:
        self.target_hw = target_hw
        self.stop_after = stop_after
        self.optimized_attention = optimized_attention
        self.precision = precision  # (layer's attn_precision, q dtype) -> effective one (ComfyUI's upcast flags)
        self.maps: dict[LayerKey, torch.Tensor] = {}  # (B, N, T), mean over heads, in the graph
        self.seen: dict[LayerKey, tuple[int, int]] = {}

    def patch(self, key: LayerKey) -> Callable:
        def attn2(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            hw = _hw(extra_options, q.shape[1])
            self.seen[key] = hw
            if key[0] == "output" and self.maps and hw[0] * hw[1] > self.target_hw[0] * self.target_hw[1]:
                raise StopForward()  # the decoder only gets finer from here: no later layer is at the target level
            if hw != self.target_hw:
                if key == self.stop_after:
                    raise StopForward()  # nothing of this layer feeds the loss
                return self.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                transformer_options=extra_options)
            probs = attention_probs(q, k, heads, self.precision(extra_options.get("attn_precision"), q.dtype))
            self.maps[key] = probs.mean(1)
            out = (probs.to(v.dtype) @ _split_heads(v, heads)).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
            if key == self.stop_after:
                raise StopForward()
            return out

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
    a GPU tensor on the host waits for the queued work.
    """

    def __init__(self, record, target_hw: tuple[int, int], sigma_values: list[float],
                 optimized_attention: Callable, precision: Callable = _same) -> None:
        self.record = record
        self.target_hw = target_hw
        self.sigmas = list(sigma_values)
        self.optimized_attention = optimized_attention
        self.precision = precision
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

    def patch(self, key: LayerKey) -> Callable:
        name = layer_name(key)

        def attn2(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            out = self.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                           transformer_options=extra_options)
            if _hw(extra_options, q.shape[1]) != self.target_hw:
                return out
            step = self._step(extra_options)
            chunks = extra_options.get("cond_or_uncond") or [0]
            if step is None or 0 not in chunks:
                return out
            size = q.shape[0] // len(chunks)
            c = chunks.index(0)
            precision = self.precision(extra_options.get("attn_precision"), q.dtype)
            with torch.no_grad():
                probs = attention_probs(q[c * size:(c + 1) * size], k[c * size:(c + 1) * size], heads,
                                        precision).mean(1)
            h, w = self.target_hw
            self.record.add_map(step, name, probs.reshape(size, h, w, -1))
            return out

        return attn2
