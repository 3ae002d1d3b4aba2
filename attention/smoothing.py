"""Gaussian smoothing of attention maps exactly as the Attend-and-Excite reference code does it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_kernel_1d(kernel_size: int = 3, sigma: float = 0.5, device: torch.device | None = None) -> torch.Tensor:
    """1-D kernel of the official code: ``exp(-((x - mu) / (2 sigma))**2)``, normalised.

    The reference (``utils/gaussian_smoothing.py``) writes ``(x - mu) / (2 sigma)`` inside the square instead of
    ``(x - mu)**2 / (2 sigma**2)``, so its effective standard deviation is ``sqrt(2) * sigma``. We reproduce that:
    for size 3, sigma 0.5 this gives ``[0.2119, 0.5761, 0.2119]``. Built on ``device`` directly: no host-to-device
    copy, which on CUDA would wait for the queued work (and cannot be captured in a CUDA graph).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    x = torch.arange(kernel_size, dtype=torch.float64, device=device)
    mean = (kernel_size - 1) / 2
    g = torch.exp(-(((x - mean) / (2 * sigma)) ** 2))
    return (g / g.sum()).float()


def reference_kernel_2d(kernel_size: int = 3, sigma: float = 0.5, device: torch.device | None = None) -> torch.Tensor:
    """2-D kernel ``(k, k)``: outer product of :func:`reference_kernel_1d` (sums to 1)."""
    g = reference_kernel_1d(kernel_size, sigma, device)
    return torch.outer(g, g)


def smooth_maps(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Smooth a stack of 2-D maps with reflect padding, as the reference does per token.

    Args:
        maps: ``(N, H, W)`` maps (any float dtype; computed in float32).
    Returns:
        ``(N, H, W)`` float32 smoothed maps.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    pad = kernel_size // 2
    kernel = reference_kernel_2d(kernel_size, sigma, maps.device)[None, None]
    x = maps.float()[:, None]
    if pad:
        mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
        x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(x, kernel)[:, 0]
