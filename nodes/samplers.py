"""AttendExciteSampler (a SAMPLER for SamplerCustom/-Advanced) and AttendExciteKSampler (all-in-one)."""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..attention.record import AttentionRecord
from ..attention.schedule import DEFAULT_REFINEMENT, parse_refinement
from .sampling import BLOCK_CHOICES, TOKEN_SLOT_MODES, AEParams, make_sampler

AttentionMaps = io.Custom("ATTEND_EXCITE_MAPS")
MAPS_TOOLTIP = ("Cross-attention maps of the run (cond branch, per step and layer) for AttendExciteVisualize. "
                "Filled when the sampler runs.")


def ae_inputs() -> list:
    """The A&E parameters shared by both sampler nodes (defaults = the paper's)."""
    return [
        io.Float.Input("scale_factor", default=20.0, min=0.0, max=1000.0, step=0.5,
                       tooltip="Base step size alpha of the latent update (paper: 20). 0 = plain sampling; the "
                               "attention maps are still recorded."),
        io.Float.Input("guided_fraction", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of the schedule with A&E updates (paper: first 25 of 50 steps = 0.5)."),
        io.Float.Input("scale_start", default=1.0, min=0.0, max=10.0, step=0.05,
                       tooltip="Step size at the first step is scale_factor*sqrt(scale_start) (paper: 1.0)."),
        io.Float.Input("scale_end", default=0.5, min=0.0, max=10.0, step=0.05,
                       tooltip="... and at the last step scale_factor*sqrt(scale_end), linear in between "
                               "(paper: 0.5)."),
        io.String.Input("refinement", default=DEFAULT_REFINEMENT,
                        tooltip="Iterative refinement as 'fraction:threshold' pairs: at that point of the schedule, "
                                "step until every subject's max attention reaches the threshold (paper: "
                                "0:0.05, 0.2:0.5, 0.4:0.8 = steps 0/10/20 of 50). Empty = off."),
        io.Int.Input("max_refinement_steps", default=20, min=1, max=200,
                     tooltip="Cap on refinement iterations per point (paper: 20)."),
        io.Boolean.Input("smoothing", default=True, tooltip="Gaussian smoothing of each token map (paper: on)."),
        io.Int.Input("kernel_size", default=3, min=1, max=15, step=2, tooltip="Smoothing kernel size (paper: 3)."),
        io.Float.Input("smoothing_sigma", default=0.5, min=0.05, max=10.0, step=0.05,
                       tooltip="Smoothing sigma as the reference code writes it (0.5; its effective sigma is "
                               "0.707, reproduced exactly)."),
        io.Int.Input("attention_resolution", default=0, min=0, max=256,
                     tooltip="Side of the attention maps A&E reads. 0 = auto, the level at latent/4: 16 for SD1.x "
                             "at 512 px, 32 for SDXL at 1024 px. Other values pick that level if it exists."),
        io.Combo.Input("token_slots", options=list(TOKEN_SLOT_MODES), default="auto",
                       tooltip="Key slots in the x100 re-softmax. auto: official per family (SD1/SDXL: all but "
                               "start and last slot = [1:-1]; SD2: prompt tokens only). all_but_bos_last = "
                               "diffusers' behaviour on every model."),
        io.Boolean.Input("record_maps", default=True,
                         tooltip="Record cross-attention maps for the visualizer (costs a little speed, and RAM "
                                 "while ComfyUI caches the output: ~10 MB per SD1.5 image, ~0.5 GB per SDXL "
                                 "1024² image)."),
        io.Combo.Input("attention_blocks", options=list(BLOCK_CHOICES), default="all", optional=True,
                       tooltip="Cross-attention layers of the level that feed the loss. all: encoder, middle and "
                               "decoder layers (the paper). down_mid: encoder and middle only, so each gradient "
                               "pass stops before the decoder: about half the work and activation memory on SDXL "
                               "at 1024 px (32x32 level), a third less on SD1.x; not validated against the paper."),
        io.Boolean.Input("cuda_graph", default=True, optional=True,
                         tooltip="On CUDA, capture the gradient pass once per run as a CUDA graph and replay it: the "
                                 "same arithmetic, issued without Python overhead (about 3x faster passes). Off by "
                                 "itself with ControlNet, hook keyframes, timestep ranges or other nodes' model "
                                 "patches (the log says why); turn off to rule it out when debugging."),
    ]


def ae_params(sampler_name: str, node: str, **kw) -> AEParams:
    """The node inputs as :class:`AEParams` (same names; ``refinement`` parsed), validated."""
    kw = {k: v for k, v in kw.items() if k in AEParams.__dataclass_fields__}
    try:
        params = AEParams(sampler_name=sampler_name, node=node,
                          **{**kw, "refinement": parse_refinement(kw.get("refinement", DEFAULT_REFINEMENT))})
        params.validate()
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None
    return params


class AttendExciteSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttendExciteSampler",
            display_name="Attend-and-Excite Sampler",
            category="attend_excite",
            description="A SAMPLER for SamplerCustom / SamplerCustomAdvanced that wraps any ComfyUI sampler and "
                        "applies Attend-and-Excite latent updates during the first part of the schedule. The "
                        "positive prompt must come from AttendExciteTextEncode.",
            inputs=[io.Combo.Input("sampler_name", options=list(comfy.samplers.SAMPLER_NAMES), default="euler",
                                   tooltip="The sampler to wrap when no SAMPLER is connected. It runs once over the "
                                           "whole schedule (its history and noise are its own); A&E edits its latent "
                                           "at the start of each guided step. Not possible with dpm_fast, "
                                           "dpm_adaptive and uni_pc (the node says so)."),
                    *ae_inputs(),
                    io.Sampler.Input("sampler", optional=True,
                                     tooltip="Optional: a SAMPLER to wrap instead of sampler_name (KSamplerSelect, "
                                             "SamplerDPMPP_2M_SDE with its eta/s_noise, SamplerLMS, ...).")],
            outputs=[io.Sampler.Output(display_name="SAMPLER"),
                     AttentionMaps.Output(display_name="attention_maps", tooltip=MAPS_TOOLTIP)],
        )

    @classmethod
    def execute(cls, sampler_name: str, sampler=None, **kw) -> io.NodeOutput:
        params = ae_params(sampler_name, "AttendExciteSampler", **kw)
        record = AttentionRecord()
        try:
            wrapped = make_sampler(params, record, sampler)
        except ValueError as e:
            raise ValueError(f"AttendExciteSampler: {e}") from None
        return io.NodeOutput(wrapped, record)


class AttendExciteKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AttendExciteKSampler",
            display_name="Attend-and-Excite KSampler",
            category="attend_excite",
            description="KSampler with Attend-and-Excite: same inputs as KSampler plus the A&E parameters. "
                        "Outputs the latent and the run's attention maps.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps (paper: 50)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (paper: 7.5)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.SAMPLER_NAMES), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="normal"),
                io.Conditioning.Input("positive", tooltip="From AttendExciteTextEncode."),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                *ae_inputs(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT"),
                     AttentionMaps.Output(display_name="attention_maps", tooltip=MAPS_TOOLTIP)],
        )

    @classmethod
    def execute(cls, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive,
                negative, latent_image: dict, denoise: float, **kw) -> io.NodeOutput:
        params = ae_params(sampler_name, "AttendExciteKSampler", **kw)
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
