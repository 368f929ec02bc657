"""The controller's table of live workers: register, heartbeat, expiry, shortest-queue choice."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmedagent.protocol import name_key
from mmedagent.serve.config import validation_problems

WorkerKind = Literal["model", "tool"]


class ToolInfo(BaseModel):
    """What the controller reads from a tool worker's ``info`` (its tool's schema) to build the proxy."""

    model_config = ConfigDict(extra="allow")

    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    needs_image: bool = True
    question_param: str | None = None
    weights_note: str = ""


WorkerAddress = Annotated[str, Field(pattern=r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")]
"""A worker's address: ``scheme://host:port``, nothing more."""


class WorkerInfo(BaseModel):
    """What a worker tells the controller when it registers (after its model/tool has loaded)."""

    address: WorkerAddress
    kind: WorkerKind
    names: list[str] = Field(min_length=1)
    info: dict[str, Any] = Field(default_factory=dict)
    queue_length: int = 0
    stalled: bool = False  # every call slot held by a call past the timeout (a hung tool): chosen last

    @model_validator(mode="after")
    def _tool_info(self) -> "WorkerInfo":
        if self.kind == "tool":  # a malformed schema is refused here, not met by every chat later
            try:
                ToolInfo.model_validate(self.info)
            except ValidationError as e:
                raise ValueError(f"the tool's schema (info) is malformed: {validation_problems(e, 'info')}") from None
        return self

    def tool_names(self) -> tuple[str, ...]:
        """The names a call may use for this worker's tool: its name(s) and aliases."""
        return (*self.names, *self.info.get("aliases", ()))


class _Entry:
    __slots__ = ("worker", "last_seen", "order")

    def __init__(self, worker: WorkerInfo, order: int):
        self.worker, self.last_seen, self.order = worker, time.monotonic(), order


class NoWorkerError(LookupError):
    """No live worker serves that name."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        super().__init__(f"no {kind} worker is serving {name!r}; available {kind}s: {', '.join(available) or '(none)'}")


class RegistrationConflict(ValueError):
    """A tool worker whose tool name or an alias (as :func:`~mmedagent.protocol.name_key` compares them) is
    another tool's name or alias:
    calls by that name could reach either tool."""


def _clash(names: Sequence[str], others: Sequence[str]) -> list[str]:
    taken = {name_key(n) for n in others}
    return [n for n in names if name_key(n) in taken]


CONVERSATIONS_KEPT = 4096
"""How many conversations' model workers the registry remembers (the oldest forgotten first)."""


class WorkerRegistry:
    """Thread-safe; the controller's HTTP handlers and its tool/model proxies share one instance."""

    def __init__(self, expiry_s: float):
        self.expiry_s = expiry_s
        self._workers: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._order = itertools.count()
        self.known: dict[str, dict[str, Any]] = {}  # name → last info, kept after a worker leaves
        self._inflight: dict[str, int] = {}  # address → calls under way (kept across a re-registration)
        self._conversations: OrderedDict[str, str] = OrderedDict()  # conversation id → its model worker's address

    def register(self, worker: WorkerInfo, reserved: Mapping[str, Sequence[str]] = {}) -> None:
        """Add (or replace, same address) a worker. A tool worker whose name or an alias is already
        used by a *different* tool (a live worker's, or ``reserved``: in-process tools, name → names)
        is refused with :class:`RegistrationConflict`; workers of the same tool share its load.
        Tools whose workers left and whose names the new tool takes are forgotten."""
        with self._lock:
            if worker.kind == "tool":
                mine = worker.tool_names()
                others = {e.worker.names[0]: e.worker.tool_names() for e in self._workers.values()
                          if e.worker.kind == "tool" and e.worker.address != worker.address}
                for tool, names in {**others, **reserved}.items():
                    clash = _clash(mine, names) if tool != worker.names[0] else []
                    if clash:
                        raise RegistrationConflict(
                            f"tool {worker.names[0]!r} at {worker.address} was refused: its name or alias "
                            f"{', '.join(map(repr, clash))} is already used by tool {tool!r}; rename one of the two "
                            "tools or remove the alias (a call by that name could reach either)"
                        )
                for name, info in list(self.known.items()):
                    if (info.get("kind") == "tool" and name != worker.names[0] and name not in others
                            and _clash(mine, (name, *info.get("aliases", ())))):
                        del self.known[name]  # gone, and its name now means the new tool
            self._workers[worker.address] = _Entry(worker, next(self._order))
            for name in worker.names:
                self.known[name] = {"kind": worker.kind, **worker.info}

    def heartbeat(self, address: str, queue_length: int, stalled: bool = False) -> bool:
        """False when the address is unknown (the worker then registers again)."""
        with self._lock:
            entry = self._workers.get(address)
            if entry is None:
                return False
            entry.last_seen = time.monotonic()
            entry.worker.queue_length = queue_length
            entry.worker.stalled = stalled
            return True

    def remove(self, address: str) -> bool:
        """Forget the worker at ``address``; whether one was registered there."""
        with self._lock:
            return self._workers.pop(address, None) is not None

    def expire(self) -> list[str]:
        """Drop workers whose last heartbeat is older than the expiry; returns their addresses."""
        cutoff = time.monotonic() - self.expiry_s
        with self._lock:
            dead = [a for a, e in self._workers.items() if e.last_seen < cutoff]
            for a in dead:
                del self._workers[a]
        return dead

    def workers(self, kind: WorkerKind | None = None) -> list[WorkerInfo]:
        with self._lock:
            return [e.worker for e in self._workers.values() if kind is None or e.worker.kind == kind]

    def names(self, kind: WorkerKind) -> list[str]:
        return sorted({n for w in self.workers(kind) for n in w.names})

    def pick(self, kind: WorkerKind, name: str, exclude: Iterable[str] = (), conversation: str | None = None) -> str:
        """Address of the least-loaded live worker serving ``name`` (stalled ones last, then shortest
        queue; ties: oldest), other than those in ``exclude``. A ``conversation`` whose last call
        went to a live, unstalled worker of ``name`` (:meth:`remember`) goes there again, unless it
        has more than one call more under way than the least-loaded one: that worker holds the
        conversation's cache and reads its earlier replies as it wrote them."""
        with self._lock:
            candidates = [e for e in self._workers.values() if e.worker.kind == kind and name in e.worker.names
                          and e.worker.address not in exclude]
            if not candidates:
                available = sorted({n for e in self._workers.values() if e.worker.kind == kind for n in e.worker.names})
                raise NoWorkerError(kind, name, available)

            def load(e: _Entry) -> tuple:
                inflight = self._inflight.get(e.worker.address, 0)
                return e.worker.stalled, max(inflight, e.worker.queue_length), inflight, e.order

            least = min(candidates, key=load)
            last = self._conversations.get(conversation) if conversation is not None else None
            for e in candidates:
                if e.worker.address == last and not e.worker.stalled and load(e)[1] <= load(least)[1] + 1:
                    return last
            return least.worker.address

    def remember(self, conversation: str, address: str) -> None:
        """Note that ``conversation``'s last call went to ``address`` (see :meth:`pick`)."""
        with self._lock:
            self._conversations[conversation] = address
            self._conversations.move_to_end(conversation)
            while len(self._conversations) > CONVERSATIONS_KEPT:
                self._conversations.popitem(last=False)

    def begin(self, address: str) -> None:
        with self._lock:
            self._inflight[address] = self._inflight.get(address, 0) + 1

    def end(self, address: str) -> None:
        with self._lock:
            left = self._inflight.get(address, 0) - 1
            if left > 0:
                self._inflight[address] = left
            else:
                self._inflight.pop(address, None)
