"""Joint-attention maps (Flux, SD3) and the flow-matching step, on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from attention.guidance import clone_saved_activations, recompute_in_backward
from attention.inputs import joint_blocks_problem, parse_joint_blocks
from attention.joint import mask_bias, split_heads, text_probabilities, token_ranges
from attention.step import step_scale, x_space_step
from attention.tokens import Token, sentencepiece_as_bpe, token_table, words


def _explicit(q, k, image, text, mask=None):
    """The reference: the full softmax over the concatenated keys, restricted to the text columns."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits + mask
    return torch.softmax(logits, dim=-1)[:, :, image, text].mean(1)


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("chunk", [1 << 24, 7])  # one chunk, and several chunks of one image row each
def test_text_block_equals_explicit_softmax(text_first, chunk):
    g = torch.Generator().manual_seed(0)
    b, h, n_text, n_img, d = 2, 3, 5, 6, 4
    q = torch.randn(b, h, n_text + n_img, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(b, h, n_text + n_img, d, generator=g, dtype=torch.float64) * 2
    image, text = token_ranges(n_text + n_img, n_text, text_first)
    got = text_probabilities(q, k, image, text, chunk_elements=chunk)
    want = _explicit(q.float(), k.float(), image, text)
    assert got.shape == (b, n_img, n_text)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the text columns hold part of each row's probability, never more than all of it
    assert bool((got.sum(-1) < 1).all())


def test_token_ranges_by_hand():
    assert token_ranges(10, 4, True) == (slice(4, 10), slice(0, 4))
    assert token_ranges(10, 4, False) == (slice(0, 6), slice(6, 10))
    with pytest.raises(ValueError, match="cannot hold"):
        token_ranges(4, 4, True)


def test_mask_is_honoured():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    allowed = torch.ones(6, 6, dtype=torch.bool)
    allowed[:, 1] = False  # no query may attend to text token 1
    got = text_probabilities(q, k, slice(2, 6), slice(0, 2), mask=allowed)
    assert torch.all(got[..., 1] == 0)
    torch.testing.assert_close(got, _explicit(q, k, slice(2, 6), slice(0, 2), mask_bias(allowed, slice(0, 6))[0]))


def test_split_heads_layouts():
    t = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    assert split_heads(t, 2, False).shape == (2, 2, 3, 4)
    assert torch.equal(split_heads(t, 2, False)[0, 1, 0], t[0, 0, 4:])
    four = torch.zeros(2, 2, 3, 4)
    assert split_heads(four, 2, True) is four


def test_gradient_reaches_q_and_k_through_the_chunks():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    image, text = slice(3, 9), slice(0, 3)
    got = text_probabilities(q, k, image, text, chunk_elements=2 * 9, run_chunk=recompute_in_backward)
    got[..., 1].max().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    _explicit(q, k, image, text)[..., 1].max().backward()
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gk, k.grad)
    assert gq.abs().sum() > 0


def test_flow_step_scale_by_hand():
    assert step_scale(torch.tensor(0.0), flow=True).item() == 1.0
    assert step_scale(torch.tensor(1.0), flow=True).item() == 1.0
    assert step_scale(torch.tensor(0.5), flow=True).item() == 0.5
    assert step_scale(torch.tensor(2.0), 1.0).item() == 5.0  # the EDM one is unchanged
    x = torch.zeros(1, 1, 1, 1)
    assert x_space_step(x, torch.ones_like(x), 2.0, torch.tensor(0.5), flow=True).item() == pytest.approx(-1.0)


def test_flow_step_equals_the_papers_step_on_the_vp_latent():
    """The x-space step equals stepping z = x / s (the VP latent with the flow latent's signal-to-noise ratio) by
    ``-alpha grad_z L`` and mapping back, for any differentiable loss."""
    torch.manual_seed(3)
    sigma, alpha = torch.tensor(0.3), 0.7
    s = torch.sqrt((1 - sigma) ** 2 + sigma**2)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)

    def loss(v):
        return (v.sin() * torch.arange(36, dtype=torch.float64).reshape(1, 4, 3, 3)).sum()

    xl = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(loss(xl), xl)
    z = (x / s).requires_grad_(True)
    (gz,) = torch.autograd.grad(loss(z * s), z)
    want = (z.detach() - alpha * gz) * s
    torch.testing.assert_close(x_space_step(x, gx, alpha, sigma, flow=True), want, rtol=1e-6, atol=1e-6)  # fp32 step


def test_joint_blocks_parsing():
    assert parse_joint_blocks("auto") == "auto"
    assert parse_joint_blocks(" Double ") == "double"
    assert parse_joint_blocks("6-8, 2, 7") == (2, 6, 7, 8)
    assert joint_blocks_problem("6-11") is None
    for bad in ("", "6-", "x", "9-3"):
        assert "joint_blocks" in joint_blocks_problem(bad)


def test_sentencepiece_pieces_read_as_words():
    sp = "\u2581"
    pieces = [Token(0, 3, sp), Token(1, 9, "a"), Token(2, 1131, sp + "red"), Token(3, 11949, sp + "café"),
              Token(4, 226, "x"), Token(5, 32, "o"), Token(6, 40, sp + "cat")]
    bpe = sentencepiece_as_bpe(pieces)
    assert [w for w, _ in words(bpe)] == ["a", "red", "caféxo", "cat"]
    table = token_table(bpe, excited=[6])
    assert "- 3: café (caféxo)" in table and table.endswith("- 6: cat  ← excited")


def test_chunks_keep_the_shared_keys_by_reference_in_a_cloning_pass():
    """Inside a pass that clones saved activations (Flux), the chunks recomputed in the backward must not copy all
    keys once per chunk. A cloning hook like :func:`clone_saved_activations` counts the key copies it makes: none
    with :func:`recompute_in_backward`, one per chunk with a bare checkpoint."""
    b, h, n, d, n_text = 1, 4, 272, 8, 16
    leaf_q = torch.randn(b, h, n, d, requires_grad=True)
    leaf_k = torch.randn(b, h, n, d, requires_grad=True)
    q, k = leaf_q * 1, leaf_k * 1  # activations in the graph, as a model's q and k are

    def key_copies(run_chunk) -> int:
        copies = []

        def clone(t):
            if t.requires_grad and t.shape == k.shape:
                copies.append(1)
            return t.clone() if t.requires_grad else t

        with torch.autograd.graph.saved_tensors_hooks(clone, lambda t: t):
            p = text_probabilities(q, k, slice(n_text, n), slice(0, n_text), chunk_elements=b * h * n * 16,
                                   run_chunk=run_chunk)
        (gk,) = torch.autograd.grad(p.sum(), leaf_k, retain_graph=True)
        assert gk.abs().sum() > 0
        return len(copies)

    def bare(fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    assert key_copies(bare) >= 16  # 256 image rows, 16 per chunk
    assert key_copies(recompute_in_backward) == 0
    with clone_saved_activations():  # the pack's own cloning context: the same result
        p = text_probabilities(q, k, slice(n_text, n), slice(0, n_text), run_chunk=recompute_in_backward)
    torch.testing.assert_close(p, text_probabilities(q, k, slice(n_text, n), slice(0, n_text)))
