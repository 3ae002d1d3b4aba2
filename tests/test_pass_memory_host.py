"""Out of memory, non-finite steps and the gradient pass kept between runs, in the real host (in-process, tiny SD1.5
checkpoint, 16x16 latents, 4 steps: 2 guided).

- An allocation failure (``torch.OutOfMemoryError``, injected: a stand-in graph backend whose warm-up or capture
  fails, a model layer that fails in a gradient pass once or always) is not the end of the run: A&E frees its
  graph, empties the cache and retries the pass eagerly; the result is the eager sampler's. When the retry fails
  too, the error is an out-of-memory error whose message says what to change. Nothing stays patched, and the next
  run works.
- A gradient that is not finite for one image skips that image's update (its latent is the unguided one), with a
  warning and the steps in the record and the report.
- The captured pass is kept with the model: a second run with the same model, shape and pass settings replays it
  from its first pass (no warm-up, no capture); another shape or setting captures anew; unloading the model
  releases it. The CPU stand-in backend's replay re-runs the captured pass, so results are compared with eager runs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from fake_graph import FakeGraphBackend
from host_helpers import load_host, no_leftovers

pytestmark = [pytest.mark.host, pytest.mark.slow]

PROMPT, SUBJECTS = "a photo of a cat and a frog", "cat, frog"
STEPS = 4


@pytest.fixture(scope="module")
def host(comfy_inprocess, tiny_checkpoint):
    return load_host(comfy_inprocess, tiny_checkpoint, PROMPT, SUBJECTS)


@pytest.fixture()
def fresh(host):
    """Each test starts with no pass kept from earlier tests (unloading the model releases it)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    yield
    comfy.model_management.unload_all_models()


@pytest.fixture()
def empties(monkeypatch):
    """Counts ComfyUI's ``soft_empty_cache`` calls."""
    import comfy.model_management

    calls = []
    original = comfy.model_management.soft_empty_cache

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "soft_empty_cache", counted)
    return calls


def params(**kw):
    from comfyui_attend_excite.attention.schedule import parse_refinement
    from comfyui_attend_excite.nodes.sampling import AEParams

    return replace(AEParams(refinement=parse_refinement("0:0.99"), max_refinement_steps=2), **kw)


def sample(host, caplog, p, backend=None, batch=1, side=16, model=None, positive=None, seed=0):
    """SamplerCustom with A&E (``p``) from a zero latent: ``(samples, record, log record of the run)``."""
    import comfy.sample
    import comfy.samplers
    from comfyui_attend_excite.attention.record import AttentionRecord
    from comfyui_attend_excite.nodes.sampling import make_sampler

    model = model or host["model"]
    record = AttentionRecord()
    sampler = make_sampler(p, record)
    sampler.extra_options["ae_graph_backend"] = backend
    caplog.clear()
    with torch.inference_mode():
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
        latent = torch.zeros(batch, 4, side, side)
        out = comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, seed), 5.0, sampler, sigmas,
                                         positive or host["pos"], host["neg"], latent, disable_pbar=True, seed=seed)
    runs = [r for r in caplog.records if hasattr(r, "ae_passes")]
    return out, record, runs[-1] if runs else None


def kept(host):
    from comfyui_attend_excite.nodes.graph_cache import find_cache

    cache = find_cache(host["model"])
    return None if cache is None else cache.entry


class FailingLayer:
    """A forward pre-hook on a UNet layer that raises ``torch.OutOfMemoryError`` in gradient passes (autograd on):
    at the pass numbers in ``at`` (1-based), or in every pass from the first of them with ``always``."""

    def __init__(self, host, at=(1,), always=False):
        self.at, self.always, self.calls = set(at), always, 0
        self.handle = host["model"].model.diffusion_model.input_blocks[0][0].register_forward_pre_hook(self)

    def __call__(self, module, args):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.at or (self.always and self.calls >= min(self.at)):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.88 GiB (injected)")

    def remove(self):
        self.handle.remove()


# ---- out of memory ----

@pytest.mark.parametrize("where", ["warm-up", "capture", "capture-chained"])
def test_graph_out_of_memory_frees_it_and_runs_eagerly(host, caplog, fresh, empties, where):
    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    eager, _, eager_run = sample(host, caplog, params(cuda_graph=False))
    backend = FakeGraphBackend(oom=where)
    out, _, run = sample(host, caplog, params(), backend)
    assert torch.allclose(out, eager, atol=1e-6), float((out - eager).abs().max())
    assert run.ae_passes == eager_run.ae_passes and not run.ae_graphed and backend.replays == 0
    assert empties and kept(host) is None  # cache emptied, nothing kept
    if where == "warm-up":  # the pass itself failed: retried eagerly
        assert run.ae_retries == 1 and backend.graphs == []
        assert "the gradient pass ran out of memory" in caplog.text and "retries it eagerly" in caplog.text
    else:  # the first pass stands; the later passes run eagerly
        assert run.ae_retries == 0 and len(backend.graphs) == 1
        assert "the CUDA graph capture ran out of memory (OutOfMemoryError: " in caplog.text
    assert no_leftovers([host["model"].model])
    again, _, run = sample(host, caplog, params(), FakeGraphBackend())  # the next run captures and replays
    assert run.ae_graphed and torch.allclose(again, eager, atol=1e-6)


@pytest.mark.parametrize("graph", [False, True])
def test_a_pass_that_runs_out_of_memory_once_is_retried_eagerly(host, caplog, fresh, empties, graph):
    """Eager: the second pass fails once. Graph: the second pass (the first replay; the layer's second call was the
    capture) fails: the graph is freed and the run continues eagerly."""
    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    eager, eager_rec, eager_run = sample(host, caplog, params(cuda_graph=False))
    layer = FailingLayer(host, at=(3,) if graph else (2,))
    try:
        out, rec, run = sample(host, caplog, params(cuda_graph=graph), FakeGraphBackend() if graph else None)
    finally:
        layer.remove()
    assert run.ae_retries == 1 and run.ae_passes == eager_run.ae_passes and empties
    assert torch.allclose(out, eager, atol=1e-6), float((out - eager).abs().max())
    assert [len(v) for v in rec.losses.values()] == [len(v) for v in eager_rec.losses.values()]
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 3.88 GiB (injected)" in caplog.text
    assert kept(host) is None and no_leftovers([host["model"].model])


def test_a_pass_that_always_runs_out_of_memory_fails_with_what_to_change(host, caplog, fresh, empties):
    from comfyui_attend_excite.nodes.pass_memory import GradientPassOutOfMemory

    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    layer = FailingLayer(host, at=(1,), always=True)
    try:
        with pytest.raises(GradientPassOutOfMemory) as info:
            sample(host, caplog, params(), FakeGraphBackend(), batch=2)
    finally:
        layer.remove()
    assert isinstance(info.value, torch.OutOfMemoryError)  # ComfyUI's executor handles it as one (unloads models)
    message = str(info.value)
    for part in ("also when retried eagerly with every transformer block recomputed", "attention_blocks = down_mid",
                 "attention_resolution = 16", "a smaller image or batch (now 2)", "latent 16x16", "attention level 4x4",
                 "3.88 GiB (injected)"):
        assert part in message, message
    assert layer.calls == 2 and len(empties) >= 2  # the pass and its eager retry; freed before and after the retry
    assert kept(host) is None and no_leftovers([host["model"].model])
    out, _, run = sample(host, caplog, params(), FakeGraphBackend())  # the next run works, graph and all
    assert torch.isfinite(out).all() and run.ae_graphed


def test_loss_and_grad_out_of_memory_in_every_eager_pass_fails_too(host, caplog, fresh, monkeypatch):
    """The same through the pass function itself (before any layer runs), with no graph: down_mid runs already, so
    the message asks for the finer level and a smaller image only."""
    from comfyui_attend_excite.nodes import gradient_pass
    from comfyui_attend_excite.nodes.pass_memory import GradientPassOutOfMemory

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(gradient_pass, "loss_and_grad", no_memory)
    with pytest.raises(GradientPassOutOfMemory) as info:
        sample(host, caplog, params(cuda_graph=False, attention_blocks="down_mid"))
    message = str(info.value)
    assert "attention_blocks = down_mid on" not in message and "attention_resolution = 16 with down_mid" in message
    assert "a smaller image;" in message and no_leftovers([host["model"].model])
    monkeypatch.undo()
    out, _, _ = sample(host, caplog, params(cuda_graph=False))
    assert torch.isfinite(out).all()


# ---- non-finite steps ----

@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_gradient_skips_that_images_update(host, caplog, fresh, monkeypatch, value):
    """Image 2's gradient is forced to NaN / inf in every pass: its latent is exactly plain sampling's, image 1's is
    the A&E result it gets unforced; warnings and the record (and the report) name the skipped steps."""
    from comfyui_attend_excite.nodes import gradient_pass
    from comfyui_attend_excite.nodes.report import build_report, skipped_text

    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    p = params(cuda_graph=False)
    plain, _, _ = sample(host, caplog, replace(p, scale_factor=0.0), batch=2)
    guided, guided_rec, _ = sample(host, caplog, p, batch=2)
    original = gradient_pass.loss_and_grad

    def second_image_not_finite(*args, **kwargs):
        loss, maxima, grad = original(*args, **kwargs)
        grad = grad.clone()
        grad[1, 0, 0, 0] = value
        return loss, maxima, grad

    monkeypatch.setattr(gradient_pass, "loss_and_grad", second_image_not_finite)
    out, rec, run = sample(host, caplog, p, batch=2)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[1], plain[1], atol=1e-6), float((out[1] - plain[1]).abs().max())
    assert torch.allclose(out[0], guided[0], atol=1e-5), float((out[0] - guided[0]).abs().max())
    assert not torch.allclose(out[1], guided[1], atol=1e-3)  # A&E moves image 2 when it is not forced
    assert rec.skipped_steps == [[], [0, 1]] and guided_rec.skipped_steps == [[], []]
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "was not finite" in r.getMessage()]
    assert len(warnings) == 1 and "image 2: the A&E update of 2 guided step(s)" in warnings[0].getMessage()
    report = build_report(rec, 0.2)
    assert report["skipped_steps"] == [[], [0, 1]]
    assert skipped_text(report) == ("image 2: A&E update skipped at steps 1, 2 (not finite: NaN/inf); the unguided "
                                    "latent was kept there.")


# ---- transformer blocks recomputed in the backward ----

@pytest.mark.parametrize("graph", [False, True])
def test_recomputed_blocks_sample_as_stored_ones(host, caplog, fresh, graph):
    """``recompute = blocks``: the same losses and latents as a stored pass (eager, or captured and replayed), the
    blocks' hooks gone afterwards; ``auto`` leaves the tiny model's passes stored."""
    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    stored, stored_rec, stored_run = sample(host, caplog, params(cuda_graph=False, recompute="off"))
    auto, _, auto_run = sample(host, caplog, params(cuda_graph=False))
    out, rec, run = sample(host, caplog, params(cuda_graph=graph, recompute="blocks"),
                           FakeGraphBackend() if graph else None)
    assert run.ae_recomputed and not stored_run.ae_recomputed and not auto_run.ae_recomputed
    assert "transformer blocks recomputed in the backward" in run.getMessage()
    assert run.ae_passes == stored_run.ae_passes and run.ae_graphed == graph
    assert torch.allclose(out, stored, atol=1e-6), float((out - stored).abs().max())
    assert torch.equal(auto, stored)
    for step, losses in stored_rec.losses.items():
        assert torch.allclose(torch.as_tensor(rec.losses[step]), torch.as_tensor(losses), atol=1e-6)
    assert no_leftovers([host["model"].model])


def test_a_retried_pass_recomputes_the_blocks(host, caplog, fresh, empties):
    """The lean form of a pass that ran out of memory recomputes the blocks, also with ``recompute = off``."""
    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    eager, _, _ = sample(host, caplog, params(cuda_graph=False, recompute="off"))
    layer = FailingLayer(host, at=(2,))
    try:
        out, _, run = sample(host, caplog, params(cuda_graph=False, recompute="off"))
    finally:
        layer.remove()
    assert run.ae_retries == 1 and run.ae_recomputed
    assert torch.allclose(out, eager, atol=1e-6) and no_leftovers([host["model"].model])


def test_auto_recomputes_the_first_blocks_until_the_rest_fits_the_budget(host):
    """``recompute = auto``: :data:`STORED_PER_VALUE` values per token and channel of each transformer block up to
    the last one read, at its level's grid; the first blocks are recomputed until the rest keeps at most
    :data:`RECOMPUTE_BUDGET` of the weight bytes."""
    from comfyui_attend_excite.nodes.capture import transformer_blocks
    from comfyui_attend_excite.nodes.families import STORED_PER_VALUE, UNetReader
    from comfyui_attend_excite.nodes.gradient_pass import RECOMPUTE_BUDGET, recompute_count

    dm = host["model"].model.diffusion_model
    reader = UNetReader(dm, params(), (32, 24))
    run = list(transformer_blocks(dm).values())
    run = run[: [m for m, _ in run].index(reader.recomputed_blocks(reader.keys)[-1]) + 1]
    assert reader.recomputed_blocks(reader.keys) == [m for m, _ in run] and len(run) > 2
    assert reader.stored_block_bytes(reader.keys, 3, 2) == [
        STORED_PER_VALUE * 3 * 2 * math.ceil(32 / 2**level) * math.ceil(24 / 2**level) * m.norm1.normalized_shape[-1]
        for m, level in run]
    weights = 100 / RECOMPUTE_BUDGET  # a budget of 100 bytes
    assert recompute_count("auto", [60, 30, 20, 10], weights) == 1  # 60 + 30 + 20 + 10 > 100; 30 + 20 + 10 fit
    assert recompute_count("auto", [50, 30, 20], weights) == 0
    assert recompute_count("auto", [120, 150], weights) == 2
    assert recompute_count("blocks", [1, 1, 1], weights) == 3 and recompute_count("off", [500], weights) == 0


# ---- the pass kept between runs ----

def test_a_second_run_replays_the_kept_pass_without_warm_up_or_capture(host, caplog, fresh):
    """Same model, shape and settings (another prompt of the same length, another seed and scale): the first pass is
    a replay of the graph the first run captured, with the second prompt's cond copied in; the result is the eager
    one. A clone of the model (shared weights) finds it too."""
    from comfyui_attend_excite.nodes.encode import encode_subjects

    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    backend = FakeGraphBackend()
    first, _, run1 = sample(host, caplog, params(), backend)
    assert (backend.warm_ups, len(backend.graphs), backend.replays) == (1, 1, run1.ae_passes - 1)
    assert kept(host) is not None and not run1.ae_graph_reused
    with torch.inference_mode():
        dog, _, _ = encode_subjects(host["clip"], "a photo of a dog and a frog", "dog, frog")
    second = params(scale_factor=10.0)
    eager, _, _ = sample(host, caplog, replace(second, cuda_graph=False), positive=dog, seed=7)
    out, _, run2 = sample(host, caplog, second, backend, positive=dog, seed=7)
    assert run2.ae_graph_reused and run2.ae_graphed and "kept from an earlier run" in caplog.text
    assert (backend.warm_ups, len(backend.graphs)) == (1, 1)  # no warm-up, no capture
    assert backend.replays == run1.ae_passes - 1 + run2.ae_passes  # every pass of the second run, the first too
    assert torch.allclose(out, eager, atol=1e-6), float((out - eager).abs().max())
    _, _, run3 = sample(host, caplog, second, FakeGraphBackend(), model=host["model"].clone(), positive=dog)
    assert run3.ae_graph_reused and no_leftovers([host["model"].model])


@pytest.mark.parametrize("change", [{"side": 24}, {"batch": 2}, {"kernel_size": 5}, {"attention_blocks": "down_mid"},
                                    {"recompute": "blocks"}])
def test_another_shape_or_setting_captures_anew(host, caplog, fresh, change):
    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    backend = FakeGraphBackend()
    sample(host, caplog, params(), backend)
    shape = {k: v for k, v in change.items() if k in ("side", "batch")}
    p = params(**{k: v for k, v in change.items() if k not in shape})
    eager, _, _ = sample(host, caplog, replace(p, cuda_graph=False), **shape)
    out, _, run = sample(host, caplog, p, backend, **shape)
    assert not run.ae_graph_reused and run.ae_graphed and (backend.warm_ups, len(backend.graphs)) == (2, 2)
    assert torch.allclose(out, eager, atol=1e-6)
    assert kept(host).graphed.graph is backend.graphs[-1]  # the new pass replaced the old one
    _, _, again = sample(host, caplog, p, backend, **shape)
    assert again.ae_graph_reused and backend.warm_ups == 2


def test_unloading_the_model_releases_the_kept_pass(host, caplog, fresh):
    import comfy.model_management

    caplog.set_level("INFO", logger="comfyui_attend_excite.nodes")
    backend = FakeGraphBackend()
    sample(host, caplog, params(), backend)
    entry = kept(host)
    assert entry is not None
    graph = entry.graphed
    del entry
    comfy.model_management.unload_all_models()  # ComfyUI's unload (also what it does after an out-of-memory error)
    assert kept(host) is None
    _, _, run = sample(host, caplog, params(), backend)
    assert not run.ae_graph_reused and backend.warm_ups == 2 and kept(host).graphed is not graph


def test_the_release_callback_is_not_a_foreign_patch(host):
    """The kept pass's ON_DETACH callback reaches the run's transformer_options like any patcher callback; the graph
    blockers skip it (other nodes' callbacks still count)."""
    from comfyui_attend_excite.nodes.graph_cache import KEY, others_entries

    registry = {"on_detach_after": {KEY: [print]}, "on_clone": {}}
    assert others_entries(registry) == {"on_detach_after": {}, "on_clone": {}}
    registry["on_detach_after"]["other"] = [print]
    assert others_entries(registry) == {"on_detach_after": {"other": [print]}, "on_clone": {}}
