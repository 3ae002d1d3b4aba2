"""AttendExciteSampler (a SAMPLER for SamplerCustom/-Advanced) and AttendExciteKSampler (all-in-one).

Both show the settings most runs change; the expert ones come from an optional Attend-and-Excite Options node.
Saved workflows keep their widget values by position: the inputs kept here are, in order, the first ones the
earlier nodes had, so a workflow saved with those nodes loads its values into the same inputs (the values of
the settings that moved to the Options node are dropped and take their defaults).
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..attention.inputs import refinement_problem, verdict
from ..attention.record import AttentionRecord
from ..attention.schedule import DEFAULT_REFINEMENT, parse_refinement
from .options import AEOptions, AEOptionsType, resolve_options, widget_problems
from .sampling import AEParams, make_sampler

AttentionMaps = io.Custom("ATTEND_EXCITE_MAPS")
MAPS_TOOLTIP = ("Cross-attention maps of the run (cond branch, per step and layer) for the Visualize and Report "
                "nodes. Empty when the Options node turns record_maps off.")
SAMPLER_NAME_TOOLTIP = ("The ComfyUI sampler to run. It runs once over the whole schedule (its history and noise "
                        "are its own); A&E edits its latent at the start of each guided step. The paper used SD "
                        "1.4's default PNDM scheduler, which ComfyUI lacks; euler and ddim follow the paper's "
                        "update exactly. dpm_fast, dpm_adaptive and uni_pc cannot be guided (the node says so).")
OPTIONS_TOOLTIP = ("Optional: an Attend-and-Excite Options node with the expert settings (refinement cap, "
                   "smoothing, attention level and layers, token slots, recorded maps, CUDA graphs). Unconnected: "
                   "the paper's defaults.")


def ae_inputs() -> list:
    """The A&E settings on both sampler nodes, in the order the earlier nodes had them (defaults = the paper's)."""
    return [
        io.Float.Input("scale_factor", default=20.0, min=0.0, max=1000.0, step=0.5,
                       tooltip="Step size alpha of the latent update, in latent units per unit of loss gradient "
                               "(paper: 20). 0 = plain sampling; the attention maps are still recorded."),
        io.Float.Input("guided_fraction", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of the sampling steps, from the start, that get A&E updates, 0 to 1 (paper: "
                               "0.5 = the first 25 of 50 steps)."),
        io.Float.Input("scale_start", default=1.0, min=0.0, max=10.0, step=0.05,
                       tooltip="Step size at the first step is scale_factor x sqrt(scale_start) (paper: 1.0); it "
                               "changes linearly to scale_end at the last step."),
        io.Float.Input("scale_end", default=0.5, min=0.0, max=10.0, step=0.05,
                       tooltip="Step size at the last step is scale_factor x sqrt(scale_end) (paper: 0.5)."),
        io.String.Input("refinement", default=DEFAULT_REFINEMENT,
                        tooltip="Iterative refinement as 'fraction:threshold' pairs: at that point of the schedule "
                                "(0 to 1), update until every subject's max attention reaches the threshold (0 to "
                                "1) or the Options node's cap (paper: 0:0.05, 0.2:0.5, 0.4:0.8 = steps 0, 10 and "
                                "20 of 50). Empty = refinement off."),
    ]


def ae_params(sampler_name: str, node: str, **kw) -> AEParams:
    """The node inputs as :class:`AEParams` (same names; ``refinement`` parsed), validated."""
    kw = {k: v for k, v in kw.items() if k in AEParams.__dataclass_fields__}
    params = AEParams(sampler_name=sampler_name, node=node,
                      **{**kw, "refinement": parse_refinement(kw.get("refinement", DEFAULT_REFINEMENT))})
    params.validate()
    return params


def check_main(inputs: list, **values) -> bool | str:
    """``validate_inputs`` of both sampler nodes: ranges and finiteness of the numbers, the combo values (an API
    client may send any string) and the refinement text."""
    refinement = values.pop("refinement", None)
    return verdict(*widget_problems(inputs, values),
                   refinement_problem(refinement) if refinement is not None else None)


class AttendExciteSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttendExciteSampler",
            display_name="Attend-and-Excite Sampler",
            category="attend_excite",
            description="A SAMPLER for SamplerCustom / SamplerCustomAdvanced that wraps any ComfyUI sampler and "
                        "applies Attend-and-Excite latent updates during the first part of the schedule. The "
                        "positive prompt must come from Attend-and-Excite Text Encode.",
            inputs=[io.Combo.Input("sampler_name", options=list(comfy.samplers.SAMPLER_NAMES), default="euler",
                                   tooltip=SAMPLER_NAME_TOOLTIP + " Used when no SAMPLER is connected."),
                    *ae_inputs(),
                    io.Sampler.Input("sampler", optional=True,
                                     tooltip="Optional: a SAMPLER to wrap instead of sampler_name (KSamplerSelect, "
                                             "SamplerDPMPP_2M_SDE with its eta/s_noise, SamplerLMS, ...)."),
                    AEOptionsType.Input("options", optional=True, tooltip=OPTIONS_TOOLTIP)],
            outputs=[io.Sampler.Output(display_name="SAMPLER",
                                       tooltip="The wrapped sampler with Attend-and-Excite updates, for the sampler "
                                               "input of SamplerCustom or SamplerCustomAdvanced; their positive "
                                               "prompt must come from Attend-and-Excite Text Encode."),
                     AttentionMaps.Output(display_name="attention_maps", tooltip=MAPS_TOOLTIP)],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, sampler_name: str | None = None, scale_factor: float | None = None,
                        guided_fraction: float | None = None, scale_start: float | None = None,
                        scale_end: float | None = None, refinement: str | None = None) -> bool | str:
        return check_main(cls.define_schema().inputs, sampler_name=sampler_name, scale_factor=scale_factor,
                          guided_fraction=guided_fraction, scale_start=scale_start, scale_end=scale_end,
                          refinement=refinement)

    @classmethod
    def execute(cls, sampler_name: str, scale_factor: float = 20.0, guided_fraction: float = 0.5,
                scale_start: float = 1.0, scale_end: float = 0.5, refinement: str = DEFAULT_REFINEMENT, sampler=None,
                options: AEOptions | None = None, **legacy) -> io.NodeOutput:
        params = ae_params(sampler_name, "AttendExciteSampler", scale_factor=scale_factor,
                           guided_fraction=guided_fraction, scale_start=scale_start, scale_end=scale_end,
                           refinement=refinement, **resolve_options(cls, options, legacy))
        record = AttentionRecord()
        return io.NodeOutput(make_sampler(params, record, sampler), record)


class AttendExciteKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttendExciteKSampler",
            display_name="Attend-and-Excite KSampler",
            category="attend_excite",
            description="KSampler with Attend-and-Excite: same inputs as KSampler plus the A&E settings; the "
                        "expert ones come from an optional Attend-and-Excite Options node. Outputs the latent and "
                        "the run's attention maps.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to sample with: an SD1.x, SD2.x or SDXL UNet "
                                                "(the paper used Stable Diffusion 1.4)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise. The same seed with scale_factor 0 gives the plain "
                                     "image to compare with."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps (paper: 50)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (paper: 7.5)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.SAMPLER_NAMES), default="euler",
                               tooltip=SAMPLER_NAME_TOOLTIP),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal",
                               tooltip="How the noise levels are spaced over the steps, as in KSampler (default: "
                                       "normal). The paper's PNDM spacing has no exact ComfyUI equivalent."),
                io.Conditioning.Input("positive", tooltip="The prompt, from Attend-and-Excite Text Encode (it "
                                                          "carries the subjects' token indices)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, from any text encode node (paper: "
                                                          "an empty prompt)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise: an Empty Latent Image for text to "
                                                        "image (paper: 512x512 px, a 64x64 latent on SD1.x), or an "
                                                        "encoded image with denoise below 1."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the schedule to run, 0 to 1: 1.0 starts from pure noise (text to "
                                       "image, the paper); less keeps part of latent_image (image to image)."),
                *ae_inputs(),
                AEOptionsType.Input("options", optional=True, tooltip=OPTIONS_TOOLTIP),
            ],
            outputs=[io.Latent.Output(display_name="LATENT",
                                      tooltip="The denoised latent; decode it with VAE Decode."),
                     AttentionMaps.Output(display_name="attention_maps", tooltip=MAPS_TOOLTIP)],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, sampler_name: str | None = None,
                        scheduler: str | None = None, denoise: float | None = None,
                        scale_factor: float | None = None, guided_fraction: float | None = None,
                        scale_start: float | None = None, scale_end: float | None = None,
                        refinement: str | None = None) -> bool | str:
        return check_main(cls.define_schema().inputs, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                          denoise=denoise, scale_factor=scale_factor, guided_fraction=guided_fraction,
                          scale_start=scale_start, scale_end=scale_end, refinement=refinement)

    @classmethod
    def execute(cls, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive,
                negative, latent_image: dict, denoise: float, scale_factor: float = 20.0, guided_fraction: float = 0.5,
                scale_start: float = 1.0, scale_end: float = 0.5, refinement: str = DEFAULT_REFINEMENT,
                options: AEOptions | None = None, **legacy) -> io.NodeOutput:
        params = ae_params(sampler_name, "AttendExciteKSampler", scale_factor=scale_factor,
                           guided_fraction=guided_fraction, scale_start=scale_start, scale_end=scale_end,
                           refinement=refinement, **resolve_options(cls, options, legacy))
        record = AttentionRecord()
        sampler = make_sampler(params, record)
        if denoise <= 0.0:
            return io.NodeOutput(dict(latent_image), record)
        # The same schedule KSampler uses (denoise, samplers that discard the penultimate sigma).
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise,
                                         model_options=model.model_options).sigmas.cpu()
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        x0_output: dict = {}
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1, x0_output)
        samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                             noise_mask=latent_image.get("noise_mask"), callback=callback,
                                             disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = dict(latent_image)
        out["samples"] = samples
        return io.NodeOutput(out, record)
