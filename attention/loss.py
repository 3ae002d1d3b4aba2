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
    ``normalize_eot``), i.e. no start, end or padding slots.
    """
    if num_keys <= 0 or num_keys % CHUNK:
        raise ValueError(f"num_keys must be a positive multiple of {CHUNK}, got {num_keys}")
    mask = torch.zeros(num_keys, dtype=torch.bool)
    if mode == "all_but_bos_last":
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
    # index_select with freshly built indices (a mask made under inference mode cannot be saved for backward),
    # found on the CPU: nonzero on a GPU tensor would wait for the device
    idx = torch.nonzero(slots.cpu()).flatten().to(attn.device)
    return torch.softmax(attn.float().index_select(-1, idx) * temperature, dim=-1)


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


def subject_max_attention(
    attn: torch.Tensor,
    subjects: Sequence[int],
    slots: torch.Tensor,
    smooth: bool = True,
    kernel_size: int = 3,
    sigma: float = 0.5,
    temperature: float = 100.0,
) -> torch.Tensor:
    """Per-subject maximum of the re-softmaxed (and smoothed) attention map.

    Args:
        attn: ``(B, H, W, T)`` cross-attention probabilities averaged over heads and layers.
        subjects: key indices (global, start token = 0) of the subject tokens.
        slots: ``(T,)`` boolean slot mask.
    Returns:
        ``(B, S)`` float32 maxima ``m_s``.
    """
    if attn.ndim != 4:
        raise ValueError(f"attn must be (B, H, W, T), got shape {tuple(attn.shape)}")
    b, h, w, _ = attn.shape
    cols = subject_columns(subjects, slots)
    maps = resoftmax(attn, slots, temperature)[..., cols]  # (B, H, W, S)
    maps = maps.permute(0, 3, 1, 2).reshape(b * len(cols), h, w)
    if smooth:
        maps = smooth_maps(maps, kernel_size, sigma)
    return maps.reshape(b, len(cols), h * w).amax(dim=-1)


def ae_loss(maxima: torch.Tensor) -> torch.Tensor:
    """``L = max_s max(0, 1 - m_s)`` per sample: the most neglected subject drives the step. ``(B, S) -> (B,)``."""
    return (1.0 - maxima).clamp(min=0.0).amax(dim=-1)
