"""What the services share: the HTTP server with its limits (the controller's too); for model and tool workers a
bound socket, registration after load, heartbeats, shutdown."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
import httpx
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mmedagent.serve.config import ServeConfig
from mmedagent.serve.httpclient import error_detail, make_client
from mmedagent.serve.security import GuardMiddleware

log = logging.getLogger(__name__)

EXIT_CANNOT_LOAD = 3
"""Exit status of a worker whose model or tool cannot load (missing weights, no Hub access): the
launcher reports it and does not restart it, since a restart would fail the same way."""

EXIT_REFUSED = 4
"""Exit status of a worker the controller will not register (409: its tool's name or an alias is
another tool's): reported, not restarted, since a restart would be refused the same way."""


LAUNCHER_PID_ENV = "MMEDAGENT_LAUNCHER_PID"
"""Set by ``python serve/controller.py`` for the children it starts: they stop when it is gone."""
TOOL_OPTIONS_ENV = "MMEDAGENT_TOOL_OPTIONS"
"""A tool worker's constructor options (JSON) from the launcher: a plug-in's credentials stay off command lines."""
BACKEND_URL_ENV = "MMEDAGENT_BACKEND_URL"
"""The model worker's backend URL from the launcher: credentials in it stay off command lines."""


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM handled like Ctrl-C: uvicorn shuts down gracefully, then raises the signal again, which
    by default would end the process before its ``finally`` blocks (a worker's unregistering, the
    launcher's stopping of its children) run."""
    raise KeyboardInterrupt


def follow_launcher(poll_s: float = 1.0) -> None:
    """In a child of the launcher (:data:`LAUNCHER_PID_ENV` set): stop this process (SIGTERM to itself)
    once the launcher is gone, killed without stopping its children (SIGKILL, the OOM killer). Without
    it they would live on, holding ports and memory, and register again with the next launcher's
    controller beside the workers it starts."""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, "")  # not inherited any further
    if not launcher.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(poll_s)
        log.warning("the launcher (pid %s) is gone; stopping", launcher)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="follow-launcher", daemon=True).start()


def bind_socket(host: str, port: int, flag: str = "--port") -> socket.socket:
    """Listen on ``host:port`` now (port 0: a free port), so the address is known before serving;
    one ``error:`` line (exit 1) when that address cannot be had, naming ``flag`` to choose another."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = f": another server is using it; stop it or pass {flag}" if e.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"error: cannot listen on {host}:{port} ({e.strerror or type(e).__name__}){hint}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


UNREACHABLE_WARNING_S = 10.0
"""A worker that has not reached its controller for this long says so (once), and goes on trying."""


class Heartbeat(threading.Thread):
    """Registers the worker once its server listens, then beats every ``interval_s``.

    Runs in its own thread with its own client, so a busy worker still beats. A controller that
    does not know the worker (it restarted, or dropped the worker) gets a fresh registration.
    Refused registrations are retried (each new reason logged once), except a conflict (409): then
    ``refused`` holds the reason and ``on_refused`` stops the worker, which exits with EXIT_REFUSED.
    ``beat`` adds fields to each heartbeat (a tool worker's ``stalled``).
    """

    def __init__(
        self,
        controller_url: str,
        payload: Callable[[], dict[str, Any]],
        queue_length: Callable[[], int],
        interval_s: float,
        api_key: str | None,
        ready: Callable[[], bool],
        beat: Callable[[], dict[str, Any]] | None = None,
    ):
        super().__init__(name="heartbeat", daemon=True)
        self.controller_url, self.payload, self.queue_length = controller_url.rstrip("/"), payload, queue_length
        self.interval_s, self.ready, self.beat = interval_s, ready, beat
        self.client = make_client(api_key, timeout_s=max(2.0, interval_s))
        self.stop = threading.Event()
        self.registered = threading.Event()
        self._registration = threading.Lock()  # a stop waits for a registration in flight, then unregisters it
        self.refused: str | None = None
        self.on_refused: Callable[[], None] = lambda: None
        self._last_refusal: str | None = None
        self._unreachable_since: float | None = None  # the first of the failed registrations in a row
        self._said_unreachable = False

    def _register(self) -> bool:
        with self._registration:
            return not self.stop.is_set() and self._post_registration()

    def _post_registration(self) -> bool:
        try:
            r = self.client.post(f"{self.controller_url}/register_worker", json=self.payload())
        except httpx.HTTPError as e:
            log.debug("controller not reachable yet: %s", type(e).__name__)
            now = time.monotonic()
            self._unreachable_since = self._unreachable_since or now
            if not self._said_unreachable and now - self._unreachable_since >= UNREACHABLE_WARNING_S:
                log.warning("controller %s not reachable for %.0f s (%s); still trying: is it running, and is "
                            "--controller its address?", self.controller_url, now - self._unreachable_since,
                            type(e).__name__)
                self._said_unreachable = True
            return False
        self._unreachable_since, self._said_unreachable = None, False
        if r.status_code == 409:
            self.refused = error_detail(r)
            log.error("controller refused registration (409): %s; this worker stops (exit status %d)",
                      self.refused, EXIT_REFUSED)
            self.stop.set()
            self.on_refused()
            return False
        if r.status_code != 200:
            wrong_place = " (is --controller the controller's address?)" if r.status_code in (404, 405) else ""
            refusal = f"controller refused registration ({r.status_code}): {error_detail(r)}{wrong_place}"
            if refusal != self._last_refusal:  # retried every second: said once, not every time
                log.error("%s; retrying", refusal)
                self._last_refusal = refusal
            return False
        self._last_refusal = None
        self.registered.set()
        log.info("registered with controller %s", self.controller_url)
        return True

    def run(self) -> None:
        while not self.stop.is_set() and not self.ready():
            self.stop.wait(0.05)
        warned = False
        while not self.stop.is_set():
            if not self.registered.is_set():
                if not self._register():
                    self.stop.wait(min(1.0, self.interval_s))
                    continue
            else:
                address = self.payload()["address"]
                try:
                    beat = {"address": address, "queue_length": self.queue_length(),
                            **(self.beat() if self.beat else {})}
                    r = self.client.post(f"{self.controller_url}/receive_heartbeat", json=beat)
                    known = r.status_code == 200 and r.json().get("exist", False)
                    warned = False
                except (httpx.HTTPError, ValueError) as e:
                    if not warned:
                        log.warning("heartbeat to controller failed: %s", type(e).__name__)
                        warned = True
                    known = True  # keep beating; re-register only when the controller says so
                if not known:
                    log.info("controller does not know this worker; registering again")
                    self.registered.clear()
                    continue
            self.stop.wait(self.interval_s)

    def unregister(self) -> None:
        """Stop beating and leave the controller, also when stopped while a registration was on its way
        (the controller lists the worker before the worker reads its answer)."""
        self.stop.set()
        with self._registration:
            pass
        if self.registered.is_set():
            try:
                self.client.post(f"{self.controller_url}/unregister_worker", json={"address": self.payload()["address"]}, timeout=2.0)
            except httpx.HTTPError:
                pass


KEEP_ALIVE_S = 5
"""An idle keep-alive connection is closed after this many seconds (uvicorn's default, as httpx's pool expiry)."""
MAX_HEADER_BYTES = 16 * 1024
"""Largest part of a request line plus headers h11 buffers while they are still arriving (more gets 400; h11's
default, stated here with the other limits); a header block that arrives whole is parsed whatever its size."""


class ReadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request: a connection that has not sent a whole
    request (headers and body) within ``read_timeout_s`` of connecting, or of its previous answer, is closed.
    uvicorn itself waits for a request's bytes forever, so clients sending them a byte at a time (slowloris)
    would hold connections until ``limit_concurrency`` turned everyone else away."""

    def __init__(self, *args: Any, read_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._read_overdue)

    def _read_overdue(self) -> None:
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()  # a body being read: the app's receive() then reports a disconnect


def http_server(app, cfg: ServeConfig, max_body: int) -> uvicorn.Server:
    """The uvicorn server of every service (controller, model and tool workers): ``app`` behind
    :class:`GuardMiddleware` (bodies up to ``max_body`` bytes), at most ``cfg.max_connections`` connections
    (more get 503; uvicorn's limit counts the connection it refuses), each request read within ``cfg.request_read_timeout_s`` (:class:`ReadDeadlineH11`)."""
    return uvicorn.Server(uvicorn.Config(
        GuardMiddleware(app, cfg.api_key, max_body), log_config=None, log_level=cfg.log_level.lower(),
        timeout_graceful_shutdown=3, http=functools.partial(ReadDeadlineH11, read_timeout_s=cfg.request_read_timeout_s),
        limit_concurrency=cfg.max_connections + 1, timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    ))


def serve_worker(app, sock: socket.socket, heartbeat: Heartbeat | None, cfg: ServeConfig, max_body: int) -> None:
    """Run ``app`` on ``sock`` until SIGINT/SIGTERM, then unregister and end the process (exit 0) without
    waiting for calls still running; register after the server listens. A worker the controller refuses (409)
    stops and exits with :data:`EXIT_REFUSED`."""
    server = http_server(app, cfg, max_body)
    if heartbeat is not None:
        heartbeat.ready = lambda: server.started
        heartbeat.on_refused = lambda: setattr(server, "should_exit", True)
        heartbeat.start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)  # stopped by the launcher or systemd: unregister first
    main = threading.current_thread() is threading.main_thread()
    code = 0
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C (and SIGTERM) after its graceful shutdown
        pass
    finally:
        try:
            if heartbeat is not None:
                heartbeat.unregister()
                code = EXIT_REFUSED if heartbeat.refused is not None else 0
        finally:
            if main:  # out now: a returning main would wait for the threads of calls still running (a hung
                logging.shutdown()  # tool: forever); a worker run in a thread leaves its host process alone
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    if code:
        raise SystemExit(code)

