"""Heatmap strips: shape, and labels that scale with the image so that a strip stays readable in a small preview."""

from __future__ import annotations

import torch

from attention.heatmap import LABEL_SCALE, MIN_LABEL_PX, label, subject_strip


def labelled_rows(panel: torch.Tensor, labelled: torch.Tensor, cols: slice) -> torch.Tensor:
    """Indices of the rows in which the label changed a pixel of the columns ``cols``."""
    changed = (panel[:, cols] - labelled[:, cols]).abs().amax(dim=(1, 2)) > 1 / 255
    return changed.nonzero().flatten()


def text_height(side: int, text: str = "cat (2)") -> int:
    """Height in pixels of the band a top label draws on a grey ``side`` x ``side`` panel."""
    panel = torch.full((side, side, 3), 0.5)
    rows = labelled_rows(panel, label(panel, text), slice(0, side // 8))
    assert rows.numel() and rows.min() == 0  # the band starts at the top edge
    return int(rows.max()) + 1


def test_strip_is_the_image_then_one_panel_per_subject():
    image = torch.rand(64, 48, 3)
    strip = subject_strip(image, torch.rand(2, 8, 6), ["cat (2)", "frog (5)"])
    assert strip.shape == (64, 3 * 48, 3)
    assert strip.min() >= 0 and strip.max() <= 1


def test_labels_scale_with_the_panel():
    small, large = text_height(128), text_height(512)
    assert 3.2 < large / small < 4.8, (small, large)
    # text height is about LABEL_SCALE of the side: readable in a 300-px preview of a 3-panel strip
    assert large > LABEL_SCALE * 512
    assert small >= MIN_LABEL_PX


def test_bottom_label_and_long_text_stay_inside_the_panel():
    panel = torch.full((256, 256, 3), 0.5)
    out = label(panel, "a very long subject name (12)", "max 0.53")
    rows = labelled_rows(panel, out, slice(0, 32))
    assert rows.min() == 0 and rows.max() == 255  # top band and bottom band
    assert not ((rows > 60) & (rows < 190)).any()  # the middle of the panel is left alone
    assert out.shape == panel.shape
