#!/usr/bin/env python3
"""What one A&E gradient pass costs next to one plain sampling step, counted on the real UNet layouts.

Nothing is run for real: ComfyUI's ``UNetModel`` for SD1.5 or SDXL is built on the ``meta`` device (no weights,
no memory, any machine) and driven through the same capture patches, early stop and loss as the sampler's gradient
pass. Per pass it counts

- ``tflop``: arithmetic, from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention);
- ``ops``: dispatched ATen operators that are not views: a proxy for GPU kernel launches, which is what bounds a
  small model on a big GPU;
- ``saved_gib``: tensors autograd keeps for the backward (weights excluded): the activation memory the gradient
  pass adds on top of the model's weights; ``saved_top`` names the largest groups of them by the operator that made
  the tensor's memory, its shape and dtype (``[op, shape, dtype, count, GiB]``).

Every attention layer runs PyTorch's SDPA (ComfyUI's choice on NVIDIA GPUs). The ``blocks`` option chooses which
cross-attention layers of the level feed the loss (``AEParams.attention_blocks``), ``--resolution`` which level.

``--memory`` counts ways to keep less for the backward (:data:`MEMORY_OPTIONS`), run for real on the meta model with
PyTorch's activation checkpointing (non-reentrant): ``stored`` is the sampler's pass as it is; ``ff_recompute``
recomputes each transformer block's feed-forward (GEGLU projection, GELU, output projection) in the backward and
keeps only its input; ``block_recompute`` recomputes each whole transformer block (self-attention, cross-attention,
feed-forward) and keeps its input and context, except the block whose cross-attention ends the pass. ``saved_gib``
then counts what is kept through the pass (the kept inputs included); a recomputed block's own activations live
only while its backward runs (one block's: tens of MiB at SDXL's 32x32 level). Every gradient row also gives
``probs_f32_gib``, the read layers' float32 probabilities among the saved bytes (kept in fp16 they would take half).

``--arch flux,sd35m``: Flux.1 dev and SD3.5 medium (``benchmarks/dit_bench.py``'s layouts, bfloat16, 1024² by
default) built with ComfyUI's ``get_model`` on the meta device. A plain step is one model call (Flux, CFG 1) or one
call of batch 2 (SD3.5, CFG); the gradient pass is the pack's joint pass: its reader's capture override and
differentiable rotary embedding, the chunked image x text probabilities (``attention.joint``, recomputed in the
backward), the stop after the last read block, the loss, and the pass's saved-tensor hook that clones activations
(its copies are what is kept). Other attention calls run the flash kernel. ``--capture`` (:data:`CAPTURE_OPTIONS`)
and ``--chunk-elements`` count variants of the capture; the rows add the capture's sizes by formula (one chunk's
logits, the image x text block, the full attention matrix of a read block) and run-level estimates
(``time_ratio_estimate``, ``peak_ratio_estimate``: see :func:`estimates`).

Output: JSON lines, then a Markdown table. ``docs/performance.md`` turns the counts into GPU estimates.

    python benchmarks/cost_model.py --arch sd15,sdxl --batch 1,4 [--memory stored,ff_recompute,block_recompute]
    python benchmarks/cost_model.py --arch flux,sd35m [--text-tokens 512,256] [--capture as_is,inputs_once]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the benchmark's architectures and ComfyUI set-up)

log = logging.getLogger("ae_cost")
GIB = 1024**3
MEMORY_OPTIONS = ("stored", "ff_recompute", "block_recompute")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=bench._csv(str), default=["sd15", "sdxl"],
                   help="sd15,sdxl (UNets) or flux,sd35m (joint attention, at 1024² by default)")
    p.add_argument("--text-tokens", type=bench._csv(int), default=None,
                   help="flux,sd35m: T5 tokens (default flux 512,256; sd35m 256, after the 77 CLIP tokens)")
    p.add_argument("--joint-blocks", type=bench._csv(str), default=["auto"],
                   help="flux,sd35m: AEParams.joint_blocks (auto = the family's default blocks)")
    p.add_argument("--joint-model", choices=("full", "reduced", "tiny"), default="full",
                   help="flux,sd35m: layout (dit_bench.ARCHS): the real one, or the CPU benchmark's smaller ones")
    p.add_argument("--capture", type=bench._csv(str), default=["as_is", "inputs_once"],
                   help="flux,sd35m: " + ",".join(CAPTURE_OPTIONS) + " (see joint_pass_attention)")
    p.add_argument("--rms-norm", choices=RMS_NORM_OPTIONS, default="fused",
                   help="flux,sd35m: the q/k RMSNorm's saved tensors as PyTorch's fused CUDA kernel keeps them "
                        "(fused) or as the meta device's composite form does (composite: float32 copies)")
    p.add_argument("--chunk-elements", type=bench._csv(int), default=None,
                   help="flux,sd35m: the capture's logits per chunk (default: attention.joint.CHUNK_ELEMENTS)")
    p.add_argument("--steps", type=int, default=28, help="flux,sd35m: sampling steps of the time estimate")
    p.add_argument("--guided-fraction", type=float, default=0.5,
                   help="flux,sd35m: AEParams.guided_fraction of the time estimate")
    p.add_argument("--size", type=bench._csv(int), default=None,
                   help="image sides in px (default: 512 for sd15, 1024 for sdxl)")
    p.add_argument("--batch", type=bench._csv(int), default=[1])
    p.add_argument("--blocks", type=bench._csv(str), default=["all", "down_mid"],
                   help="which cross-attention layers of the level feed the loss")
    p.add_argument("--resolution", type=int, default=0,
                   help="AEParams.attention_resolution: side of the level read (0 = auto, latent / 4)")
    p.add_argument("--memory", type=bench._csv(str), default=["stored"],
                   help="what the gradient pass keeps for its backward: " + ",".join(MEMORY_OPTIONS))
    p.add_argument("--comfy-root", default=None)
    p.add_argument("--markdown", type=Path, default=None)
    return p.parse_args(argv)


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


def sdpa_attention(q, k, v, heads, mask=None, **_):
    """ComfyUI's ``optimized_attention`` signature, computed by the flash-attention kernel that SDPA picks for fp16
    on NVIDIA GPUs (it keeps only the output and the log-sum-exp for its backward, not the attention matrix)."""
    import torch

    b, n, _ = q.shape
    qh, kh, vh = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, False, False)[0]
    return out.transpose(1, 2).reshape(b, n, -1)


class Model:
    """A meta-device ComfyUI UNet of ``arch`` with the inputs of one sampling call."""

    def __init__(self, arch: str, size: int, pack, resolution: int = 0) -> None:
        import comfy.ops
        import torch
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        spec = bench.ARCHS[arch]
        self.arch, self.size, self.spec, self.pack = arch, size, spec, pack
        self.dtype = torch.float16
        self.config = bench.unet_config(arch, "full")
        self.unet = UNetModel(**self.config, dtype=self.dtype, device="meta",
                              operations=comfy.ops.disable_weight_init)
        self.unet.requires_grad_(False)
        self.param_storages = {p.untyped_storage()._cdata for p in self.unet.parameters()}
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.unet.parameters()) / GIB
        self.latent = size // 8
        self.target_hw = families_module().target_resolution((self.latent, self.latent), resolution)
        self.keys = pack.capture.attn2_keys(self.unet)

    def inputs(self, batch: int):
        import torch

        kw = {"device": "meta", "dtype": self.dtype}
        x = torch.empty(batch, 4, self.latent, self.latent, **kw)
        t = torch.empty(batch, **kw)
        ctx = torch.empty(batch, bench.NUM_KEYS, self.config["context_dim"], **kw)
        y = torch.empty(batch, self.config["adm_in_channels"], **kw) if self.spec["pooled"] else None
        return x, t, ctx, y

    def forward(self, x, attn2: dict, batch: int):
        _, t, ctx, y = self.inputs(batch)
        sdpa = {k: self._sdpa for k in self.keys}
        patches = {"attn1": sdpa, "attn2": {**sdpa, **attn2}}
        return self.unet(x, t, context=ctx, y=y, transformer_options={"patches_replace": patches})

    @staticmethod
    def _sdpa(q, k, v, extra_options):
        return sdpa_attention(q, k, v, extra_options["n_heads"])


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


def plain_step(model: Model, batch: int) -> dict[str, Any]:
    """One CFG sampling step: cond and uncond in one forward of batch 2B, no gradient."""
    import torch

    def run(hold):
        with torch.no_grad():
            x, *_ = model.inputs(2 * batch)
            model.forward(x, {}, 2 * batch)

    return measure(run, model.param_storages)


class Recomputed:
    """A transformer block's part run under activation checkpointing: its input is kept (``hold``), its activations
    are recomputed in the backward. ``skip(transformer_options)``: run this call as it is (the block whose
    cross-attention ends the pass: its forward stops inside)."""

    def __new__(cls, inner, hold, skip=lambda to: False):
        import torch

        class _Module(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x, *args, **kwargs):
                to = kwargs.get("transformer_options")
                if to is not None:  # the UNet updates its block index in place: the recompute must see this call's
                    kwargs["transformer_options"] = to = dict(to)
                    if skip(to):
                        return self.inner(x, *args, **kwargs)
                for t in (x, *args, *kwargs.values()):
                    if isinstance(t, torch.Tensor):
                        hold(t)
                return torch.utils.checkpoint.checkpoint(self.inner, x, *args, use_reentrant=False,
                                                         preserve_rng_state=False, **kwargs)

        return _Module()


@contextlib.contextmanager
def memory_option(model: Model, option: str, stop_key, hold):
    """``model``'s transformer blocks as ``option`` runs them (see :data:`MEMORY_OPTIONS`), for the ``with`` body."""
    from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer

    undo = []
    for m in model.unet.modules():
        if option == "ff_recompute" and isinstance(m, BasicTransformerBlock):
            undo.append((m, "ff", m.ff))
            m.ff = Recomputed(m.ff, hold)
        elif option == "block_recompute" and isinstance(m, SpatialTransformer):
            blocks = m.transformer_blocks
            for i, block in enumerate(list(blocks)):
                def ends_the_pass(to, i=i):
                    return (*to.get("block", ("", -1)), i) == tuple(stop_key)

                undo.append((blocks, i, block))
                blocks[i] = Recomputed(block, hold, ends_the_pass)
    try:
        yield
    finally:
        for owner, name, original in reversed(undo):
            if isinstance(name, int):
                owner[name] = original
            else:
                setattr(owner, name, original)


def gradient_pass(model: Model, batch: int, blocks: str, option: str = "stored") -> dict[str, Any]:
    """The sampler's gradient pass: cond only, capture at the target level, stop after the last layer read, loss,
    backward to the latent; ``option``: what it keeps for the backward (:data:`MEMORY_OPTIONS`)."""
    import torch

    pack = model.pack
    keys = families_module().select_blocks(model.keys, blocks)
    with torch.no_grad():
        targets = bench.target_layers(lambda attn2: model.forward(model.inputs(1)[0], attn2, 1), pack,
                                      model.target_hw, keys, sdpa_attention)
    slots = pack.loss.slot_mask(bench.NUM_KEYS, "all_but_bos_last")

    def run(hold):
        forward = bench.pass_forward(lambda x, attn2: model.forward(x, attn2, batch), pack, model.target_hw,
                                     targets, sdpa_attention, slots)
        with torch.enable_grad(), memory_option(model, option, targets[-1], hold):
            leaf = model.inputs(batch)[0].requires_grad_(True)
            loss, _ = forward(leaf)
            loss.sum().backward(inputs=[leaf])  # as autograd.grad (which the counter rejects)

    out = measure(run, model.param_storages)
    out["layers"] = len(targets)
    out["last_layer"] = pack.capture.layer_name(targets[-1])
    return out


# ---------------------------------------------------------------------------------------------------------------
# joint-attention transformers (Flux, SD3.5 medium)


def dit_module():
    import dit_bench

    return dit_bench


def flash_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **_):
    """ComfyUI's ``optimized_attention`` signature (both layouts) computed by the flash-attention kernel SDPA picks
    for bf16/fp16 on NVIDIA GPUs (it keeps the output and the log-sum-exp for its backward, never the matrix)."""
    import torch

    if skip_reshape:
        qh, kh, vh = q, k, v
    else:
        b, d = q.shape[0], q.shape[-1] // heads  # SD3 hands v over as (B, N, heads, d)
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, False, False)[0]
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])


def _flash_override(func, *args, **kwargs):
    return flash_attention(*args, **kwargs)


CAPTURE_OPTIONS = ("as_is", "inputs_once")
RMS_NORM_OPTIONS = ("fused", "composite")


def fused_rms_norm(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm`` as the fused CUDA kernel keeps it for the backward (the input, the weight
    and the float32 reciprocal RMS per row), where the meta device runs the composite form, which keeps float32
    copies of the input. Same output shape and dtype; no matmul, so the FLOPs do not change."""
    import torch

    class _Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            rstd = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
            ctx.save_for_backward(x, rstd, *([] if weight is None else [weight]))
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, grad):
            x = ctx.saved_tensors[0]
            return torch.empty_like(x), None

    return _Fused.apply(x, weight)


@contextlib.contextmanager
def rms_norm_as(option: str):
    """For the ``with`` body: ``torch.nn.functional.rms_norm`` (what ComfyUI's RMSNorm calls) as
    :data:`RMS_NORM_OPTIONS` says: ``fused`` = :func:`fused_rms_norm`, ``composite`` = as the meta device runs it."""
    import torch

    original = torch.nn.functional.rms_norm
    import comfy.rmsnorm

    original_comfy = getattr(comfy.rmsnorm, "rms_norm_torch", None)
    if option == "fused":
        torch.nn.functional.rms_norm = fused_rms_norm
        if original_comfy is not None:
            comfy.rmsnorm.rms_norm_torch = fused_rms_norm
    try:
        yield
    finally:
        torch.nn.functional.rms_norm = original
        if original_comfy is not None:
            comfy.rmsnorm.rms_norm_torch = original_comfy


@contextlib.contextmanager
def joint_pass_attention(hold, capture: str = "as_is", chunk_elements: int | None = None):
    """For the ``with`` body: the pass's attention calls outside the read blocks (the capture calls ComfyUI's
    ``attention_pytorch``) run the flash kernel, and the queries and keys the chunked probabilities read are counted
    as held. ``capture``: ``as_is`` = the pack's capture (its chunks run through
    :func:`attention.guidance.recompute_in_backward`, which keeps their inputs by reference: one q and k per block);
    ``inputs_once`` = the same computation with every tensor it saves counted as held by reference (a check: it
    equals ``as_is`` when the capture copies nothing). ``chunk_elements``: the capture's chunk size
    (default: ``attention.joint.CHUNK_ELEMENTS``)."""
    import importlib

    import torch
    from comfy.ldm.modules import attention as comfy_attention

    jc = importlib.import_module(f"{bench.PACK}.nodes.joint_capture")
    original_probs, original_attention = jc.text_probabilities, comfy_attention.attention_pytorch

    def probabilities(q, k, *args, **kwargs):
        hold(q)
        hold(k)
        if chunk_elements:
            kwargs["chunk_elements"] = chunk_elements
        if capture == "as_is":
            return original_probs(q, k, *args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (hold(t), t)[1], lambda t: t):
            return original_probs(q, k, *args, **kwargs)

    jc.text_probabilities, comfy_attention.attention_pytorch = probabilities, flash_attention
    try:
        yield
    finally:
        jc.text_probabilities, comfy_attention.attention_pytorch = original_probs, original_attention


class JointModel:
    """A meta-device Flux / SD3.5 medium (ComfyUI's ``get_model`` of ``dit_bench``'s full layout, bfloat16) with
    the inputs of one sampling call and the pack's reader of its joint blocks."""

    def __init__(self, arch: str, size: int, n_text: int, pack, joint_blocks: str = "auto",
                 variant: str = "full") -> None:
        import torch

        dit = dit_module()
        self.arch, self.size, self.n_text, self.pack = arch, size, n_text, pack
        self.spec = dit.ARCHS[arch]
        self.dtype = torch.bfloat16
        self.base = dit.model_config(arch, variant, self.dtype).get_model({}, "", device=torch.device("meta"))
        self.dm = self.base.diffusion_model
        self.dm.requires_grad_(False)
        self.param_storages = {p.untyped_storage()._cdata for p in self.dm.parameters()}
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.dm.parameters()) / GIB
        self.latent = size // 8
        families = families_module()
        params = importlib_module("nodes.sampling").AEParams(joint_blocks=joint_blocks)
        self.reader = families.JointReader(families.family_of(self.base), self.dm, params,
                                           (self.latent, self.latent), n_text)
        self.grid = self.reader.target_hw
        self.calls = 1 if self.spec["cfg"] == 1.0 else 2  # model calls per sampling step (CFG: cond + uncond)
        off = self.spec["clip_tokens"]
        self.indices = tuple(off + i for i in dit.SUBJECT_POSITIONS)
        self.positions = tuple(off + i for i in range(dit.PROMPT_LENGTH))

    def inputs(self, batch: int):
        import torch

        kw = {"device": "meta", "dtype": self.dtype}
        return (torch.empty(batch, 16, self.latent, self.latent, **kw), torch.empty(batch, **kw),
                torch.empty(batch, self.n_text, dit_module().CONTEXT_DIM, **kw),
                torch.empty(batch, self.spec["pooled"], **kw))

    def forward(self, x, transformer_options: dict, batch: int):
        import torch

        _, t, ctx, y = self.inputs(batch)
        if self.spec["guidance"] is not None:
            guidance = torch.empty(batch, device="meta", dtype=self.dtype)
            return self.dm(x, t, ctx, y=y, guidance=guidance, transformer_options=transformer_options)
        return self.dm(x, t, context=ctx, y=y, transformer_options=transformer_options)


def importlib_module(name: str):
    import importlib

    return importlib.import_module(f"{bench.PACK}.{name}")


def joint_plain_step(model: JointModel, batch: int, rms_norm: str = "fused") -> dict[str, Any]:
    """One sampling step: one call (Flux, CFG 1) or cond and uncond in one call of batch 2B (SD3.5), no gradient."""
    import torch

    b = model.calls * batch

    def run(hold):
        with torch.no_grad(), rms_norm_as(rms_norm):
            model.forward(model.inputs(b)[0], {"optimized_attention_override": _flash_override}, b)

    return measure(run, model.param_storages)


def joint_gradient_pass(model: JointModel, batch: int, capture_option: str = "as_is",
                        chunk_elements: int | None = None, rms_norm: str = "fused") -> dict[str, Any]:
    """The sampler's joint gradient pass (:class:`~nodes.gradient_pass.GradientPasses` with a ``JointReader``):
    cond only, the capture's override and differentiable rotary embedding installed by the reader, stop after the
    last read block, the chunked image x text probabilities (recomputed in the backward), the A&E loss with its
    default smoothing, backward to the latent; activations saved as the pass's saved-tensor hook keeps them
    (cloned)."""
    import torch

    pack, reader = model.pack, model.reader
    jc = importlib_module("nodes.joint_capture")
    capture = reader.grad_capture(reader.keys)
    to = reader.install({"transformer_options": {}}, capture, reader.keys)["transformer_options"]
    slots = pack.loss.slot_mask(model.n_text, "prompt", model.positions)

    def run(hold):
        with torch.enable_grad(), joint_pass_attention(hold, capture_option, chunk_elements), rms_norm_as(rms_norm):
            leaf = model.inputs(batch)[0].requires_grad_(True)
            try:
                model.forward(leaf, to, batch)
            except pack.capture.StopForward:
                pass
            loss, _ = pack.loss.attend_excite_objective(capture.aggregate(), model.indices, slots, smoothing=True,
                                                        kernel_size=3, smoothing_sigma=0.5)
            loss.sum().backward(inputs=[leaf])

    clone = importlib_module("attention.guidance")._clone_activation  # what clone_saved_activations keeps
    out = measure(run, model.param_storages, transform=clone, probs_keys=model.n_text)
    out["layers"] = len(capture.maps)
    out["read_blocks"] = dit_module()._blocks_label(reader.keys)
    out["last_layer"] = jc.block_name(reader.keys[-1])
    return out


def attention_sizes(model: JointModel, batch: int, chunk_elements: int | None = None) -> dict[str, Any]:
    """By formula: the chunked capture's working memory against the full attention matrix of the read blocks."""
    chunk_elements = chunk_elements or importlib_module("attention.joint").CHUNK_ELEMENTS
    image = model.grid[0] * model.grid[1]
    n = image + model.n_text
    heads = _heads(model)
    rows = max(1, chunk_elements // max(1, batch * heads * n))
    read = len(model.reader.keys)
    full = batch * heads * n * n
    return {"image_tokens": image, "text_tokens": model.n_text, "tokens": n, "heads": heads, "read_block_count": read,
            "chunk_elements": chunk_elements, "chunk_rows": rows, "chunks_per_block": math.ceil(image / rows),
            "chunk_logits_gib": rows * batch * heads * n * 4 / GIB,
            "image_x_text_gib_per_block": batch * image * model.n_text * 4 / GIB,
            "full_matrix_f32_gib_per_block": full * 4 / GIB, "full_matrix_f16_gib_per_block": full * 2 / GIB,
            "full_matrix_f32_gib_read_blocks": read * full * 4 / GIB}


def _heads(model: JointModel) -> int:
    dm = model.dm
    return int(dm.num_heads) if hasattr(dm, "num_heads") else int(dm.params.num_heads)


def joint_rows(args: argparse.Namespace, pack, arch: str) -> list[dict[str, Any]]:
    dit = dit_module()
    schedule = pack.schedule.build_schedule(args.steps, args.guided_fraction)
    out = []
    for size in args.size or [1024]:
        for t5 in args.text_tokens or dit.ARCHS[arch]["cost_text_tokens"]:
            n_text = dit.text_tokens(arch, t5)
            for joint_blocks in args.joint_blocks:
                model = JointModel(arch, size, n_text, pack, joint_blocks, args.joint_model)
                for batch in args.batch:
                    base = {"arch": arch, "model": args.joint_model, "size": size, "batch": batch,
                            "level": f"{model.grid[0]}x{model.grid[1]}",
                            "weights_gib": model.weights_gib, "text_tokens": n_text, "joint_blocks": joint_blocks,
                            "model_calls_per_step": model.calls}
                    plain = joint_plain_step(model, batch, args.rms_norm)
                    out.append({**base, "pass": "plain_step", **plain})
                    for option in args.capture:
                        for chunk in args.chunk_elements or [None]:
                            g = joint_gradient_pass(model, batch, option, chunk, args.rms_norm)
                            sizes = attention_sizes(model, batch, chunk)
                            name = "gradient_joint" + ("" if option == "as_is" else f"+{option}")
                            name += "" if chunk is None else f"+chunk{chunk}"
                            out.append({**base, "pass": name, "capture": option, "rms_norm": args.rms_norm,
                                        **g, **sizes,
                                        **estimates(model, plain, g, sizes, schedule.guided_steps, args.steps)})
    return out


def estimates(model: JointModel, plain: dict, g: dict, sizes: dict, passes: int, steps: int) -> dict[str, Any]:
    """Run-level ratios from the counts. Time: passes and steps at the same arithmetic rate. Peak: weights + what
    the pass keeps + the read blocks' image x text maps + one chunk's logits, over the weights (plain activations
    left out of both: a bound from above)."""
    ratio = g["tflop"] / plain["tflop"]
    kept = g["saved_gib"] + sizes["read_block_count"] * sizes["image_x_text_gib_per_block"] + sizes["chunk_logits_gib"]
    return {"tflop_vs_step": ratio, "ops_vs_step": g["ops"] / plain["ops"], "steps": steps, "guided_passes": passes,
            "time_ratio_estimate": 1 + passes * ratio / steps,
            "peak_ratio_estimate": (model.weights_gib + kept) / model.weights_gib}


def rows(args: argparse.Namespace, pack) -> list[dict[str, Any]]:
    out = []
    for arch in args.arch:
        if arch in dit_module().ARCHS:
            out += joint_rows(args, pack, arch)
            continue
        sizes = args.size or [512 if arch == "sd15" else 1024]
        for size in sizes:
            model = Model(arch, size, pack, args.resolution)
            for batch in args.batch:
                base = {"arch": arch, "size": size, "batch": batch,
                        "level": f"{model.target_hw[0]}x{model.target_hw[1]}", "weights_gib": model.weights_gib}
                plain = plain_step(model, batch)
                out.append({**base, "pass": "plain_step", **plain})
                for blocks in args.blocks:
                    for option in args.memory:
                        g = gradient_pass(model, batch, blocks, option)
                        name = f"gradient_{blocks}" + ("" if option == "stored" else f"+{option}")
                        out.append({**base, "pass": name, "memory": option, **g, "tflop_vs_step": g["tflop"] /
                                    plain["tflop"], "ops_vs_step": g["ops"] / plain["ops"]})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    return bench.simple_table([
        ("arch", lambda r: r["arch"]), ("size", lambda r: f"{r['size']}²"), ("batch", lambda r: r["batch"]),
        ("level", lambda r: r["level"]), ("pass", lambda r: r["pass"]), ("layers read", lambda r: r.get("layers", "–")),
        ("TFLOP", lambda r: f"{r['tflop']:.3f}"), ("× step", lambda r: bench._fmt(r.get("tflop_vs_step"))),
        ("ops", lambda r: r["ops"]), ("× step", lambda r: bench._fmt(r.get("ops_vs_step"))),
        ("saved GiB", lambda r: f"{r['saved_gib']:.2f}"),
        ("of which fp32 probs", lambda r: f"{r['probs_f32_gib']:.2f}"),
        ("text tokens", lambda r: r.get("text_tokens", "–")),
        ("est. × plain time", lambda r: bench._fmt(r.get("time_ratio_estimate"))),
        ("est. × plain peak", lambda r: bench._fmt(r.get("peak_ratio_estimate"))),
    ], table)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    args = parse_args(argv)
    bench.setup_comfy(args.comfy_root, cpu=True)
    pack = bench.import_pack()
    table = rows(args, pack)
    bench.write_results(table, markdown(table), args.markdown, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
