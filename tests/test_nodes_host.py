"""The node definitions in-process: lean sampler nodes, the Options node, tooltips everywhere, validation without a
model, settings given the earlier way (no checkpoint needed)."""

from __future__ import annotations

import math
import types

import pytest

pytestmark = pytest.mark.host

# Widget inputs of the sampler nodes before the expert settings moved to the Options node, in saved order.
EARLIER_KSAMPLER = ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "scale_factor", "guided_fraction",
                    "scale_start", "scale_end", "refinement", "max_refinement_steps", "smoothing", "kernel_size",
                    "smoothing_sigma", "attention_resolution", "token_slots", "record_maps", "attention_blocks",
                    "cuda_graph"]
EARLIER_SAMPLER = ["sampler_name", *EARLIER_KSAMPLER[6:]]
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@pytest.fixture(scope="module")
def pack(comfy_inprocess):
    import comfy_inprocess as ci

    ci.load_pack()
    import comfyui_attend_excite.nodes as nodes
    import comfyui_attend_excite.nodes.options as options
    import comfyui_attend_excite.nodes.samplers as samplers

    return types.SimpleNamespace(nodes=nodes, options=options, samplers=samplers)


def widget_names(node_cls) -> list[str]:
    return [i.id for i in node_cls.define_schema().inputs if i.get_io_type() in WIDGETS]


def test_every_input_and_output_has_a_tooltip(pack):
    for node in pack.nodes.NODES:
        schema = node.define_schema()
        for item in [*schema.inputs, *schema.outputs]:
            name = getattr(item, "id", None) or item.display_name
            assert item.tooltip and len(item.tooltip) > 20, f"{schema.node_id}.{name}"


def test_tooltips_give_the_papers_values(pack):
    ks = {i.id: i.tooltip for i in pack.samplers.AttendExciteKSampler.define_schema().inputs}
    for name, value in (("steps", "50"), ("cfg", "7.5"), ("scale_factor", "20"), ("guided_fraction", "0.5"),
                        ("scale_start", "1.0"), ("scale_end", "0.5"), ("refinement", "0:0.05, 0.2:0.5, 0.4:0.8")):
        assert f"paper: {value}" in ks[name], name
    opts = {i.id: i.tooltip for i in pack.options.AttendExciteOptions.define_schema().inputs}
    for name, value in (("max_refinement_steps", "20"), ("kernel_size", "3"), ("smoothing_sigma", "0.5")):
        assert f"paper: {value}" in opts[name], name


def test_sampler_nodes_are_lean_and_keep_the_earlier_order(pack):
    ks, sampler = pack.samplers.AttendExciteKSampler, pack.samplers.AttendExciteSampler
    # saved workflows assign widget values by position: the kept widgets are the earlier nodes' first ones
    assert widget_names(ks) == EARLIER_KSAMPLER[:11]
    assert widget_names(sampler) == EARLIER_SAMPLER[:6]
    for node in (ks, sampler):
        names = [i.id for i in node.define_schema().inputs]
        assert "cuda_graph" not in names and "smoothing" not in names and names[-1] == "options"
    # the Options node keeps the earlier order; settings added since come after it
    assert list(pack.options.OPTION_NAMES) == [*EARLIER_KSAMPLER[11:], "joint_blocks", "recompute"]
    assert widget_names(pack.options.AttendExciteOptions) == [*EARLIER_KSAMPLER[11:], "joint_blocks", "recompute"]


def test_validation_refuses_bad_values_without_a_model(pack):
    ks, sampler = pack.samplers.AttendExciteKSampler, pack.samplers.AttendExciteSampler
    ok = dict(cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0, scale_factor=20.0, guided_fraction=0.5,
              scale_start=1.0, scale_end=0.5, refinement="0:0.05, 0.2:0.5, 0.4:0.8")
    assert ks.validate_inputs(**ok) is True
    assert ks.validate_inputs() is True  # inputs fed by other nodes arrive as None
    assert ks.validate_inputs(**{**ok, "scale_factor": math.nan}).startswith("scale_factor = nan is not a finite")
    assert ks.validate_inputs(**{**ok, "cfg": math.inf}).startswith("cfg = inf is not a finite number")
    assert ks.validate_inputs(**{**ok, "scheduler": "nope"}).startswith("scheduler 'nope' is not one of")
    assert "Did you mean 'euler'?" in ks.validate_inputs(**{**ok, "sampler_name": "eulr"})
    assert ks.validate_inputs(**{**ok, "refinement": "0.2-0.5"}).startswith("refinement entry '0.2-0.5'")
    assert sampler.validate_inputs(sampler_name="bogus").startswith("sampler_name 'bogus' is not one of")
    opts = pack.options.AttendExciteOptions
    assert opts.validate_inputs(kernel_size=4).startswith("kernel_size = 4 is even")
    assert opts.validate_inputs(token_slots="bogus").startswith("token_slots 'bogus' is not one of")
    assert opts.validate_inputs(smoothing_sigma=math.nan).startswith("smoothing_sigma = nan")
    from comfyui_attend_excite.nodes.report import AttendExciteReport
    from comfyui_attend_excite.nodes.visualize import AttendExciteVisualize

    assert AttendExciteVisualize.validate_inputs(start_percent=0.8, end_percent=0.2).startswith(
        "start_percent (0.8) is after end_percent (0.2)")
    assert AttendExciteVisualize.validate_inputs(start_percent=0.0, end_percent=None) is True
    assert AttendExciteReport.validate_inputs(threshold=math.nan).startswith("threshold = nan")


def test_options_node_and_settings_given_the_earlier_way(pack):
    o = pack.options
    (options,) = o.AttendExciteOptions.execute(**{**vars(o.AEOptions()), "max_refinement_steps": 3}).args
    assert isinstance(options, o.AEOptions) and options.max_refinement_steps == 3
    node = pack.samplers.AttendExciteSampler
    assert o.resolve_options(node, None, {})["attention_blocks"] == "all"
    assert o.resolve_options(node, options, {"max_refinement_steps": 9})["max_refinement_steps"] == 3  # node wins
    assert o.resolve_options(node, None, {"max_refinement_steps": 9})["max_refinement_steps"] == 9
    # a prompt sent through the API with the earlier inputs on the sampler node itself
    hidden = types.SimpleNamespace(unique_id="5", prompt={"5": {"class_type": "AttendExciteSampler", "inputs": {
        "sampler_name": "euler", "record_maps": False, "attention_blocks": "down_mid", "kernel_size": "5"}}})
    clone = type("Clone", (node,), {"hidden": hidden})
    got = o.resolve_options(clone, None, {})
    assert (got["record_maps"], got["attention_blocks"], got["kernel_size"]) == (False, "down_mid", 5)
    hidden.prompt["5"]["inputs"]["kernel_size"] = 4
    with pytest.raises(ValueError, match="^kernel_size = 4 is even"):
        o.resolve_options(clone, None, {})
    hidden.prompt["5"]["inputs"]["kernel_size"] = ["9", 0]
    with pytest.raises(ValueError, match="^kernel_size is fed by another node.*Attend-and-Excite Options"):
        o.resolve_options(clone, None, {})
    with pytest.raises(TypeError, match="unexpected inputs"):
        o.resolve_options(node, None, {"smothing": True})


def test_sampler_node_builds_a_sampler_with_the_options(pack):
    import comfy.samplers

    o = pack.options
    options = o.AEOptions(max_refinement_steps=2, record_maps=False)
    wrapped, record = pack.samplers.AttendExciteSampler.execute("euler", 20.0, 0.5, 1.0, 0.5, "", None,
                                                                options).args
    assert isinstance(wrapped, comfy.samplers.KSAMPLER)
    params = wrapped.extra_options["ae_params"]
    assert (params.max_refinement_steps, params.record_maps, params.refinement) == (2, False, ())
