"""Attend-and-Excite loss on aggregated cross-attention maps (Chefer et al. 2023, Sec. 3; official ``_compute_loss``).

Shapes: ``B`` batch, ``H, W`` attention resolution, ``T`` key slots (77 per CLIP chunk), ``S`` subjects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .smoothing import smooth_maps

CHUNK = 77
SLOT_MODES = ("all_but_bos_last", "prompt")


def slot_mask(num_keys: int, mode: str, prompt_positions: Sequence[int] = ()) -> torch.Tensor:
    """Boolean ``(T,)`` mask of the key slots that enter the x100 re-softmax.

    ``all_but_bos_last``: every slot except each chunk's start token (position 0) and last slot (76). For one
    77-token chunk this is slots 1..75, i.e. the official SD1.4 code's and diffusers' ``[:, :, 1:-1]`` (prompt tokens,
    end token and end-token padding). ``prompt``: only the prompt's own token slots (the official SD2.1 mode,
    ``normalize_eot``), i.e. no start, end or padding slots; the mode for T5 streams (Flux, SD3), which have no
    start token and 77-token chunks.
    """
    if num_keys <= 0:
        raise ValueError(f"num_keys must be positive, got {num_keys}")
    mask = torch.zeros(num_keys, dtype=torch.bool)
    if mode == "all_but_bos_last":
        if num_keys % CHUNK:
            raise ValueError(f"token_slots all_but_bos_last reads 77-token CLIP chunks; this prompt has {num_keys} "
                             f"keys (a T5 stream). Use token_slots auto or prompt.")
        mask[:] = True
        mask[0::CHUNK] = False
        mask[CHUNK - 1 :: CHUNK] = False
    elif mode == "prompt":
        if not prompt_positions:
            raise ValueError("slot mode 'prompt' needs the prompt's token positions")
        mask[list(prompt_positions)] = True
    else:
        raise ValueError(f"unknown token slot mode {mode!r}; choose one of {SLOT_MODES}")
    return mask


def resoftmax(attn: torch.Tensor, slots: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """Keep the selected slots and re-normalise them: ``softmax(temperature * A[..., slots])`` in float32.

    Args:
        attn: ``(..., T)`` attention probabilities.
        slots: ``(T,)`` boolean mask from :func:`slot_mask`.
    Returns:
        ``(..., slots.sum())`` float32.
    """
    # slices of the contiguous runs of selected slots, found on the host: no index tensor to copy to the device (a
    # blocking copy that waits for the queued work), no mask to save for backward (one made under inference mode
    # cannot be saved)
    runs = slot_runs(slots)
    parts = [attn[..., a:b] for a, b in runs]
    picked = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return torch.softmax(picked.float() * temperature, dim=-1)


def slot_runs(slots: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, stop)`` spans of the consecutive ``True`` entries of the ``(T,)`` mask, in order."""
    flags = [bool(v) for v in slots.cpu().tolist()]
    runs: list[tuple[int, int]] = []
    for i, on in enumerate(flags):
        if on and (not runs or runs[-1][1] != i):
            runs.append((i, i + 1))
        elif on:
            runs[-1] = (runs[-1][0], i + 1)
    if not runs:
        raise ValueError("the slot mask selects no key slot")
    return runs


def subject_columns(subjects: Sequence[int], slots: torch.Tensor) -> list[int]:
    """Positions of the subject key indices inside the slot selection (the reference's ``index - 1`` shift)."""
    if not subjects:
        raise ValueError("at least one subject token index is needed")
    cols = torch.cumsum(slots.long(), 0) - 1
    out = []
    for s in subjects:
        if s < 0 or s >= slots.numel() or not bool(slots[s]):
            raise ValueError(f"subject token index {s} is not among the slots that enter the loss")
        out.append(int(cols[s]))
    return out


def subject_maps(
    attn: torch.Tensor,
    subjects: Sequence[int],
    slots: torch.Tensor,
    smoothing: bool = True,
    kernel_size: int = 3,
    smoothing_sigma: float = 0.5,
    temperature: float = 100.0,
) -> torch.Tensor:
    """The maps A&E takes the maximum of: re-softmaxed (and smoothed) subject maps, ``(B, H, W, T) -> (B, S, H, W)``.

    Args:
        attn: ``(B, H, W, T)`` cross-attention probabilities averaged over heads and layers.
        subjects: key indices (global, start token = 0) of the subject tokens.
        slots: ``(T,)`` boolean slot mask (kept on the CPU: it is read on the host).
    Returns:
        ``(B, S, H, W)`` float32. No host-to-device copy and no host sync: safe inside a CUDA graph.
    """
    if attn.ndim != 4:
        raise ValueError(f"attn must be (B, H, W, T), got shape {tuple(attn.shape)}")
    b, h, w, _ = attn.shape
    cols = subject_columns(subjects, slots)
    probs = resoftmax(attn, slots, temperature)
    maps = torch.stack([probs[..., c] for c in cols], dim=1)  # slices: no index tensor to copy to the device
    if smoothing:
        maps = smooth_maps(maps.reshape(b * len(cols), h, w), kernel_size, smoothing_sigma).reshape(b, len(cols), h, w)
    return maps


def subject_max_attention(attn: torch.Tensor, subjects: Sequence[int], slots: torch.Tensor,
                          **options) -> torch.Tensor:
    """Per-subject maximum ``m_s`` of :func:`subject_maps` (``options``: its keyword arguments ``smoothing``,
    ``kernel_size``, ``smoothing_sigma``, ``temperature``): ``(B, H, W, T) -> (B, S)`` float32."""
    return subject_maps(attn, subjects, slots, **options).flatten(2).amax(dim=-1)


def ae_loss(maxima: torch.Tensor) -> torch.Tensor:
    """``L = max_s max(0, 1 - m_s)`` per sample: the most neglected subject drives the step. ``(B, S) -> (B,)``."""
    return (1.0 - maxima).clamp(min=0.0).amax(dim=-1)


def attend_excite_objective(attn: torch.Tensor, subjects: Sequence[int], slots: torch.Tensor,
                            **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The A&E objective of aggregated maps: ``(loss (B,), maxima (B, S))`` = :func:`ae_loss` of
    :func:`subject_max_attention` (``options`` as there). Differentiable; no host sync."""
    maxima = subject_max_attention(attn, subjects, slots, **options)
    return ae_loss(maxima), maxima


def below_threshold(maxima: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B,)``: the samples whose weakest subject's max attention is still below ``threshold`` (iterative
    refinement continues for them). ``maxima``: ``(B, S)``."""
    return maxima.amin(dim=-1) < threshold
