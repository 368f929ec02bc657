"""Model worker: hosts one planner and streams its tokens.

``python serve/model_worker.py --model-path PATH`` loads a checkpoint through the model layer
(``mmedagent.model.load_planner``, KV cache kept between a conversation's planning and answer
passes); ``--backend-url http://gpu-box:8000/v1`` instead forwards every call to an
OpenAI-compatible server (vLLM, another model worker), which is how serving scales past one
machine. Besides the controller's ``/worker_generate_stream`` it speaks OpenAI itself
(``/v1/chat/completions``, ``/v1/models``) with raw model turns.
"""

if __name__ == "__main__":  # run as a script: serve/ must not shadow installed packages
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import mmedagent  # noqa: F401  - arms the torchvision shim first
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from mmedagent.agent import openai_usage, token_counts
from mmedagent.protocol import system_message
from mmedagent.serve import openai_api as oa
from mmedagent.serve.config import DTYPES, ServeConfig, add_common_args, add_limit_args, config_or_exit, is_loopback
from mmedagent.serve.remote import CHAT_REQUEST_ID, REQUEST_ID_HEADER, loggable_id, remote_tool_class, shown_url
from mmedagent.serve.messages import (DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS, MAX_PROMPT_MESSAGES, MAX_STOPS, ConversationId,
                                      StopString, TextMessage, as_dicts)
from mmedagent.serve.security import setup_logging, without_echoed_input
from mmedagent import demo
from mmedagent.serve.uploads import UploadError, image_from_data_url
from mmedagent.serve.worker_base import (BACKEND_URL_ENV, EXIT_CANNOT_LOAD, Heartbeat, bind_socket, follow_launcher,
                                         serve_worker, url_for)

log = logging.getLogger("mmedagent.serve.model_worker")

TINY_NOTE = "tiny random checkpoint — not a medical device; answers are noise"


def default_model(cache_dir: Path) -> tuple[str, str]:
    """(path, banner note) of the planner to serve when none is configured: the embedded demo
    model when it is built, else a tiny random LLaVA built once into the cache."""
    if demo.is_built():
        return str(demo.demo_model_path(build_if_missing=False)), demo.NOTE
    log.warning("the demo model is not built (python scripts/build_demo_model.py); serving a tiny random checkpoint")
    from mmedagent.model.tiny import make_tiny_model

    target = cache_dir / "tiny-llava"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tiny-llava-", dir=target.parent))
        make_tiny_model("llava", tmp)
        try:
            os.replace(tmp, target)  # atomic: concurrent starts never see half a checkpoint
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return str(target), TINY_NOTE


MAX_OFFERED_TOOLS = 200


class OfferedTool(BaseModel):
    """A tool the chat offers the model: what constrained decoding holds a call to (its name or an alias, and
    params valid for its schema)."""

    name: str = Field(min_length=1, max_length=200)
    aliases: list[Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]] = Field(default_factory=list,
                                                                                          max_length=50)
    params: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class GenerateRequest(BaseModel):
    messages: list[TextMessage] = Field(min_length=1, max_length=MAX_PROMPT_MESSAGES)
    image: str | None = None
    conversation_id: ConversationId | None = None
    max_new_tokens: int = Field(default=DEFAULT_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[StopString] | None = Field(default=None, max_length=MAX_STOPS)
    max_wait_s: float | None = Field(default=None, gt=0,
                                     description="how long to wait for a busy model (none: the worker's model_timeout_s)")
    tools: list[OfferedTool] | None = Field(default=None, max_length=MAX_OFFERED_TOOLS,
                                            description="the tools the chat offers (none: every registered tool)")


KEEPALIVE_S = 5.0
"""A request waiting for the model is sent an empty piece this often (at most a third of its wait limit),
so that its caller's read timeout measures the model's silence, not the queue."""


class Busy(RuntimeError):
    """A request got no turn at the model within its wait limit."""


class ModelHost:
    """One planner, used by one request at a time (its KV cache belongs to the current conversation),
    or by up to ``planner.max_concurrency`` at once where the planner says it batches (a backend)."""

    def __init__(self, planner: Any, name: str, info: dict[str, Any], max_upload_bytes: int,
                 max_wait_s: float | None = None):
        self.planner, self.name, self.info, self.max_upload_bytes = planner, name, info, max_upload_bytes
        self.max_wait_s = max_wait_s  # a request's wait for the model when it names none (None: no limit)
        self.slots = threading.BoundedSemaphore(getattr(planner, "max_concurrency", 1))
        self.waiting = 0
        self._count_lock = threading.Lock()
        self._offered: tuple[tuple[str, ...], list[Any]] = ((), [])  # the last tool set offered, as classes

    def queue_length(self) -> int:
        return self.waiting

    def image(self, data_url: str | None):
        if data_url is None:
            return None
        try:
            return image_from_data_url(data_url, self.max_upload_bytes).image
        except UploadError as e:
            raise HTTPException(e.status, e.reason) from None

    def _classes(self, tools: list[OfferedTool]) -> list[Any]:
        """The offered tools as tool classes, made again only when the set changes (it rarely does)."""
        key = tuple(t.model_dump_json() for t in tools)
        if key != self._offered[0]:
            self._offered = key, [remote_tool_class(t.name, t.model_dump()) for t in tools]
        return self._offered[1]

    def _turn(self, ahead: int, max_wait_s: float | None) -> Iterator[str]:
        """Take a turn at the model (a slot): "" every :data:`KEEPALIVE_S` while waiting, :class:`Busy`
        after ``max_wait_s`` (None: no limit)."""
        interval = KEEPALIVE_S if max_wait_s is None else min(KEEPALIVE_S, max_wait_s / 3)
        deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Busy(f"model {self.name!r} is busy: no turn came within {max_wait_s:g} s ({ahead} request(s) "
                           "were ahead of this one); try again later, or start another model worker for it")
            if self.slots.acquire(timeout=interval if left is None else min(interval, left)):
                return
            yield ""

    def stream(self, messages: list[dict[str, str]], image: Any, gen: dict[str, Any],
               stats: dict[str, Any] | None = None, request_id: str | None = None,
               max_wait_s: float | None = None, tools: list[OfferedTool] | None = None) -> Iterator[str]:
        """The reply in pieces, after waiting for the model (empty pieces while waiting, :class:`Busy`
        after ``max_wait_s``, by default the host's), a constrained planner held to ``tools`` (None: every
        registered tool); ``stats``, when given, receives the call's token counts (``prompt_tokens``,
        ``new_tokens``) and why it ended (``finish``) where the planner reports them.
        Each call is one log line (``request_id``: the controller's chat): its tokens, how long it waited
        for the model and how long it ran; never the text."""
        with self._count_lock:
            self.waiting += 1
            ahead = self.waiting - 1
        queued, started, ended = time.monotonic(), None, "stopped by its client"
        try:
            yield from self._turn(ahead, self.max_wait_s if max_wait_s is None else max_wait_s)
            started = time.monotonic()
            try:
                if hasattr(self.planner, "tools"):  # set while this call holds the model
                    self.planner.tools = None if tools is None else self._classes(tools)
                CHAT_REQUEST_ID.set(request_id)  # a backend's log names the chat too (each call sets its own)
                stream = getattr(self.planner, "stream", None)
                if stream is None:
                    yield self.planner.generate(messages, image, **gen)
                else:
                    yield from stream(messages, image, **gen)
                counts = token_counts(self.planner)
                if stats is not None and counts:
                    stats.update(prompt_tokens=counts[0], new_tokens=counts[1])
                    if (finish := getattr(self.planner, "last_stats", {}).get("finish")) is not None:
                        stats["finish"] = finish
                ended = f"{counts[0]} prompt and {counts[1]} new tokens" if counts else "done"
            finally:
                self.slots.release()
        except Busy:
            ended = "not started (the model stayed busy)"
            raise
        except Exception as e:
            ended = f"failed ({type(e).__name__})"
            raise
        finally:
            now = time.monotonic()
            log.info("request %s: %s in %.2f s, after %.2f s waiting for the model", request_id or "-", ended,
                     now - (started or now), (started or now) - queued)
            with self._count_lock:
                self.waiting -= 1


async def _pump(pieces: Iterator[str]) -> AsyncIterator[str | BaseException]:
    """Iterate a blocking generator in a thread; yields its items (or the exception it raised).

    When the consumer goes away (the client disconnected, the response was cancelled), the
    generator is closed at its next item: generation stops and releases the model at once instead
    of running on to ``max_new_tokens`` while every other request waits.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    abandoned = threading.Event()

    def hand_over(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            abandoned.set()

    def run() -> None:
        try:
            for p in pieces:
                if abandoned.is_set():
                    break
                hand_over(p)
        except BaseException as e:  # handed to the response, which reports it
            hand_over(e)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # the generator's own cleanup: the planner's and the host's locks are released
            hand_over(done)

    threading.Thread(target=run, name="generate", daemon=True).start()
    try:
        while (item := await queue.get()) is not done:
            yield item
    finally:
        abandoned.set()


def build_app(host: ModelHost) -> FastAPI:
    app = oa.openai_errors(without_echoed_input(FastAPI(title=f"mmedagent model worker: {host.name}")))

    @app.post("/worker_generate_stream")
    async def generate_stream(req: GenerateRequest, request: Request) -> StreamingResponse:
        image = await run_in_threadpool(host.image, req.image)
        gen = req.model_dump(include={"max_new_tokens", "temperature", "top_p", "stop"}, exclude_none=True)

        async def events() -> AsyncIterator[str]:
            stats: dict[str, Any] = {}
            rid = loggable_id(request.headers.get(REQUEST_ID_HEADER))
            async for item in _pump(host.stream(as_dicts(req.messages), image, gen, stats, rid, req.max_wait_s, req.tools)):
                if isinstance(item, Busy):
                    yield json.dumps({"error": str(item), "busy": True}) + "\n"
                    return
                if isinstance(item, BaseException):
                    log.warning("generation failed", exc_info=item)  # reduced by the log filter
                    yield json.dumps({"error": f"generation failed: {type(item).__name__}: {item}"}) + "\n"
                    return
                yield json.dumps({"text": item}, ensure_ascii=False) + "\n"
            if stats:
                yield json.dumps({"stats": stats}) + "\n"

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: oa.ChatCompletionRequest):
        if req.model and req.model != host.name:
            raise HTTPException(404, f"model {req.model!r} is not served here; this worker serves {host.name!r}")
        try:
            messages, image_url = oa.split_messages(req.messages)
        except UploadError as e:
            raise HTTPException(e.status, e.reason) from None
        image = await run_in_threadpool(host.image, image_url)
        gen = req.gen({"max_new_tokens": DEFAULT_NEW_TOKENS})
        if stops := req.stops():  # raw model text: the planner itself stops at them
            gen["stop"] = stops
        cid = oa.completion_id()
        stats: dict[str, Any] = {}

        def usage() -> dict[str, Any]:
            return {"usage": openai_usage(stats["prompt_tokens"], stats["new_tokens"])} if stats else {}

        def finish() -> str:  # "length": the reply was cut off by the token budget or the model's context
            return oa.finish_reason(stats.get("new_tokens"), gen["max_new_tokens"], stats.get("finish"))

        if not req.stream:
            pieces = []
            async for item in _pump(host.stream(messages, image, gen, stats)):
                if isinstance(item, Busy):
                    raise HTTPException(503, str(item))
                if isinstance(item, BaseException):
                    raise HTTPException(500, f"generation failed: {type(item).__name__}: {item}")
                pieces.append(item)
            return oa.completion(cid, host.name, "".join(pieces), finish(), **usage())

        async def sse() -> AsyncIterator[str]:
            yield oa.chunk(cid, host.name, {"role": "assistant", "content": ""})
            async for item in _pump(host.stream(messages, image, gen, stats)):
                if isinstance(item, Busy):
                    yield oa.error_event(str(item))
                    break
                if isinstance(item, BaseException):
                    yield oa.error_event(f"generation failed: {type(item).__name__}: {item}")
                    break
                yield oa.chunk(cid, host.name, {"content": item})
            else:
                yield oa.chunk(cid, host.name, {}, finish(), **usage())
            yield oa.SSE_DONE

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return oa.model_list([host.name])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "model": host.name, "queue_length": host.queue_length()}

    @app.get("/worker_get_status")
    async def status() -> dict[str, Any]:
        return {"names": [host.name], "queue_length": host.queue_length(), "info": host.info}

    return app


def load_host(cfg: ServeConfig) -> ModelHost:
    """Load the configured planner (or the default one) and describe it for the banner."""
    t0 = time.monotonic()
    if cfg.model_backend_url:
        from mmedagent.serve.remote import OpenAIPlanner

        nearby = is_loopback(urlsplit(cfg.model_backend_url).hostname or "")
        key = cfg.model_backend_api_key or (cfg.api_key if nearby else None)
        planner = OpenAIPlanner(cfg.model_backend_url, cfg.model_backend_model, key, cfg.model_timeout_s)
        info, note = dict(planner.info()), f"forwarded to {shown_url(cfg.model_backend_url)}"
        info["system_prompt"] = cfg.system_prompt or "catalog"
    else:
        from mmedagent.model import load_planner, planner_settings

        if cfg.model_path == "demo":  # the embedded demo planner, built first if missing
            path, note = str(demo.demo_model_path(build_if_missing=True)), demo.NOTE
        elif cfg.model_path:
            path, note = cfg.model_path, ""
        else:
            path, note = default_model(cfg.cache_path())
        settings = planner_settings(path)
        constrain = cfg.constrain if cfg.constrain is not None else bool(settings.get("constrain"))
        options: dict[str, Any] = {"conv_template": cfg.conv_template, "kv_reuse": True,
                                   "prompt_lookup": cfg.prompt_lookup, "constrain": constrain}
        if cfg.device:
            options["device"] = cfg.device
        if cfg.dtype:
            options["dtype"] = cfg.dtype
        if cfg.model_base:  # the adapter at model_path on this base (its recorded base may be elsewhere)
            path, options["adapter"] = cfg.model_base, path
        planner = load_planner(path, **options)
        info = dict(planner.info())
        info["system_prompt"] = cfg.system_prompt or settings.get("system_prompt") or "catalog"
        if info["system_prompt"] == "text":  # the trained text: checked here, not at every chat
            info["system_text"] = system_message("text", (), settings.get("system_text"))
    info["note"] = note
    info["demo"] = note == demo.NOTE
    name = cfg.model_name or str(info.get("name") or "planner")
    log.info("loaded planner %s in %.1f s", name, time.monotonic() - t0)
    return ModelHost(planner, name, info, cfg.max_upload_bytes, cfg.model_timeout_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="checkpoint directory or hub id (default: demo or tiny model)")
    parser.add_argument("--model-base", default=None, help="with a LoRA adapter as --model-path: its base model "
                        "(default: the base the adapter records)")
    parser.add_argument("--model-name", default=None, help="name clients use (default: from the checkpoint)")
    parser.add_argument("--conv-template", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="the planner's weights (default: bfloat16 on a CUDA GPU that has it, else float32)")
    parser.add_argument("--prompt-lookup", type=int, default=None, help="draft tokens for prompt-lookup decoding (0: off)")
    parser.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=None,
                        help="decode turns under the turn format and tool schemas (default: mmedagent.json, else off)")
    parser.add_argument("--system-prompt", choices=("catalog", "plain", "none"), default=None,
                        help="what the model was trained with (default: mmedagent.json in the model dir, else catalog)")
    parser.add_argument("--backend-url", default=None, help="forward to this OpenAI-compatible API root instead "
                        f"(default: ${BACKEND_URL_ENV}, how the launcher passes it, out of sight of ps)")
    parser.add_argument("--backend-model", default=None)
    parser.add_argument("--controller", default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--heartbeat-interval", type=float, default=None)
    parser.add_argument("--max-upload-mb", type=float, default=None, help="largest image (default from config)")
    parser.add_argument("--no-register", action="store_true", help="serve alone (OpenAI API), no controller")
    add_limit_args(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.backend_url = args.backend_url or os.environ.pop(BACKEND_URL_ENV, None)  # not inherited any further
    cfg = config_or_exit(
        parser, args.config, api_key=args.api_key, log_level=args.log_level, host=args.host, model_path=args.model_path,
        model_base=args.model_base, max_upload_mb=args.max_upload_mb, model_name=args.model_name, conv_template=args.conv_template, device=args.device, dtype=args.dtype, system_prompt=args.system_prompt,
        model_backend_url=args.backend_url, model_backend_model=args.backend_model,
        heartbeat_interval_s=args.heartbeat_interval, prompt_lookup=args.prompt_lookup, constrain=args.constrain,
        max_connections=args.max_connections, request_read_timeout_s=args.request_read_timeout,
    )
    setup_logging(cfg.log_level, [cfg.api_key or "", cfg.model_backend_api_key or ""])
    follow_launcher()
    try:
        host = load_host(cfg)  # the model first: the worker registers only once it can serve
    except Exception as e:  # missing weights, no Hub access...: one clear line, not a restart loop
        log.error("model %s could not load: %s: %s", cfg.model_path or "(default)", type(e).__name__, e)
        log.debug("model load failure", exc_info=True)
        raise SystemExit(EXIT_CANNOT_LOAD) from None
    sock = bind_socket(cfg.host, args.port)
    address = url_for(sock)
    heartbeat = None
    if not args.no_register:
        heartbeat = Heartbeat(
            args.controller or cfg.controller_url,
            lambda: {"address": address, "kind": "model", "names": [host.name], "info": host.info},
            host.queue_length,
            cfg.heartbeat_interval_s,
            cfg.api_key,
            ready=lambda: False,
        )
    print(f"model worker {host.name}: {address}", flush=True)
    serve_worker(build_app(host), sock, heartbeat, cfg, cfg.max_upload_bytes * 2)


if __name__ == "__main__":
    main()
