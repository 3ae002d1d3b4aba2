"""The Attend-and-Excite latent update expressed in ComfyUI's x-space."""

from __future__ import annotations

import torch


def x_space_step(x: torch.Tensor, grad_x: torch.Tensor, alpha: torch.Tensor | float,
                 sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """``x <- x - alpha (sigma^2 + sigma_data^2) grad_x L``.

    ComfyUI samples ``x = z sqrt(sigma^2 + sigma_data^2)`` while the paper steps the VP latent ``z``
    (``z <- z - alpha grad_z L``). Since ``grad_x L = grad_z L / sqrt(sigma^2 + sigma_data^2)``, the z-step is the
    x-step above exactly (sigma_data = 1 for SD1/SD2/SDXL).

    Args:
        x, grad_x: ``(B, C, H, W)``.
        alpha: scalar or ``(B,)`` step size (0 for samples that must not move).
        sigma: ``(B,)`` or scalar noise level.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=x.device)
    scale = alpha * (sigma**2 + sigma_data**2)
    scale = scale.reshape(-1, *([1] * (x.ndim - 1))) if scale.ndim else scale
    return (x.float() - scale * grad_x.float()).to(x.dtype)
