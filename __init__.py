"""Attend-and-Excite for ComfyUI (Chefer et al., SIGGRAPH 2023): attention-based semantic guidance nodes."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .nodes import NODES

# The front-end extension that shows the token table and the report's numbers on their nodes.
WEB_DIRECTORY = "./web"


class AttendExciteExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> AttendExciteExtension:
    return AttendExciteExtension()
