"""AttendExciteVisualize: per-subject heatmaps of a run, overlaid on the decoded image."""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from ..attention.heatmap import subject_strip
from ..attention.inputs import order_problem, verdict
from ..attention.loss import subject_maps
from ..attention.record import AttentionRecord
from .options import widget_problems
from .samplers import AttentionMaps

NODE = "AttendExciteVisualize"


def select_steps(record: AttentionRecord, start: float, end: float) -> list[int]:
    """Recorded steps ``i`` with ``start <= i / num_steps < end`` (``end == 1`` includes the last step)."""
    n = max(record.num_steps, 1)
    lo, hi = math.floor(start * n + 1e-9), math.ceil(end * n - 1e-9)
    return [s for s in record.steps if lo <= s < max(hi, lo + 1)]


def render(record: AttentionRecord, image: torch.Tensor, start: float, end: float, layers: str,
           alpha: float) -> torch.Tensor:
    if not isinstance(record, AttentionRecord):
        raise TypeError("attention_maps must come from an Attend-and-Excite sampler node.")
    if not record.maps:
        raise ValueError("attention_maps is empty: the run recorded no attention maps. Turn record_maps on (on the "
                         "Attend-and-Excite Options node) and decode the image from that sampler's output.")
    problem = order_problem("start_percent", start, "end_percent", end)
    if problem:
        raise ValueError(problem)
    steps = select_steps(record, start, end)
    if not steps:
        raise ValueError(f"no recorded step between start_percent {start:.2f} and end_percent {end:.2f} of the "
                         f"schedule ({record.num_steps} steps). Widen the range.")
    names = [n.strip() for n in layers.split(",") if n.strip()] if layers.strip() not in ("", "all") else None
    if names:
        unknown = [n for n in names if n not in record.layers]
        if unknown:
            raise ValueError(f"layers names unknown layers ({', '.join(unknown)}). Give 'all' or some of the "
                             f"recorded ones: {', '.join(record.layers)}.")
    maps = subject_maps(record.aggregate(steps, names), record.subjects, record.slots, record.smoothing,
                        record.kernel_size, record.smoothing_sigma)
    if image.shape[0] != maps.shape[0] and image.shape[0] != 1:
        raise ValueError(f"image has {image.shape[0]} images but the run had a batch of {maps.shape[0]}. Connect the "
                         f"decoded output of the same sampler.")
    labels = [f"{lbl} ({idx})" for lbl, idx in zip(record.labels, record.subjects)]
    strips = [subject_strip(image[min(b, image.shape[0] - 1)], maps[b], labels, alpha) for b in range(maps.shape[0])]
    return torch.stack(strips)


def inputs() -> list:
    return [
        AttentionMaps.Input("attention_maps", tooltip="The attention_maps output of an Attend-and-Excite sampler "
                                                      "node (record_maps on, the default)."),
        io.Image.Input("image", tooltip="The decoded output of the same run (VAE Decode of its LATENT)."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Start of the averaged steps as a share of the schedule, 0 to 1 (0 = the first "
                               "step)."),
        io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="End of the averaged steps as a share of the schedule, 0 to 1, at least "
                               "start_percent (0.5 = the paper's guided steps)."),
        io.String.Input("layers", default="all",
                        tooltip="'all' (the layers A&E reads) or comma-separated layer names such as "
                                "'input.7.0, output.3.0' (UNets). Flux and SD3 record one map averaged over the "
                                "blocks read, named like 'double.0-18' or 'joint.6-8'."),
        io.Float.Input("alpha", default=0.55, min=0.0, max=1.0, step=0.05,
                       tooltip="Heatmap opacity over the image, 0 (image only) to 1 (heatmap only)."),
    ]


class AttendExciteVisualize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Attend-and-Excite Visualize",
            category="attend_excite",
            description="Per-subject cross-attention heatmaps of a run (the re-softmaxed, smoothed maps A&E "
                        "maximises, averaged over the chosen steps and layers), overlaid on the decoded image. "
                        "Outputs a batch with one row per image: the image, then one panel per subject.",
            inputs=inputs(),
            outputs=[io.Image.Output(display_name="IMAGE",
                                     tooltip="Batch: one row per image = image | subject 1 | subject 2 ...; each "
                                             "panel the size of the decoded image.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent: float | None = None, end_percent: float | None = None,
                        alpha: float | None = None) -> bool | str:
        values = {"start_percent": start_percent, "end_percent": end_percent, "alpha": alpha}
        order = (order_problem("start_percent", start_percent, "end_percent", end_percent)
                 if start_percent is not None and end_percent is not None else None)
        return verdict(*widget_problems(inputs(), values), order)

    @classmethod
    def execute(cls, attention_maps, image, start_percent: float, end_percent: float, layers: str,
                alpha: float) -> io.NodeOutput:
        return io.NodeOutput(render(attention_maps, image, start_percent, end_percent, layers, alpha))
