"""One generic tool worker: ``python serve/tool_worker.py --tool NAME`` hosts any registered tool.

It loads the tool's weights, starts listening, registers with the controller (only then), beats,
and answers ``POST /call`` with the tool's full result, the model's view and the UI overlay.
The image arrives as bytes in the request; the worker never opens a path it is given.
"""

if __name__ == "__main__":  # run as a script: serve/ must not shadow installed packages
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import json
import logging
import threading
import time
from typing import Any

import mmedagent  # noqa: F401  - arms the torchvision shim first
from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from mmedagent.dispatcher import parse_params
from mmedagent.serve.config import add_common_args, config_or_exit
from mmedagent.serve.security import setup_logging, without_echoed_input
from mmedagent.serve.uploads import UploadError, image_from_data_url
from mmedagent.serve.worker_base import EXIT_CANNOT_LOAD, Heartbeat, bind_socket, serve_worker, url_for
from mmedagent.tools import Tool, UnknownToolError, get_tool, load_plugin

log = logging.getLogger("mmedagent.serve.tool_worker")


class CallRequest(BaseModel):
    params: dict[str, Any] = {}
    image: str | None = None


def build_app(tool: Tool, max_upload_bytes: int, max_concurrency: int = 4) -> FastAPI:
    """The worker's HTTP API around one loaded tool instance."""
    app = without_echoed_input(FastAPI(title=f"mmedagent tool worker: {tool.name}"))
    slots = threading.BoundedSemaphore(max_concurrency)
    state = {"queue": 0}
    lock = threading.Lock()
    app.state.queue_length = lambda: state["queue"]

    def run_call(image, params) -> dict[str, Any]:
        with lock:
            state["queue"] += 1
        try:
            with slots:
                t0 = time.monotonic()
                result = tool.run(image, params)
                elapsed = time.monotonic() - t0
        finally:
            with lock:
                state["queue"] -= 1
        overlay = result.overlay()
        return {
            "result": result.model_dump(mode="json"),
            "for_model": result.for_model(),
            "overlay": overlay.model_dump(mode="json") if overlay is not None else None,
            "elapsed_s": elapsed,
        }

    @app.post("/call")
    async def call(req: CallRequest) -> dict[str, Any]:
        params = dict(req.params)
        params.pop("image", None)  # a path or placeholder from the model: never opened
        try:
            parsed = parse_params(tool, params)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
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
        except Exception as e:  # the tool's failure is the caller's answer, the worker stays up
            log.warning("%s failed: %s", tool.name, type(e).__name__)
            raise HTTPException(500, f"{tool.name} failed: {type(e).__name__}: {e}") from None

    @app.get("/schema")
    async def schema() -> dict[str, Any]:
        return tool.schema()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "tool": tool.name, "queue_length": state["queue"]}

    return app


def registration(tool: Tool, address: str) -> dict[str, Any]:
    info = tool.schema()
    info["weights_note"] = tool.weights_note or type(tool).weights_note
    return {"address": address, "kind": "tool", "names": [tool.name], "info": info}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True, help="tool name or alias (see mmedagent.tools.list_tools())")
    parser.add_argument("--options", default="{}", help="JSON object passed to the tool's constructor (weights, device)")
    parser.add_argument("--plugin", action="append", default=[], help="module whose tool classes to register (repeatable)")
    parser.add_argument("--controller", default=None, help="controller URL (default from config)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--heartbeat-interval", type=float, default=None)
    parser.add_argument("--max-concurrency", type=int, default=4)
    add_common_args(parser)
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, args.config, api_key=args.api_key, log_level=args.log_level, host=args.host,
                      heartbeat_interval_s=args.heartbeat_interval)
    setup_logging(cfg.log_level, [cfg.api_key or ""])
    for module in [*cfg.plugins, *args.plugin]:
        try:
            load_plugin(module)
        except (ImportError, ValueError) as e:
            parser.error(f"--plugin {module}: {e}")
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as e:
        parser.error(f"--options is not valid JSON: {e}")
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    try:
        cls = get_tool(args.tool)
    except UnknownToolError as e:
        parser.error(str(e))
    t0 = time.monotonic()
    try:
        tool = cls(**options)
        tool.ensure_loaded()  # weights first: the worker registers only once it can serve
    except Exception as e:  # bad options, missing weights etc.: one clear line, not a traceback
        log.error("tool %s could not load: %s: %s", cls.name, type(e).__name__, e)
        raise SystemExit(EXIT_CANNOT_LOAD) from None
    log.info("loaded tool %s in %.1f s", tool.name, time.monotonic() - t0)
    sock = bind_socket(cfg.host, args.port)
    address = url_for(sock)
    app = build_app(tool, cfg.max_upload_bytes, args.max_concurrency)
    heartbeat = Heartbeat(
        args.controller or cfg.controller_url,
        lambda: registration(tool, address),
        app.state.queue_length,
        cfg.heartbeat_interval_s,
        cfg.api_key,
        ready=lambda: False,
    )
    print(f"tool worker {tool.name}: {address}", flush=True)
    serve_worker(app, sock, heartbeat, cfg.api_key, cfg.max_upload_bytes * 2, cfg.log_level)


if __name__ == "__main__":
    main()
