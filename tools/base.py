"""What a tool is: one class with typed params and result, weights loaded once.

A tool file defines a subclass of :class:`Tool`; the registry finds it, the system prompt lists
it with its JSON schema, the dispatcher validates calls against ``Params``, and the HTTP worker and
the UI serve and draw its ``Result``.
"""

from __future__ import annotations

import math
import pathlib
import threading
import typing
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from mmedagent.protocol import name_key


class ToolError(Exception):
    """A failure the model and the user read as its message alone (any other exception a tool raises
    reads ``TypeName: message``): raise it where the message says all, e.g. "no slice holds tissue"."""

    failure: ClassVar[str] = "error"
    """Its :data:`~mmedagent.protocol.Failure` kind."""


class ToolParams(BaseModel):
    """Base for a tool's ``Params``: unknown fields are errors that name the field."""

    model_config = ConfigDict(extra="forbid")


class Overlay(BaseModel):
    """What the UI draws on the image for one result: boxes (normalised xyxy; ``[]`` draws none) and
    RLE masks; the i-th box, mask and label belong together."""

    boxes: list[list[float]] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    masks: list[dict[str, Any]] = Field(default_factory=list)


MAX_MODEL_CHARS = 100_000
"""The most characters (as JSON) a result may show the model: more would flood the planner's prompt."""


def _holds_path(annotation: Any, seen: set[int] | None = None) -> bool:
    """Whether a type annotation is or holds a ``pathlib`` path (``Path``, ``FilePath``, ``list[Path]``,
    a nested model with such a field)."""
    seen = set() if seen is None else seen
    if id(annotation) in seen:
        return False
    seen.add(id(annotation))
    if isinstance(annotation, type):
        if issubclass(annotation, pathlib.PurePath):
            return True
        if issubclass(annotation, BaseModel):
            return any(_holds_path(f.annotation, seen) for f in annotation.model_fields.values())
    return any(_holds_path(a, seen) for a in typing.get_args(annotation))


def _as_json(value: Any) -> Any:
    """JSON serialisation's fallback for values of ``Any`` fields: numpy arrays and scalars and torch
    tensors as plain lists and numbers (the model and a tool worker's answer get the same values)."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"a {type(value).__qualname__} value cannot be carried as JSON; give the Result field a JSON "
                    "type (a number, string, list or model of these)")


def _round(value: Any, ndigits: int) -> Any:
    """Floats rounded; NaN and infinities as None, as JSON (and so a tool worker) carries them."""
    if isinstance(value, float):
        return round(value, ndigits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round(v, ndigits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v, ndigits) for v in value]
    return value


class ToolResult(BaseModel):
    """Base for a tool's ``Result``.

    ``for_model()`` is the compact form fed back to the planner (rounded numbers, NaN and infinities
    as None, without the fields named in ``hidden_from_model`` such as masks); ``overlay()`` is what
    the UI draws.
    """

    hidden_from_model: ClassVar[frozenset[str]] = frozenset()
    digits: ClassVar[int] = 2

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a ``hidden_from_model`` that would hide nothing: a string (``"masks"`` is its letters) or
        a name that is no field (a typo), either of which would show the model what it should not see."""
        super().__pydantic_init_subclass__(**kwargs)
        hidden = cls.hidden_from_model
        if isinstance(hidden, str) or not all(isinstance(h, str) for h in hidden):
            raise TypeError(f"{cls.__qualname__}.hidden_from_model must be a set of field names, e.g. "
                            f"frozenset({{'masks'}}), not {hidden!r}")
        unknown = sorted(set(hidden) - set(cls.model_fields))
        if unknown and cls.model_config.get("extra") != "allow":
            raise TypeError(f"{cls.__qualname__}.hidden_from_model names {', '.join(map(repr, unknown))}, which "
                            f"{'is' if len(unknown) == 1 else 'are'} not a field; its fields: "
                            f"{', '.join(cls.model_fields) or '(none)'}")

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        if kwargs.get("mode") == "json":
            kwargs.setdefault("fallback", _as_json)
        return super().model_dump(**kwargs)

    def model_dump_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("fallback", _as_json)
        return super().model_dump_json(**kwargs)

    def for_model(self) -> dict[str, Any]:
        return _round(self.model_dump(mode="json", exclude=set(self.hidden_from_model)), self.digits)

    def overlay(self) -> Overlay | None:
        return None


# Building models from checkpoints is not thread-safe: transformers/accelerate patch process-wide torch
# state while they do it ("Cannot copy out of meta tensor" when two checkpoints load in parallel
# threads). So that part of loading holds this one process-wide lock; the rest (a tool's load-once
# guard, an index build) is per tool. Re-entrant because a composite tool's load() loads its parts.
_LOAD_LOCK = threading.RLock()
_held = threading.local()  # how deeply this thread holds _LOAD_LOCK


@contextmanager
def loading_weights() -> Iterator[None]:
    """Hold while building models from checkpoints (one such build at a time per process).

    ``Tool.load`` runs inside it already unless the tool sets ``exclusive_load = False``; such a
    tool wraps only its model construction in it, so the rest of its load runs beside others'.
    """
    with _LOAD_LOCK:
        _held.depth = getattr(_held, "depth", 0) + 1
        try:
            yield
        finally:
            _held.depth -= 1


class Tool:
    """A medical tool. Subclasses set the class attributes and implement ``load`` / ``__call__``.

    Constructor keyword options (weights path or hub id, device, ...) are the tool's own; ``load``
    reads the weights once and ``__call__`` is then safe to call for every request.
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    Params: ClassVar[type[ToolParams]] = ToolParams
    Result: ClassVar[type[ToolResult]] = ToolResult
    needs_image: ClassVar[bool] = True
    question_param: ClassVar[str | None] = None
    """Optional param set to the user's question when a call leaves it empty (MMedAgent calls ChatCAD-R with ``{}``)."""
    slow_load: ClassVar[bool] = False
    """True when the first ``load`` can take minutes (e.g. building an index): servers do not wait for it."""
    exclusive_load: ClassVar[bool] = True
    """True: ``load`` runs under :func:`loading_weights`, one such load at a time per process (safe for
    any load that builds models). False: ``load`` takes :func:`loading_weights` itself around building
    models, so its other work (an index build) does not hold up other tools' loads. Such a tool cannot
    be loaded inside another tool's exclusive ``load`` (the locks would be taken in both orders): a
    composite loads it first and is given the loaded instance; otherwise ``ensure_loaded`` raises."""
    weights_note: ClassVar[str] = ""
    """Short description of the loaded weights, for the UI banner (set by ``load``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse declarations that would misbehave at call time: ``aliases = ("volume")`` (a string,
        so every letter would be an alias), a ``Params`` that is not a :class:`ToolParams` (a plain
        pydantic model ignores a misspelt param, so the call runs on the default), a ``Params`` field
        named ``image`` (the dispatcher drops it) or typed as a path (validating it would look the model's
        path up on the server), a ``question_param`` that is no ``Params`` field (the question would be
        dropped) and a ``Result`` that is not a :class:`ToolResult`."""
        super().__init_subclass__(**kwargs)
        if isinstance(cls.aliases, str) or not all(isinstance(a, str) and a.strip() for a in cls.aliases):
            raise TypeError(f"{cls.__qualname__}.aliases must be a tuple of non-empty strings, e.g. ('volume',), "
                            f"not {cls.aliases!r}")
        if not (isinstance(cls.Params, type) and issubclass(cls.Params, ToolParams)):
            raise TypeError(f"{cls.__qualname__}.Params must subclass mmedagent.tools.ToolParams (it refuses unknown "
                            "params by name; a plain pydantic model would ignore a misspelt one)")
        if "image" in cls.Params.model_fields:
            raise TypeError(f"{cls.__qualname__}.Params must not have an 'image' field: the dispatcher drops the "
                            "model's image value and passes the conversation's image as __call__'s first argument")
        if paths := [n for n, f in cls.Params.model_fields.items() if _holds_path(f.annotation)]:
            raise TypeError(f"{cls.__qualname__}.Params field {paths[0]!r} is a file path: the model writes the params, "
                            "and a path it names must not be looked up on the server; take the data as __call__'s "
                            "image, or its location as a constructor option")
        question = cls.question_param
        if question is not None and question not in cls.Params.model_fields and cls.Params.model_config.get("extra") != "allow":
            raise TypeError(f"{cls.__qualname__}.question_param {question!r} is not a field of its Params; its fields: "
                            f"{', '.join(cls.Params.model_fields) or '(none)'}")
        if not (isinstance(cls.Result, type) and issubclass(cls.Result, ToolResult)):
            raise TypeError(f"{cls.__qualname__}.Result must subclass mmedagent.tools.ToolResult")

    def __new__(cls, *args: Any, **kwargs: Any) -> Tool:
        """The load-once state, set here so that a subclass ``__init__`` that does not call ``super().__init__()``
        still loads and serves."""
        self = super().__new__(cls)
        self.options = {}
        self._loaded = False
        self._load_lock = threading.RLock()  # this tool's load-once guard; other tools never wait on it
        return self

    def __init__(self, **options: Any) -> None:
        self.options = options

    def load(self) -> None:
        """Load weights; called once before the first call."""

    @property
    def loaded(self) -> bool:
        return self._loaded

    def ensure_loaded(self) -> None:
        """Load once; a second caller waits for the same load. Loads of different tools wait on each
        other only under :func:`loading_weights` (the whole ``load`` unless ``exclusive_load`` is
        False); a tool with nothing to load (no ``load`` of its own, e.g. a remote proxy) never waits."""
        if self._loaded:
            return
        if type(self).load is Tool.load:
            self._loaded = True
            return
        if not self.exclusive_load and getattr(_held, "depth", 0):
            raise RuntimeError(f"{self.name} (exclusive_load = False) cannot be loaded inside another tool's load; "
                               "load it first (ensure_loaded()) and pass the loaded instance")
        with loading_weights() if self.exclusive_load else nullcontext(), self._load_lock:
            if not self._loaded:
                self.load()
                self._loaded = True

    def __call__(self, image: Any, params: ToolParams) -> ToolResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, image: Any, params: ToolParams) -> ToolResult:
        """Load if needed, call, and check the result's type (what it shows the model and the UI:
        :func:`mmedagent.dispatcher.result_views`)."""
        self.ensure_loaded()
        result = self(image, params)
        if not isinstance(result, self.Result):
            raise TypeError(f"{self.name} returned {type(result).__name__}, expected {self.Result.__name__}")
        return result

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return (cls.name, *cls.aliases)

    @classmethod
    def answers_to(cls, name: str) -> bool:
        """Whether ``name`` is this tool's name or an alias, as :func:`name_key` compares them."""
        return name_key(name) in {name_key(n) for n in cls.names()}

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """JSON description of the tool (for the prompt, the worker API and the UI)."""
        return {
            "name": cls.name,
            "aliases": list(cls.aliases),
            "description": cls.description,
            "params": cls.Params.model_json_schema(),
            "result": cls.Result.model_json_schema(),
            "needs_image": cls.needs_image,
            "question_param": cls.question_param,
        }
