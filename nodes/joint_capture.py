"""Joint-attention capture (Flux, SD3) through ``transformer_options["optimized_attention_override"]``: ComfyUI
routes every ``optimized_attention`` call of these models through it (``comfy/ldm/modules/attention.py``,
``wrap_attn``), with the call's ``transformer_options``.

- :class:`JointGradCapture`: the gradient pass. On the blocks that feed the loss it computes the image x text
  probabilities (:func:`attention.joint.text_probabilities`: chunked, never the full matrix) in the autograd graph
  and stops the forward after the last of them; every other call runs PyTorch's attention (it has a backward).
- :class:`JointRecorder`: the ordinary denoising passes. The output is the attention ComfyUI (or another node's
  override, kept as ``inner``) computes, so plain sampling stays bit-identical; the cond branch's probabilities are
  computed on the side without gradients.

Which block a call belongs to comes from the family (:mod:`.families`): ComfyUI tags Flux's blocks in
``transformer_options``; SD3's joint blocks are counted per model call.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import comfy.model_patcher
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..attention.guidance import recompute_in_backward
from ..attention.joint import apply_rope, split_heads, text_probabilities, token_ranges
from .capture import MapRecorder, StopForward

BlockKey = tuple[str, int]  # ("double", i), ("single", i) (Flux) or ("joint", i) (SD3)
ROPE_KEY = "attend_excite_rope"  # transformer_options entry: the block's rotary embedding, applied by the capture
BLOCK_TAG = "attend_excite_block"  # transformer_options entry: the read block a call belongs to (tagged families)


def _block_patch(inner: Callable | None, edit: Callable[[dict], dict]) -> Callable:
    """A ``dit`` block replace patch that runs the block with its arguments changed by ``edit``; ``inner``: another
    node's replace patch of the block (e.g. Skip Layer Guidance), which still decides what runs."""
    def block(args: dict, extra: dict):
        args = edit(args)
        return inner(args, extra) if inner is not None else extra["original_block"](args)

    return block


def with_block_patches(model_options: dict, blocks: list[tuple[str, int]],
                       edit_for: Callable[[int], Callable[[dict], dict]]) -> dict:
    """A copy of ``model_options`` whose ``dit`` blocks ``(replace name, index)`` run with their arguments changed by
    ``edit_for(index)`` (:func:`_block_patch`, wrapping another node's patch of the block)."""
    for name, i in blocks:
        replaced = model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        model_options = comfy.model_patcher.set_model_options_patch_replace(
            model_options, _block_patch(replaced.get((name, i)), edit_for(i)), "dit", name, i)
    return model_options


def _rope_to_capture(args: dict) -> dict:
    """The block runs without its rotary embedding; the capture gets it (:data:`ROPE_KEY`) and applies it with a
    backward (:func:`attention.joint.apply_rope`)."""
    return {**args, "pe": None, "transformer_options": {**args["transformer_options"], ROPE_KEY: args["pe"]}}


def with_differentiable_rope(model_options: dict, blocks: list[tuple[str, int]]) -> dict:
    """A copy of ``model_options`` whose ``dit`` blocks ``(replace name, index)`` apply their rotary embedding in
    the capture."""
    return with_block_patches(model_options, blocks, lambda i: _rope_to_capture)


def with_block_tags(model_options: dict, replace_name: str, keys: list[BlockKey]) -> dict:
    """A copy of ``model_options`` whose ``dit`` blocks ``(replace_name, index)`` of ``keys`` mark their attention
    calls as that key (:data:`BLOCK_TAG`)."""
    by_index = {key[1]: key for key in keys}

    def tag(i: int) -> Callable[[dict], dict]:
        return lambda args: {**args, "transformer_options": {**args["transformer_options"], BLOCK_TAG: by_index[i]}}

    return with_block_patches(model_options, [(replace_name, i) for i in by_index], tag)


def block_name(key: BlockKey) -> str:
    return f"{key[0]}.{key[1]}"


def attention_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, int, bool, torch.Tensor | None]:
    """``(q, k, heads, skip_reshape, mask)`` of an ``optimized_attention(q, k, v, heads, mask=..., ...)`` call."""
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    return args[0], args[1], int(heads), bool(kwargs.get("skip_reshape", False)), mask


class _JointReader:
    """What both captures share: which calls are joint, which block they are, where text and image sit."""

    def __init__(self, family, diffusion_model, keys: Collection[BlockKey], n_text: int,
                 grid: tuple[int, int]) -> None:
        self.family, self.dm = family, diffusion_model
        self.keys = frozenset(keys)
        self.n_text, self.grid = n_text, tuple(grid)
        self._call: dict | None = None  # the transformer_options of the current model call (SD3's block count)
        self._count = 0
        self.tagged = False  # the read blocks carry BLOCK_TAG (:func:`with_block_tags`): other calls are not read

    def _block(self, to: dict, n: int) -> BlockKey | None:
        if n <= self.grid[0] * self.grid[1]:
            return None  # image-only attention (SD3.5's second attention in a block)
        if self.tagged:
            return to.get(BLOCK_TAG)
        if to is not self._call:
            self._call, self._count = to, 0
        self._count += 1
        return self.family.block_of(to, self._count - 1)

    def probabilities(self, key: BlockKey, q, k, heads: int, skip_reshape: bool, mask,
                      run_chunk=None) -> torch.Tensor:
        """``(B, gh, gw, T)`` image x text probabilities of block ``key``, averaged over heads."""
        qh, kh = split_heads(q, heads, skip_reshape), split_heads(k, heads, skip_reshape)
        image, text = token_ranges(kh.shape[-2], self.n_text, self.family.text_first(self.dm, key))
        probs = text_probabilities(qh, kh, image, text, mask, run_chunk=run_chunk)
        return probs.reshape(probs.shape[0], *self.grid, self.n_text)

    def fits(self, n: int) -> bool:
        return n == self.n_text + self.grid[0] * self.grid[1]


class JointGradCapture(_JointReader):
    """Collects the maps of one gradient pass; raises :class:`StopForward` after block ``stop_after``."""

    def __init__(self, family, diffusion_model, keys, n_text, grid, stop_after: BlockKey | None) -> None:
        super().__init__(family, diffusion_model, keys, n_text, grid)
        self.stop_after = stop_after
        self.maps: dict[BlockKey, torch.Tensor] = {}

    def override(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        if to.get(ROPE_KEY) is not None:
            args = (*apply_rope(args[0], args[1], to[ROPE_KEY]), *args[2:])
        q, k, heads, skip_reshape, mask = attention_args(args, kwargs)
        n = k.shape[-2]
        key = self._block(to, n)
        if key in self.keys:
            if not self.fits(n):
                raise ValueError(f"the model attends over {n} tokens, not the prompt's {self.n_text} text tokens and "
                                 f"{self.grid[0]}x{self.grid[1]} image tokens: reference latents (Kontext) and "
                                 f"other extra tokens are not supported by Attend-and-Excite.")
            self.maps[key] = self.probabilities(key, q, k, heads, skip_reshape, mask, recompute_in_backward)
        if key is not None and key == self.stop_after:
            raise StopForward()  # nothing later in the model changes the maps
        return comfy_attention.attention_pytorch(*args, **kwargs)

    def aggregate(self) -> torch.Tensor:
        if not self.maps:
            raise RuntimeError("no joint-attention block was captured")
        return torch.stack(list(self.maps.values())).mean(0)


def blocks_label(keys: list[BlockKey]) -> str:
    """One name for blocks in execution order, runs of one kind shortened: ``double.0-18``, ``joint.6-8``,
    ``double.0-18,single.0-3``, ``joint.2,joint.5``."""
    runs: list[list] = []
    for kind, i in keys:
        if runs and runs[-1][0] == kind and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([kind, i, i])
    return ",".join(f"{k}.{a}" if a == b else f"{k}.{a}-{b}" for k, a, b in runs)


class JointRecorder(MapRecorder, _JointReader):
    """Records the cond branch's maps of the read blocks during the ordinary sampling passes, averaged over the
    blocks: one ``(B, gh, gw, T)`` map per step named :func:`blocks_label` (per block it would be 19 maps of Flux's
    64 x 64 x 512 per step at 1024 px, ≈ 2 GB per image over 28 steps; averaged ≈ 0.1 GB)."""

    def __init__(self, record, family, diffusion_model, keys: list[BlockKey], n_text, grid,
                 sigma_values: list[float], inner: Callable | None = None) -> None:
        MapRecorder.__init__(self, record, tuple(grid), sigma_values, None)
        _JointReader.__init__(self, family, diffusion_model, keys, n_text, grid)
        self.inner = inner  # another node's override, whose output the model keeps
        self.last, self.label = keys[-1], blocks_label(keys)
        self._sum: tuple[object, torch.Tensor | None, int] = (None, None, 0)  # (model call, sum of maps, blocks)

    def override(self, func, *args, **kwargs):
        out = self.inner(func, *args, **kwargs) if self.inner is not None else func(*args, **kwargs)
        q, k, heads, skip_reshape, mask = attention_args(args, kwargs)
        to = kwargs.get("transformer_options") or {}
        key = self._block(to, k.shape[-2])
        if key not in self.keys or not self.fits(k.shape[-2]):
            return out  # not read, or text repeated to batch with a longer prompt: no map for this call
        found = self._cond_rows(to, q.shape[0])
        if found is None:
            return out
        step, rows = found
        with torch.no_grad():
            probs = self.probabilities(key, q[rows], k[rows], heads, skip_reshape,
                                       mask if mask is None or mask.ndim < 3 or mask.shape[0] == 1 else mask[rows])
            call, total, n = self._sum
            this = to.get("cond_or_uncond", to)  # one list per model call (tagged blocks get copies of the options)
            total, n = (probs, 1) if call is not this else (total + probs, n + 1)
        self._sum = (this, total, n)
        if key == self.last:
            self.record.add_map(step, self.label, total / n)
            self._sum = (None, None, 0)
        return out
