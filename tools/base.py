"""What a tool is: one class with typed params and result, weights loaded once.

A tool file defines a subclass of :class:`Tool`; the registry finds it, the system prompt lists
it with its JSON schema, the dispatcher validates calls against ``Params``, and the HTTP worker and
the UI serve and draw its ``Result``.
"""

from __future__ import annotations

import math
import threading
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class ToolParams(BaseModel):
    """Base for a tool's ``Params``: unknown fields are errors that name the field."""

    model_config = ConfigDict(extra="forbid")


class Overlay(BaseModel):
    """What the UI draws on the image for one result: boxes (normalised xyxy) and RLE masks."""

    boxes: list[list[float]] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    masks: list[dict[str, Any]] = Field(default_factory=list)


def _round(value: Any, ndigits: int) -> Any:
    if isinstance(value, float):
        return round(value, ndigits) if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _round(v, ndigits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v, ndigits) for v in value]
    return value


class ToolResult(BaseModel):
    """Base for a tool's ``Result``.

    ``for_model()`` is the compact form fed back to the planner (rounded numbers, without the
    fields named in ``hidden_from_model`` such as masks); ``overlay()`` is what the UI draws.
    """

    hidden_from_model: ClassVar[frozenset[str]] = frozenset()
    digits: ClassVar[int] = 2

    def for_model(self) -> dict[str, Any]:
        return _round(self.model_dump(mode="json", exclude=set(self.hidden_from_model)), self.digits)

    def overlay(self) -> Overlay | None:
        return None


# One load at a time per process: transformers' loading is not thread-safe ("Cannot copy out of meta
# tensor" when two checkpoints load in parallel threads). Re-entrant because a composite tool's
# load() loads its parts.
_LOAD_LOCK = threading.RLock()


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
    weights_note: ClassVar[str] = ""
    """Short description of the loaded weights, for the UI banner (set by ``load``)."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._loaded = False

    def load(self) -> None:
        """Load weights; called once before the first call."""

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with _LOAD_LOCK:
            if not self._loaded:
                self.load()
                self._loaded = True

    def __call__(self, image: Any, params: ToolParams) -> ToolResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, image: Any, params: ToolParams) -> ToolResult:
        """Load if needed, call, and check the result type."""
        self.ensure_loaded()
        result = self(image, params)
        if not isinstance(result, self.Result):
            raise TypeError(f"{self.name} returned {type(result).__name__}, expected {self.Result.__name__}")
        return result

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return (cls.name, *cls.aliases)

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
