"""Route tool calls to tools: validate params, inject the conversation's image, time out, never raise.

Every failure (unknown tool, bad params, missing image, timeout, crash) becomes a
:class:`~mmedagent.protocol.ToolOutcome` with ``ok=False`` and a message meant for the model and
the user; the caller always gets one outcome per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from pydantic import ValidationError

from mmedagent.protocol import IMAGE_PLACEHOLDER, ToolCall, ToolOutcome
from mmedagent.tools.base import Tool, ToolResult

log = logging.getLogger(__name__)


def describe_validation_error(tool: str, err: ValidationError) -> str:
    """One line per bad field: ``prompts: Field required``."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(params)"
        parts.append(f"{field}: {e['msg']}")
    return f"invalid params for {tool}: " + "; ".join(parts)


class Dispatcher:
    """Runs tool calls against a set of tool instances (in-process or remote proxies)."""

    def __init__(self, tools: Mapping[str, Tool] | Sequence[Tool], timeout_s: float = 60.0, max_workers: int = 8):
        items = tools.values() if isinstance(tools, Mapping) else tools
        self.tools: dict[str, Tool] = {t.name: t for t in items}
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tool")

    def resolve(self, name: str) -> Tool | None:
        key = name.strip().casefold()
        for tool in self.tools.values():
            if key in (n.casefold() for n in tool.names()):
                return tool
        return None

    def prepare(self, call: ToolCall, image: Any, question: str | None = None) -> tuple[Tool, Any] | ToolOutcome:
        """Resolve and validate one call; an outcome (error) if it cannot run."""
        tool = self.resolve(call.API_name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "(none)"
            return ToolOutcome(tool=call.API_name, ok=False, error=f"unknown tool {call.API_name!r}; available tools: {known}")
        params = dict(call.API_params)
        supplied = params.pop("image", None)
        if supplied not in (None, IMAGE_PLACEHOLDER):
            # Paths from the model are never opened; the conversation's image is used instead.
            log.info("%s: ignoring model-supplied image value", tool.name)
        if tool.needs_image and image is None:
            return ToolOutcome(tool=call.API_name, ok=False, error=f"{tool.name} needs an image, and none was given")
        try:
            parsed = tool.Params.model_validate(params)
        except ValidationError as e:
            return ToolOutcome(tool=call.API_name, ok=False, error=describe_validation_error(tool.name, e))
        if tool.question_param and question and not getattr(parsed, tool.question_param, None):
            parsed = parsed.model_copy(update={tool.question_param: question})
        return tool, parsed

    def _finish(self, call: ToolCall, fut: Future, started: float, deadline: float) -> ToolOutcome:
        try:
            result: ToolResult = fut.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            fut.cancel()
            return ToolOutcome(
                tool=call.API_name, ok=False, error=f"timed out after {self.timeout_s:g} s", elapsed_s=time.monotonic() - started
            )
        except Exception as e:  # any tool failure goes back to the model, not up the stack
            log.warning("tool %s failed: %s", call.API_name, type(e).__name__)
            return ToolOutcome(
                tool=call.API_name, ok=False, error=f"{type(e).__name__}: {e}", elapsed_s=time.monotonic() - started
            )
        return ToolOutcome(tool=call.API_name, output=result.for_model(), elapsed_s=time.monotonic() - started)

    def dispatch_all(
        self, calls: Sequence[ToolCall], image: Any, question: str | None = None
    ) -> tuple[list[ToolOutcome], list[ToolResult | None]]:
        """Run every call of a turn concurrently; outcomes for the model and full results for the UI.

        ``question`` (the user's question) fills a tool's ``question_param`` when the call omits it.
        """
        started = time.monotonic()
        deadline = started + self.timeout_s
        pending: list[ToolOutcome | Future] = []
        for call in calls:
            prepared = self.prepare(call, image, question)
            if isinstance(prepared, ToolOutcome):
                pending.append(prepared)
            else:
                tool, params = prepared
                pending.append(self._pool.submit(tool.run, image, params))
        outcomes, results = [], []
        for call, p in zip(calls, pending):
            if isinstance(p, ToolOutcome):
                outcomes.append(p)
                results.append(None)
                continue
            outcomes.append(self._finish(call, p, started, deadline))
            results.append(p.result() if outcomes[-1].ok else None)
        return outcomes, results

    def dispatch(self, call: ToolCall, image: Any, question: str | None = None) -> ToolOutcome:
        return self.dispatch_all([call], image, question)[0][0]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
