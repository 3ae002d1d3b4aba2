"""The gradient island on the newest ComfyUI cores (dynamic VRAM), with duck-typed stand-ins for its layers.

Under ``ModelPatcherDynamic`` every comfy-ops layer has ``comfy_cast_weights = True``. Large layers get their own
function lists and a slot in the virtual VRAM buffer (``_v``); their cast hands back a cached resident tensor made
under inference mode (an inference tensor that need not be a view). Small layers are loaded fully and keep the
class-level ``weight_function``/``bias_function`` lists: one list object shared by every such layer of every model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attention.guidance import loss_and_grad, recompute_blocks
from attention.weights import AutogradWeights, function_lists


def _ops():
    """A fresh stand-in for comfy.ops' ``Linear``, with its own class-level function lists (as one ComfyUI process
    has one ``CastWeightBiasOp``)."""

    class CastWeightBiasOp:
        comfy_cast_weights = False
        weight_function: list = []
        bias_function: list = []

    class Linear(nn.Linear, CastWeightBiasOp):
        def load_dynamic(self, paged: bool) -> None:
            """What ``ModelPatcherDynamic.load`` does to a layer: cast always; large layers get a VRAM slot and
            lists of their own, small ones keep the class-level lists."""
            self.comfy_cast_weights = True
            if paged:
                self._v = ("vbar", 0, self.weight.numel())
                self.weight_function, self.bias_function = [], []

        def _resident(self) -> tuple[torch.Tensor, torch.Tensor]:
            # the slot's tensors, cached by an earlier forward under inference mode: inference tensors, not views
            if not hasattr(self, "_v_weight"):
                with torch.inference_mode():
                    self._v_weight, self._v_bias = self.weight.detach().clone(), self.bias.detach().clone()
            return self._v_weight, self._v_bias

        def _cast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if hasattr(self, "_v"):
                w, b = self._resident()
            else:  # resident small layer: the weight itself, or a copy when functions follow (comfy's cast_to)
                w = self.weight.to(x.dtype, copy=bool(self.weight_function))
                b = self.bias.to(x.dtype, copy=bool(self.bias_function))
            for f in self.weight_function:
                w = f(w)
            for f in self.bias_function:
                b = f(b)
            return w, b

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                return nn.functional.linear(x, *self._cast(x))
            return super().forward(x)

    return Linear


def _dynamic_model(linear, sizes: list[tuple[int, int, bool]], seed: int = 0) -> nn.Sequential:
    """Layers ``(in, out, paged)`` with tanh between, created and loaded under inference mode as ComfyUI does."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        layers: list[nn.Module] = []
        for i, (n_in, n_out, paged) in enumerate(sizes):
            layer = linear(n_in, n_out)
            layer.load_dynamic(paged)
            layers += [layer] if i == 0 else [nn.Tanh(), layer]
        return nn.Sequential(*layers)


def _reference_grad(m: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``d sum(m(x)) / dx`` through plain layers holding normal copies of ``m``'s weights."""
    plain = nn.Sequential(*[nn.Linear(layer.in_features, layer.out_features) if isinstance(layer, nn.Linear)
                            else nn.Tanh() for layer in m])
    plain.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(plain(xr).sum(), xr)
    return g


def _forward(m):
    return lambda leaf: (m(leaf).sum(-1), leaf.sum(-1, keepdim=True))


def test_resident_inference_weights_are_cloned_and_give_the_exact_gradient():
    linear = _ops()
    m = _dynamic_model(linear, [(3, 6, True), (6, 4, False), (4, 2, True)])
    with torch.inference_mode():
        x = torch.randn(2, 3, dtype=torch.float32)
        m(x)  # a sampling step before the pass fills the cache
        cached = m[0]._v_weight
        assert cached.is_inference() and not cached._is_view()
        weights = AutogradWeights([m])
        assert weights.cast_modules == [m[0], m[2], m[4]] and weights.swaps == []
        _, _, grad = loss_and_grad(_forward(m), x, weights)
    assert torch.allclose(grad, _reference_grad(m, x), atol=1e-6)
    assert m[0]._v_weight is cached  # the cache itself is left alone


def test_recomputed_layers_cast_their_weights_again_in_the_backward():
    """Layers recomputed in the backward (``recompute``) fetch and clone their cast weights anew there: the weights
    are not kept from the forward, and the gradient is exact."""
    linear = _ops()
    m = _dynamic_model(linear, [(3, 6, True), (6, 4, False), (4, 2, True)])
    casts = []
    for layer in (m[0], m[2], m[4]):  # paged layers' own lists and the small layer's class-level one
        layer.weight_function.append(lambda w: casts.append(1) or w)

    def forward(leaf):
        with recompute_blocks([m[0], m[2], m[4]]):
            return _forward(m)(leaf)

    with torch.inference_mode():
        x = torch.randn(2, 3)
        m(x)
        casts.clear()
        _, _, grad = loss_and_grad(forward, x, AutogradWeights([m]))
    assert torch.allclose(grad, _reference_grad(m, x), atol=1e-6)
    assert len(casts) == 6  # the three layers cast in the forward, and again when recomputed
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in m)


def test_a_weight_function_that_clones_only_views_lets_the_cache_reach_autograd():
    """What the stand-in reproduces: the cached tensor is an inference tensor but no view."""
    linear = _ops()
    m = _dynamic_model(linear, [(3, 4, True)])

    def views_only(w: torch.Tensor) -> torch.Tensor:
        return w.clone() if w._is_view() else w

    m[0].weight_function.append(views_only)
    with torch.inference_mode():
        x = torch.randn(2, 3)
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
            loss_and_grad(_forward(m), x)


@pytest.mark.parametrize("raised", [None, ValueError, KeyboardInterrupt])
def test_a_shared_class_list_gets_one_entry_and_is_restored_exactly(raised):
    linear = _ops()
    shared_w, shared_b = linear.weight_function, linear.bias_function
    calls: list[int] = []

    def foreign(w: torch.Tensor) -> torch.Tensor:  # another node's entry, there before the pass
        calls.append(1)
        return w

    shared_w.append(foreign)
    first = _dynamic_model(linear, [(3, 4, False), (4, 4, False), (4, 2, True)])
    second = _dynamic_model(linear, [(3, 3, False)], seed=1)  # another model's small layer: the same lists
    assert first[0].weight_function is shared_w and second[0].weight_function is shared_w
    weights = AutogradWeights([first, second])
    lists = function_lists(weights.cast_modules)
    assert len(lists) == 4  # the shared pair and the paged layer's own pair, each once

    def forward(leaf):
        assert len(shared_w) == 2 and shared_w[0] is foreign and len(shared_b) == 1
        assert len(first[4].weight_function) == 1 and len(first[4].bias_function) == 1
        out = first(leaf).sum(-1) + second(leaf).sum(-1)
        if raised is not None:
            raise raised
        return out, leaf

    with torch.inference_mode():
        x = torch.randn(2, 3)
        if raised is None:
            _, _, grad = loss_and_grad(forward, x, weights)
        else:
            with pytest.raises(raised):
                loss_and_grad(forward, x, weights)
    if raised is None:
        assert torch.allclose(grad, _reference_grad(first, x) + _reference_grad(second, x), atol=1e-6)
        assert len(calls) == 3  # the foreign entry still ran, once per small layer
    assert shared_w == [foreign] and shared_w[0] is foreign and shared_b == []
    assert first[4].weight_function == [] and first[4].bias_function == []
    assert linear.weight_function is shared_w  # the class keeps its list object


def test_streamed_modules_tell_paged_and_patched_layers_from_resident_ones():
    linear = _ops()
    m = _dynamic_model(linear, [(3, 4, True), (4, 4, False), (4, 2, False)])
    m[4].weight_function = [lambda w: w]  # a LoRA patch applied on each forward
    weights = AutogradWeights([m])
    assert weights.streamed_modules(torch.device("cpu")) == [m[0], m[4]]
    # the same layers for a model computing on a GPU: weights still on the CPU are copied over on each forward
    assert weights.streamed_modules(torch.device("cuda")) == [m[0], m[2], m[4]]
