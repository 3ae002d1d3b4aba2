"""The Attend-and-Excite latent update expressed in ComfyUI's x-space, and its guard against non-finite steps.

The paper steps the VP latent ``z`` (unit variance at every noise level): ``z <- z - alpha grad_z L``. ComfyUI's
samplers hold ``x = c(sigma) z`` for a known scale ``c``, so ``grad_z L = c grad_x L`` and the same step in x is
``x <- x - alpha c(sigma)^2 grad_x L`` (:func:`step_scale` gives ``c^2``):

- EPS / v-prediction models (SD1.x, SD2.x, SDXL): ``x = z sqrt(sigma^2 + sigma_data^2)``, ``c^2 = sigma^2 +
  sigma_data^2``.
- Flow matching (Flux, SD3: ComfyUI's ``CONST`` sampling): ``x = (1 - sigma) x0 + sigma eps``. With
  ``s = sqrt((1 - sigma)^2 + sigma^2)``, ``z = x / s = a x0 + b eps`` has ``a^2 + b^2 = 1``: the VP latent with the
  same signal-to-noise ratio. So ``c^2 = (1 - sigma)^2 + sigma^2`` (1 at both ends, 1/2 at ``sigma = 1/2``).
"""

from __future__ import annotations

import torch


def step_scale(sigma: torch.Tensor, sigma_data: float = 1.0, flow: bool = False) -> torch.Tensor:
    """``c(sigma)^2`` of the module docstring: ``(1 - sigma)^2 + sigma^2`` for flow matching, else
    ``sigma^2 + sigma_data^2``."""
    return (1 - sigma) ** 2 + sigma**2 if flow else sigma**2 + sigma_data**2


def x_space_step(x: torch.Tensor, grad_x: torch.Tensor, alpha: torch.Tensor | float,
                 sigma: torch.Tensor, sigma_data: float = 1.0, flow: bool = False) -> torch.Tensor:
    """``x <- x - alpha c(sigma)^2 grad_x L`` (:func:`step_scale`; ``flow`` for flow-matching models), i.e. for
    EPS/v models ``x <- x - alpha (sigma^2 + sigma_data^2) grad_x L``.

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
    scale = alpha * step_scale(sigma, sigma_data, flow)
    scale = scale.reshape(-1, *([1] * (x.ndim - 1))) if scale.ndim else scale
    return (x.float() - scale * grad_x.float()).to(x.dtype)


def finite_samples(t: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: whether every value of each sample (the first dimension) of ``t`` is finite."""
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)


def guarded_step(x: torch.Tensor, grad_x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor,
                 sigma_data: float = 1.0, flow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`x_space_step` for the samples whose step is finite; a sample whose gradient or stepped latent is not
    (NaN or inf: fp16 overflow with a large step size, a degenerate attention map) keeps ``x`` unchanged.

    Returns ``(x_new, skipped)``: ``skipped`` ``(B,)`` bool marks the samples that were to move (``alpha != 0``)
    but kept ``x``. A sample with ``alpha = 0`` keeps ``x`` and is never counted, whatever its gradient holds
    (``0 * inf`` would be NaN). Nothing here reads a value on the host."""
    new = x_space_step(x, grad_x, alpha, sigma, sigma_data, flow)
    ok = finite_samples(new)
    moving = torch.as_tensor(alpha, device=x.device).reshape(-1).expand(x.shape[0]) != 0
    return torch.where(ok.reshape(-1, *[1] * (x.ndim - 1)), new, x), moving & ~ok
