"""Where and how strongly Attend-and-Excite steps, as fractions of any sampling schedule.

The official code counts loop indices of a 50-step run: updates while ``i < 25``, refinement at ``i`` in
``{0: 0.05, 10: 0.5, 20: 0.8}`` and step size ``scale_factor * sqrt(linspace(1.0, 0.5, N)[i])``. Here the same
points are fractions of the schedule (50 %; 0 %, 20 %, 40 %), which gives exactly those indices for 50 steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_REFINEMENT = "0:0.05, 0.2:0.5, 0.4:0.8"


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class GuidanceSchedule:
    """Resolved per-step plan for one sampling run of ``num_steps`` steps."""

    num_steps: int
    guided_steps: int  # steps 0 .. guided_steps-1 get a gradient update
    step_sizes: tuple[float, ...]  # alpha_i for every step (only the guided ones are used)
    refinement: dict[int, float]  # step index -> threshold

    def is_guided(self, i: int) -> bool:
        return i < self.guided_steps


def parse_refinement(text: str) -> tuple[tuple[float, float], ...]:
    """Parse ``"0:0.05, 0.2:0.5, 0.4:0.8"`` (schedule fraction : attention threshold). Empty text = no refinement."""
    out = []
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        frac, sep, thr = item.partition(":")
        try:
            f, t = float(frac), float(thr)
        except ValueError:
            raise ValueError(f"refinement entry {item!r} is not 'fraction:threshold', e.g. '0.2:0.5'") from None
        if not sep or not 0.0 <= f < 1.0 or not 0.0 <= t <= 1.0:
            raise ValueError(f"refinement entry {item!r}: fraction must be in [0, 1) and threshold in [0, 1]")
        out.append((f, t))
    return tuple(out)


def build_schedule(
    num_steps: int,
    guided_fraction: float = 0.5,
    scale_factor: float = 20.0,
    scale_range: tuple[float, float] = (1.0, 0.5),
    refinement: Sequence[tuple[float, float]] = ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8)),
) -> GuidanceSchedule:
    """Resolve fractions to step indices. ``scale_factor == 0`` disables guidance (plain sampling)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= guided_fraction <= 1.0:
        raise ValueError(f"guided_fraction must be in [0, 1], got {guided_fraction}")
    guided = _round(guided_fraction * num_steps) if scale_factor > 0 else 0
    lo, hi = scale_range
    if num_steps == 1:
        ranges = [lo]
    else:
        ranges = [lo + (hi - lo) * i / (num_steps - 1) for i in range(num_steps)]
    if min(ranges) < 0:
        raise ValueError(f"scale_range must be non-negative, got {scale_range}")
    sizes = tuple(scale_factor * math.sqrt(r) for r in ranges)
    refine: dict[int, float] = {}
    for frac, thr in refinement:
        i = _round(frac * num_steps)
        if i < guided:  # never a gradient pass after the guided portion
            refine[i] = max(thr, refine.get(i, 0.0))
    return GuidanceSchedule(num_steps, guided, sizes, refine)
