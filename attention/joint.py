"""Cross-attention maps of joint-attention transformers (Flux, SD3): the image-query x text-key block of one
attention over the concatenated ``[text, image]`` tokens, without the full attention matrix.

A joint block runs ``softmax(q k^T / sqrt(d))`` over all ``N = T + I`` keys (``T`` text, ``I`` image tokens). A&E
needs only the ``I x T`` block: the probability each image token gives each text token, normalised over **all**
keys (text and image), as the model's own attention is. Per head and query ``i``::

    p[i, t] = exp(s[i, t] - logsumexp_n s[i, n]),     s = q k^T / sqrt(d)

computed in chunks of image rows: a chunk's logits against all keys give its log-sum-exp, then only its text
columns are kept. Peak extra memory is one chunk's ``rows x N`` logits per head, not ``N x N``. In a gradient pass
the caller runs each chunk through :func:`attention.guidance.recompute_in_backward`, so what stays saved for the
backward is the ``I x T`` block and the shared ``q``, ``k``, not the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Logit elements (batch x heads x rows x keys, float32) per chunk: 2**26 = 256 MiB; Flux at 1024 px (24 heads,
# 4.6k keys): 600 image rows, 7 chunks per block.
CHUNK_ELEMENTS = 1 << 26


def split_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """``(B, heads, N, d)`` from ComfyUI's two attention layouts: ``(B, N, heads*d)`` or, with ``skip_reshape``
    (Flux), already ``(B, heads, N, d)``."""
    if skip_reshape:
        return t
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def _block(q: torch.Tensor, k: torch.Tensor, text: slice, bias: torch.Tensor | None) -> torch.Tensor:
    """``(B, h, rows, T)`` float32 text-column probabilities of the query rows ``q`` over all keys ``k``."""
    logits = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    return torch.exp(logits[..., text] - torch.logsumexp(logits, dim=-1, keepdim=True))


def mask_bias(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """ComfyUI's attention ``mask`` (bool: True = attend, or additive float; ``(N, N)``, ``(B, N, N)`` or
    ``(B, h, N, N)``) as an additive float32 bias for the query ``rows``, broadcastable to ``(B, h, rows, N)``."""
    if mask is None:
        return None
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    mask = mask[..., rows, :]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def text_probabilities(q: torch.Tensor, k: torch.Tensor, image: slice, text: slice,
                       mask: torch.Tensor | None = None, chunk_elements: int = CHUNK_ELEMENTS,
                       run_chunk: Callable | None = None) -> torch.Tensor:
    """Image-query x text-key probabilities of a joint attention, averaged over heads: ``(B, I, T)`` float32.

    Args:
        q, k: ``(B, heads, N, d)`` queries and keys of all tokens (after RoPE where the model applies it).
        image, text: the token ranges of the image and the text (``slice(T, N)`` and ``slice(0, T)`` for the
            text-first order, the other way round for image-first blocks).
        mask: the attention mask the block got, if any (see :func:`mask_bias`).
        chunk_elements: logit elements per chunk of image rows (bounds the extra memory).
        run_chunk: ``run_chunk(fn, *args)`` computes each chunk (default ``fn(*args)``; a gradient pass recomputes
            them in the backward).
    """
    b, h, n, _ = q.shape
    start, stop = image.indices(n)[:2]
    rows = max(1, chunk_elements // max(1, b * h * n))
    parts = []
    for a in range(start, stop, rows):
        z = min(a + rows, stop)
        args = (q[:, :, a:z], k, text, mask_bias(mask, slice(a, z)))
        part = _block(*args) if run_chunk is None else run_chunk(_block, *args)
        parts.append(part.mean(1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def apply_rope(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux's rotary position embedding, differentiable: each adjacent pair ``(x[2j], x[2j+1])`` of a head's
    channels is multiplied by the 2x2 matrix ``freqs[..., j, :, :]`` (``(B, 1, N, d/2, 2, 2)``, as the model's
    ``pe``). The model's own kernel may have no backward (ComfyUI >= 0.7 runs it as a custom operator)."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)

    return rotate(q), rotate(k)


def token_ranges(n: int, n_text: int, text_first: bool) -> tuple[slice, slice]:
    """``(image, text)`` token ranges of a joint attention over ``n`` tokens with ``n_text`` text tokens."""
    if not 0 < n_text < n:
        raise ValueError(f"a joint attention over {n} tokens cannot hold {n_text} text tokens")
    if text_first:
        return slice(n_text, n), slice(0, n_text)
    return slice(0, n - n_text), slice(n - n_text, n)
