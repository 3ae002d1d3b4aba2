"""The gradient island works under inference mode and always leaves the modules as it found them."""

from __future__ import annotations

import threading

import pytest
import torch
from fake_graph import FakeGraphBackend
from torch import nn

from attention.guidance import GraphedPass, NoGradientError, loss_and_grad
from attention.weights import AutogradWeights, autograd_safe_weights, comfy_op_modules


class CastLinear(nn.Linear):
    """A stand-in for a comfy.ops layer: casts a copy of its weights when weight functions are present."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.weight_function: list = []
        self.bias_function: list = []

    def forward(self, x):
        if self.weight_function or self.bias_function:
            w = self.weight.to(x.dtype, copy=True)
            b = self.bias.to(x.dtype, copy=True)
            for f in self.weight_function:
                w = f(w)
            for f in self.bias_function:
                b = f(b)
            return nn.functional.linear(x, w, b)
        return super().forward(x)


def _model():
    torch.manual_seed(0)
    with torch.inference_mode():  # weights created like ComfyUI's loader does: inference tensors
        m = nn.Sequential(CastLinear(3, 4), nn.Tanh(), CastLinear(4, 1))
    return m


def test_gradient_under_inference_mode_matches_plain_autograd():
    m = _model()
    with torch.inference_mode():
        x = torch.randn(2, 3)
        assert x.is_inference()
        loss, extra, grad = loss_and_grad(lambda leaf: (m(leaf).squeeze(-1), leaf.sum(-1, keepdim=True)), x,
                                          AutogradWeights([m], swap=False))
    ref_m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    ref_m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref_m(xr).sum(), xr)
    assert torch.allclose(grad, gr, atol=1e-6)
    assert loss.shape == (2,) and extra.shape == (2, 1)
    assert all(len(mod.weight_function) == 0 for mod in comfy_op_modules([m]))


def test_without_the_weight_trick_autograd_fails_on_inference_weights():
    m = _model()
    with torch.inference_mode():
        x = torch.randn(2, 3)
        with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
            loss_and_grad(lambda leaf: (m(leaf).squeeze(-1), leaf), x)


def test_weight_functions_are_removed_even_on_error_and_others_kept():
    m = _model()
    other = object()
    m[0].weight_function.append(other)
    with pytest.raises(KeyboardInterrupt):
        with autograd_safe_weights(comfy_op_modules([m])):
            assert len(m[0].weight_function) == 2 and len(m[2].bias_function) == 1
            raise KeyboardInterrupt
    assert m[0].weight_function == [other]
    assert m[0].bias_function == [] and m[2].weight_function == [] and m[2].bias_function == []


def test_run_weights_are_active_only_during_a_pass():
    m = _model()
    m[2].comfy_cast_weights = True  # a layer that casts anyway (low-VRAM style) keeps the weight-function trick
    originals = {n: p for n, p in m.named_parameters()}
    weights = AutogradWeights([m])
    assert m[2] in weights.cast_modules and [(s[0], s[1]) for s in weights.swaps] == [(m[0], "weight"),
                                                                                          (m[0], "bias")]
    with torch.inference_mode():
        x = torch.randn(2, 3)

        def forward(leaf):
            w = m[0].weight  # a normal tensor on the very same memory: no copy of the weight at all
            assert w is not originals["0.weight"] and not w.is_inference()
            assert w.data_ptr() == originals["0.weight"].data_ptr()
            assert len(m[2].weight_function) == 1
            return m(leaf).squeeze(-1), leaf

        loss, _, grad = loss_and_grad(forward, x, weights)
        assert grad.abs().sum() > 0
    assert {n: p for n, p in m.named_parameters()} == originals
    assert m[2].weight_function == []
    with pytest.raises(ValueError):
        with weights.active():
            raise ValueError
    assert {n: p for n, p in m.named_parameters()} == originals


def test_aliases_follow_a_parameter_replaced_between_passes():
    m = _model()
    weights = AutogradWeights([m])
    with torch.inference_mode():
        x = torch.randn(2, 3)
        _, _, g1 = loss_and_grad(lambda leaf: (m(leaf).squeeze(-1), leaf), x, weights)
        new = torch.nn.Parameter(m[2].weight * 2, requires_grad=False)  # as a weight patcher replacing it would
    m[2]._parameters["weight"] = new
    with torch.inference_mode():
        _, _, g2 = loss_and_grad(lambda leaf: (m(leaf).squeeze(-1), leaf), x, weights)
    assert torch.allclose(g2, 2 * g1, atol=1e-6) and m[2].weight is new


@pytest.mark.parametrize("by_reference", [True, False])
def test_aliased_and_copied_weights_give_the_exact_input_gradient(by_reference):
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
                             nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 3),
                             nn.LayerNorm(3))

    ref = build().double()
    with torch.inference_mode():
        inf = build().double()
        inf.load_state_dict(ref.state_dict())
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        weights = AutogradWeights([inf], by_reference=by_reference)
        assert len(weights.swaps) == 10  # weight and bias of 2 convs, 1 linear and 2 norms
        shared = [s[3].data_ptr() == s[2].data_ptr() for s in weights.swaps]
        assert shared == [by_reference] * 10
        _, _, grad = loss_and_grad(lambda leaf: ((inf(leaf) ** 2).sum(-1), leaf), x, weights)
    xr = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad((ref(xr) ** 2).sum(), xr)
    assert torch.allclose(grad, gr, atol=1e-12)


class _QuantLike(torch.Tensor):
    """A tensor subclass standing in for another pack's quantized weight type."""


def test_tensor_subclass_weights_are_copied_not_aliased():
    torch.manual_seed(0)
    with torch.inference_mode():
        m = nn.Linear(3, 2)
        m.weight = nn.Parameter(m.weight.detach().as_subclass(_QuantLike), requires_grad=False)
        x = torch.randn(2, 3)
    weights = AutogradWeights([m])
    stand_in = {s[1]: s[3] for s in weights.swaps}
    assert stand_in["weight"].data_ptr() != m.weight.data_ptr()  # copied
    assert stand_in["bias"].data_ptr() == m.bias.data_ptr()  # a plain tensor: aliased
    with torch.inference_mode():
        _, _, grad = loss_and_grad(lambda leaf: (m(leaf).sum(-1), leaf), x, weights)
    assert torch.allclose(grad, m.weight.as_subclass(torch.Tensor).sum(0).expand(2, 3))


def _graph_forward(m):
    # loss (B,) = sigma * m(x); maxima (B, 1) = x.sum (sigma may be an inference tensor: a clone may be saved)
    return lambda leaf, sigma: ((m(leaf).squeeze(-1) * sigma.clone()), leaf.sum(-1, keepdim=True))


@pytest.mark.parametrize("fail", [False, True])
def test_graphed_pass_reads_each_call_inputs_and_keeps_earlier_results(fail):
    m = _model()
    weights = AutogradWeights([m], swap=False)
    backend = FakeGraphBackend(fail=fail)
    graphed = GraphedPass(_graph_forward(m), weights, backend)
    with torch.inference_mode():
        xs = [torch.randn(2, 3) for _ in range(3)]
        sigmas = [torch.tensor(s) for s in (14.6, 3.0, 0.5)]
        got = [graphed(x, s) for x, s in zip(xs, sigmas)]
    for (loss, maxima, grad), x, s in zip(got, xs, sigmas):  # every call: its own x and sigma, results kept
        ref_loss, ref_max, ref_grad = loss_and_grad(lambda leaf, s=s: _graph_forward(m)(leaf, s), x, weights)
        assert torch.allclose(loss, ref_loss, atol=1e-6) and torch.allclose(grad, ref_grad, atol=1e-6)
        assert torch.equal(maxima, ref_max)
    assert not torch.allclose(got[1][2], got[2][2])  # different sigma: a different gradient, not a stale one
    assert backend.warm_ups == 1  # one warm-up pass, whose results were the first call's
    if fail:
        assert graphed.failure is not None and "capturing" in graphed.failure and graphed.graph is None
    else:
        assert graphed.failure is None and backend.graphs[0].replays == 2
    assert all(len(mod.weight_function) == 0 for mod in comfy_op_modules([m]))  # nothing left behind


def _in_no_grad_worker(m):
    """The model run as multi-GPU clones run it: in a worker thread under ``torch.no_grad``."""
    def forward(leaf):
        out: list[torch.Tensor] = []

        def work():
            with torch.no_grad():
                out.append(m(leaf))

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        return out[0].squeeze(-1), leaf
    return forward


def _without_backward(m):
    """An attention backend whose kernel has no backward: its output carries no autograd history."""
    def forward(leaf):
        h = m[0](leaf).unsqueeze(-1)  # (B, tokens, 1)
        with torch.no_grad():
            attn = torch.softmax(h @ h.transpose(-1, -2), -1) @ h
        return attn.sum((-1, -2)), leaf
    return forward


def _detached_latent(m):
    """Another node detaches the latent; a trainable layer of its own still makes the loss require grad."""
    trainable = nn.Linear(3, 3)

    def forward(leaf):
        return m(trainable(leaf.detach())).squeeze(-1), leaf
    return forward


@pytest.mark.parametrize("case", [_in_no_grad_worker, _without_backward, _detached_latent])
def test_no_gradient_for_the_latent_is_an_error_not_a_zero_step(case):
    m = _model()
    with torch.inference_mode():
        x = torch.randn(2, 3)
        with pytest.raises(NoGradientError, match="no gradient for the latent") as info:
            loss_and_grad(case(m), x, AutogradWeights([m], swap=False))
    message = str(info.value)
    assert "attention backend" in message and "no_grad" in message and "detaches the latent" in message
    assert all(len(mod.weight_function) == 0 for mod in comfy_op_modules([m]))  # left as found on error too


def test_a_loss_that_is_flat_in_the_latent_gives_a_zero_gradient():
    with torch.inference_mode():
        x = torch.randn(2, 3)

        def satisfied(leaf):  # the loss's clamp is inactive: every subject already attended
            maxima = leaf.abs() + 2.0
            return (1.0 - maxima).clamp(min=0.0).amax(-1), maxima

        loss, _, grad = loss_and_grad(satisfied, x)
    assert torch.equal(loss, torch.zeros(2)) and torch.equal(grad, torch.zeros(2, 3))


def test_graphed_pass_raises_no_gradient_instead_of_falling_back():
    m = _model()
    graphed = GraphedPass(lambda leaf, sigma: _in_no_grad_worker(m)(leaf), AutogradWeights([m], swap=False),
                          FakeGraphBackend())
    with torch.inference_mode():
        x, sigma = torch.randn(2, 3), torch.tensor(1.0)
        with pytest.raises(NoGradientError):
            graphed(x, sigma)
        with pytest.raises(NoGradientError):
            graphed.capture(x, sigma)
    assert graphed.failure is None and graphed.graph is None
