"""Find tools: every module of ``mmedagent.tools`` plus the ``mmedagent.tools`` entry-point group."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from importlib.metadata import entry_points

from mmedagent.tools.base import Tool

ENTRY_POINT_GROUP = "mmedagent.tools"
log = logging.getLogger(__name__)

_registry: dict[str, type[Tool]] | None = None
_extra: dict[str, type[Tool]] = {}


class UnknownToolError(KeyError):
    """No tool has that name or alias."""

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown tool {self.name!r}; available tools: {', '.join(self.known) or '(none)'}"


def _is_tool(obj: object) -> bool:
    return inspect.isclass(obj) and issubclass(obj, Tool) and "name" in vars(obj)


def _tools_in_module(module) -> list[type[Tool]]:
    """The tool classes a module defines or imports from its own package (``from my_pkg.impl import MyTool``)."""
    package = module.__name__.partition(".")[0]
    return [
        obj
        for _, obj in inspect.getmembers(module, _is_tool)
        if obj.__module__ == package or obj.__module__.startswith(package + ".")
    ]


def _discover() -> dict[str, type[Tool]]:
    import mmedagent.tools as pkg

    found: dict[str, type[Tool]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in {"base", "registry"}:
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for cls in _tools_in_module(module):
            found[cls.name] = cls
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plug-in must not take the others down
            log.warning("tool plug-in %s could not be loaded: %s", ep.name, e)
            continue
        if inspect.ismodule(obj):
            classes = _tools_in_module(obj)
            if not classes:
                log.warning("tool plug-in %s: module %s defines no tool class", ep.name, obj.__name__)
        elif _is_tool(obj):
            classes = [obj]
        else:
            log.warning("tool plug-in %s is not a Tool subclass with a name", ep.name)
            continue
        for cls in classes:
            found[cls.name] = cls
    return found


def _all() -> dict[str, type[Tool]]:
    global _registry
    if _registry is None:
        _registry = _discover()
    return {**_registry, **_extra}


def refresh() -> None:
    """Forget discovered tools (e.g. after installing a plug-in in a running process)."""
    global _registry
    _registry = None


def register(cls: type[Tool]) -> type[Tool]:
    """Register a tool class defined outside ``tools/`` and outside any entry point."""
    _extra[cls.name] = cls
    return cls


def load_plugin(module_name: str) -> list[type[Tool]]:
    """Import a module (``--plugin my_pkg.tools``) and register every tool class it defines; a
    ``ValueError`` if it defines none."""
    classes = _tools_in_module(importlib.import_module(module_name))
    if not classes:
        raise ValueError(f"{module_name} defines no tool class (a Tool subclass with a name)")
    for cls in classes:
        register(cls)
    return classes


def list_tools() -> list[type[Tool]]:
    """All known tool classes, sorted by name."""
    return sorted(_all().values(), key=lambda c: c.name)


def get_tool(name_or_alias: str) -> type[Tool]:
    """The tool class with this name or alias (case-insensitive)."""
    key = name_or_alias.strip().casefold()
    tools = _all()
    for cls in tools.values():
        if key in (n.casefold() for n in cls.names()):
            return cls
    raise UnknownToolError(name_or_alias, sorted(tools))
