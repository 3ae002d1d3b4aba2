"""AttendExciteVisualize: per-subject heatmaps of a run, overlaid on the decoded image."""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from ..attention.heatmap import subject_strip
from ..attention.loss import subject_maps
from ..attention.record import AttentionRecord
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
        raise TypeError(f"{NODE}: attention_maps must come from an Attend-and-Excite sampler node.")
    if not record.maps:
        raise ValueError(f"{NODE}: the run recorded no attention maps. Enable record_maps on the sampler and make "
                         f"sure the image comes from that sampler's output.")
    steps = select_steps(record, start, end)
    if not steps:
        raise ValueError(f"{NODE}: no recorded step between {start:.2f} and {end:.2f} of the schedule "
                         f"({record.num_steps} steps). Widen start_percent/end_percent.")
    names = [n.strip() for n in layers.split(",") if n.strip()] if layers.strip() not in ("", "all") else None
    if names:
        unknown = [n for n in names if n not in record.layers]
        if unknown:
            raise ValueError(f"{NODE}: unknown layers {unknown}; recorded layers are {record.layers} (or 'all').")
    maps = subject_maps(record.aggregate(steps, names), record.subjects, record.slots, record.smoothing,
                        record.kernel_size, record.smoothing_sigma)
    if image.shape[0] != maps.shape[0] and image.shape[0] != 1:
        raise ValueError(f"{NODE}: {image.shape[0]} images but the run had a batch of {maps.shape[0]}. Connect the "
                         f"decoded output of the same sampler.")
    labels = [f"{lbl} ({idx})" for lbl, idx in zip(record.labels, record.subjects)]
    strips = [subject_strip(image[min(b, image.shape[0] - 1)], maps[b], labels, alpha) for b in range(maps.shape[0])]
    return torch.stack(strips)


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
            inputs=[
                AttentionMaps.Input("attention_maps", tooltip="From an Attend-and-Excite sampler node."),
                io.Image.Input("image", tooltip="The decoded output of the same run."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First part of the schedule to average (0 = first step)."),
                io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the averaged range (0.5 = the paper's guided steps)."),
                io.String.Input("layers", default="all",
                                tooltip="'all' or comma-separated layer names such as 'input.7.0, output.3.0'."),
                io.Float.Input("alpha", default=0.55, min=0.0, max=1.0, step=0.05, tooltip="Heatmap opacity."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE",
                                     tooltip="Batch: one row per image = image | subject 1 | subject 2 ...")],
        )

    @classmethod
    def execute(cls, attention_maps, image, start_percent: float, end_percent: float, layers: str,
                alpha: float) -> io.NodeOutput:
        return io.NodeOutput(render(attention_maps, image, start_percent, end_percent, layers, alpha))
