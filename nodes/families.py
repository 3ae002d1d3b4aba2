"""The model families Attend-and-Excite runs on, one small description each, and the per-run *reader* that installs
the capture of the layers a family reads.

A family says: how its layers are found, which are read by default (and how ``attention_blocks`` /
``joint_blocks`` choose others), the grid of their maps, where the gradient pass stops (after the last read
layer), and for joint attention where text and image sit. The token stream the subjects live in is decided by the
text encoder's output (:mod:`.encode`); the latent step by the model's sampling (:func:`flow_matching`). A further
joint-attention family (Chroma, HiDream, Lumina 2, ...) is one :class:`JointFamily` entry plus tests.

- UNets (SD1.x, SD2.x, SDXL): cross-attention ``attn2`` layers of one level, through attn2 replace patches
  (:mod:`.capture`).
- Flux.1: the 19 double-stream blocks by default (``joint_blocks``: ``all``, ``single`` or numbers, single
  blocks numbered after the double ones); T5 text first (a ``flipped_img_txt`` block has the image first).
- SD3 / SD3.5: a middle range of the joint blocks by default, blocks ``n/4 .. 3n/8 - 1`` (6-8 of SD3.5 medium's
  24): the gradient pass stops at 3/8 of the model (counted: ~1.5x plain peak memory at 1024 px, where 6-11 would
  need ~1.7x; ``benchmarks/cost_model.py --arch sd35m``). Text (CLIP-L/G, then T5) first.

Joint blocks are read through ``optimized_attention_override`` (:mod:`.joint_capture`). Defaults for Flux and SD3
are not yet validated on real weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_patcher
import comfy.model_sampling
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..attention.guidance import clone_saved_activations
from ..attention.inputs import parse_joint_blocks
from .capture import GradCapture, LayerKey, MapRecorder, attn2_levels, replaced_attn2, transformer_blocks
from .joint_capture import (
    BlockKey,
    JointGradCapture,
    JointRecorder,
    block_name,
    with_block_tags,
    with_differentiable_rope,
)

SUPPORTED = "SD1.x, SD2.x and SDXL (UNet), Flux.1 (dev, schnell) and SD3 / SD3.5"

# Values a UNet transformer block keeps for the backward per token and channel when it is not recomputed: counted
# with benchmarks/cost_model.py (SDXL 1024 px `all`: 3.87 GiB over 64 blocks; SD1.5 512 px: 0.32 GiB over 10).
STORED_PER_VALUE = 24


def flow_matching(model_sampling) -> bool:
    """Whether the model samples as flow matching (ComfyUI's ``CONST``: Flux, SD3, or a UNet behind
    ModelSamplingSD3): the latent step then uses the flow scale (:func:`attention.step.step_scale`)."""
    return isinstance(model_sampling, comfy.model_sampling.CONST)


# ---- UNets ----

def _level(side: int, ds: int) -> int:
    while ds > 1:
        side, ds = math.ceil(side / 2), ds // 2
    return side


def target_resolution(latent_hw: tuple[int, int], attention_resolution: int) -> tuple[int, int]:
    """Map side of the attention level to read: ``auto`` (0) = latent / 4, else the level whose longer side is
    ``attention_resolution``."""
    h, w = latent_hw
    levels = [(_level(h, 2**k), _level(w, 2**k)) for k in range(7)]
    if attention_resolution == 0:
        return levels[2]
    for hw in levels:
        if max(hw) == attention_resolution:
            return hw
    raise ValueError(f"attention_resolution {attention_resolution} does not exist for a {h}x{w} latent; "
                     f"levels are {sorted({max(x) for x in levels}, reverse=True)}. Use one of them or 0 (auto).")


def select_blocks(keys: list[LayerKey], attention_blocks: str) -> list[LayerKey]:
    """The cross-attention layers whose maps may feed the loss: ``all``, or ``down_mid`` (encoder and middle
    block only, so the gradient pass never runs the decoder)."""
    if attention_blocks == "down_mid":
        return [k for k in keys if k[0] != "output"]
    return list(keys)


def level_keys(diffusion_model: torch.nn.Module, latent_hw: tuple[int, int], target_hw: tuple[int, int],
               attention_blocks: str) -> list[LayerKey]:
    """The cross-attention layers of the level whose maps are ``target_hw`` in an ordinary forward of a
    ``latent_hw`` latent, by the UNet's structure: nodes that resize the hidden state (Deep Shrink) change the size
    those layers see, not which layers they are (their maps are resized to ``target_hw``)."""
    levels = attn2_levels(diffusion_model)
    side = {v: (_level(latent_hw[0], 2**v), _level(latent_hw[1], 2**v)) for v in set(levels.values())}
    keys = select_blocks([k for k, v in levels.items() if side[v] == tuple(target_hw)], attention_blocks)
    if not keys:
        sides = sorted({max(hw) for hw in side.values()}, reverse=True)
        raise ValueError(f"no cross-attention layer works at {target_hw[0]}x{target_hw[1]}"
                         f"{'' if attention_blocks == 'all' else ' in ' + attention_blocks}; this model has them at "
                         f"{sides}. Set attention_resolution to one of those sides.")
    return keys


def with_attn2_patches(model_options: dict, patch_for, keys: list[LayerKey]) -> dict:
    """A copy of ``model_options`` with ``patch_for(key, inner)`` as the attn2 replace patch of each key; ``inner``:
    another node's replace patch of that layer in ``model_options`` (or ``None``), which A&E's patch wraps."""
    others = model_options
    for key in keys:
        patch = patch_for(key, replaced_attn2(others, key))
        model_options = comfy.model_patcher.set_model_options_patch_replace(model_options, patch, "attn2", *key)
    return model_options


def _precision(attn_precision, dtype):
    """A layer's attention precision after ComfyUI's ``--force-upcast-attention`` / ``--dont-upcast-attention``."""
    resolve = getattr(comfy_attention, "get_attn_precision", None)
    return attn_precision if resolve is None else resolve(attn_precision, dtype)


class UNetReader:
    """The cross-attention layers of one UNet level (``attention_resolution``, ``attention_blocks``)."""

    joint_name = None  # not a joint-attention family

    def __init__(self, diffusion_model, params, latent_hw: tuple[int, int]) -> None:
        self.dm, self.latent_hw = diffusion_model, tuple(latent_hw)
        self.blocks = transformer_blocks(diffusion_model)  # found once per run, not once per pass
        self.target_hw = target_resolution(latent_hw, params.attention_resolution)
        self.keys = level_keys(diffusion_model, latent_hw, self.target_hw, params.attention_blocks)

    def grad_capture(self, keys: list[LayerKey]) -> GradCapture:
        return GradCapture(self.target_hw, keys[-1] if keys else None, comfy_attention.optimized_attention,
                           _precision, keys)

    def recorder(self, record, sigma_values: list[float]) -> MapRecorder:
        return MapRecorder(record, self.target_hw, sigma_values, comfy_attention.optimized_attention, _precision,
                           self.keys)

    def install(self, model_options: dict, capture, keys: list[LayerKey]) -> dict:
        return with_attn2_patches(model_options, capture.patch, keys)

    def nothing_read(self, capture: GradCapture, keys: list[LayerKey], n_text: int) -> str:
        """Why a gradient pass read no map: the sizes the model's cross-attention layers had."""
        seen = sorted({f"{h}x{w}" for h, w in capture.seen.values()})
        return (f"no cross-attention layer works at {self.target_hw[0]}x{self.target_hw[1]}; this model has {seen}. "
                f"Set attention_resolution to one of those sides.")

    def pass_context(self):
        return contextlib.nullcontext()

    def _run_blocks(self, keys: list[LayerKey]) -> list[tuple[torch.nn.Module, int]]:
        order = list(self.blocks)
        return [self.blocks[k] for k in order[: order.index(keys[-1]) + 1]] if keys else []

    def recomputed_blocks(self, keys: list[LayerKey]) -> list[torch.nn.Module]:
        """The transformer blocks a pass reading ``keys`` runs (up to the one whose cross-attention is the last key):
        the blocks whose activations are recomputed in the backward (``recompute``)."""
        return [m for m, _ in self._run_blocks(keys)]

    def stored_block_bytes(self, keys: list[LayerKey], batch: int, itemsize: int) -> list[int]:
        """Estimated activations each block of :meth:`recomputed_blocks` keeps for the backward when it is not
        recomputed: :data:`STORED_PER_VALUE` values per token and channel."""
        out = []
        for m, level in self._run_blocks(keys):
            tokens = _level(self.latent_hw[0], 2**level) * _level(self.latent_hw[1], 2**level)
            out.append(STORED_PER_VALUE * batch * itemsize * tokens * m.norm1.normalized_shape[-1])
        return out

    def finest_encoder_side(self, latent_hw: tuple[int, int]) -> int | None:
        levels = [v for k, v in attn2_levels(self.dm).items() if k[0] == "input"]
        return max(_level(n, 2 ** min(levels)) for n in latent_hw) if levels else None


# ---- joint-attention transformers ----

@dataclass(frozen=True)
class JointFamily:
    """A joint-attention family: ``blocks(dm)`` in execution order, ``default(blocks)`` read when ``joint_blocks``
    is ``auto``, ``text_first(dm, key)``, ``block_of(transformer_options, joint_call_index)`` (the block of an
    attention call), ``patch(dm)`` (latent pixels per image token side), ``rope_blocks``: the ``dit`` block replace
    name of each block kind whose rotary embedding the gradient pass applies itself, ``tag_blocks``: the ``dit``
    block replace name that tags the read blocks during sampling when ``block_of`` counts calls
    (:mod:`.joint_capture`)."""

    name: str
    model_types: tuple[str, ...]  # comfy.model_base class names
    blocks: Callable[[torch.nn.Module], list[BlockKey]]
    default: Callable[[list[BlockKey]], list[BlockKey]]
    text_first: Callable[[torch.nn.Module, BlockKey], bool]
    block_of: Callable[[dict, int], BlockKey | None]
    patch: Callable[[torch.nn.Module], int]
    rope_blocks: tuple[tuple[str, str], ...] = ()
    tag_blocks: str | None = None  # dit replace name that tags the read blocks while maps are recorded

    def choose(self, dm: torch.nn.Module, joint_blocks: str) -> list[BlockKey]:
        blocks = self.blocks(dm)
        chosen = parse_joint_blocks(joint_blocks)
        if chosen == "auto":
            return self.default(blocks)
        if chosen == "all":
            return blocks
        if isinstance(chosen, str):
            keys = [b for b in blocks if b[0] == chosen]
            if not keys:
                raise ValueError(f"joint_blocks = {joint_blocks}: {self.name} has no {chosen} blocks. Use auto, all "
                                 f"or block numbers 0-{len(blocks) - 1}.")
            return keys
        if chosen[-1] >= len(blocks):
            raise ValueError(f"joint_blocks = {joint_blocks}: {self.name} has blocks 0-{len(blocks) - 1} "
                             f"({', '.join(sorted({b[0] for b in blocks}))}). Give numbers in that range.")
        return [blocks[i] for i in chosen]


def _flux_blocks(dm) -> list[BlockKey]:
    return [("double", i) for i in range(len(dm.double_blocks))] + [("single", i) for i in range(len(dm.single_blocks))]


def _flux_block_of(to: dict, call: int) -> BlockKey | None:
    kind, index = to.get("block_type"), to.get("block_index")
    return (kind, int(index)) if kind in ("double", "single") and index is not None else None


FLUX = JointFamily(
    name="Flux",
    model_types=("Flux",),
    blocks=_flux_blocks,
    default=lambda blocks: [b for b in blocks if b[0] == "double"],
    text_first=lambda dm, key: key[0] == "single" or not getattr(dm.double_blocks[key[1]], "flipped_img_txt", False),
    block_of=_flux_block_of,
    patch=lambda dm: int(dm.patch_size),
    rope_blocks=(("double", "double_block"), ("single", "single_block")),
)

SD3 = JointFamily(
    name="SD3",
    model_types=("SD3",),
    blocks=lambda dm: [("joint", i) for i in range(len(dm.joint_blocks))],
    default=lambda blocks: blocks[len(blocks) // 4: max(3 * len(blocks) // 8, len(blocks) // 4 + 1)],
    text_first=lambda dm, key: True,
    block_of=lambda to, call: ("joint", call),  # ComfyUI does not tag SD3's blocks: count the joint calls
    patch=lambda dm: int(dm.x_embedder.patch_size[0]),
    tag_blocks="double_block",  # sampling may skip blocks (Skip Layer Guidance): the recorder does not count
)

JOINT_FAMILIES = (FLUX, SD3)


class JointReader:
    """The chosen joint blocks of a Flux or SD3 model (``joint_blocks``), maps at the image-token grid."""

    def __init__(self, family: JointFamily, diffusion_model, params, latent_hw: tuple[int, int],
                 n_text: int) -> None:
        self.family, self.dm, self.n_text = family, diffusion_model, n_text
        self.joint_name = family.name
        p = family.patch(diffusion_model)
        self.target_hw = (math.ceil(latent_hw[0] / p), math.ceil(latent_hw[1] / p))
        self.keys = family.choose(diffusion_model, params.joint_blocks)

    def grad_capture(self, keys: list[BlockKey]) -> JointGradCapture:
        return JointGradCapture(self.family, self.dm, keys, self.n_text, self.target_hw, keys[-1] if keys else None)

    def recorder(self, record, sigma_values: list[float]) -> JointRecorder:
        return JointRecorder(record, self.family, self.dm, self.keys, self.n_text, self.target_hw, sigma_values)

    def install(self, model_options: dict, capture, keys: list[BlockKey]) -> dict:
        to = dict(model_options.get("transformer_options", {}))
        if isinstance(capture, JointRecorder):
            capture.inner = to.get("optimized_attention_override")  # another node's: its output stands
        to["optimized_attention_override"] = capture.override
        model_options = {**model_options, "transformer_options": to}
        if isinstance(capture, JointRecorder) and self.family.tag_blocks:
            model_options = with_block_tags(model_options, self.family.tag_blocks, keys)
            capture.tagged = True
        if isinstance(capture, JointGradCapture) and self.family.rope_blocks and keys:
            names = dict(self.family.rope_blocks)
            blocks = self.family.blocks(self.dm)
            run = blocks[: blocks.index(keys[-1]) + 1]  # the blocks the pass runs
            model_options = with_differentiable_rope(model_options, [(names[b[0]], b[1]) for b in run])
        return model_options

    def nothing_read(self, capture: JointGradCapture, keys: list[BlockKey], n_text: int) -> str:
        """Why a gradient pass read no map: no call of the read blocks held the prompt's text tokens."""
        return (f"no attention call of the {self.family.name} blocks {keys} held the prompt's {n_text} text tokens; "
                f"is the conditioning from this model's text encoder?")

    def pass_context(self):
        return clone_saved_activations()

    def recomputed_blocks(self, keys: list[BlockKey]) -> list[torch.nn.Module]:
        return []  # the joint blocks update their inputs in place; their maps are recomputed per chunk instead

    def stored_block_bytes(self, keys: list[BlockKey], batch: int, itemsize: int) -> list[int]:
        return []

    def finest_encoder_side(self, latent_hw: tuple[int, int]) -> int | None:
        return None


def family_of(base_model) -> JointFamily | None:
    """The joint-attention family of a ComfyUI model (``None``: a UNet with cross-attention layers); a ValueError
    that names the supported families for any other model."""
    name = type(base_model).__name__
    for family in JOINT_FAMILIES:
        if name in family.model_types:
            return family
    if attn2_levels(base_model.diffusion_model):
        return None
    raise ValueError(f"model: {name} models are not supported by Attend-and-Excite; it runs on {SUPPORTED}.")


def reader_for(base_model, params, latent_hw: tuple[int, int], n_text: int) -> UNetReader | JointReader:
    """The reader of one run: which layers are read and how their capture is installed."""
    family = family_of(base_model)
    if family is None:
        return UNetReader(base_model.diffusion_model, params, latent_hw)
    return JointReader(family, base_model.diffusion_model, params, latent_hw, n_text)


def layer_label(key) -> str:
    return block_name(key) if len(key) == 2 else ".".join(str(k) for k in key)
