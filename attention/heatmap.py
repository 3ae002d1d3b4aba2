"""Per-subject attention heatmaps overlaid on the decoded image, labelled with the token (pure torch + Pillow)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp (knots of a "jet"-like map).
_KNOTS = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.9, 0.9], [1.0, 1.0, 0.0], [1.0, 0.3, 0.0],
                       [0.6, 0.0, 0.0]])


def colorize(v: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] of shape ``(H, W)`` to RGB ``(H, W, 3)`` by linear interpolation between knots."""
    v = v.clamp(0, 1) * (len(_KNOTS) - 1)
    lo = v.floor().long().clamp(max=len(_KNOTS) - 2)
    t = (v - lo)[..., None]
    return _KNOTS[lo] * (1 - t) + _KNOTS[lo + 1] * t


def overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend ``heat (h, w)`` (normalised to its own max) over ``image (H, W, 3)`` in [0, 1]."""
    H, W, _ = image.shape
    heat = heat.float() / heat.max().clamp(min=1e-8)
    up = F.interpolate(heat[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    return (1 - alpha) * image.float() + alpha * colorize(up)


def label(panel: torch.Tensor, text: str) -> torch.Tensor:
    """Write ``text`` on a dark band at the top of ``panel (H, W, 3)`` in [0, 1]."""
    img = Image.fromarray((panel.clamp(0, 1).numpy() * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    box = draw.textbbox((0, 0), text, font=font)
    draw.rectangle((0, 0, min(img.width, box[2] + 6), box[3] + 6), fill=(0, 0, 0))
    draw.text((3, 3), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)


def subject_strip(image: torch.Tensor, maps: torch.Tensor, labels: Sequence[str], alpha: float = 0.5) -> torch.Tensor:
    """One row: the image, then one labelled overlay per subject. ``image (H, W, 3)``, ``maps (S, h, w)``."""
    panels = [label(image.float().cpu(), "image")]
    for m, text in zip(maps, labels):
        panels.append(label(overlay(image.float().cpu(), m.cpu(), alpha), f"{text}  max {float(m.max()):.2f}"))
    return torch.cat(panels, dim=1)
