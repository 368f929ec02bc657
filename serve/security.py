"""Bearer-token auth, request-size limit and log hygiene shared by every serve process."""

from __future__ import annotations

import hmac
import logging
import re
import sys
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

# Never let these reach a log line: credentials, inline image bytes.
_SECRET_PATTERNS = [
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+)?[^\s\"',}]+"),
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"data:[\w.+/-]*;base64,[A-Za-z0-9+/=]*"),
    re.compile(r"[A-Za-z0-9+/]{200,}={0,2}"),  # long base64 runs
]


class RedactFilter(logging.Filter):
    """Rewrites every record's message with secrets (the API key, bearer tokens, base64) removed."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "[redacted]")
        for pat in _SECRET_PATTERNS:
            text = pat.sub("[redacted]", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not kill logging
            message = str(record.msg)
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks may quote request data; keep the type and a scrubbed message only.
            exc = record.exc_info[1]
            record.msg = f"{record.msg} [{type(exc).__name__}: {self.scrub(str(exc))[:300]}]"
            record.exc_info, record.exc_text = None, None
        return True


class _QuietPolls(logging.Filter):
    """Drops access-log lines of heartbeats and health polls (several per second per worker)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(isinstance(a, str) and a.startswith(("/receive_heartbeat", "/health")) for a in record.args or ())


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    """One stderr handler for the process, uvicorn's loggers included, with redaction."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").filters[:] = [_QuietPolls()]
    for noisy in ("httpx", "httpcore", "urllib3", "PIL", "matplotlib", "multipart"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_token(header: str | None, api_key: str | None) -> bool:
    if not api_key:
        return True
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), api_key.encode())


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
    """ASGI wrapper (outermost, around the whole app): bearer token on every HTTP request, JSON
    bodies only, and a hard cap on request bodies.

    The cap is enforced on ``Content-Length`` and again while the body streams in, so a client
    cannot make the server buffer more than ``max_body`` bytes.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not check_token(headers.get("authorization"), self.api_key):
            return await _send_json(
                send, 401, b'{"detail":"missing or wrong bearer token"}', [(b"www-authenticate", b"Bearer")]
            )
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return await _send_json(send, 415, b'{"detail":"request body must be application/json (images go inside as data URLs)"}')
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send_json(send, 413, self._too_large())
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge()
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, self._too_large())

    def _too_large(self) -> bytes:
        return b'{"detail":"request body too large (limit %d bytes)"}' % self.max_body


class BodyTooLarge(Exception):
    """Raised inside the app when the streamed body passes the limit."""
