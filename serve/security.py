"""Bearer-token auth, request-size limit, log hygiene and input-free error bodies shared by every serve process."""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mmedagent.serve.config import is_loopback
from mmedagent.serve.openai_api import OPENAI_PATHS, error_body

# Never let these reach a log line: credentials, inline image bytes.
_SECRET_PATTERNS = [
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+)?[^\s\"',}]+"),
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"data:[\w.+/-]*;base64,[A-Za-z0-9+/=]*"),
    re.compile(r"[A-Za-z0-9+/]{200,}={0,2}"),  # long base64 runs
]
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
"""Characters that would end a log line early or drive a terminal: a client's text (a worker address, a
tool name) could forge whole log lines or hide others."""


def _escaped(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def _is_ours(module: str | None) -> bool:
    return bool(module) and (module == "mmedagent" or module.startswith("mmedagent."))


FULL_TRACEBACKS_ENV = "MMEDAGENT_LOG_TRACEBACKS"
"""Set to 1 to log whole tracebacks (to debug a tool or plug-in): they may quote patient data."""


class RedactFilter(logging.Filter):
    """Rewrites every record's message with secrets (the API key, bearer tokens, base64) removed, line
    breaks escaped, and an exception reduced to its type and place (and, for mmedagent's own exceptions,
    their text); ``full_tracebacks`` keeps exceptions whole."""

    def __init__(self, secrets: Iterable[str] = (), full_tracebacks: bool = False):
        super().__init__()
        self.secrets = [s for s in secrets if s]
        self.full_tracebacks = full_tracebacks

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "[redacted]")
        for pat in _SECRET_PATTERNS:
            text = pat.sub("[redacted]", text)
        return text

    def one_line(self, text: str) -> str:
        """``text`` with line breaks and other control characters escaped (``\\n``): one record, one line."""
        return _CONTROL.sub(_escaped, text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a call whose arguments do not fit its format: they may be request data, never shown
            message = f"unformattable log call at {Path(record.pathname).name}:{record.lineno}"
            record.msg, record.args = message, ()
        clean = self.scrub(message)
        if record.exc_info and record.exc_info[1] is not None and self.full_tracebacks:
            # the whole traceback, formatted now and scrubbed (the formatter reuses a record's exc_text)
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_info and record.exc_info[1] is not None:
            # A library's exception text and a traceback may quote request data (a DICOM header, a
            # question): keep the type, the last place in our code, and the text of our own exceptions.
            exc = record.exc_info[1]
            ours = [(f, n) for f, n in traceback.walk_tb(record.exc_info[2]) if _is_ours(f.f_globals.get("__name__"))]
            where = f" at {Path(ours[-1][0].f_code.co_filename).name}:{ours[-1][1]}" if ours else ""
            text = f": {self.scrub(str(exc))[:300]}" if _is_ours(type(exc).__module__) else ""
            clean = f"{clean.rstrip()} [{type(exc).__name__}{text}{where}]"
            record.exc_info, record.exc_text = None, None
        clean = self.one_line(clean)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


class _QuietPolls(logging.Filter):
    """Drops access-log lines of heartbeats and health polls (several per second per worker)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(isinstance(a, str) and a.startswith(("/receive_heartbeat", "/health", "/ready")) for a in record.args or ())


_errors = logging.getLogger("mmedagent.serve.errors")
_printing = threading.local()
_print_exception = traceback.print_exception


def _logged_print_exception(*args, **kwargs) -> None:
    """``traceback.print_exception`` (and so ``print_exc``) to stderr as a log record, which
    :class:`RedactFilter` reduces; to any other file as before."""
    bound = inspect.signature(_print_exception).bind(*args, **kwargs)
    file, exc = bound.arguments.get("file"), bound.arguments.get("value", bound.arguments["exc"])
    tb = bound.arguments.get("tb", getattr(exc, "__traceback__", None))
    if (file is not None and file is not sys.stderr) or not isinstance(exc, BaseException):
        return _print_exception(*args, **kwargs)
    if getattr(_printing, "active", False):  # the log handler itself failed: no record, no loop
        sys.stderr.write(f"{type(exc).__name__} (details withheld)\n")
        return None
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == "traceback":  # print_exc's caller
        frame = frame.f_back
    _printing.active = True
    try:
        _errors.error("error reported by %s", frame.f_globals.get("__name__", "?") if frame else "?",
                      exc_info=(type(exc), exc, tb))
    finally:
        _printing.active = False
    return None


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is not SystemExit:  # as the default hook: a thread's SystemExit ends it quietly
        _errors.error("uncaught error in thread %s", args.thread.name if args.thread else "?",
                      exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def route_tracebacks_to_log() -> None:
    """Tracebacks never reach stderr raw: those libraries print (Gradio's queue and routes call
    ``traceback.print_exc()``) and those of uncaught exceptions, in any thread, become log records,
    which :class:`RedactFilter` reduces to type and place. Their text may quote an uploaded file's
    name, a question or a DICOM tag."""
    traceback.print_exception = _logged_print_exception
    sys.excepthook = lambda kind, exc, tb: _errors.error("uncaught error", exc_info=(kind, exc, tb))
    threading.excepthook = _log_thread_exception


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """One stderr handler for the process, uvicorn's loggers included, with redaction; tracebacks
    routed through it (:func:`route_tracebacks_to_log`).

    uvicorn's loggers also get the filter themselves: a later ``logging.config.dictConfig`` (Gradio's
    ``uvicorn.Config`` applies uvicorn's default one when the web UI starts) gives them handlers of
    their own but keeps their filters, so "Exception in ASGI application" stays redacted.

    ``MMEDAGENT_LOG_TRACEBACKS=1`` logs whole tracebacks instead (secrets still removed from messages),
    with a warning: for debugging a tool on test data, never with patients' data."""
    full = os.environ.get(FULL_TRACEBACKS_ENV, "") not in ("", "0")
    redact = RedactFilter(secrets, full_tracebacks=full)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(redact)
    logging.raiseExceptions = False  # a failing handler reports nothing (logging's report quotes the call's arguments)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
        lg.filters[:] = [redact]
    logging.getLogger("uvicorn.access").addFilter(_QuietPolls())
    if full:
        logging.getLogger("mmedagent.serve").warning(
            "%s=1: whole tracebacks are logged; they may quote file names, questions and DICOM tags: use it "
            "only to debug with test data", FULL_TRACEBACKS_ENV)
    route_tracebacks_to_log()  # printed tracebacks become records too, reduced or whole (and scrubbed) as set
    for noisy in ("httpx", "httpcore", "urllib3", "PIL", "matplotlib", "multipart", "faiss", "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if root.level > logging.INFO:
        quiet_progress_bars()


def quiet_progress_bars() -> None:
    """No "Loading weights" / download progress bars (transformers', the Hub client's), in this process and the
    ones it starts: a log level above INFO asks for fewer lines, and they are many."""
    from huggingface_hub.utils import disable_progress_bars

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read at import: the children the launcher starts
    disable_progress_bars()
    if "transformers" in sys.modules:  # imported already: its own switch was read from the Hub's at import
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:80`` → ``::1``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def check_host(header: str | None, api_key: str | None) -> bool:
    """Without an API key the server is this machine's alone: a request must name it by a loopback
    name. A web page the user opens cannot then reach it through a DNS name of its own that resolves to
    127.0.0.1 (DNS rebinding); with a key, the key guards it."""
    return bool(api_key) or header is None or is_loopback(host_name(header))


def check_token(header: str | None, api_key: str | None) -> bool:
    if not api_key:
        return True
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), api_key.encode())


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have: the parser recurses once per level, and a
structure nested some hundreds deep parses but then fails wherever it is written out again (a worker's
registration made the controller's listings fail)."""
MAX_JSON_ITEMS = 100_000
"""Most values (counted as strings, arrays, objects and commas) a request body may hold: each becomes a Python
object of 30 to 100 bytes, so a 40 MB body of ``[],`` would take a gigabyte to parse."""

_STRING = re.compile(rb'"[^"]*"')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def json_shape_problem(body: bytes) -> tuple[int, str] | None:
    """Why the JSON text ``body`` is too costly to parse, as (HTTP status, reason), judged on its bytes before
    parsing (:data:`MAX_JSON_DEPTH`, :data:`MAX_JSON_ITEMS`); None when it is not, or when it is no JSON at all
    (the parser then says so). Only UTF-8 is judged, so other encodings, which JSON allows only in closed
    systems, are refused."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return 415, "request body must be JSON in UTF-8"
    marks = body.count(b"[") + body.count(b"{") + body.count(b",") + body.count(b'"')
    if marks <= MAX_JSON_DEPTH:  # too few to nest deeper or to count more items
        return None
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes inside strings go, so every quote left is one
    too_many = 413, f"request body holds more than {MAX_JSON_ITEMS} JSON values; send less at once"
    strings = text.count(b'"') // 2
    if strings > MAX_JSON_ITEMS:  # before the strings are cut out, each a piece of that work
        return too_many
    outside = _STRING.sub(b"", text)  # the text between strings: the only place of brackets and commas
    brackets = outside.translate(_BRACKETS, _NOT_BRACKETS)
    depth = 0
    for bracket in brackets[:2 * MAX_JSON_ITEMS]:  # all of them unless there are too many anyway (two per value)
        depth += 1 if bracket == ord("[") else -1
        if depth > MAX_JSON_DEPTH:
            return 422, f"request body nests JSON arrays and objects more than {MAX_JSON_DEPTH} levels deep"
    if strings + outside.count(b",") + len(brackets) // 2 > MAX_JSON_ITEMS:
        return too_many
    return None


async def _send_json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """ASGI wrapper (outermost, around the whole app): bearer token on every HTTP request (without a
    key, a loopback ``Host``: :func:`check_host`), JSON bodies only, and a hard cap on request bodies.

    The cap is enforced on ``Content-Length`` and again while the body streams in, so a client
    cannot make the server buffer more than ``max_body`` bytes; a JSON body nested too deep or holding
    too many values is refused before it is parsed (:func:`json_shape_problem`).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def refuse(status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
            """FastAPI's ``{"detail"}``; on the OpenAI routes OpenAI's error object, which its clients show."""
            body = error_body(detail, status) if scope.get("path") in OPENAI_PATHS else {"detail": detail}
            await _send_json(send, status, json.dumps(body).encode(), extra)

        if not check_host(headers.get("host"), self.api_key):
            return await refuse(421, "this server answers only to a loopback host name (127.0.0.1, localhost) "
                                     "unless it has an API key")
        if not check_token(headers.get("authorization"), self.api_key):
            return await refuse(401, "missing or wrong API key", [(b"www-authenticate", b"Bearer")])
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return await refuse(415, "request body must be application/json (images go inside as data URLs)")
        too_large = f"request body too large (limit {self.max_body} bytes)"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await refuse(413, too_large)
        # Read the body here, within the cap (a chunked body declares no length), and replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await refuse(413, too_large)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope.get("method") in ("POST", "PUT", "PATCH") and (problem := json_shape_problem(body)) is not None:
            return await refuse(*problem)
        buffered = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return buffered.pop() if buffered else await receive()

        await self.app(scope, replay, send)


class LoopbackHostOnly:
    """ASGI wrapper for a server without an API key that takes no bearer token (the web UI): a request
    naming a non-loopback ``Host`` is refused (:func:`check_host`)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers", [])).get(b"host")
            if not check_host(host.decode("latin-1") if host is not None else None, None):
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                return await _send_json(send, 421, b'{"detail":"this server answers only to a loopback host name"}')
        await self.app(scope, receive, send)


def without_echoed_input(app: FastAPI) -> FastAPI:
    """Make ``app``'s 422 answers name each bad field and the problem, without echoing the value
    sent: it may be patient text, or a NaN that JSON cannot carry back."""

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid)
    return app
