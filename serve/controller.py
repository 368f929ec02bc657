"""Controller: worker registry, agent loop, streaming chat and OpenAI-compatible APIs; starts the stack.

It runs the agent loop behind a streaming chat API and an OpenAI-compatible API, and is the one
command that starts the whole stack.

``python serve/controller.py`` (no arguments) starts on 127.0.0.1 the controller, one model
worker, one worker per tool and the web UI, prints the URLs and stops everything on Ctrl-C.
``--no-workers`` starts the controller alone (a head node that workers elsewhere register with).
"""

if __name__ == "__main__":  # run as a script: serve/ must not shadow installed packages
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import mmedagent  # noqa: F401  - arms the torchvision shim first
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from mmedagent.agent import Agent, AgentResult, AgentStep
from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import ToolCall, ToolOutcome, strip_image_token, system_message
from mmedagent.serve import openai_api as oa
from mmedagent.hub import is_hub_id
from mmedagent.serve.config import (
    API_KEY_ENV,
    DTYPES,
    ServeConfig,
    ToolSpec,
    add_common_args,
    add_limit_args,
    config_or_exit,
    exit_error,
    is_loopback,
)
from mmedagent.serve.httpclient import make_client
from mmedagent.serve.messages import (
    MAX_NEW_TOKENS,
    MAX_QUESTION_CHARS,
    MAX_STEPS,
    ClientMessage,
    ConversationId,
    as_dicts,
    too_long_conversation,
)
from mmedagent.serve.registry import NoWorkerError, RegistrationConflict, WorkerAddress, WorkerInfo, WorkerRegistry
from mmedagent.serve.remote import (
    CHAT_REQUEST_ID,
    REQUEST_ID_HEADER,
    RemoteResult,
    RemoteTool,
    WorkerBusy,
    WorkerError,
    WorkerPlanner,
    remote_tool_class,
)
from mmedagent.serve.security import setup_logging, without_echoed_input
from mmedagent.serve.uploads import UploadError, image_from_data_url, sendable_png
from mmedagent.tools import Tool, UnknownToolError, get_tool, list_tools, load_plugins
from mmedagent.tools.grounding_segmentation import share_composite_parts

# System prompts for models trained without the tool catalog ("catalog" derives it from the live tools).
log = logging.getLogger("mmedagent.serve.controller")


class ChatRequest(BaseModel):
    """Body of ``POST /chat``: one question, the conversation's image (a data URL) and the
    ``history`` returned by the previous answer."""

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    image: str | None = None
    history: list[ClientMessage] = Field(default_factory=list)  # its length: checked by the route, with advice
    model: str | None = None
    conversation_id: ConversationId | None = None
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)

    @field_validator("question")
    @classmethod
    def _has_words(cls, question: str) -> str:
        if not strip_image_token(question):
            raise ValueError("the question is empty (only spaces or the <image> marker); ask something")
        return question


def check_history_length(history: list[Any]) -> None:
    """Refuse a conversation grown past :data:`MAX_MESSAGES` with what to do about it (each question
    adds its answer and every tool round to the history)."""
    if (message := too_long_conversation(len(history))) is not None:
        raise HTTPException(422, message)


FAILURE_STATUS: dict[str, int] = {"unknown": 404, "params": 422, "unavailable": 503, "timeout": 504, "error": 502}
"""The HTTP status of a tool call that failed, by its :data:`~mmedagent.protocol.Failure` kind."""


class ChatFailure(NamedTuple):
    """How a chat run ended without an answer: what the client reads and the HTTP status (where one is sent)."""

    message: str
    status: int


class ChatCancelled(Exception):
    """The client of a chat went away: its agent run stops at its next event."""


class ToolCallRequest(BaseModel):
    params: dict[str, Any] = Field(default_factory=dict)
    image: str | None = None


class Address(BaseModel):
    address: WorkerAddress  # as registered: nothing else reaches the registry or a log line


class Heartbeat(Address):
    queue_length: int = 0
    stalled: bool = False  # a tool worker whose every call slot is held by a call past the timeout


class Lookup(BaseModel):
    kind: str = "model"
    name: str


def step_view(step: AgentStep) -> dict[str, Any]:
    """One agent step as the trace shows it: thought, tool calls, tool results, overlays, and why the reply
    ended (``finish``: "length" for a reply cut off by the token budget)."""
    turn = step.turn
    return {
        "index": step.index,
        "thoughts": turn.thoughts if turn else "",
        "actions": [a.model_dump() for a in turn.actions] if turn else [],
        "value": turn.value if turn else "",
        "outcomes": [o.model_dump() for o in step.outcomes],
        "overlays": [o.model_dump() if o is not None else None for o in step.overlays],
        "parse_error": step.parse_error,
        "raw": step.raw,
        "model_s": round(step.model_s, 4),
        "tools_s": round(step.tools_s, 4),
        "prompt_tokens": step.prompt_tokens,
        "new_tokens": step.new_tokens,
        "finish": step.finish,
    }


def _usage(result: AgentResult) -> dict[str, Any]:
    """The OpenAI ``usage`` field of a response, where the model worker reported token counts."""
    return {"usage": result.usage} if result.usage else {}


def openai_answer(result: AgentResult, stops: list[str], max_new_tokens: int) -> tuple[str, str]:
    """The agent's answer as an OpenAI client reads it, and its ``finish_reason``: the request's stop
    sequences cut the answer (never the planner's turns, whose format they would break), and
    "length" says the planner's last turn ran out of its token budget."""
    answer, cut = oa.cut_at_stop(result.answer, stops)
    last = result.steps[-1] if result.steps else None
    return answer, "stop" if cut else oa.finish_reason(last and last.new_tokens, max_new_tokens, last and last.finish)


def chat_summary(result: AgentResult, model: str, address: str, resolve: Callable[[str], Tool | None]) -> str:
    """One finished chat for the log, to debug with and never patient-identifying: the model worker,
    each step's tools (their canonical names: the model's text is not repeated), tokens, times and how
    it ended; not the question, the answer or any tool output."""
    tools = []
    for step in result.steps:
        for outcome in step.outcomes:
            tool = resolve(outcome.tool)
            tools.append(f"{tool.name if tool else 'unknown tool'} {'ok' if outcome.ok else 'failed'} {outcome.elapsed_s:.2f} s")
    usage = result.usage
    tokens = f"; tokens {usage['prompt_tokens']} in, {usage['completion_tokens']} out" if usage else ""
    model_s = sum(s.model_s for s in result.steps)
    return (f"model {model} at {address}; {len(result.steps)} steps; tools: {', '.join(tools) or 'none'}{tokens}; "
            f"model {model_s:.2f} s, total {result.wall_s:.2f} s; ended by {result.stopped}")


def request_id() -> str:
    """The id of one chat request: in its log line and the response's ``X-Request-ID`` header."""
    return uuid.uuid4().hex[:16]


def trace_view(result: AgentResult) -> dict[str, Any]:
    return {
        "steps": [step_view(s) for s in result.steps],
        "stopped": result.stopped,
        "tool_calls": result.tool_calls,
        "wall_s": round(result.wall_s, 4),
        "history": result.messages,
    }


class Controller:
    """Registry + tools + agent runs; the FastAPI app (:func:`build_app`) is a thin layer over it."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.registry = WorkerRegistry(cfg.heartbeat_expiry_s)
        self.client = make_client(cfg.api_key, cfg.tool_timeout_s)
        self.local_tools: dict[str, Tool] = {}
        self._proxies: dict[str, tuple[dict[str, Any], RemoteTool]] = {}  # name → (info it was made from, proxy)
        self._proxy_lock = threading.Lock()
        # threads per tool: as many calls of one tool at once as there are chats (more queue)
        self.dispatcher = Dispatcher({}, timeout_s=cfg.tool_timeout_s, max_workers=cfg.max_concurrent_chats)
        self.executor = ThreadPoolExecutor(cfg.max_concurrent_chats, thread_name_prefix="chat")
        self.gen_defaults = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
        self.loading: list[str] = []  # tools whose workers are still loading (kept current by the launcher)
        self.failed: set[str] = set()  # tools whose workers failed to start (kept by the launcher)
        self._demo_report: tuple[float, dict[str, Any] | None] | None = None

    # ------------------------------------------------------------------ tools

    def load_local_tools(self, specs: dict[str, ToolSpec]) -> None:
        """Load the in-process tools (weights once); each becomes available once loaded."""
        made: dict[str, Tool] = {}
        for name, spec in specs.items():
            try:
                made[name] = get_tool(name)(**spec.options)
            except Exception as e:  # bad options: reported; the others serve
                log.error("in-process tool %s failed to load: %s: %s", name, type(e).__name__, e)
        share_composite_parts([*made.values(), *self.local_tools.values()])
        for name, tool in made.items():
            try:
                tool.ensure_loaded()
            except Exception as e:  # a tool that cannot load is reported; the others serve
                log.error("in-process tool %s failed to load: %s: %s", name, type(e).__name__, e)
                continue
            self.local_tools[tool.name] = tool
            log.info("in-process tool %s loaded", tool.name)

    def in_process_names(self) -> dict[str, tuple[str, ...]]:
        """Name → names and aliases of the in-process tools, loaded or still loading: no worker may take them."""
        names = {n: t.names() for n, t in self.local_tools.items()}
        for name, spec in (self.cfg.tools or {}).items():
            if spec.in_process:
                try:
                    cls = get_tool(name)
                except UnknownToolError:
                    continue
                names.setdefault(cls.name, cls.names())
        return names

    def _proxy(self, name: str) -> RemoteTool:
        """The proxy of a worker's tool, made again when a worker registers it with other info
        (a restarted worker with new aliases, description or parameters); for a tool no worker ever registered
        (its worker failed to start), made from its class, so that a call by an alias is answered as its own."""
        info = self.registry.known.get(name) or self._class_info(name)
        with self._proxy_lock:
            made = self._proxies.get(name)
            if made is None or made[0] != info:
                cls = remote_tool_class(name, info)
                proxy = cls(self.registry, self.client, self.cfg.tool_timeout_s, self.available_tools)
                made = self._proxies[name] = (info, proxy)
            return made[1]

    def live_tools(self) -> dict[str, Tool]:
        """Tools that can run now: in-process ones and those with a live worker."""
        tools: dict[str, Tool] = {n: self._proxy(n) for n in self.registry.names("tool")}
        tools.update(self.local_tools)
        return tools

    @staticmethod
    def _class_info(name: str) -> dict[str, Any]:
        try:
            cls = get_tool(name)
        except UnknownToolError:
            return {}
        return {"aliases": list(cls.aliases), "description": cls.description, "needs_image": cls.needs_image,
                "question_param": cls.question_param}

    def all_tools(self) -> dict[str, Tool]:
        """Live tools plus tools whose workers went away or failed to start (a call then says no worker serves
        it, listing the live ones; it read as an unknown tool)."""
        known = {n for n, i in list(self.registry.known.items()) if i.get("kind") == "tool"}
        return {**{n: self._proxy(n) for n in sorted(known | self.failed)}, **self.live_tools()}

    def available_tools(self) -> list[str]:
        return sorted(self.live_tools())

    # ------------------------------------------------------------------ models / agent

    def model_names(self) -> list[str]:
        return self.registry.names("model")

    def pick_model(self, requested: str | None) -> str:
        names = self.model_names()
        if requested in (None, "", "mmedagent") and names:
            return names[0]
        if requested in names:
            return requested  # type: ignore[return-value]
        if not names:
            raise HTTPException(503, "no model worker is registered (yet); start one or wait for it to load")
        raise HTTPException(404, f"no model worker is serving {requested!r}; available models: {', '.join(names)}")

    def run_agent(
        self,
        model: str,
        question: str,
        image: Any,
        history: list[dict[str, str]],
        gen: dict[str, Any],
        max_steps: int,
        conversation_id: str | None,
        request_id: str = "-",
        on_event: Callable[[str, Any], None] | None = None,
    ) -> AgentResult:
        """One agent run (blocking; called in the chat thread pool), logged as one line under
        ``request_id`` (:func:`chat_summary`), or a line saying how it ended otherwise."""
        t0, planner = time.monotonic(), None
        chat = CHAT_REQUEST_ID.set(request_id)  # its tool calls carry it to the workers' logs
        try:
            live = self.live_tools()
            self.dispatcher.tools = self.all_tools()
            planner = WorkerPlanner(self.registry, self.client, model, conversation_id, self.cfg.model_timeout_s, request_id,
                                    [type(t) for t in live.values()])
            served = self.registry.known.get(model, {})
            system = system_message(served.get("system_prompt"), (type(t) for t in live.values()), served.get("system_text"))
            agent = Agent(planner, self.dispatcher, max_steps=max_steps, system=system, **gen)
            result = agent.run(question, image, history=history, on_event=on_event)
        except ChatCancelled:
            log.info("chat %s: stopped after %.2f s: its client went away", request_id, time.monotonic() - t0)
            raise
        except (WorkerError, NoWorkerError) as e:  # their text may quote a library's message: the type only
            log.warning("chat %s: failed after %.2f s: %s (model %s at %s)", request_id, time.monotonic() - t0,
                        type(e).__name__, model, planner.address if planner else "none")
            raise
        except Exception as e:
            log.warning("chat %s: failed after %.2f s", request_id, time.monotonic() - t0, exc_info=e)  # reduced by the log filter
            raise
        finally:
            CHAT_REQUEST_ID.reset(chat)
        log.info("chat %s: %s", request_id, chat_summary(result, model, planner.address, self.dispatcher.resolve))
        return result

    async def decode(self, data_url: str | None):
        if data_url is None:
            return None
        def usable(url: str):
            image = image_from_data_url(url, self.cfg.max_upload_bytes).image
            sendable_png(image, self.cfg.max_upload_bytes)  # what the workers get (encoded once, reused)
            return image

        try:
            return await run_in_threadpool(usable, data_url)
        except UploadError as e:
            raise HTTPException(e.status, e.reason) from None

    async def stream_agent(self, kwargs: dict[str, Any], request: Request | None = None) -> AsyncIterator[tuple[str, Any]]:
        """Run the agent in the chat pool; yield its events (token/step/answer/error) as they happen.

        When the client of ``request`` disconnects, or this generator is closed, the run stops at its
        next event: between two pieces of model text, which closes the model worker's stream (it stops
        generating), or before the next planner call after a tool round. The model worker is then free
        for the next question.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        async def watch() -> None:  # the response sends nothing while a tool runs: only receive() sees the client go
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancelled.set()

        def hand_over(kind: str, payload: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        def emit(kind: str, payload: Any) -> None:
            if cancelled.is_set():
                raise ChatCancelled
            hand_over(kind, payload)

        def work() -> None:  # run_agent logs how the run ended
            try:
                self.run_agent(**kwargs, on_event=emit)
            except ChatCancelled:
                pass
            except (WorkerError, NoWorkerError) as e:
                hand_over("error", ChatFailure(str(e), 503 if isinstance(e, WorkerBusy) else 502))
            except Exception as e:  # reported to the client; the server goes on
                hand_over("error", ChatFailure(f"internal error: {type(e).__name__}", 500))
            finally:
                hand_over("end", None)

        loop.run_in_executor(self.executor, work)
        watcher = asyncio.create_task(watch()) if request is not None else None
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "end":
                    return
                yield kind, payload
        finally:
            cancelled.set()
            if watcher is not None:
                watcher.cancel()

    def loading_tool(self, name: str) -> str | None:
        """The canonical name of ``name`` if that tool is still loading."""
        try:
            canonical = get_tool(name).name
        except UnknownToolError:
            return None
        return canonical if canonical in self.loading else None

    def tool_weights(self) -> list[dict[str, Any]]:
        """Each live tool with its loaded weights (the tool's own note) and, where configured, a
        ``label`` (e.g. the demo's "tiny random weights — demo only")."""
        specs = self.cfg.tools or {}
        out = []
        for n, t in sorted(self.live_tools().items()):
            entry = {"name": n, "where": "in-process" if n in self.local_tools else "worker",
                     "weights": getattr(t, "weights_note", "") or ""}
            label = getattr(specs.get(n), "weights_label", None)
            if label:
                entry["label"] = label
            out.append(entry)
        return out

    def demo_summary(self, models: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The demo planner's held-out evaluation, when it is the model being served."""
        from mmedagent import demo

        if not any(m.get("note") == demo.NOTE for m in models) or not demo.is_built():
            return None
        report_file = demo.demo_model_path(build_if_missing=False) / demo.REPORT_FILE
        mtime = report_file.stat().st_mtime if report_file.is_file() else 0.0
        if self._demo_report is None or self._demo_report[0] != mtime:  # read once per build, not per request
            report = demo.demo_report()
            summary = None if report is None else {
                "tool_selection_accuracy": report.get("tool_selection_accuracy"),
                "argument_validity": report.get("argument_validity"),
                "samples": len(report.get("samples") or []),
                "routes": report.get("routes"),
                "targets": report.get("targets"),
            }
            self._demo_report = (mtime, summary)
        return {"note": demo.NOTE, "evaluation": self._demo_report[1]}

    def status(self) -> dict[str, Any]:
        """What the banner shows: models and tools with their weights, loading tools, the demo's evaluation."""
        by_name: dict[str, dict[str, Any]] = {}
        for w in self.registry.workers("model"):  # several workers of one model: one entry
            by_name.setdefault(w.names[0], {**w.info, "name": w.names[0]})
        models = list(by_name.values())
        return {"models": models, "tools": self.tool_weights(), "loading": list(self.loading),
                "demo": self.demo_summary(models)}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.dispatcher.close()
        self.client.close()


def build_app(ctl: Controller) -> FastAPI:
    """The controller's HTTP API."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def expire() -> None:
            period = min(1.0, ctl.cfg.heartbeat_expiry_s / 4)
            while True:
                await asyncio.sleep(period)
                for address in ctl.registry.expire():
                    log.warning("worker %s missed its heartbeats; dropped", address)

        task = asyncio.create_task(expire())
        yield
        task.cancel()

    app = oa.openai_errors(without_echoed_input(FastAPI(title="mmedagent controller", lifespan=lifespan)))

    # ------------------------------------------------------------------ registry

    @app.post("/register_worker")
    async def register_worker(worker: WorkerInfo) -> dict[str, Any]:
        if not ctl.cfg.api_key and not is_loopback(urlsplit(worker.address).hostname or ""):
            raise HTTPException(403, "without an API key only workers on this machine (a loopback address) may register; "
                                     f"set one (--api-key or env {API_KEY_ENV}) on the controller and its workers")
        try:
            ctl.registry.register(worker, reserved=ctl.in_process_names())
        except RegistrationConflict as e:
            log.error("%s", e)
            raise HTTPException(409, str(e)) from None
        log.info("registered %s worker %s for %s", worker.kind, worker.address, ", ".join(worker.names))
        return {"ok": True}

    @app.post("/receive_heartbeat")
    async def receive_heartbeat(beat: Heartbeat) -> dict[str, Any]:
        return {"exist": ctl.registry.heartbeat(beat.address, beat.queue_length, beat.stalled)}

    @app.post("/unregister_worker")
    async def unregister_worker(body: Address) -> dict[str, Any]:
        if ctl.registry.remove(body.address):
            log.info("worker %s left", body.address)
        return {"ok": True}

    @app.get("/list_workers")
    async def list_workers() -> dict[str, Any]:
        return {"workers": [w.model_dump() for w in ctl.registry.workers()]}

    @app.post("/get_worker_address")
    async def get_worker_address(body: Lookup) -> dict[str, Any]:
        if body.kind not in ("model", "tool"):
            raise HTTPException(422, "kind must be 'model' or 'tool'")
        try:
            return {"address": ctl.registry.pick(body.kind, body.name)}  # type: ignore[arg-type]
        except NoWorkerError as e:
            raise HTTPException(404, str(e)) from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: 200 while the controller runs; ``ready`` says whether a chat can be answered now."""
        return {"ok": True, "ready": bool(ctl.model_names()), "models": len(ctl.registry.workers("model")),
                "tool_workers": len(ctl.registry.workers("tool")), "loading": list(ctl.loading)}

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        """Readiness, for a monitor or load balancer: 200 once a model worker is registered, else 503 saying so."""
        models = ctl.model_names()
        if not models:
            raise HTTPException(503, "not ready: no model worker is registered (still loading, or it failed: see the "
                                     "controller's log)")
        return {"ready": True, "models": models, "tools": ctl.available_tools(), "loading": list(ctl.loading)}

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return ctl.status()

    # ------------------------------------------------------------------ tools

    @app.get("/v1/tools")
    async def tools() -> dict[str, Any]:
        return {
            "tools": [
                {**type(t).schema(), "where": "in-process" if n in ctl.local_tools else "worker"}
                for n, t in sorted(ctl.live_tools().items())
            ]
        }

    @app.post("/v1/tools/{name}")
    async def call_tool(name: str, body: ToolCallRequest) -> dict[str, Any]:
        """Run one tool on an image directly (no planner): the UI's and the benchmark's tool path."""
        ctl.dispatcher.tools = ctl.all_tools()
        image = await ctl.decode(body.image)
        call = ToolCall(API_name=name, API_params=body.params)
        prepared = ctl.dispatcher.prepare(call, image)
        if isinstance(prepared, ToolOutcome):
            if prepared.failure == "unknown" and (loading := ctl.loading_tool(name)):
                raise HTTPException(503, f"tool {loading!r} is still loading; it registers when ready")
            raise HTTPException(FAILURE_STATUS[prepared.failure or "error"], prepared.error)
        (outcome,), (result,) = await run_in_threadpool(ctl.dispatcher.dispatch_all, [call], image)
        if not outcome.ok:
            raise HTTPException(FAILURE_STATUS[outcome.failure or "error"], outcome.error)
        overlay = result.overlay() if result is not None else None
        return {
            "tool": outcome.tool,
            "output": outcome.output,
            "result": result.data if isinstance(result, RemoteResult) else result.model_dump(mode="json"),
            "overlay": overlay.model_dump() if overlay is not None else None,
            "elapsed_s": outcome.elapsed_s,
            "worker_elapsed_s": result.worker_elapsed_s if isinstance(result, RemoteResult) else None,
        }

    # ------------------------------------------------------------------ chat

    @app.post("/chat")
    async def chat(req: ChatRequest, request: Request) -> StreamingResponse:
        """Streams NDJSON events: ``token`` (model text), ``step`` (thought, tool calls, results,
        overlays), then ``answer`` (with the ``history`` for the next turn) or ``error``."""
        check_history_length(req.history)
        model = ctl.pick_model(req.model)
        image = await ctl.decode(req.image)
        gen = {**ctl.gen_defaults, **req.model_dump(include={"max_new_tokens", "temperature", "top_p"}, exclude_none=True)}
        kwargs = dict(
            model=model, question=req.question, image=image, history=as_dicts(req.history), gen=gen,
            max_steps=req.max_steps or ctl.cfg.max_steps, conversation_id=req.conversation_id,
            request_id=request_id(),
        )

        async def events() -> AsyncIterator[str]:
            async with contextlib.aclosing(ctl.stream_agent(kwargs, request)) as run:  # a disconnect stops the run
                async for kind, payload in run:
                    if kind == "token":
                        event = {"type": "token", "text": payload}
                    elif kind == "step":
                        event = {"type": "step", "step": step_view(payload)}
                    elif kind == "answer":
                        event = {"type": "answer", "answer": payload.answer, "model": model, **trace_view(payload)}
                    else:
                        event = {"type": "error", "error": payload.message}
                    yield json.dumps(event, ensure_ascii=False) + "\n"

        return StreamingResponse(events(), media_type="application/x-ndjson", headers={REQUEST_ID_HEADER: kwargs["request_id"]})

    # ------------------------------------------------------------------ OpenAI API

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        notes = {w.names[0]: w.info.get("note", "") for w in ctl.registry.workers("model")}
        return oa.model_list(ctl.model_names(), notes=notes, tools=ctl.tool_weights())

    @app.post("/v1/chat/completions")
    async def chat_completions(req: oa.ChatCompletionRequest, request: Request):
        """OpenAI chat completions answered by the agent; the tool trace is in ``mmedagent_trace``."""
        try:
            messages, image_url = oa.split_messages(req.messages)
        except UploadError as e:
            raise HTTPException(e.status, e.reason) from None
        if messages[-1]["role"] != "user":
            raise HTTPException(400, "the last message must be the user's question")
        model = ctl.pick_model(req.model)
        image = await ctl.decode(image_url)
        history = [m for m in messages[:-1] if m["role"] != "system"]  # the agent's own system prompt lists the tools
        question = strip_image_token(messages[-1]["content"])
        if not question:
            raise HTTPException(400, "the user's question is empty")
        gen = req.gen(ctl.gen_defaults)
        kwargs = dict(
            model=model, question=question, image=image, history=history, gen=gen,
            max_steps=ctl.cfg.max_steps, conversation_id=None,
        )
        stops, cid = req.stops(), oa.completion_id()
        kwargs["request_id"] = cid  # the id the client reads is the one in the log
        traced = {REQUEST_ID_HEADER: cid}
        if not req.stream:
            result: AgentResult | None = None
            async with contextlib.aclosing(ctl.stream_agent(kwargs, request)) as run:  # a disconnect stops the run
                async for kind, payload in run:
                    if kind == "error":
                        return JSONResponse(oa.error_body(payload.message, payload.status), status_code=payload.status,
                                            headers=traced)
                    if kind == "answer":
                        result = payload
            if result is None:  # stopped: the client went away, nobody reads this
                return Response(status_code=499)
            answer, finish = openai_answer(result, stops, gen["max_new_tokens"])
            body = oa.completion(cid, model, answer, finish, **_usage(result), mmedagent_trace=trace_view(result))
            return JSONResponse(body, headers=traced)

        async def sse() -> AsyncIterator[str]:
            yield oa.chunk(cid, model, {"role": "assistant", "content": ""})
            async with contextlib.aclosing(ctl.stream_agent(kwargs, request)) as run:  # a disconnect stops the run
                async for kind, payload in run:
                    if kind == "step":
                        yield oa.chunk(cid, model, {}, mmedagent_step=step_view(payload))
                    elif kind == "answer":
                        answer, finish = openai_answer(payload, stops, gen["max_new_tokens"])
                        yield oa.chunk(cid, model, {"content": answer})
                        yield oa.chunk(cid, model, {}, finish, **_usage(payload), mmedagent_trace=trace_view(payload))
                    elif kind == "error":
                        yield oa.error_event(payload.message)
            yield oa.SSE_DONE

        return StreamingResponse(sse(), media_type="text/event-stream", headers=traced)

    return app


# ---------------------------------------------------------------------------- one command


def tool_specs(cfg: ServeConfig) -> dict[str, ToolSpec]:
    """The configured tools, or every registered tool with one worker each."""
    if cfg.tools is not None:
        return cfg.tools
    return {cls.name: ToolSpec() for cls in list_tools()}


def is_background(name: str, spec: ToolSpec) -> bool:
    """Whether the ready line goes on without this tool (it registers once loaded): the spec's
    ``background``, else the tool class's ``slow_load``."""
    if spec.background is not None:
        return spec.background
    try:
        return get_tool(name).slow_load
    except UnknownToolError:
        return False


def main(argv: list[str] | None = None) -> None:
    from mmedagent.serve.launcher import Launcher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="controller / API port (default 21001; 0: any free port)")
    parser.add_argument("--web-port", type=int, default=None, help="web UI port (default 7860; 0: any free port)")
    parser.add_argument("--no-web", action="store_true", help="do not start the web UI")
    parser.add_argument("--model-path", default=None, help="planner checkpoint (default: demo model, else a tiny random one)")
    parser.add_argument("--model-base", default=None, help="with a LoRA adapter as --model-path: its base model "
                        "(default: the base the adapter records)")
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--conv-template", default=None)
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="the planner's weights (default: bfloat16 on a CUDA GPU that has it, else float32)")
    parser.add_argument("--prompt-lookup", type=int, default=None,
                        help="planner drafts this many tokens per step from its context (greedy; same output); 0: off")
    parser.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=None,
                        help="planner decodes each turn under the turn format and the tools' schemas, so every call "
                        "parses (default: the model dir's mmedagent.json, else off)")
    parser.add_argument("--system-prompt", choices=("catalog", "plain", "none"), default=None,
                        help="planner's system prompt: tool catalog, plain Vicuna text, or none (default: from the model dir)")
    parser.add_argument("--backend-url", default=None, help="model worker forwards to this OpenAI-compatible API root")
    parser.add_argument("--tools", default=None, help="comma-separated tools to start workers for (default: all)")
    parser.add_argument("--tool-weights", choices=("demo", "default"), default=None,
                        help="weights of tools without configured options: demo = tiny random ones built once (retrieval: "
                        "real MiniLM over ICD-10-CM); default = each tool's published weights. Default: demo without "
                        "--model-path (demo or tiny planner), default with it")
    parser.add_argument("--in-process-tools", default=None, help="comma-separated tools to run inside the controller")
    parser.add_argument("--no-workers", action="store_true", help="controller only (workers register from elsewhere)")
    parser.add_argument("--heartbeat-interval", type=float, default=None)
    parser.add_argument("--heartbeat-expiry", type=float, default=None)
    parser.add_argument("--tool-timeout", type=float, default=None)
    parser.add_argument("--max-upload-mb", type=float, default=None)
    parser.add_argument("--plugin", action="append", default=None, help="module whose tool classes to register (repeatable)")
    add_limit_args(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    tools = None
    if args.tools is not None or args.in_process_tools is not None:
        tools = {n.strip(): {} for n in (args.tools or "").split(",") if n.strip()}
        tools.update({n.strip(): {"in_process": True} for n in (args.in_process_tools or "").split(",") if n.strip()})
    cfg = config_or_exit(
        parser, args.config, host=args.host, port=args.port, web_port=args.web_port, model_path=args.model_path,
        model_base=args.model_base, model_name=args.model_name, conv_template=args.conv_template, dtype=args.dtype, model_backend_url=args.backend_url,
        system_prompt=args.system_prompt, tool_weights=args.tool_weights, prompt_lookup=args.prompt_lookup,
        constrain=args.constrain, tools=tools, no_workers=args.no_workers or None, api_key=args.api_key, log_level=args.log_level,
        heartbeat_interval_s=args.heartbeat_interval, heartbeat_expiry_s=args.heartbeat_expiry,
        tool_timeout_s=args.tool_timeout, max_upload_mb=args.max_upload_mb, plugins=args.plugin,
        max_connections=args.max_connections, request_read_timeout_s=args.request_read_timeout,
    )
    if args.no_web:
        cfg.web_port = None
    setup_logging(cfg.log_level, [cfg.api_key or "", cfg.model_backend_api_key or ""])
    if not cfg.no_workers and not cfg.model_backend_url:  # a model worker that would start, fail and leave no model
        for flag, ref in (("--model-path", cfg.model_path), ("--model-base", cfg.model_base)):
            if ref and ref != "demo" and not is_hub_id(ref) and not Path(ref).expanduser().exists():
                exit_error(parser, f"{flag} / the config's {flag[2:].replace('-', '_')}: {ref} does not exist (relative "
                                   f"paths are read from {Path.cwd()}); give the model's folder")
    try:
        load_plugins(cfg.plugins)  # tools that may run in-process
    except ValueError as e:
        exit_error(parser, str(e))
    for name, spec in tool_specs(cfg).items():  # the tools started here (a head node's workers bring their own)
        if spec.in_process or not cfg.no_workers:
            try:
                get_tool(name)
            except UnknownToolError as e:
                exit_error(parser, f"--tools / the config's tools: {e}")
    Launcher(cfg, args.config).run()


if __name__ == "__main__":
    main()
