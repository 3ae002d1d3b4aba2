"""AttendExciteReport: the run's per-subject max attention, shown on the node and kept in ``/history`` outputs."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.inputs import verdict
from ..attention.metrics import neglected, report_text
from ..attention.record import AttentionRecord
from ..attention.schedule import build_schedule
from .options import widget_problems
from .samplers import AttentionMaps

NODE = "AttendExciteReport"
UI_KEY = "attend_excite"


def report_step(record: AttentionRecord) -> int:
    """The step whose maps are reported: the last guided step, or for plain runs (no guided steps) the step that
    ends the default guided half (the paper's 0.5 of the schedule,
    rounded like the sampler rounds it), so both are compared at the same step.
    Falls back to the last recorded step before it when that step has no maps."""
    if not record.maps:
        raise ValueError("attention_maps is empty: the run recorded no attention maps. Turn record_maps on (on the "
                         "Attend-and-Excite Options node). With the Attend-and-Excite Sampler node, also connect the "
                         "sampled LATENT to the report's samples input, so that it runs after the sampling.")
    guided = record.guided_steps or build_schedule(max(record.num_steps, 1), 0.5, 1.0, refinement=()).guided_steps
    target = guided - 1
    earlier = [s for s in record.steps if s <= max(target, 0)]
    return earlier[-1] if earlier else record.steps[0]


def build_report(record: AttentionRecord, threshold: float) -> dict:
    """``{labels, subjects, step, num_steps, guided_steps, threshold, max_attention (B, S), neglected (B,),
    skipped_steps}``; ``skipped_steps[b]``: the guided steps at which image ``b``'s A&E update was skipped as not
    finite (NaN/inf), empty when none was (and an empty list for records without guided steps)."""
    if not isinstance(record, AttentionRecord):
        raise TypeError("attention_maps must come from an Attend-and-Excite sampler node.")
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
        "skipped_steps": [list(steps) for steps in record.skipped_steps],
    }


def skipped_text(report: dict) -> str:
    """Lines for the images whose A&E update was skipped at some step (none: an empty string)."""
    lines = [f"image {b}: A&E update skipped at step{'s' if len(steps) > 1 else ''} "
             f"{', '.join(str(s + 1) for s in steps)} (not finite: NaN/inf); the unguided latent was kept there."
             for b, steps in enumerate(report.get("skipped_steps", []), 1) if steps]
    return "\n".join(lines)


def inputs() -> list:
    return [
        AttentionMaps.Input("attention_maps", tooltip="The attention_maps output of an Attend-and-Excite sampler "
                                                      "node (record_maps on, the default)."),
        io.Float.Input("threshold", default=0.2, min=0.0, max=1.0, step=0.01,
                       tooltip="A subject whose max attention (0 to 1) is below this counts as neglected. The "
                               "paper's refinement asks for 0.8 by 40 % of the schedule; 0.2 flags clear neglect."),
        io.Latent.Input("samples", optional=True,
                        tooltip="Optional: the sampled LATENT of the same run. Connect it when the maps come from "
                                "the Attend-and-Excite Sampler node, whose maps fill while SamplerCustom runs: the "
                                "report then runs after the sampling."),
    ]


class AttendExciteReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Attend-and-Excite Report",
            category="attend_excite",
            description="Shows each subject's max attention (the quantity A&E raises, 0 to 1) per image, at the "
                        "last guided step (plain runs: the step that ends the first half), and flags images where "
                        "a subject stays below the threshold (neglected). The numbers appear on the node and in "
                        "the prompt's history outputs under 'attend_excite'.",
            inputs=inputs(),
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, threshold: float | None = None) -> bool | str:
        return verdict(*widget_problems(inputs(), {"threshold": threshold}))

    @classmethod
    def execute(cls, attention_maps: AttentionRecord, threshold: float, samples: dict | None = None) -> io.NodeOutput:
        report = build_report(attention_maps, threshold)
        text = "\n".join(t for t in (report_text(report), skipped_text(report)) if t)
        return io.NodeOutput(ui={UI_KEY: [report], "text": [text]})
