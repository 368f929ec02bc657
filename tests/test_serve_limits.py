"""What a client cannot do to a service: hold its connections (too many, or a request sent a byte at a time)
or make it parse a body into far more memory than the body's size, or nest JSON too deep to write out again."""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import httpx
import pytest
from _serve_fixtures import Nap, ServeProcess, wait_until
from fastapi.testclient import TestClient

from mmedagent.serve import launcher as la
from mmedagent.serve import tool_worker as tw
from mmedagent.serve.config import ServeConfig, load_config
from mmedagent.serve.controller import Controller
from mmedagent.serve.controller import build_app as controller_app
from mmedagent.serve.security import MAX_JSON_DEPTH, MAX_JSON_ITEMS, GuardMiddleware, json_shape_problem
from mmedagent.serve.worker_base import bind_socket, http_server
from mmedagent.tools import list_tools

JSON = {"content-type": "application/json"}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def tool_worker_client() -> TestClient:
    """The nap tool's worker app behind the guard every service has, in process."""
    return TestClient(GuardMiddleware(tw.build_app(Nap(), 1 << 20), None, 40 << 20), base_url="http://127.0.0.1")


def test_json_nested_deeper_than_the_limit_is_refused_before_parsing():
    """At 100,000 levels the parser gave up with FastAPI's "There was an error parsing the body"; now the
    limit is named, and a body within it reaches the route (the nap tool then refuses the unknown param)."""
    client = tool_worker_client()
    for depth in (100_000, MAX_JSON_DEPTH):  # the body's object is a level, and so is params
        r = client.post("/call", content=f'{{"params": {{"x": {nested(depth)}}}}}', headers=JSON)
        assert r.status_code == 422 and r.json() == {
            "detail": f"request body nests JSON arrays and objects more than {MAX_JSON_DEPTH} levels deep"}
    r = client.post("/call", content=f'{{"params": {{"x": {nested(MAX_JSON_DEPTH - 2)}}}}}', headers=JSON)
    assert r.status_code == 422 and "invalid params for nap" in r.json()["detail"]
    brackets_in_text = json.dumps({"params": {"seconds": 0}, "note": '"[' * 5000 + "\\"})  # counted as text, not nesting
    assert client.post("/call", content=brackets_in_text, headers=JSON).status_code == 200
    padding = ",".join(["[" * 60 + "]" * 60] * 834)  # 100,080 brackets but only ~51,000 values: within the count
    r = client.post("/call", content=f'{{"params": {{"x": [{padding}, {nested(500)}]}}}}', headers=JSON)
    assert r.status_code == 422 and "levels deep" in r.json()["detail"]  # the depth after them was not looked at


def test_a_deeply_nested_registration_cannot_break_the_controllers_listings():
    """A worker info nested 900 deep parsed, was stored, and every /list_workers after it failed (500)."""
    ctl = Controller(ServeConfig(tools={}))
    try:
        with TestClient(GuardMiddleware(controller_app(ctl), None, 1 << 20), base_url="http://127.0.0.1") as client:
            body = ('{"address": "http://127.0.0.1:9", "kind": "tool", "names": ["deep"], '
                    f'"info": {{"x": {nested(900)}}}}}')
            assert client.post("/register_worker", content=body, headers=JSON).status_code == 422
            r = client.get("/list_workers")
            assert r.status_code == 200 and "deep" not in r.text
    finally:
        ctl.close()


def test_a_body_of_many_small_values_is_refused_before_parsing():
    """A 40 MB body of ``{},`` took a gigabyte to parse; the count of values is checked on the bytes."""
    client = tool_worker_client()
    for item in ("{}", "[]", "0.5", '""'):
        body = '{"params": {"x": [' + ",".join([item] * (MAX_JSON_ITEMS + 1)) + "]}}"
        r = client.post("/call", content=body, headers=JSON)
        assert r.status_code == 413, (item, r.text)
        assert r.json() == {"detail": f"request body holds more than {MAX_JSON_ITEMS} JSON values; send less at once"}


def test_json_in_another_encoding_than_utf8_is_refused():
    """The limits are counted on UTF-8 bytes; a UTF-16 body could hide its brackets from them (a short one too)."""
    for extra in ([[0]] * MAX_JSON_DEPTH, None):
        body = json.dumps({"params": {"seconds": 0}, "x": extra}).encode("utf-16")
        r = tool_worker_client().post("/call", content=body, headers=JSON)
        assert r.status_code == 415 and r.json() == {"detail": "request body must be JSON in UTF-8"}


def test_the_bodies_the_services_send_each_other_are_within_the_json_limits():
    """A tool worker's registration (its schema) and a chat's model call offering 200 tools with a
    full conversation whose text is full of brackets, quotes and backslashes."""
    for cls in list_tools():
        registration = {"address": "http://127.0.0.1:1", "kind": "tool", "names": [cls.name], "info": cls.schema()}
        assert json_shape_problem(json.dumps(registration).encode()) is None, cls.name
    offered = [{"name": c.name, "aliases": list(c.aliases), "params": c.Params.model_json_schema()} for c in list_tools()]
    text = 'he said "[{x}]" \\ then, ' * 200
    call = {"messages": [{"role": "user", "content": text}] * 222, "tools": (offered * 200)[:200], "image": None}
    assert json_shape_problem(json.dumps(call).encode()) is None


@contextlib.contextmanager
def serving(**settings):
    """The nap tool's worker app on a free loopback port in a thread, as every service serves; yields
    the server and the port."""
    sock = bind_socket("127.0.0.1", 0)
    server = http_server(tw.build_app(Nap(), 1 << 20), ServeConfig(**settings), 1 << 20)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, 0.01)
    try:
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def slow_client(port: int, sent: bytes = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n") -> socket.socket:
    """A connection that sends the start of a request and then waits (slowloris)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(sent)
    return sock


def test_connections_over_the_limit_get_503_and_the_service_stays_up():
    """Without a limit every connection was taken, up to the process's file limit, and then none could be accepted."""
    with serving(max_connections=3) as (server, port):
        slow = [slow_client(port) for _ in range(3)]
        try:
            wait_until(lambda: len(server.server_state.connections) == 3, 30, 0.01)
            assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503
        finally:
            for sock in slow:
                sock.close()
        wait_until(lambda: not server.server_state.connections, 30, 0.01)
        r = httpx.get(f"http://127.0.0.1:{port}/health")
        assert r.status_code == 200 and r.json()["tool"] == "nap"


def closed_by_server(sock: socket.socket, trickle: bytes = b"") -> bool:
    """Send ``trickle`` a byte at a time, 0.1 s apart, until the server closes the connection (at most 30 s)."""
    for i in range(300):
        try:
            if trickle:
                sock.sendall(trickle[i % len(trickle):][:1])
            sock.settimeout(0.1)
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset by the server while sending
            return True
    return False


@pytest.mark.parametrize("sent, trickle", [
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: 1\r\n"),  # headers that never end
    (b"POST /call HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
     b" "),  # a body a byte at a time
], ids=["headers", "body"])
def test_a_request_sent_a_byte_at_a_time_is_cut_off_at_the_read_deadline(sent, trickle):
    with serving(request_read_timeout_s=1.0) as (server, port):
        slow = slow_client(port, sent)
        try:
            assert closed_by_server(slow, trickle)
        finally:
            slow.close()
        wait_until(lambda: not server.server_state.connections, 30, 0.01)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200


def test_a_slow_answer_is_not_cut_off_by_the_read_deadline():
    """The deadline is for receiving the request: a call running longer than it still answers."""
    with serving(request_read_timeout_s=0.2) as (_, port):
        r = httpx.post(f"http://127.0.0.1:{port}/call", json={"params": {"seconds": 0.6}}, timeout=30)
        assert r.status_code == 200 and r.json()["result"]["slept"] == 0.6


def test_the_launcher_gives_its_workers_the_connection_limits(monkeypatch):
    import sys

    from mmedagent.serve import model_worker as mw

    cfg = load_config(None, max_connections=100, request_read_timeout_s=12.5, tools={"nap": {}})
    launcher = la.Launcher(cfg, None)
    spawned = []
    launcher._spawn = lambda label, argv, **env: spawned.append(argv)
    launcher.start_children("http://127.0.0.1:9", None)
    _, _, worker_cfg = tw.parse_args(next(a for a in spawned if a[1].endswith("tool_worker.py"))[2:])
    assert (worker_cfg.max_connections, worker_cfg.request_read_timeout_s) == (100, 12.5)
    monkeypatch.setattr(mw, "setup_logging", lambda *args: None)  # the process-wide log filters of a worker
    seen = []
    monkeypatch.setattr(mw, "load_host", lambda cfg: seen.append(cfg) or sys.exit(7))
    with pytest.raises(SystemExit):
        mw.main(next(a for a in spawned if a[1].endswith("model_worker.py"))[2:])
    assert (seen[0].max_connections, seen[0].request_read_timeout_s) == (100, 12.5)


def test_a_tool_worker_started_with_a_connection_limit_answers_503_over_it(tmp_path):
    worker = ServeProcess("tool_worker.py", ["--tool", "nap", "--plugin", "_serve_fixtures", "--controller", "http://127.0.0.1:9",
                                             "--max-connections", "3", "--log-level", "WARNING"], tmp_path / "worker.log")
    try:
        url = worker.wait_for(r"tool worker nap: (http://\S+)").group(1)
        port = int(url.rsplit(":", 1)[1])
        slow = [slow_client(port) for _ in range(3)]  # accepted before the request below: the server takes them in order
        try:
            r = httpx.get(f"{url}/health")
            assert r.status_code == 503, r.text
        finally:
            for sock in slow:
                sock.close()
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 30)
        assert worker.proc.poll() is None
    finally:
        worker.stop()

