"""AttendExciteReport: the run's per-subject max attention as UI output (shown in ``/history`` outputs)."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.metrics import neglected
from ..attention.record import AttentionRecord
from ..attention.schedule import build_schedule
from .samplers import AttentionMaps

NODE = "AttendExciteReport"
UI_KEY = "attend_excite"


def report_step(record: AttentionRecord) -> int:
    """The step whose maps are reported: the last guided step, or for plain runs (no guided steps) the step that
    ends the default guided half (the paper's 0.5 of the schedule,
    rounded like the sampler rounds it), so both are compared at the same step.
    Falls back to the last recorded step before it when that step has no maps."""
    if not record.maps:
        raise ValueError(f"{NODE}: the run recorded no attention maps. Enable record_maps on the sampler.")
    guided = record.guided_steps or build_schedule(max(record.num_steps, 1), 0.5, 1.0, refinement=()).guided_steps
    target = guided - 1
    earlier = [s for s in record.steps if s <= max(target, 0)]
    return earlier[-1] if earlier else record.steps[0]


def build_report(record: AttentionRecord, threshold: float) -> dict:
    """``{labels, subjects, step, num_steps, guided_steps, threshold, max_attention (B, S), neglected (B,)}``."""
    if not isinstance(record, AttentionRecord):
        raise TypeError(f"{NODE}: attention_maps must come from an Attend-and-Excite sampler node.")
    step = report_step(record)
    maxima = record.subject_maxima([step]).float()
    return {
        "labels": list(record.labels),
        "subjects": [int(i) for i in record.subjects],
        "step": step,
        "num_steps": record.num_steps,
        "guided_steps": record.guided_steps,
        "threshold": threshold,
        "max_attention": [[round(float(v), 6) for v in row] for row in maxima],
        "neglected": [bool(v) for v in neglected(maxima, threshold)],
    }


class AttendExciteReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Attend-and-Excite Report",
            category="attend_excite",
            description="Reports each subject's max attention (the quantity A&E raises) per image, at the last "
                        "guided step (plain runs: the step that ends the first half), and flags images where a "
                        "subject stays below the threshold (neglected). The numbers appear in the prompt's "
                        "history outputs under 'attend_excite'.",
            inputs=[
                AttentionMaps.Input("attention_maps", tooltip="From an Attend-and-Excite sampler node."),
                io.Float.Input("threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="A subject whose max attention is below this counts as neglected."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, attention_maps: AttentionRecord, threshold: float) -> io.NodeOutput:
        return io.NodeOutput(ui={UI_KEY: [build_report(attention_maps, threshold)]})
