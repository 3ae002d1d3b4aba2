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


# Label text height as a share of the panel's shorter side: the labels scale with the image, so that a strip shown
# in a 300-px node preview (three 100-px panels) still has text about 12 px high.
LABEL_SCALE = 0.12
MIN_LABEL_PX = 10


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` px (its fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: one fixed size
        return ImageFont.load_default()


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, size: int, max_width: int):
    """The font at ``size`` px, smaller if ``text`` would be wider than ``max_width`` (not below ``MIN_LABEL_PX``)."""
    font = _font(size)
    width = draw.textlength(text, font=font)
    if width > max_width and size > MIN_LABEL_PX:
        font = _font(max(MIN_LABEL_PX, int(size * max_width / width)))
    return font


def label(panel: torch.Tensor, top: str, bottom: str | None = None) -> torch.Tensor:
    """Write ``top`` at the top-left and ``bottom`` at the bottom-left of ``panel (H, W, 3)`` in [0, 1].

    Text height is ``LABEL_SCALE`` of the panel's shorter side (at least ``MIN_LABEL_PX``; shrunk to fit the width),
    white with a dark outline on a translucent dark band, so it reads at any display size and over any heatmap.
    """
    img = Image.fromarray((panel.clamp(0, 1).numpy() * 255).astype(np.uint8)).convert("RGBA")
    band = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(band)
    size = max(MIN_LABEL_PX, round(min(img.size) * LABEL_SCALE))
    pad = max(2, size // 5)
    for text, at_top in ((top, True), (bottom, False)):
        if not text:
            continue
        font = _fitting_font(draw, text, size, img.width - 2 * pad)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        height = y1 - y0
        y = pad if at_top else img.height - pad - height
        draw.rectangle((0, y - pad, min(img.width, x1 - x0 + 3 * pad), y + height + pad), fill=(0, 0, 0, 140))
        draw.text((pad - x0, y - y0), text, fill=(255, 255, 255, 255), font=font,
                  stroke_width=max(1, size // 14), stroke_fill=(0, 0, 0, 255))
    out = Image.alpha_composite(img, band).convert("RGB")
    return torch.from_numpy(np.asarray(out).astype(np.float32) / 255.0)


def subject_strip(image: torch.Tensor, maps: torch.Tensor, labels: Sequence[str], alpha: float = 0.5) -> torch.Tensor:
    """One row: the image, then one labelled overlay per subject. ``image (H, W, 3)``, ``maps (S, h, w)``."""
    panels = [label(image.float().cpu(), "image")]
    for m, text in zip(maps, labels):
        panels.append(label(overlay(image.float().cpu(), m.cpu(), alpha), text, f"max {float(m.max()):.2f}"))
    return torch.cat(panels, dim=1)
