"""What one A&E gradient pass of the joint-attention transformers costs next to one plain sampling step: the
``--arch flux,sd35m`` rows of ``benchmarks/cost_model.py``, which runs them (command line, table) and counts them
(its ``measure``: ``tflop``, ``ops``, ``saved_gib``, ``saved_top``; ``probs_f32_gib`` is here the float32 image x
text probabilities among the saved bytes).

Flux.1 dev and SD3.5 medium (``benchmarks/dit_bench.py``'s layouts, bfloat16, 1024² by default) are built with
ComfyUI's ``get_model`` on the meta device. A plain step is one model call (Flux, CFG 1) or one call of batch 2
(SD3.5, CFG); the gradient pass is the pack's joint pass: its reader's capture override and differentiable rotary
embedding, the chunked image x text probabilities (``attention.joint``, recomputed in the backward), the stop after
the last read block, the loss, and the pass's saved-tensor hook that clones activations (its copies are what is
kept). Other attention calls run the flash kernel; the q/k RMS norms keep what PyTorch's fused CUDA kernel keeps
(``--rms-norm``, :data:`RMS_NORM_OPTIONS`). ``--capture`` (:data:`CAPTURE_OPTIONS`) and ``--chunk-elements`` count
variants of the capture; the rows add the capture's sizes by formula (one chunk's logits, the image x text block,
the full attention matrix of a read block: :func:`attention_sizes`) and run-level estimates
(``time_ratio_estimate``, ``peak_ratio_estimate``: see :func:`estimates`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Any

import bench
import cost_counting as base  # the counters (measure) and the pack's families module

CAPTURE_OPTIONS = ("as_is", "inputs_once")
RMS_NORM_OPTIONS = ("fused", "composite")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flux,sd35m options of ``cost_model.py``'s command line."""
    p.add_argument("--text-tokens", type=bench._csv(int), default=None,
                   help="flux,sd35m: T5 tokens (default flux 512,256; sd35m 256, after the 77 CLIP tokens)")
    p.add_argument("--joint-blocks", type=bench._csv(str), default=["auto"],
                   help="flux,sd35m: AEParams.joint_blocks (auto = the family's default blocks)")
    p.add_argument("--joint-model", choices=("full", "reduced", "tiny"), default="full",
                   help="flux,sd35m: layout (dit_bench.ARCHS): the real one, or the CPU benchmark's smaller ones")
    p.add_argument("--capture", type=bench._csv(str), default=["as_is", "inputs_once"],
                   help="flux,sd35m: " + ",".join(CAPTURE_OPTIONS) + " (see cost_model_joint.joint_pass_attention)")
    p.add_argument("--rms-norm", choices=RMS_NORM_OPTIONS, default="fused",
                   help="flux,sd35m: the q/k RMSNorm's saved tensors as PyTorch's fused CUDA kernel keeps them "
                        "(fused) or as the meta device's composite form does (composite: float32 copies)")
    p.add_argument("--chunk-elements", type=bench._csv(int), default=None,
                   help="flux,sd35m: the capture's logits per chunk (default: attention.joint.CHUNK_ELEMENTS)")
    p.add_argument("--steps", type=int, default=28, help="flux,sd35m: sampling steps of the time estimate")
    p.add_argument("--guided-fraction", type=float, default=0.5,
                   help="flux,sd35m: AEParams.guided_fraction of the time estimate")


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
        self.weights_gib = sum(p.numel() * p.element_size() for p in self.dm.parameters()) / base.GIB
        self.latent = size // 8
        families = base.families_module()
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

    return base.measure(run, model.param_storages)


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
    out = base.measure(run, model.param_storages, transform=clone, probs_keys=model.n_text)
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
            "chunk_logits_gib": rows * batch * heads * n * 4 / base.GIB,
            "image_x_text_gib_per_block": batch * image * model.n_text * 4 / base.GIB,
            "full_matrix_f32_gib_per_block": full * 4 / base.GIB, "full_matrix_f16_gib_per_block": full * 2 / base.GIB,
            "full_matrix_f32_gib_read_blocks": read * full * 4 / base.GIB}


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
