"""Find tools: every module of ``mmedagent.tools`` plus the ``mmedagent.tools`` entry-point group."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from pydantic import create_model

from mmedagent.protocol import actions_json_schema, render_tool_catalog
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
    """A Tool subclass that sets its own non-empty string ``name`` (one that leaves it unset or ``None`` is a base)."""
    if not (inspect.isclass(obj) and issubclass(obj, Tool)):
        return False
    name = vars(obj).get("name")
    return isinstance(name, str) and bool(name.strip())


def _tools_in_module(module) -> list[type[Tool]]:
    """The tool classes a module defines or imports from its own package (``from my_pkg.impl import MyTool``)."""
    package = module.__name__.partition(".")[0]
    return [
        obj
        for _, obj in inspect.getmembers(module, _is_tool)
        if obj.__module__ == package or obj.__module__.startswith(package + ".")
    ]


def _clash(cls: type[Tool], known: Iterable[type[Tool]]) -> str | None:
    """Why ``cls`` cannot join ``known``: a different tool already answers to one of its names
    (as :func:`~mmedagent.protocol.name_key` compares names); None if it can (or is already there)."""
    for other in known:
        if other is cls or (other.__module__, other.__qualname__) == (cls.__module__, cls.__qualname__):
            continue  # the same class (re-exported, or its module reloaded)
        taken = sorted(n for n in other.names() if cls.answers_to(n))
        if taken:
            return f"{_where(cls)} answers to {', '.join(map(repr, taken))}, already taken by {_where(other)}"
    return None


def _where(cls: type[Tool]) -> str:
    return f"tool {cls.name!r} ({cls.__module__}.{cls.__qualname__})"


def schema_problem(cls: type[Tool]) -> str | None:
    """Why ``cls`` cannot describe itself as JSON (the planner's prompt, its constrained decoding and a
    worker's registration need it), naming the first ``Params`` or ``Result`` field pydantic has no JSON
    schema for (a ``numpy.ndarray``, say); None if it can."""
    try:
        json.dumps(cls.schema())
        render_tool_catalog([cls])  # the prompt's and the constrained decoder's forms (nested models inlined)
        actions_json_schema([cls])
        return None
    except Exception as e:
        whole = f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')}"  # pydantic adds a help link line
    for part in ("Params", "Result"):
        model = getattr(cls, part)
        for name, field in model.model_fields.items():
            try:
                create_model(model.__name__, __config__=model.model_config,
                             **{name: (field.annotation, None)}).model_json_schema()
            except Exception:
                kind = getattr(field.annotation, "__qualname__", None) or str(field.annotation)
                return (f"its {part} field {name!r} ({kind}) has no JSON schema; give it a JSON type "
                        "(a number, string, list or model of these)")
    return whole


def call_problem(cls: type[Tool]) -> str | None:
    """Why ``cls`` could not answer a call, whatever its params: no ``__call__`` of its own, an ``async`` one
    (the dispatcher calls it in a thread and gets a coroutine) or one that does not take ``(image, params)``."""
    call = cls.__call__
    if call is Tool.__call__:
        return "defines no __call__(self, image, params)"
    if inspect.iscoroutinefunction(call):
        return "has an async __call__; define it with plain def (each call runs in a thread of its own)"
    try:
        inspect.signature(call).bind(None, None, None)
    except TypeError:
        return (f"has __call__{inspect.signature(call)}, which must take (self, image, params) (image is None for a "
                "tool that needs none)")
    except ValueError:  # no signature to read (a builtin): let it be tried
        pass
    return None


def _problem(cls: type[Tool]) -> str | None:
    """Why ``cls`` cannot be offered as a tool (:func:`schema_problem`, :func:`call_problem`); None if it can."""
    if problem := schema_problem(cls):
        return f"cannot describe itself (its schema): {problem}"
    return call_problem(cls)


def _add(found: dict[str, type[Tool]], cls: type[Tool], source: str) -> None:
    """Add a discovered tool unless its name or an alias is taken (the first comes first: built-ins,
    then plug-ins in entry-point order), it has no JSON schema or it cannot be called (:func:`_problem`);
    such a tool is skipped with a warning, so that it cannot break the system prompt of the others. Tools
    registered in this process (``register``) are not discovered tools: they never push one out."""
    broken = _problem(cls)
    if broken:
        log.warning("%s: %s %s; it is skipped", source, _where(cls), broken)
        return
    why = _clash(cls, found.values())
    if why:
        log.warning("%s: %s; it is skipped: rename it or drop the clashing alias", source, why)
    elif not any(c is cls for c in found.values()):
        found[cls.name] = cls


BUILT_IN_MODULES = ("grounding", "segmentation", "grounding_segmentation", "classification", "report", "rag")
"""The project's own tool files, discovered before any other file in ``tools/`` and any plug-in."""


BROKEN = (Exception, SystemExit)
"""What importing a tool file or plug-in may raise without stopping discovery (``SystemExit``: a module that
parses the command line or calls ``sys.exit`` when imported)."""


def _plugin(ep: EntryPoint) -> str:
    """How a warning names an entry point: its name, its target and the distribution that declares it."""
    dist = f", from {ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
    return f"tool plug-in {ep.name} ({ep.value}{dist})"


def _kind(obj: object) -> str:
    """What an entry point that is not a tool points at, for its warning."""
    if not (inspect.isclass(obj) and issubclass(obj, Tool)):
        return f"a {'class' if inspect.isclass(obj) else type(obj).__name__}, not a Tool subclass"
    if "name" not in vars(obj):
        return "a Tool subclass that sets no name"
    return f"a Tool subclass whose name is {vars(obj)['name']!r}, not a non-empty string"


def _discover() -> dict[str, type[Tool]]:
    import mmedagent.tools as pkg

    found: dict[str, type[Tool]] = {}
    files = {info.name for info in pkgutil.iter_modules(pkg.__path__)} - {"base", "registry"}
    others = sorted(f for f in files - set(BUILT_IN_MODULES) if not f.startswith("_"))
    for name in [*(m for m in BUILT_IN_MODULES if m in files), *others]:  # built-ins first: they keep their names
        try:
            module = importlib.import_module(f"{pkg.__name__}.{name}")
        except BROKEN as e:  # one broken tool file must not take the other tools down
            log.warning("tool module %s could not be imported: %s: %s", name, type(e).__name__, e)
            continue
        for cls in _tools_in_module(module):
            _add(found, cls, f"tools/{name}.py")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        source = _plugin(ep)
        try:
            obj = ep.load()
        except BROKEN as e:  # a broken plug-in must not take the others down
            log.warning("%s could not be loaded: %s: %s; it is skipped: fix it or uninstall its package",
                        source, type(e).__name__, e)
            continue
        if inspect.ismodule(obj):
            classes = _tools_in_module(obj)
            if not classes:
                log.warning("%s: module %s defines no tool class (a Tool subclass with a name); it is skipped",
                            source, obj.__name__)
        elif _is_tool(obj):
            classes = [obj]
        else:
            log.warning("%s is %s; it is skipped: point the entry point at a tool class or at the module that "
                        "defines it", source, _kind(obj))
            continue
        for cls in classes:
            _add(found, cls, source)
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
    """Register a tool class defined outside ``tools/`` and outside any entry point; a ``ValueError``
    if it is not a Tool subclass with a name, has no JSON schema (:func:`schema_problem`) or cannot be
    called (:func:`call_problem`), or another tool already answers to its name or one of its aliases."""
    if not _is_tool(cls):
        raise ValueError(f"{cls!r} is {_kind(cls)}; register a Tool subclass that sets a name")
    if problem := _problem(cls):
        raise ValueError(f"tool {cls.name!r} {problem}")
    why = _clash(cls, _all().values())
    if why:
        raise ValueError(f"{why}; rename it or drop the clashing alias")
    _extra[cls.name] = cls
    return cls


def load_plugin(module_name: str) -> list[type[Tool]]:
    """Import a module (``--plugin my_pkg.tools``) and register every tool class it defines; an
    ``ImportError`` if it cannot be imported (whatever it raised, named), a ``ValueError`` if it defines
    none, or one cannot be registered (:func:`register`)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise
    except BROKEN as e:  # a tool class refused where it is defined, a module that exits: one line, not a traceback
        raise ImportError(f"{module_name} could not be imported: {type(e).__name__}: {e}") from e
    classes = _tools_in_module(module)
    if not classes:
        raise ValueError(f"{module_name} defines no tool class (a Tool subclass with a name)")
    for cls in classes:
        register(cls)
    return classes


def load_plugins(modules: Iterable[str]) -> None:
    """:func:`load_plugin` each of ``modules`` (the scripts' repeatable ``--plugin``); a ``ValueError`` naming
    the flag and the module that cannot be loaded."""
    for module in modules:
        try:
            load_plugin(module)
        except ModuleNotFoundError as e:
            missing = e.name is not None and module.split(".")[0] == e.name.split(".")[0]
            hint = ("; a module in the current folder needs PYTHONPATH=. (only `python -m` adds that folder), a package "
                    "needs installing") if missing else ""
            raise ValueError(f"--plugin {module}: {e}{hint}") from None
        except (ImportError, ValueError) as e:
            raise ValueError(f"--plugin {module}: {e}") from None


def list_tools() -> list[type[Tool]]:
    """All known tool classes, sorted by name."""
    return sorted(_all().values(), key=lambda c: c.name)


def get_tool(name_or_alias: str) -> type[Tool]:
    """The tool class with this name or alias (case, separators and spaces around "+" do not count:
    :func:`~mmedagent.protocol.name_key`)."""
    tools = _all()
    for cls in tools.values():
        if cls.answers_to(name_or_alias):
            return cls
    raise UnknownToolError(name_or_alias, sorted(tools))
