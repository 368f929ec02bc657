"""The controller's table of live workers: register, heartbeat, expiry, shortest-queue choice."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

WorkerKind = Literal["model", "tool"]


class WorkerInfo(BaseModel):
    """What a worker tells the controller when it registers (after its model/tool has loaded)."""

    address: str = Field(pattern=r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")  # scheme://host:port, no more
    kind: WorkerKind
    names: list[str] = Field(min_length=1)
    info: dict[str, Any] = Field(default_factory=dict)
    queue_length: int = 0


class _Entry:
    __slots__ = ("worker", "last_seen", "inflight", "order")

    def __init__(self, worker: WorkerInfo, order: int):
        self.worker, self.last_seen, self.inflight, self.order = worker, time.monotonic(), 0, order


class NoWorkerError(LookupError):
    """No live worker serves that name."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, available
        super().__init__(f"no {kind} worker is serving {name!r}; available {kind}s: {', '.join(available) or '(none)'}")


class WorkerRegistry:
    """Thread-safe; the controller's HTTP handlers and its tool/model proxies share one instance."""

    def __init__(self, expiry_s: float):
        self.expiry_s = expiry_s
        self._workers: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._order = itertools.count()
        self.known: dict[str, dict[str, Any]] = {}  # name → last info, kept after a worker leaves

    def register(self, worker: WorkerInfo) -> None:
        with self._lock:
            self._workers[worker.address] = _Entry(worker, next(self._order))
            for name in worker.names:
                self.known[name] = {"kind": worker.kind, **worker.info}

    def heartbeat(self, address: str, queue_length: int) -> bool:
        """False when the address is unknown (the worker then registers again)."""
        with self._lock:
            entry = self._workers.get(address)
            if entry is None:
                return False
            entry.last_seen = time.monotonic()
            entry.worker.queue_length = queue_length
            return True

    def remove(self, address: str) -> None:
        with self._lock:
            self._workers.pop(address, None)

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

    def pick(self, kind: WorkerKind, name: str) -> str:
        """Address of the least-loaded live worker serving ``name`` (shortest queue; ties: oldest)."""
        with self._lock:
            candidates = [e for e in self._workers.values() if e.worker.kind == kind and name in e.worker.names]
            if not candidates:
                available = sorted({n for e in self._workers.values() if e.worker.kind == kind for n in e.worker.names})
                raise NoWorkerError(kind, name, available)
            best = min(candidates, key=lambda e: (max(e.inflight, e.worker.queue_length), e.inflight, e.order))
            return best.worker.address

    def begin(self, address: str) -> None:
        with self._lock:
            if address in self._workers:
                self._workers[address].inflight += 1

    def end(self, address: str) -> None:
        with self._lock:
            if address in self._workers and self._workers[address].inflight > 0:
                self._workers[address].inflight -= 1
