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

``--memory`` counts ways to keep less for the backward (:data:`MEMORY_OPTIONS`), run for real on the meta model:
``stored`` is the sampler's pass with ``recompute = off``; ``ff_recompute`` (not offered by the sampler) recomputes
each transformer block's feed-forward (GEGLU projection, GELU, output projection) in the backward with PyTorch's
activation checkpointing and keeps only its input; ``block_recompute`` is the sampler's ``recompute = blocks``
(:func:`attention.guidance.recompute_blocks`): each transformer block the pass runs (self-attention,
cross-attention, feed-forward) keeps its input and context and is recomputed in the backward. ``saved_gib``
then counts what is kept through the pass (the kept inputs included); a recomputed block's own activations live
only while its backward runs (one block's: tens of MiB at SDXL's 32x32 level). Every gradient row also gives
``probs_f32_gib``, the read layers' float32 probabilities among the saved bytes (kept in fp16 they would take half).

``--arch flux,sd35m``: Flux.1 dev and SD3.5 medium, counted the same way by ``benchmarks/cost_model_joint.py``
(their joint gradient pass, the capture's variants and sizes, run-level estimates: see its docstring).

Output: JSON lines, then a Markdown table. ``docs/performance.md`` turns the counts into GPU estimates.

    python benchmarks/cost_model.py --arch sd15,sdxl --batch 1,4 [--memory stored,ff_recompute,block_recompute]
    python benchmarks/cost_model.py --arch flux,sd35m [--text-tokens 512,256] [--capture as_is,inputs_once]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the benchmark's architectures and ComfyUI set-up)
import cost_model_joint as joint  # noqa: E402  (--arch flux,sd35m)
from cost_counting import GIB, families_module, measure  # noqa: E402  (the counters)

log = logging.getLogger("ae_cost")
MEMORY_OPTIONS = ("stored", "ff_recompute", "block_recompute", "auto")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=joint.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=bench._csv(str), default=["sd15", "sdxl"],
                   help="sd15,sdxl (UNets) or flux,sd35m (joint attention, at 1024² by default)")
    joint.add_arguments(p)
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
        self.arch, self.size, self.spec, self.pack, self.resolution = arch, size, spec, pack, resolution
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


def plain_step(model: Model, batch: int) -> dict[str, Any]:
    """One CFG sampling step: cond and uncond in one forward of batch 2B, no gradient."""
    import torch

    def run(hold):
        with torch.no_grad():
            x, *_ = model.inputs(2 * batch)
            model.forward(x, {}, 2 * batch)

    return measure(run, model.param_storages)


class Recomputed:
    """A transformer block's feed-forward run under PyTorch's activation checkpointing: its input is kept
    (``hold``), its activations are recomputed in the backward."""

    def __new__(cls, inner, hold):
        import torch

        class _Module(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x, *args, **kwargs):
                _hold_tensors(hold, (x, *args), kwargs)
                return torch.utils.checkpoint.checkpoint(self.inner, x, *args, use_reentrant=False,
                                                         preserve_rng_state=False, **kwargs)

        return _Module()


def _hold_tensors(hold, args: tuple, kwargs: dict) -> None:
    for t in (*args, *kwargs.values()):
        if hasattr(t, "untyped_storage"):  # a tensor
            hold(t)


@contextlib.contextmanager
def memory_option(model: Model, option: str, hold, recomputed: list):
    """``model``'s transformer blocks as ``option`` runs them (see :data:`MEMORY_OPTIONS`), for the ``with`` body;
    ``recomputed``: the blocks the sampler's recomputation takes (``block_recompute``, ``auto``)."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    undo, handles = [], []
    for m in model.unet.modules():
        if option == "ff_recompute" and isinstance(m, BasicTransformerBlock):
            undo.append((m, "ff", m.ff))
            m.ff = Recomputed(m.ff, hold)
    recomputing = contextlib.nullcontext()
    if recomputed:  # the sampler's own recomputation, its kept inputs counted
        recomputing = model.pack.guidance.recompute_blocks(recomputed, (model.pack.capture.StopForward,))
        for block in recomputed:
            handles.append(block.register_forward_pre_hook(
                lambda _m, args, kwargs: _hold_tensors(hold, args, kwargs), with_kwargs=True))
    try:
        with recomputing:
            yield
    finally:
        for h in handles:
            h.remove()
        for owner, name, original in reversed(undo):
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
    params = pack.sampling.AEParams(attention_blocks=blocks, attention_resolution=model.resolution)
    reader = pack.families.UNetReader(model.unet, params, (model.latent, model.latent))
    stored = reader.stored_block_bytes(targets, batch, model.dtype.itemsize)
    recompute = {"block_recompute": "blocks", "auto": "auto"}.get(option, "off")
    n = pack.gradient_pass.recompute_count(recompute, stored, sum(p.nbytes for p in model.unet.parameters()))
    recomputed = reader.recomputed_blocks(targets)[:n]

    def run(hold):
        forward = bench.pass_forward(lambda x, attn2: model.forward(x, attn2, batch), pack, model.target_hw,
                                     targets, sdpa_attention, slots)
        with torch.enable_grad(), memory_option(model, option, hold, recomputed):
            leaf = model.inputs(batch)[0].requires_grad_(True)
            loss, _ = forward(leaf)
            loss.sum().backward(inputs=[leaf])  # as autograd.grad (which the counter rejects)

    out = measure(run, model.param_storages)
    out["layers"] = len(targets)
    out["blocks_recomputed"], out["blocks_run"], out["stored_estimate_gib"] = n, len(stored), sum(stored) / GIB
    out["last_layer"] = pack.capture.layer_name(targets[-1])
    return out


def rows(args: argparse.Namespace, pack) -> list[dict[str, Any]]:
    out = []
    for arch in args.arch:
        if arch in joint.dit_module().ARCHS:
            out += joint.joint_rows(args, pack, arch)
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
        ("blocks recomputed", lambda r: f"{r['blocks_recomputed']}/{r['blocks_run']}" if "blocks_run" in r else "–"),
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
