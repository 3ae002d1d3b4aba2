"""ComfyUI nodes of the pack (thin: validation and wiring; math lives in ``attention/``)."""

from __future__ import annotations

from .encode import AttendExciteTextEncode
from .options import AttendExciteOptions
from .report import AttendExciteReport
from .samplers import AttendExciteKSampler, AttendExciteSampler
from .visualize import AttendExciteVisualize

NODES = [AttendExciteTextEncode, AttendExciteSampler, AttendExciteKSampler, AttendExciteOptions,
         AttendExciteVisualize, AttendExciteReport]
