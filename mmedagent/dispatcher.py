"""Route tool calls to tools: validate params, inject the conversation's image, time out, never raise.

Every failure (unknown tool, bad params, missing image, timeout, crash) becomes a
:class:`~mmedagent.protocol.ToolOutcome` with ``ok=False``, a message meant for the model and
the user (``TypeName: message`` for an exception, the message alone for a
:class:`~mmedagent.tools.base.ToolError`) and its ``failure`` kind; the caller always gets one outcome per call.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, get_args

import numpy as np
from pydantic import ValidationError

from mmedagent.protocol import IMAGE_PLACEHOLDER, Failure, ToolCall, ToolOutcome
from mmedagent.tools.base import MAX_MODEL_CHARS, Overlay, Tool, ToolError, ToolResult

log = logging.getLogger(__name__)

FAILURES = frozenset(get_args(Failure))


def describe_validation_error(tool: str, err: ValidationError) -> str:
    """One part per bad field: ``prompts: Field required``; items of one list failing alike are one part
    (``boxes.0 (items 0, 1, 2, 3): Input should be less than or equal to 1``: a box given in pixels)."""
    parts: dict[tuple[tuple, str, bool], list[str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        listed = bool(loc) and isinstance(loc[-1], int)
        parts.setdefault((loc[:-1] if listed else loc, e["msg"], listed), []).append(str(loc[-1]) if listed else "")

    def field(loc: tuple, listed: bool, items: list[str]) -> str:
        name = ".".join(map(str, loc))
        if not listed:
            return name or "(params)"
        if len(items) == 1:
            return ".".join(map(str, (*loc, *items)))
        return f"{name} (items {', '.join(items)})" if name else f"items {', '.join(items)}"

    return f"invalid params for {tool}: " + "; ".join(
        f"{field(loc, listed, items)}: {msg}" for (loc, msg, listed), items in parts.items())


def parse_params(tool: Tool, params: Mapping[str, Any]) -> Any:
    """``tool.Params`` from a call's params; a ``ValueError`` saying what is wrong if they do not
    validate, also when a tool's own validator fails with another error (``int`` has no ``lower``)."""
    try:
        return tool.Params.model_validate(params)
    except ValidationError as e:
        raise ValueError(describe_validation_error(tool.name, e)) from None
    except Exception as e:  # a validator that assumed the type the model would send
        raise ValueError(f"invalid params for {tool.name}: {type(e).__name__}: {e}") from None


def result_views(result: ToolResult, tool: str) -> tuple[dict[str, Any], Overlay | None]:
    """What ``result`` of ``tool`` shows the model (plain JSON, :func:`plain_json`) and the UI (its overlay),
    checked here, in-process and in a tool worker alike, so that a broken one is its call's error, not the
    UI's later: a ``TypeError`` for a ``for_model()`` or ``overlay()`` of the wrong type, a ``ValueError``
    for more than :data:`~mmedagent.tools.base.MAX_MODEL_CHARS` for the model (it would flood the prompt)."""
    output = result.for_model()
    if not isinstance(output, dict):
        raise TypeError(f"{type(result).__name__}.for_model() returned {type(output).__name__}, expected a dict")
    overlay = result.overlay()
    if overlay is not None and not isinstance(overlay, Overlay):
        raise TypeError(f"{type(result).__name__}.overlay() returned {type(overlay).__name__}, expected Overlay or None")
    output = plain_json(output, f"{type(result).__name__}.for_model()")
    if (size := len(json.dumps(output))) > MAX_MODEL_CHARS:
        raise ValueError(f"{tool} returned {size:,} characters for the model, more than the {MAX_MODEL_CHARS:,} a prompt "
                         "can take; return a summary, and list bulky fields in Result.hidden_from_model")
    return output, overlay


def error_text(error: Exception) -> str:
    """What the model and the user read for an exception a tool raised: a :class:`ToolError`'s message,
    else ``TypeName: message``."""
    return str(error) if isinstance(error, ToolError) else f"{type(error).__name__}: {error}"


def failure_of(error: Exception) -> Failure:
    """The :data:`~mmedagent.protocol.Failure` kind of an exception a tool raised."""
    kind = getattr(error, "failure", "error") if isinstance(error, ToolError) else "error"
    return kind if kind in FAILURES else "error"


def plain_json(output: dict[str, Any], where: str) -> dict[str, Any]:
    """``output`` as plain JSON values, as the model reads it (the Python repr of JSON data, as in the
    training records) and the trace carries it: numpy numbers as Python ones (``np.float32(0.5)`` would read
    as such, and break the trace's JSON), tuples as lists, NaN and infinities as None (as
    ``ToolResult.for_model`` gives them). A ``TypeError`` naming ``where`` for what JSON cannot carry."""

    def plain(value: Any, at: str) -> Any:
        if isinstance(value, np.generic) and value.ndim == 0:
            value = value.item()
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, (list, tuple)):
            return [plain(v, f"{at}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: plain(v, f"{at}.{k}") for k, v in value.items()}
        what = "a dict with keys other than str" if isinstance(value, dict) else type(value).__name__
        raise TypeError(f"{where} returned {what} at {at}, which JSON cannot carry; return str, int, float, "
                        "bool, None, lists and dicts with str keys")

    return plain(output, "output")


class Dispatcher:
    """Runs tool calls against a set of tool instances (in-process or remote proxies).

    Threads: each tool has its own pool of ``max_workers`` threads, so a slow or hung tool can use
    up only its own threads, never another tool's. A call that times out gets an error outcome,
    but Python cannot stop a running thread: the call goes on in the background, holding its thread,
    until the tool returns. While ``max_workers`` calls of one tool are running past their timeout,
    new calls to that tool fail at once with an error saying so, instead of queueing behind them;
    the other tools are not affected.

    Loading: the timeout covers the call, not the tool's first load. :meth:`preload` loads the
    tools up front (the evaluation those its data names; the controller its tools before offering them). A
    tool still unloaded at its first call is loaded then, before the call's clock starts, however
    long the load takes. A tool that fails to load, either way, stays unavailable: its calls get an
    error naming the load failure.
    """

    def __init__(self, tools: Mapping[str, Tool] | Sequence[Tool], timeout_s: float = 60.0, max_workers: int = 8):
        """``max_workers``: threads per tool (calls of one tool running at once)."""
        items = tools.values() if isinstance(tools, Mapping) else tools
        self.tools: dict[str, Tool] = {t.name: t for t in items}
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.load_errors: dict[str, str] = {}
        """Tools that failed to load: name -> error (their calls are refused with it)."""
        self.load_s: dict[str, float] = {}
        """Seconds each tool's load here took (loaded or failed), up front or at its first call."""
        self.progress: Callable[[str], None] | None = None
        """Gets a line per tool loaded here, up front (unless :meth:`preload` is given its own) or at a first call."""
        self._lock = threading.Lock()
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._overdue: dict[str, int] = {}  # per tool: calls still running past their timeout

    def preload(self, progress: Callable[[str], None] | None = None,
                tools: Iterable[Tool] | None = None) -> dict[str, str]:
        """Load ``tools`` (default: every tool) now, one after another; returns ``{name: error}`` for
        those that failed, so far.

        A tool that fails stays unavailable (not retried): its calls get an error naming the
        failure, and the others run as usual. ``progress`` (default :attr:`progress`) gets a line per tool."""
        for tool in self.tools.values() if tools is None else tools:
            self._load(tool, progress or self.progress)
        return dict(self.load_errors)

    def resolve(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools.values() if tool.answers_to(name)), None)

    def prepare(self, call: ToolCall, image: Any, question: str | None = None) -> tuple[Tool, Any] | ToolOutcome:
        """Resolve and validate one call; an outcome (error) if it cannot run."""
        tool = self.resolve(call.API_name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "(none)"
            return ToolOutcome(tool=call.API_name, ok=False, failure="unknown",
                               error=f"unknown tool {call.API_name!r}; available tools: {known}")
        if tool.name in self.load_errors:
            return ToolOutcome(tool=call.API_name, ok=False, failure="unavailable",
                               error=f"{tool.name} is unavailable: it failed to load ({self.load_errors[tool.name]})")
        params = dict(call.API_params)
        supplied = params.pop("image", None)
        if supplied not in (None, IMAGE_PLACEHOLDER):
            # Paths from the model are never opened; the conversation's image is used instead.
            log.info("%s: ignoring model-supplied image value", tool.name)
        if tool.needs_image and image is None:
            return ToolOutcome(tool=call.API_name, ok=False, failure="params", error=f"{tool.name} needs an image, and none was given")
        try:
            parsed = parse_params(tool, params)
        except ValueError as e:
            return ToolOutcome(tool=call.API_name, ok=False, failure="params", error=str(e))
        if tool.question_param and question and not getattr(parsed, tool.question_param, None):
            parsed = parsed.model_copy(update={tool.question_param: question})
        return tool, parsed

    def _load(self, tool: Tool, progress: Callable[[str], None] | None, when: str = "") -> str | None:
        """Load ``tool`` if needed (outside any call's timeout; its seconds in :attr:`load_s`), said to
        ``progress``; the error if it fails, kept in ``load_errors`` (the tool stays unavailable: a failing
        load is not retried on every call)."""
        if tool.name in self.load_errors:
            return self.load_errors[tool.name]
        if tool.loaded:
            return None
        if progress:
            progress(f"loading tool {tool.name}{when}" + (" (the first load can take minutes)" if tool.slow_load else ""))
        started = time.monotonic()
        try:
            tool.ensure_loaded()
        except Exception as e:  # reported to the caller and the model; the other tools still serve
            self.load_errors[tool.name] = f"{type(e).__name__}: {e}"
            log.error("tool %s failed to load: %s", tool.name, type(e).__name__)
        finally:
            self.load_s[tool.name] = time.monotonic() - started
        error = self.load_errors.get(tool.name)
        if progress:
            progress(f"tool {tool.name} failed to load: {error}" if error
                     else f"tool {tool.name} loaded in {self.load_s[tool.name]:.1f} s")
        return error

    def _submit(self, call: ToolCall, tool: Tool, image: Any, params: Any) -> Future | ToolOutcome:
        """Start the call on the tool's own pool, or refuse it if the tool's threads are all held by
        earlier calls still running past their timeout."""
        with self._lock:
            overdue = self._overdue.get(tool.name, 0)
            if overdue >= self.max_workers:
                return ToolOutcome(
                    tool=call.API_name, ok=False, failure="unavailable",
                    error=f"{tool.name} is not responding: {overdue} earlier calls are still running past the "
                    f"{self.timeout_s:g} s timeout; not starting another until they finish",
                )
            pool = self._pools.get(tool.name)
            if pool is None:
                pool = self._pools[tool.name] = ThreadPoolExecutor(self.max_workers, thread_name_prefix=f"tool-{tool.name}")
        return pool.submit(contextvars.copy_context().run, tool.run, image, params)  # the chat's context (its request id)

    def _abandon(self, name: str, fut: Future) -> None:
        """A timed-out call: dropped if it never started, else counted as overdue until it ends."""
        if fut.cancel():
            return
        with self._lock:
            self._overdue[name] = self._overdue.get(name, 0) + 1

        def done(_: Future) -> None:
            with self._lock:
                self._overdue[name] -= 1

        fut.add_done_callback(done)  # runs at once if it has finished meanwhile

    def _finish(self, call: ToolCall, tool: Tool, fut: Future, started: float, deadline: float) -> ToolOutcome:
        # wait apart from reading the result: a TimeoutError the tool raises itself is that tool's error
        if not wait([fut], timeout=max(0.0, deadline - time.monotonic())).done:
            self._abandon(tool.name, fut)
            return ToolOutcome(tool=call.API_name, ok=False, failure="timeout", error=f"timed out after {self.timeout_s:g} s",
                               elapsed_s=time.monotonic() - started)
        try:
            output, _ = result_views(fut.result(), tool.name)
        except Exception as e:  # any tool failure goes back to the model, not up the stack
            # the traceback only when debugging (a serving process reduces it to its type and place)
            log.warning("tool %s failed: %s", call.API_name, type(e).__name__,
                        exc_info=e if log.isEnabledFor(logging.DEBUG) else None)
            return ToolOutcome(tool=call.API_name, ok=False, failure=failure_of(e), error=error_text(e),
                               elapsed_s=time.monotonic() - started)
        return ToolOutcome(tool=call.API_name, output=output, elapsed_s=time.monotonic() - started)

    def dispatch_all(
        self, calls: Sequence[ToolCall], image: Any, question: str | None = None
    ) -> tuple[list[ToolOutcome], list[ToolResult | None]]:
        """Run every call of a turn concurrently; outcomes for the model and full results for the UI.

        ``question`` (the user's question) fills a tool's ``question_param`` when the call omits it.
        Tools not loaded yet are loaded first; the timeout starts after that.
        """
        prepared = [self.prepare(call, image, question) for call in calls]
        for i, (call, p) in enumerate(zip(calls, prepared)):
            if not isinstance(p, ToolOutcome) and (error := self._load(p[0], self.progress, " at its first call")) is not None:
                prepared[i] = ToolOutcome(tool=call.API_name, ok=False, failure="unavailable",
                                          error=f"{p[0].name} failed to load: {error}")
        started = time.monotonic()
        deadline = started + self.timeout_s
        pending: list[ToolOutcome | tuple[Tool, Future]] = []
        for call, p in zip(calls, prepared):
            if isinstance(p, ToolOutcome):
                pending.append(p)
                continue
            tool, params = p
            fut = self._submit(call, tool, image, params)
            pending.append(fut if isinstance(fut, ToolOutcome) else (tool, fut))
        outcomes, results = [], []
        for call, p in zip(calls, pending):
            if isinstance(p, ToolOutcome):
                outcomes.append(p)
                results.append(None)
                continue
            tool, fut = p
            outcomes.append(self._finish(call, tool, fut, started, deadline))
            results.append(fut.result() if outcomes[-1].ok else None)
        return outcomes, results

    def dispatch(self, call: ToolCall, image: Any, question: str | None = None) -> ToolOutcome:
        return self.dispatch_all([call], image, question)[0][0]

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
