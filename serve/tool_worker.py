"""One generic tool worker: ``python serve/tool_worker.py --tool NAME`` hosts any registered tool.

It loads the tool's weights, starts listening, registers with the controller (only then), beats,
and answers ``POST /call`` with the tool's full result, the model's view and the UI overlay.
The image arrives as bytes in the request; the worker never opens a path it is given.
A hung tool cannot pile calls up: while every call slot is held by a call past the tool timeout,
calls are refused at once (503), and the heartbeat tells the controller to choose other workers.
"""

if __name__ == "__main__":  # run as a script: serve/ must not shadow installed packages
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import itertools
import json
import logging
import os
import threading
import time
from typing import Any

import mmedagent  # noqa: F401  - arms the torchvision shim first
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from mmedagent.dispatcher import error_text, failure_of, parse_params, result_views
from mmedagent.serve.config import ServeConfig, ToolSpec, add_common_args, add_limit_args, config_or_exit
from mmedagent.serve.remote import REQUEST_ID_HEADER, TOOL_FAILED, CallAnswer, loggable_id
from mmedagent.serve.security import setup_logging, without_echoed_input
from mmedagent.serve.uploads import UploadError, image_from_data_url
from mmedagent.serve.worker_base import (EXIT_CANNOT_LOAD, TOOL_OPTIONS_ENV, Heartbeat, bind_socket, follow_launcher,
                                         serve_worker, url_for)
from mmedagent.tools import Tool, UnknownToolError, get_tool, load_plugins

log = logging.getLogger("mmedagent.serve.tool_worker")


class CallRequest(BaseModel):
    params: dict[str, Any] = {}
    image: str | None = None


class Busy(Exception):
    """No call slot for this call (a 503): all are held by calls past the timeout, or none came free in time."""


class CallSlots:
    """At most ``size`` calls of the tool at once, the rest wait, at most ``timeout_s`` (the controller
    gives up on a call then). Python cannot stop a hung call, so while every slot is held by a call
    running past ``timeout_s`` new and waiting calls are refused at once instead of queueing behind it."""

    def __init__(self, tool: str, size: int, timeout_s: float):
        self.tool, self.size, self.timeout_s = tool, size, timeout_s
        self._cond = threading.Condition()
        self._started: dict[int, float] = {}  # running call → when it started
        self._ids = itertools.count()
        self.waiting = 0

    def _refusal(self, now: float) -> str | None:
        overdue = sum(now - t > self.timeout_s for t in self._started.values())
        if overdue < self.size:
            return None
        held = ("its call slot is held by a call that has" if self.size == 1
                else f"all {self.size} of its call slots are held by calls that have")
        return (f"tool {self.tool!r} is busy: {held} run past the {self.timeout_s:g} s timeout (the tool may be hung); "
                "try again later")

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._cond:
            running = len(self._started)
            return {"running": running, "waiting": self.waiting, "queue_length": running + self.waiting,
                    "overdue": sum(now - t > self.timeout_s for t in self._started.values()),
                    "stalled": self._refusal(now) is not None}

    def check(self) -> None:
        """:class:`Busy` now if a call could only wait behind overdue ones."""
        with self._cond:
            reason = self._refusal(time.monotonic())
        if reason:
            raise Busy(reason)

    def acquire(self) -> int:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            self.waiting += 1
            try:
                while len(self._started) >= self.size:
                    now = time.monotonic()
                    reason = self._refusal(now)
                    if reason:
                        raise Busy(reason)
                    if now >= deadline:
                        raise Busy(f"tool {self.tool!r} is busy: no call slot came free within the "
                                   f"{self.timeout_s:g} s timeout; try again later")
                    # wake when a slot frees, the next running call goes overdue, or this call's wait is up
                    due = min(t for t in self._started.values() if now - t <= self.timeout_s) + self.timeout_s
                    self._cond.wait(max(0.001, min(due, deadline) - now))
                token = next(self._ids)
                self._started[token] = time.monotonic()
                return token
            finally:
                self.waiting -= 1

    def release(self, token: int) -> None:
        with self._cond:
            del self._started[token]
            self._cond.notify()


def build_app(tool: Tool, max_upload_bytes: int, max_concurrency: int = 4, timeout_s: float = 60.0,
              schema: dict[str, Any] | None = None) -> FastAPI:
    """The worker's HTTP API around one loaded tool instance; ``timeout_s`` is the controller's tool
    timeout, ``schema`` the tool's schema (computed once, else here)."""
    app = without_echoed_input(FastAPI(title=f"mmedagent tool worker: {tool.name}"))
    schema = tool.schema() if schema is None else schema
    slots = CallSlots(tool.name, max_concurrency, timeout_s)
    app.state.slots = slots

    def run_call(image, params) -> CallAnswer:
        token = slots.acquire()
        try:
            t0 = time.monotonic()
            result = tool.run(image, params)
            elapsed = time.monotonic() - t0
        finally:
            slots.release(token)
        for_model, overlay = result_views(result, tool.name)
        return CallAnswer(result=result.model_dump(mode="json"), for_model=for_model, overlay=overlay, elapsed_s=elapsed)

    @app.post("/call")
    async def call(req: CallRequest, request: Request) -> CallAnswer:
        """One tool call, logged as one line under the chat's request id: how it ended and how long it
        took, never its params, image or output."""
        t0, ended = time.monotonic(), "stopped by its client"
        try:
            answer = await run_checked(req)
            ended = "ok"
            return answer
        except HTTPException as e:
            ended = f"refused ({e.status_code})" if e.status_code < 500 else f"failed ({e.status_code})"
            raise
        except Exception as e:
            ended = f"failed ({type(e).__name__})"
            raise
        finally:
            log.info("call %s: %s in %.2f s", loggable_id(request.headers.get(REQUEST_ID_HEADER)) or "-", ended,
                     time.monotonic() - t0)

    async def run_checked(req: CallRequest) -> CallAnswer:
        params = dict(req.params)
        params.pop("image", None)  # a path or placeholder from the model: never opened
        try:
            parsed = parse_params(tool, params)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        try:
            slots.check()  # before decoding the image: refused at once, never queued behind a hung call
        except Busy as e:
            raise HTTPException(503, str(e)) from None
        image = None
        if req.image is not None:
            try:
                image = (await run_in_threadpool(image_from_data_url, req.image, max_upload_bytes)).image
            except UploadError as e:
                raise HTTPException(e.status, e.reason) from None
        elif tool.needs_image:
            raise HTTPException(400, f"{tool.name} needs an image, and none was given")
        try:
            return await run_in_threadpool(run_call, image, parsed)
        except Busy as e:
            log.warning("%s", e)
            raise HTTPException(503, str(e)) from None
        except Exception as e:  # the tool's failure is the caller's answer, the worker stays up
            log.warning("%s failed", tool.name, exc_info=e)  # reduced to its type and place by the log filter
            if failure_of(e) == "params":  # the tool refused these params (ToolError): as parse_params's refusal
                raise HTTPException(422, error_text(e)) from None
            raise HTTPException(500, f"{TOOL_FAILED.format(tool=tool.name)}{error_text(e)}") from None

    @app.get("/schema")
    async def get_schema() -> dict[str, Any]:
        return schema

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """``ok`` is false while every call slot is held by a call past the timeout."""
        status = slots.status()
        return {"ok": not status["stalled"], "tool": tool.name, **status}

    return app


def described(tool: Tool) -> dict[str, Any]:
    """The tool's schema and weights note, as JSON; a :class:`ValueError` naming the tool if they are not
    (a weights note that is no string, say): the worker then exits instead of never registering. (A tool
    whose fields have no JSON schema is refused before: :func:`~mmedagent.tools.registry.schema_problem`.)"""
    try:
        info = tool.schema()
        info["weights_note"] = tool.weights_note or type(tool).weights_note
        return json.loads(json.dumps(info))
    except Exception as e:  # a weights note that is no string, say
        raise ValueError(f"tool {tool.name} cannot describe itself (its schema): {type(e).__name__}: {e}") from None


def configured_options(cfg: ServeConfig, name: str) -> dict[str, Any]:
    """The options the serving config gives tool ``name`` where no ``--options`` are given (a worker started by
    hand on another machine with the stack's YAML): its ``tools:`` entry, else the demo weights under
    ``tool_weights: demo``, as the launcher resolves them (:func:`~mmedagent.serve.launcher.resolve_tool_specs`);
    without ``tool_weights`` the tool's published defaults."""
    from mmedagent.serve.launcher import resolve_tool_specs

    tools = dict(cfg.tools or {})
    if not any(_is_tool(key, name) for key in tools):
        tools[name] = ToolSpec()
    worker = cfg.model_copy(update={"tools": tools, "no_workers": False, "tool_weights": cfg.tool_weights or "default"})
    return dict(resolve_tool_specs(worker)[name].options)


def _is_tool(key: str, name: str) -> bool:
    try:
        return get_tool(key).name == name
    except UnknownToolError:
        return False


def registration(tool: Tool, address: str, info: dict[str, Any]) -> dict[str, Any]:
    return {"address": address, "kind": "tool", "names": [tool.name], "info": info}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace, ServeConfig]:
    """The command line and the settings it makes: flags over the ``--config`` file over defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True, help="tool name or alias (see mmedagent.tools.list_tools())")
    parser.add_argument("--options", default=None, help="JSON object passed to the tool's constructor (weights, device); "
                        f"default: ${TOOL_OPTIONS_ENV} (how the launcher passes them, out of sight of ps), else {{}}")
    parser.add_argument("--plugin", action="append", default=[], help="module whose tool classes to register (repeatable)")
    parser.add_argument("--controller", default=None, help="controller URL (default from config)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--heartbeat-interval", type=float, default=None)
    parser.add_argument("--max-concurrency", type=int, default=4, help="calls of the tool at once (more wait)")
    parser.add_argument("--tool-timeout", type=float, default=None,
                        help="the controller's tool timeout in seconds (default from config): calls are refused while "
                        "every slot is held by a call past it")
    parser.add_argument("--max-upload-mb", type=float, default=None, help="largest image (default from config)")
    add_limit_args(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, args.config, api_key=args.api_key, log_level=args.log_level, host=args.host,
                         heartbeat_interval_s=args.heartbeat_interval, tool_timeout_s=args.tool_timeout,
                         max_upload_mb=args.max_upload_mb, max_connections=args.max_connections,
                         request_read_timeout_s=args.request_read_timeout)
    if args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    return parser, args, cfg


def main(argv: list[str] | None = None) -> None:
    parser, args, cfg = parse_args(argv)
    setup_logging(cfg.log_level, [cfg.api_key or ""])
    follow_launcher()
    try:
        load_plugins([*cfg.plugins, *args.plugin])
    except ValueError as e:
        parser.error(str(e))
    try:
        cls = get_tool(args.tool)
    except UnknownToolError as e:
        parser.error(str(e))
    if args.options is None:
        args.options = os.environ.pop(TOOL_OPTIONS_ENV, None)  # not inherited any further
    try:
        options = json.loads(args.options) if args.options is not None else configured_options(cfg, cls.name)
    except json.JSONDecodeError as e:
        parser.error(f"--options is not valid JSON: {e}")
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    t0 = time.monotonic()
    try:
        tool = cls(**options)
        tool.ensure_loaded()  # weights first: the worker registers only once it can serve
        info = described(tool)
    except Exception as e:  # bad options, missing weights etc.: one clear line, not a traceback
        log.error("tool %s could not load: %s: %s", cls.name, type(e).__name__, " ".join(str(e).split()))  # one line
        raise SystemExit(EXIT_CANNOT_LOAD) from None
    log.info("loaded tool %s in %.1f s", tool.name, time.monotonic() - t0)
    sock = bind_socket(cfg.host, args.port)
    address = url_for(sock)
    app = build_app(tool, cfg.max_upload_bytes, args.max_concurrency, cfg.tool_timeout_s, info)
    slots: CallSlots = app.state.slots
    heartbeat = Heartbeat(
        args.controller or cfg.controller_url,
        lambda: registration(tool, address, info),
        lambda: slots.status()["queue_length"],
        cfg.heartbeat_interval_s,
        cfg.api_key,
        ready=lambda: False,
        beat=lambda: {"stalled": slots.status()["stalled"]},
    )
    print(f"tool worker {tool.name}: {address}", flush=True)
    serve_worker(app, sock, heartbeat, cfg, cfg.max_upload_bytes * 2)


if __name__ == "__main__":
    main()
