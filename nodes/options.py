"""AttendExciteOptions: the expert settings of the A&E samplers, kept off the sampler nodes.

The sampler nodes show what most runs change (step size, guided share of the schedule, refinement); this node
carries the rest into their optional ``options`` input. Unconnected, the samplers use the same defaults (the
paper's). Prompts written for the earlier sampler nodes, which had these settings as their own inputs, keep
working: see :func:`legacy_options`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from comfy_api.latest import io

from ..attention.inputs import choice_problem, joint_blocks_problem, number_problem, odd_problem, verdict
from .sampling import BLOCK_CHOICES, RECOMPUTE_CHOICES, TOKEN_SLOT_MODES, AEParams

NODE = "AttendExciteOptions"
AEOptionsType = io.Custom("ATTEND_EXCITE_OPTIONS")
_DEFAULT = {f.name: f.default for f in fields(AEParams)}


@dataclass(frozen=True)
class AEOptions:
    """The expert settings; names and defaults are those of :class:`~.sampling.AEParams`."""

    max_refinement_steps: int = _DEFAULT["max_refinement_steps"]
    smoothing: bool = _DEFAULT["smoothing"]
    kernel_size: int = _DEFAULT["kernel_size"]
    smoothing_sigma: float = _DEFAULT["smoothing_sigma"]
    attention_resolution: int = _DEFAULT["attention_resolution"]
    token_slots: str = _DEFAULT["token_slots"]
    record_maps: bool = _DEFAULT["record_maps"]
    attention_blocks: str = _DEFAULT["attention_blocks"]
    cuda_graph: bool = _DEFAULT["cuda_graph"]
    joint_blocks: str = _DEFAULT["joint_blocks"]
    recompute: str = _DEFAULT["recompute"]


OPTION_NAMES = tuple(f.name for f in fields(AEOptions))


def option_inputs() -> list:
    """The inputs of the Options node, in :class:`AEOptions` order, which is the order the earlier sampler nodes had
    them in (defaults = the paper's)."""
    d = AEOptions()
    return [
        io.Int.Input("max_refinement_steps", default=d.max_refinement_steps, min=1, max=200,
                     tooltip="Cap on iterative-refinement iterations at each refinement point, one gradient pass "
                             "through the UNet each (paper: 20)."),
        io.Boolean.Input("smoothing", default=d.smoothing,
                         tooltip="Gaussian smoothing of each subject's attention map before its maximum is taken "
                                 "(paper: on)."),
        io.Int.Input("kernel_size", default=d.kernel_size, min=1, max=15, step=2,
                     tooltip="Smoothing kernel size in attention-map pixels, odd (paper: 3)."),
        io.Float.Input("smoothing_sigma", default=d.smoothing_sigma, min=0.05, max=10.0, step=0.05,
                       tooltip="Smoothing sigma in attention-map pixels as the reference code writes it (paper: "
                               "0.5; that code's kernel has an effective sigma of 0.707, reproduced exactly)."),
        io.Int.Input("attention_resolution", default=d.attention_resolution, min=0, max=256,
                     tooltip="Side in pixels of the attention maps A&E reads. 0 = auto, the level at latent/4: "
                             "16 for SD1.x at 512 px (the paper), 32 for SDXL at 1024 px. Another value picks that "
                             "level if the model has it."),
        io.Combo.Input("token_slots", options=list(TOKEN_SLOT_MODES), default=d.token_slots,
                       tooltip="Key slots in the x100 re-softmax. auto (the paper's code): SD1/SDXL all but the "
                               "start and last slot ([1:-1]), SD2 the prompt's tokens only. all_but_bos_last: "
                               "diffusers' behaviour on every model. prompt: the prompt's tokens only."),
        io.Boolean.Input("record_maps", default=d.record_maps,
                         tooltip="Record the cross-attention maps of every step for the Visualize and Report nodes "
                                 "(not part of the method). Costs a little speed, and RAM while ComfyUI caches the "
                                 "output: about 10 MB per SD1.5 image, 0.5 GB per SDXL 1024 px image."),
        io.Combo.Input("attention_blocks", options=list(BLOCK_CHOICES), default=d.attention_blocks,
                       tooltip="Cross-attention layers of the level that feed the loss. all (the paper): encoder, "
                               "middle and decoder layers. down_mid: encoder and middle only, so each gradient pass "
                               "stops before the decoder: about half the work and activation memory on SDXL at "
                               "1024 px, a third less on SD1.x; not validated against the paper."),
        io.Boolean.Input("cuda_graph", default=d.cuda_graph,
                         tooltip="On CUDA, capture the gradient pass once per run as a CUDA graph and replay it: "
                                 "the same arithmetic without Python overhead (about 3x faster passes). Ignored on "
                                 "CPU; off by itself with ControlNet, hook keyframes, timestep ranges or other "
                                 "nodes' model patches (the log says why). Turn off to rule it out when debugging."),
        io.String.Input("joint_blocks", default=d.joint_blocks, optional=True,  # optional: prompts saved without it run
                        tooltip="Flux and SD3: the joint-attention blocks whose maps feed the loss; the gradient pass "
                                "stops after the last. auto: Flux's 19 double-stream blocks, SD3's middle range "
                                "(blocks n/4 to 3n/8-1, 6-8 of 24). all, double, single (Flux), or block numbers in "
                                "execution order such as 6-11 (Flux's single blocks come after the double ones). "
                                "Ignored on UNets. Defaults not yet validated on real weights."),
        io.Combo.Input("recompute", options=list(RECOMPUTE_CHOICES), default=d.recompute, optional=True,
                       tooltip="UNets: keep less memory in each gradient pass by recomputing transformer blocks' "
                               "activations in its backward (one more forward of those blocks). auto: as many blocks "
                               "as keep the pass's activations within about 30% of the model's weight size (SDXL at "
                               "1024 px: about two thirds of them; SD1.5 at 512 px: none). blocks: every block the "
                               "pass runs (least memory). off: none (fastest), except to retry a pass that ran out "
                               "of memory. Estimates per option: docs/performance.md."),
    ]


def widget_problems(inputs: list, values: Mapping[str, Any]) -> list[str | None]:
    """Problems of widget values by the limits and lists of their input definitions. ``None`` values (inputs fed
    by another node, known only when the prompt runs) are skipped."""
    specs = {i.id: i for i in inputs}
    out: list[str | None] = []
    for name, value in values.items():
        spec = specs.get(name)
        if value is None or spec is None:
            continue
        if isinstance(spec, (io.Float.Input, io.Int.Input)):
            out.append(number_problem(name, value, spec.min, spec.max, spec.default))
        elif isinstance(spec, io.Combo.Input):
            out.append(choice_problem(name, value, spec.options))
    return out


_KIND = {io.Int.Input: "whole number", io.Float.Input: "number", io.Boolean.Input: "true/false value"}


def _coerce(spec, value: Any) -> Any:
    if isinstance(spec, io.Int.Input):
        return int(value)
    if isinstance(spec, io.Float.Input):
        return float(value)
    if isinstance(spec, io.Boolean.Input):
        return bool(value)
    return value


def checked_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (option names only) converted like ComfyUI converts widget values, or ValueError naming the
    input and the fix."""
    specs = {i.id: i for i in option_inputs()}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, list):
            raise ValueError(f"{name} is fed by another node, which the sampler cannot take any more. Set it on an "
                             f"Attend-and-Excite Options node connected to the sampler's options input.")
        try:
            out[name] = _coerce(specs[name], value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} = {value!r} is not a {_KIND.get(type(specs[name]), 'valid value')}. "
                             f"Give one, or leave it out for the default.") from None
    problem = verdict(*widget_problems(list(specs.values()), out),
                      odd_problem("kernel_size", out["kernel_size"]) if "kernel_size" in out else None,
                      joint_blocks_problem(out["joint_blocks"]) if "joint_blocks" in out else None)
    if problem is not True:
        raise ValueError(problem)
    return out


def legacy_options(node_cls, given: Mapping[str, Any]) -> dict[str, Any]:
    """Expert settings given the earlier way, as inputs of the sampler node itself.

    ``given`` are keyword arguments of a direct call; a prompt sent through the API may also carry them in the
    node's own inputs, which ComfyUI does not pass to ``execute`` because the node no longer declares them (they
    are read from the prompt the node runs in). Values are checked like the Options node's own.
    """
    raw = {k: v for k, v in given.items() if k in OPTION_NAMES}
    hidden = getattr(node_cls, "hidden", None)
    prompt = getattr(hidden, "prompt", None) if hidden is not None else None
    node = prompt.get(str(hidden.unique_id)) if isinstance(prompt, Mapping) else None
    if isinstance(node, Mapping):
        raw = {**{k: v for k, v in node.get("inputs", {}).items() if k in OPTION_NAMES}, **raw}
    return checked_options(raw)


def resolve_options(node_cls, options: AEOptions | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """The expert settings of one run: the Options node's when one is connected, else those given the earlier
    way (:func:`legacy_options`), else the defaults."""
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected inputs {unknown}")
    if options is not None:
        if not isinstance(options, AEOptions):
            raise TypeError("options must come from an Attend-and-Excite Options node.")
        return asdict(options)
    return {**asdict(AEOptions()), **legacy_options(node_cls, given)}


class AttendExciteOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Attend-and-Excite Options",
            category="attend_excite",
            description="Expert settings of the Attend-and-Excite samplers: refinement cap, smoothing, the "
                        "attention level and layers read (joint blocks on Flux and SD3), token slots, recorded "
                        "maps, CUDA graphs, recomputation. Connect it to "
                        "a sampler's options input; without it the samplers use these defaults (the paper's).",
            inputs=option_inputs(),
            outputs=[AEOptionsType.Output(display_name="options",
                                          tooltip="The settings, for the options input of Attend-and-Excite "
                                                  "KSampler or Attend-and-Excite Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, kernel_size: int | None = None, smoothing_sigma: float | None = None,
                        token_slots: str | None = None, attention_blocks: str | None = None,
                        joint_blocks: str | None = None, recompute: str | None = None) -> bool | str:
        values = {"kernel_size": kernel_size, "smoothing_sigma": smoothing_sigma, "token_slots": token_slots,
                  "attention_blocks": attention_blocks, "recompute": recompute}
        return verdict(*widget_problems(option_inputs(), values),
                       odd_problem("kernel_size", kernel_size) if kernel_size is not None else None,
                       joint_blocks_problem(joint_blocks) if joint_blocks is not None else None)

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        return io.NodeOutput(AEOptions(**checked_options(values)))
