"""Attend-and-Excite for ComfyUI (Chefer et al., SIGGRAPH 2023): attention-based semantic guidance nodes."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .nodes import NODES


class AttendExciteExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> AttendExciteExtension:
    return AttendExciteExtension()
