"""Medical tools. Each module here defines one :class:`Tool`; plug-ins register through the
``mmedagent.tools`` entry-point group."""

from mmedagent.tools._boxes import Box, Point, as_pil_rgb
from mmedagent.tools.base import Overlay, Tool, ToolError, ToolParams, ToolResult
from mmedagent.tools.registry import UnknownToolError, get_tool, list_tools, load_plugin, load_plugins, refresh, register

__all__ = [
    "Box",
    "Overlay",
    "Point",
    "Tool",
    "ToolError",
    "ToolParams",
    "ToolResult",
    "UnknownToolError",
    "as_pil_rgb",
    "get_tool",
    "list_tools",
    "load_plugin",
    "load_plugins",
    "refresh",
    "register",
]
