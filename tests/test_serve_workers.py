"""Tool workers and the worker registry under failure: hung tools, name clashes, re-registration,
broken schemas, workers that are gone or answer garbage, settings the launcher hands to its workers;
the agent's OpenAI answers (clients that leave, stop sequences, finish reasons)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

import mmedagent  # noqa: F401
from _serve_fixtures import ROOT, data_url, sample_png, serve_env, wait_until
from mmedagent.protocol import ToolCall
from mmedagent.serve import controller as ctl_mod
from mmedagent.serve import launcher as la
from mmedagent.serve import tool_worker as tw
from mmedagent.serve.config import ServeConfig, ToolSpec, load_config
from mmedagent.serve.registry import RegistrationConflict, WorkerInfo, WorkerRegistry
from mmedagent.serve.worker_base import EXIT_REFUSED, Heartbeat, bind_socket, url_for
from mmedagent.tools import Tool, ToolResult, get_tool


class HangResult(ToolResult):
    released: bool


class Hang(Tool):
    """Blocks until the test opens its gate: a hung model."""

    name = "hang"
    description = "Waits until it is let go."
    Result = HangResult
    needs_image = False

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def __call__(self, image, params):
        self.gate.wait(30)
        return HangResult(released=self.gate.is_set())


def tool_worker(address, name, aliases=()):
    return WorkerInfo(address=address, kind="tool", names=[name], info={"aliases": list(aliases)})


@contextlib.contextmanager
def serving(app):
    """``app`` on a free loopback port in a thread; yields its URL."""
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, 0.01)
    try:
        yield url_for(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_hung_tool_is_refused_at_once_instead_of_queueing():
    tool = Hang()
    client = TestClient(tw.build_app(tool, 1 << 20, max_concurrency=2, timeout_s=2.0))  # all three calls sent within it
    answers = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, client.post("/call", json={"params": {}})))
               for i in range(3)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: client.get("/health").json()["waiting"] == 1, 5, 0.01)  # both slots hung, one call waits
        wait_until(lambda: answers, 5, 0.01)  # the waiting call is refused once both are past the timeout
        (refused,) = answers.values()
        assert refused.status_code == 503, refused.text
        reason = refused.json()["detail"]
        assert reason == ("tool 'hang' is busy: all 2 of its call slots are held by calls that have run past the "
                          "2 s timeout (the tool may be hung); try again later")
        t0 = time.monotonic()
        r = client.post("/call", json={"params": {}})
        assert r.status_code == 503 and r.json()["detail"] == reason and time.monotonic() - t0 < 1.5  # not a 2 s wait
        health = client.get("/health").json()
        assert health["ok"] is False and health["stalled"] and health["overdue"] == 2 and health["queue_length"] == 2
    finally:
        tool.gate.set()
        for t in threads:
            t.join(10)
    assert sorted(r.status_code for r in answers.values()) == [200, 200, 503]
    assert client.post("/call", json={"params": {}}).status_code == 200
    assert client.get("/health").json()["ok"] is True


def test_the_controller_turns_a_busy_worker_into_a_tool_error_at_once():
    """The heartbeat says the worker is stalled; calls then get a clear error without waiting."""
    tool = Hang()
    worker_app = tw.build_app(tool, 1 << 20, max_concurrency=1, timeout_s=1.5)
    slots = worker_app.state.slots
    ctl = ctl_mod.Controller(ServeConfig(tool_timeout_s=1.5, heartbeat_interval_s=0.05, heartbeat_expiry_s=5))
    with serving(ctl_mod.build_app(ctl)) as ctl_url, serving(worker_app) as address:
        beat = Heartbeat(ctl_url, lambda: tw.registration(tool, address, tw.described(tool)),
                         lambda: slots.status()["queue_length"], 0.05, None, ready=lambda: True,
                         beat=lambda: {"stalled": slots.status()["stalled"]})
        beat.start()
        client = httpx.Client(base_url=ctl_url, timeout=10, trust_env=False)
        try:
            wait_until(lambda: ctl.registry.names("tool") == ["hang"], 5, 0.02)
            assert client.post("/v1/tools/hang", json={"params": {}}).status_code in (502, 504)  # it hangs: timed out
            wait_until(lambda: ctl.registry.workers("tool")[0].stalled, 5, 0.02)
            r = client.post("/v1/tools/hang", json={"params": {}})
            assert r.status_code == 503, r.text  # refused by the worker, not timed out
            assert r.json()["detail"] == ("tool 'hang' is busy: its call slot is held by a call that "
                                          "has run past the 1.5 s timeout (the tool may be hung); try again later")
            ctl.dispatcher.tools = ctl.all_tools()
            outcome = ctl.dispatcher.dispatch(ToolCall(API_name="hang", API_params={}), None)  # what a chat gets
            assert not outcome.ok and outcome.error == r.json()["detail"]
        finally:
            tool.gate.set()
            beat.unregister()
            beat.join(5)
            client.close()
            ctl.close()


def test_a_stalled_worker_is_chosen_last():
    reg = WorkerRegistry(expiry_s=10)
    reg.register(tool_worker("http://127.0.0.1:1", "hang"))
    reg.register(tool_worker("http://127.0.0.1:2", "hang"))
    reg.heartbeat("http://127.0.0.1:1", 4, stalled=True)
    reg.heartbeat("http://127.0.0.1:2", 9)
    assert reg.pick("tool", "hang") == "http://127.0.0.1:2"
    reg.heartbeat("http://127.0.0.1:2", 9, stalled=True)
    assert reg.pick("tool", "hang") == "http://127.0.0.1:1"  # all stalled: it answers the clear 503


def test_in_flight_calls_are_counted_across_a_re_registration():
    reg = WorkerRegistry(expiry_s=10)
    for port in (1, 2):
        reg.register(tool_worker(f"http://127.0.0.1:{port}", "hang"))
    for address in ("http://127.0.0.1:1", "http://127.0.0.1:1", "http://127.0.0.1:2"):
        reg.begin(address)
    reg.register(tool_worker("http://127.0.0.1:1", "hang"))  # the controller dropped it; it registered again
    assert reg.pick("tool", "hang") == "http://127.0.0.1:2"  # 1 in flight beats 2
    reg.end("http://127.0.0.1:1")
    reg.end("http://127.0.0.1:1")
    assert reg.pick("tool", "hang") == "http://127.0.0.1:1"


def test_the_launcher_gives_tool_workers_the_controllers_timeout_and_upload_limit(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("tool_timeout_s: 60\nmax_upload_mb: 20\n")
    cfg = load_config(config, tool_timeout_s=7.5, max_upload_mb=3, tools={"nap": {}})  # as the controller's flags do
    launcher = la.Launcher(cfg, str(config))
    spawned = []
    launcher._spawn = lambda label, argv, **env: spawned.append(argv)
    launcher.start_children("http://127.0.0.1:9", None)
    argv = next(a for a in spawned if a[1].endswith("tool_worker.py"))
    _, _, worker_cfg = tw.parse_args(argv[2:])
    assert (worker_cfg.tool_timeout_s, worker_cfg.max_upload_mb) == (7.5, 3)


def test_a_tool_workers_options_travel_in_its_environment_not_on_its_command_line():
    """Options may hold a plug-in's credentials: on a command line every user of the machine reads them (ps)."""
    cfg = load_config(None, tools={"nap": {"options": {"api_key": "s3cr3t-plugin"}}})
    launcher = la.Launcher(cfg, None)
    spawned = []
    launcher._spawn = lambda label, argv, **env: spawned.append((argv, env))
    launcher.start_children("http://127.0.0.1:9", None)
    argv, env = next((a, e) for a, e in spawned if a[1].endswith("tool_worker.py"))
    assert "s3cr3t-plugin" not in " ".join(argv)
    assert json.loads(env["MMEDAGENT_TOOL_OPTIONS"]) == {"api_key": "s3cr3t-plugin"}


def test_the_backend_url_travels_in_the_model_workers_environment_not_on_its_command_line(monkeypatch):
    """A backend URL may hold credentials (user:password@host): on a command line every user of the machine reads it."""
    from mmedagent.serve import model_worker as mw

    url = "http://alice:s3cr3t@gpu-box:8000/v1"
    launcher = la.Launcher(load_config(None, model_backend_url=url), None)
    spawned = []
    launcher._spawn = lambda label, argv, **env: spawned.append((argv, env))
    launcher.start_children("http://127.0.0.1:9", None)
    argv, env = next((a, e) for a, e in spawned if a[1].endswith("model_worker.py"))
    assert "s3cr3t" not in " ".join(argv) and env == {"MMEDAGENT_BACKEND_URL": url}
    monkeypatch.setenv("MMEDAGENT_BACKEND_URL", url)
    monkeypatch.setattr(mw, "setup_logging", lambda *args: None)  # the process-wide log filters of a worker
    seen = {}
    monkeypatch.setattr(mw, "load_host", lambda cfg: seen.setdefault("url", cfg.model_backend_url) and sys.exit(7))
    with pytest.raises(SystemExit):
        mw.main(argv[2:])
    assert seen["url"] == url and "MMEDAGENT_BACKEND_URL" not in os.environ  # not passed on to its own children


def test_a_tool_whose_name_or_alias_is_another_tools_is_refused():
    reg = WorkerRegistry(expiry_s=10)
    reg.register(tool_worker("http://127.0.0.1:1", "grounding", ["Grounding DINO"]))
    reg.register(tool_worker("http://127.0.0.1:2", "grounding", ["Grounding DINO"]))  # a second worker shares the load
    with pytest.raises(RegistrationConflict, match=r"tool 'detector' at http://127.0.0.1:3 was refused: its name or "
                       r"alias 'grounding dino' is already used by tool 'grounding'"):
        reg.register(tool_worker("http://127.0.0.1:3", "detector", ["grounding dino"]))
    with pytest.raises(RegistrationConflict, match="'GROUNDING' is already used by tool 'grounding'"):
        reg.register(tool_worker("http://127.0.0.1:3", "GROUNDING"))
    with pytest.raises(RegistrationConflict, match="already used by tool 'pixel_stats'"):
        reg.register(tool_worker("http://127.0.0.1:3", "stats", ["Pixel_Stats"]),
                     reserved={"pixel_stats": ("pixel_stats",)})
    assert [w.address for w in reg.workers()] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    reg.register(tool_worker("http://127.0.0.1:1", "segmentation"))  # the address now serves another tool
    reg.remove("http://127.0.0.1:2")
    reg.register(tool_worker("http://127.0.0.1:3", "detector", ["grounding"]))  # grounding's workers are gone
    assert "grounding" not in reg.known and reg.names("tool") == ["detector", "segmentation"]


def test_the_controller_answers_a_clash_with_409_and_a_malformed_schema_with_422():
    ctl = ctl_mod.Controller(ServeConfig(tools={"pixel_stats": ToolSpec(in_process=True)}))  # not loaded yet
    try:
        with TestClient(ctl_mod.build_app(ctl)) as client:
            body = tool_worker("http://127.0.0.1:1", "grounding", ["Grounding DINO"]).model_dump()
            assert client.post("/register_worker", json=body).status_code == 200
            body = tool_worker("http://127.0.0.1:2", "detector", ["GROUNDING"]).model_dump()
            r = client.post("/register_worker", json=body)
            assert r.status_code == 409 and "'GROUNDING' is already used by tool 'grounding'" in r.json()["detail"]
            body = tool_worker("http://127.0.0.1:2", "stats", ["Pixel_Stats"]).model_dump()
            r = client.post("/register_worker", json=body)
            assert r.status_code == 409 and "'Pixel_Stats' is already used by tool 'pixel_stats'" in r.json()["detail"]
            body = {"address": "http://127.0.0.1:3", "kind": "tool", "names": ["odd"], "info": {"aliases": 5}}
            r = client.post("/register_worker", json=body)
            assert r.status_code == 422 and "schema (info) is malformed: aliases" in r.text
            assert [t["name"] for t in client.get("/v1/tools").json()["tools"]] == ["grounding"]
    finally:
        ctl.close()


def test_a_worker_that_restarts_with_other_aliases_is_called_by_them():
    ctl = ctl_mod.Controller(ServeConfig())
    try:
        ctl.registry.register(tool_worker("http://127.0.0.1:1", "hang", ["waiter"]))
        ctl.dispatcher.tools = ctl.all_tools()
        assert ctl.dispatcher.resolve("waiter").name == "hang"
        ctl.registry.remove("http://127.0.0.1:1")
        ctl.registry.register(tool_worker("http://127.0.0.1:2", "hang", ["sleeper"]))
        ctl.dispatcher.tools = ctl.all_tools()
        assert ctl.dispatcher.resolve("sleeper").name == "hang" and ctl.dispatcher.resolve("waiter") is None
    finally:
        ctl.close()


def test_a_worker_refused_for_a_clash_says_why_once_and_exits_not_to_be_restarted():
    ctl = ctl_mod.Controller(ServeConfig())
    ctl.registry.register(tool_worker("http://127.0.0.1:9", "sleeper", ["NAP"]))
    try:
        with serving(ctl_mod.build_app(ctl)) as url:
            proc = subprocess.run(
                [sys.executable, str(ROOT / "serve" / "tool_worker.py"), "--tool", "nap", "--plugin", "_serve_fixtures",
                 "--controller", url, "--heartbeat-interval", "0.2"],
                env=serve_env(), capture_output=True, text=True, timeout=60,
            )
    finally:
        ctl.close()
    assert proc.returncode == EXIT_REFUSED, proc.stderr[-2000:]
    assert proc.stderr.count("controller refused registration (409): tool 'nap'") == 1, proc.stderr[-2000:]
    assert "'nap' is already used by tool 'sleeper'" in proc.stderr and "Traceback" not in proc.stderr
    child = la.Child("tool worker nap", [sys.executable, "-c", f"exit({EXIT_REFUSED})"], {})
    child.proc.wait(30)
    child.started -= 60
    assert "refused by the controller" in child.restart_refusal()


def test_a_plugin_tool_without_a_json_schema_is_refused_at_start_instead_of_never_registering(tmp_path):
    (tmp_path / "opaque_tool.py").write_text(
        "from pydantic import ConfigDict\n"
        "from mmedagent.tools import Tool, ToolParams\n"
        "class Blob:\n    pass\n"
        "class OpaqueParams(ToolParams):\n"
        "    model_config = ConfigDict(arbitrary_types_allowed=True)\n"
        "    blob: Blob | None = None\n"
        "class Opaque(Tool):\n    name = 'opaque'\n    Params = OpaqueParams\n    needs_image = False\n"
    )
    env = serve_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "serve" / "tool_worker.py"), "--tool", "opaque", "--plugin", "opaque_tool",
         "--controller", "http://127.0.0.1:9", "--heartbeat-interval", "0.2"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --plugin opaque_tool: tool 'opaque' cannot describe itself (its schema): its Params field 'blob' " \
           "(opaque_tool.Blob | None) has no JSON schema" in proc.stderr and "Traceback" not in proc.stderr


def test_a_controller_refuses_a_plugin_tool_without_a_json_schema_at_start_naming_the_field(tmp_path):
    """Else the tool is listed like any other, and the planner's prompt, its constrained decoding and
    GET /v1/tools fail on it."""
    (tmp_path / "array_tool.py").write_text(
        "import numpy as np\n"
        "from pydantic import ConfigDict\n"
        "from mmedagent.tools import Tool, ToolParams\n"
        "class KernelParams(ToolParams):\n"
        "    model_config = ConfigDict(arbitrary_types_allowed=True)\n"
        "    kernel: np.ndarray | None = None\n"
        "class Convolve(Tool):\n    name = 'convolve'\n    Params = KernelParams\n"
    )
    env = serve_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "serve" / "controller.py"), "--plugin", "array_tool", "--no-workers", "--no-web",
         "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.endswith("error: --plugin array_tool: tool 'convolve' cannot describe itself (its schema): its Params "
                          "field 'kernel' (numpy.ndarray | None) has no JSON schema; give it a JSON type (a number, "
                          "string, list or model of these)"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_refused_registration_is_retried_and_logged_once_per_reason(caplog):
    """A worker the controller keeps refusing (here: a non-loopback address without a key) says why once."""
    ctl = ctl_mod.Controller(ServeConfig())
    try:
        with serving(ctl_mod.build_app(ctl)) as url:
            payload = tool_worker("http://10.0.0.7:8000", "nap").model_dump()
            beat = Heartbeat(url, lambda: payload, lambda: 0, 0.02, None, ready=lambda: True)
            with caplog.at_level("ERROR", logger="mmedagent.serve.worker_base"):
                beat.start()
                wait_until(lambda: any("refused registration" in r.getMessage() for r in caplog.records), 10, 0.01)
                time.sleep(0.3)  # about 15 more tries
                beat.unregister()
                beat.join(5)
    finally:
        ctl.close()
    refusals = [r.getMessage() for r in caplog.records if "refused registration (403)" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].endswith("; retrying") and not beat.registered.is_set()


def test_a_worker_stopped_while_its_registration_is_answered_still_leaves_the_controller():
    """The controller lists a worker before the worker reads the answer; a SIGTERM in between left it listed
    until its heartbeats expired (seen as a flaky stack test)."""
    listed, answer = threading.Event(), threading.Event()
    calls = []

    def controller(request):
        calls.append(request.url.path)
        if request.url.path == "/register_worker":
            listed.set()
            answer.wait(5)
        return httpx.Response(200, json={"ok": True, "exist": True})

    beat = Heartbeat("http://controller", lambda: {"address": "http://127.0.0.1:9"}, lambda: 0, 0.02, None, ready=lambda: True)
    beat.client = httpx.Client(transport=httpx.MockTransport(controller))
    beat.start()
    assert listed.wait(5)
    stopping = threading.Thread(target=beat.unregister)
    stopping.start()
    wait_until(beat.stop.is_set, 5, 0.01)
    time.sleep(0.05)  # the stop now waits for the registration's answer
    answer.set()
    stopping.join(5)
    beat.join(5)
    assert calls == ["/register_worker", "/unregister_worker"]


def test_a_tool_worker_started_by_hand_takes_its_options_from_the_stacks_config(tmp_path):
    """A worker on another machine started with the stack's YAML ignored its tools: entry (and tried the Hub)."""
    config = tmp_path / "stack.yaml"
    config.write_text("tools:\n  BiomedClip: {options: {model: /models/biomedclip}}\n"
                      "  grounding: {options: {model: /models/gdino}}\n  segmentation: {options: {checkpoint: /m/medsam.pth}}\n")
    cfg = load_config(config)
    assert tw.configured_options(cfg, "classification") == {"model": "/models/biomedclip"}
    assert tw.configured_options(cfg, "grounding_segmentation") == {
        "grounding": {"model": "/models/gdino"}, "segmentation": {"checkpoint": "/m/medsam.pth"}}
    assert tw.configured_options(load_config(None), "classification") == {}  # no config: the published weights


def test_a_worker_that_cannot_reach_its_controller_says_so_once(monkeypatch, caplog):
    """It printed its address and then nothing (the attempts were logged at DEBUG): a wrong --controller looked
    like a hang."""
    from mmedagent.serve import worker_base

    up = False

    def controller(request):
        if not up:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"ok": True})

    beat = Heartbeat("http://10.0.0.9:21001", lambda: {"address": "http://127.0.0.1:9"}, lambda: 0, 0.02, None,
                     ready=lambda: True)
    beat.client = httpx.Client(transport=httpx.MockTransport(controller))
    with caplog.at_level(logging.WARNING, logger="mmedagent.serve.worker_base"):
        assert not beat._register() and not caplog.records  # not yet: the controller may still be starting
        monkeypatch.setattr(worker_base, "UNREACHABLE_WARNING_S", 0.0)
        assert not beat._register() and not beat._register()
        assert [r.getMessage().split(" not reachable")[0] for r in caplog.records] == ["controller http://10.0.0.9:21001"]
        assert "still trying: is it running, and is --controller its address?" in caplog.text
        up = True
        assert beat._register()
        up, beat.registered = False, threading.Event()
        assert not beat._register()  # unreachable again after it was reached: said again
        assert len(caplog.records) == 2

    def model_worker_port(request):  # --controller pointed at another service
        return httpx.Response(404, json={"detail": "Not Found"})

    beat.client = httpx.Client(transport=httpx.MockTransport(model_worker_port))
    with caplog.at_level(logging.ERROR, logger="mmedagent.serve.worker_base"):
        assert not beat._register()
    assert caplog.records[-1].getMessage() == ("controller refused registration (404): Not Found (is --controller the "
                                               "controller's address?); retrying")


class Held:
    """A planner that answers "ok" once ``free`` is set (a long generation holding the model)."""

    def __init__(self):
        self.free, self.holding = threading.Event(), threading.Event()

    def generate(self, messages, image, **gen):
        self.holding.set()
        self.free.wait(10)
        return "ok"


def test_a_chat_waiting_for_a_busy_model_is_told_it_is_busy_not_that_the_worker_died(monkeypatch):
    """The queue for a model counted against the controller's read timeout: a chat behind a long one ended
    with "did not answer in time". Now a waiting request is kept alive, told "busy" after the controller's
    model timeout, and tried on another worker of the model when there is one."""
    from mmedagent.serve import model_worker as mw
    from mmedagent.serve.remote import WorkerError, WorkerPlanner

    held = Held()
    with serving(mw.build_app(mw.ModelHost(held, "m", {}, 1 << 20))) as url:
        registry = WorkerRegistry(expiry_s=60)
        registry.register(WorkerInfo(address=url, kind="model", names=["m"]))
        first = threading.Thread(target=lambda: WorkerPlanner(registry, httpx.Client(), "m", "a", 30).generate(
            [{"role": "user", "content": "hi"}], None))
        first.start()
        assert held.holding.wait(10)
        try:
            t0 = time.monotonic()
            with pytest.raises(WorkerError) as failure:
                WorkerPlanner(registry, httpx.Client(), "m", "b", 0.9).generate([{"role": "user", "content": "hi"}], None)
            assert 0.8 < time.monotonic() - t0 < 5
            assert "model 'm' is busy: no turn came within 0.9 s (1 request(s) were ahead of this one)" in str(failure.value)

            monkeypatch.setattr(mw, "KEEPALIVE_S", 0.1)
            body = {"messages": [{"role": "user", "content": "hi"}], "max_wait_s": 10}  # a longer wait than the read timeout
            answer = {}

            def patient():
                with httpx.Client(timeout=httpx.Timeout(0.5)) as client:
                    with client.stream("POST", f"{url}/worker_generate_stream", json=body) as r:
                        answer["text"] = "".join(json.loads(line).get("text", "") for line in r.iter_lines() if line)

            waiting = threading.Thread(target=patient)
            waiting.start()
            time.sleep(1.5)  # three read timeouts
        finally:
            held.free.set()
            first.join(10)
        waiting.join(10)
    assert answer == {"text": "ok"}


def test_a_call_waits_for_a_slot_at_most_the_timeout():
    slots = tw.CallSlots("hang", 1, 2.0)
    first = slots.acquire()
    refused = []

    def wait_for_a_slot():
        try:
            slots.acquire()
        except tw.Busy as e:
            refused.append(str(e))

    waiter = threading.Thread(target=wait_for_a_slot)
    waiter.start()
    wait_until(lambda: slots.status()["waiting"] == 1, 5, 0.01)
    time.sleep(0.2)
    with slots._cond:  # a newcomer takes the freed slot before the waiter wakes: never overdue at its deadline
        slots.release(first)
        second = slots.acquire()
    waiter.join(5)
    slots.release(second)
    assert refused == ["tool 'hang' is busy: no call slot came free within the 2 s timeout; try again later"]


def test_the_launcher_gives_the_model_worker_and_web_ui_the_upload_limit_and_model_base(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("max_upload_mb: 20\n")
    cfg = load_config(config, max_upload_mb=50, model_path="runs/lora", model_base="/models/llava-med", tools={})
    launcher = la.Launcher(cfg, str(config))
    spawned = []
    launcher._spawn = lambda label, argv, **env: spawned.append(argv)
    launcher.start_children("http://127.0.0.1:9", 7861)
    model = next(a for a in spawned if a[1].endswith("model_worker.py"))
    web = next(a for a in spawned if a[1].endswith("web.py"))
    assert model[model.index("--model-base") + 1] == "/models/llava-med"
    assert model[model.index("--max-upload-mb") + 1] == web[web.index("--max-upload-mb") + 1] == "50.0"


def test_a_call_goes_to_another_worker_when_one_is_gone_or_hung():
    """A worker that died (connection refused: the call never started) is dropped at once rather than
    at heartbeat expiry, and a hung one (503) is passed over, when another worker serves the tool."""
    from mmedagent.serve.remote import WorkerError, remote_tool_class

    answered = []

    def workers(request):
        host = request.url.host
        if host == "10.0.0.1":
            raise httpx.ConnectError("connection refused", request=request)
        if host == "10.0.0.2":
            return httpx.Response(503, json={"detail": "tool 'grounding' is busy: all 4 of its call slots are held"})
        answered.append(host)
        return httpx.Response(200, json={"result": {"boxes": []}, "for_model": {"boxes": []}})

    reg = WorkerRegistry(expiry_s=60)
    for i in (1, 2, 3):
        reg.register(tool_worker(f"http://10.0.0.{i}:8000", "grounding"))
    cls = remote_tool_class("grounding", {})
    tool = cls(reg, httpx.Client(transport=httpx.MockTransport(workers)), 5.0, lambda: ["grounding"])
    assert tool(None, cls.Params(prompts=["tumor"])).model_view == {"boxes": []} and answered == ["10.0.0.3"]
    assert [w.address for w in reg.workers()] == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    reg.remove("http://10.0.0.3:8000")
    with pytest.raises(WorkerError, match="busy"):  # the only worker left is hung: its reason, at once
        tool(None, cls.Params(prompts=["tumor"]))


def test_the_composite_shares_its_parts_weights_with_the_parts_running_beside_it(monkeypatch):
    """In one process (evaluation, data building, the controller's in-process tools) grounding,
    segmentation and grounding+segmentation with the same weights load them once."""
    from mmedagent.tools.grounding import GroundingTool
    from mmedagent.tools.grounding_segmentation import GroundingSegmentationTool
    from mmedagent.tools.segmentation import SegmentationTool

    options = {"grounding": {"model": "/weights/gdino"}, "segmentation": {"checkpoint": "/weights/medsam.pth"}}
    g, s, gs = la.in_process_tools([GroundingTool, SegmentationTool, GroundingSegmentationTool], options, "default")
    assert gs.grounding is g and gs.segmentation is s
    other = la.in_process_tools([GroundingTool, GroundingSegmentationTool],
                                {**options, "grounding_segmentation": {"grounding": {"model": "/weights/other"}}},
                                "default")
    assert other[1].grounding is not other[0]  # other weights: its own part

    loads = []
    for cls in (GroundingTool, SegmentationTool):
        monkeypatch.setattr(cls, "load", lambda self, cls=cls: loads.append(cls.name))
    ctl = ctl_mod.Controller(ServeConfig(tools={}))
    try:
        ctl.load_local_tools({"grounding_segmentation": ToolSpec(options=options, in_process=True),
                              "grounding": ToolSpec(options=options["grounding"], in_process=True),
                              "segmentation": ToolSpec(options=options["segmentation"], in_process=True)})
        assert sorted(loads) == ["grounding", "segmentation"] and len(ctl.local_tools) == 3
    finally:
        ctl.close()


def test_a_tool_that_failed_to_load_is_a_503_and_model_base_needs_an_adapter(monkeypatch):
    """A tool that could not load is the server's problem (503), not the request's (422); ``model_base``
    without a local adapter to stack on it is refused up front."""
    from mmedagent.tools.grounding import GroundingTool

    def broken(self):
        raise OSError("weights not found: /weights/gdino")

    monkeypatch.setattr(GroundingTool, "load", broken)
    ctl = ctl_mod.Controller(ServeConfig(tools={}))
    try:
        ctl.local_tools["grounding"] = GroundingTool(model="/weights/gdino")  # loaded at its first call
        client = TestClient(ctl_mod.build_app(ctl))
        body = {"params": {"prompts": ["tumor"]}, "image": data_url(sample_png())}
        r = client.post("/v1/tools/grounding", json=body)
        assert r.status_code >= 500 and "weights not found" in r.json()["detail"], r.text
        r = client.post("/v1/tools/grounding", json=body)  # the load is not retried
        assert r.status_code == 503 and "grounding is unavailable: it failed to load" in r.json()["detail"], r.text
    finally:
        ctl.close()
    for bad in ({}, {"model_path": "demo"}, {"model_path": "runs/lora", "model_backend_url": "http://x/v1"}):
        with pytest.raises(ValueError, match="model_base is the base of a LoRA adapter"):
            ServeConfig(model_base="/models/llava-med", tools={}, **bad)


class SlowPlanner:
    """A planner that writes ``turn`` a character at a time (an endless text without one), slowly enough
    to be interrupted; counts its calls and notes when each stream ends."""

    def __init__(self, turn: str | None = None):
        self.turn, self.calls, self.pieces, self.ended = turn, 0, 0, threading.Event()

    def stream(self, messages, image, **gen):
        self.calls += 1
        self.ended.clear()
        try:
            for piece in self.turn if self.turn is not None else iter(lambda: "x", None):
                time.sleep(0.01)
                self.pieces += 1
                yield piece
        finally:
            self.ended.set()


@contextlib.contextmanager
def chat_stack(planner, tools=None, workers=()):
    """The controller with one model worker serving ``planner``, ``tools`` in-process and tool ``workers``
    registered; yields its URL."""
    from mmedagent.serve import model_worker as mw
    from mmedagent.serve.registry import WorkerInfo as Info

    ctl = ctl_mod.Controller(ServeConfig(heartbeat_interval_s=5, heartbeat_expiry_s=60))
    ctl.local_tools.update(tools or {})
    worker_app = mw.build_app(mw.ModelHost(planner, "slow", {}, 1 << 20))
    try:
        with serving(ctl_mod.build_app(ctl)) as ctl_url, serving(worker_app) as address:
            ctl.registry.register(Info(address=address, kind="model", names=["slow"], info={}))
            for worker in workers:
                ctl.registry.register(worker)
            yield ctl_url
    finally:
        ctl.close()


def first_event_then_leave(url, body):
    """Send a question, read its first event and disconnect (Ctrl-C in the CLI, a new upload in the web UI)."""
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client, client.stream("POST", "/chat", json=body) as r:
        assert r.status_code == 200
        return json.loads(next(r.iter_lines()))


def test_a_client_that_leaves_mid_answer_stops_the_run_and_frees_the_model():
    """Generation stops between two pieces of text: the model is free for the next question at once,
    not after the abandoned answer runs to its token budget."""
    planner = SlowPlanner()
    with chat_stack(planner) as url:
        assert first_event_then_leave(url, {"question": "Where?", "max_new_tokens": 8192})["type"] == "token"
        assert planner.ended.wait(3), "the abandoned answer went on generating"
        left = planner.pieces
        time.sleep(0.2)
        assert planner.pieces == left
        planner.turn = "It is in the left lobe."
        started = time.monotonic()
        r = httpx.post(f"{url}/chat", json={"question": "Where?"}, timeout=10, trust_env=False)
        events = [json.loads(line) for line in r.text.splitlines()]
        assert events[-1]["type"] == "answer" and events[-1]["answer"] == "It is in the left lobe."
        assert time.monotonic() - started < 3


def test_a_tool_call_is_one_log_line_at_its_worker_under_the_chats_request_id(caplog):
    """An operator follows a chat from the controller's line to its tool calls; nothing of the call's
    params or output is in the line."""
    from mmedagent.protocol import AssistantTurn, ToolCall, render_turn

    hang = Hang()
    hang.gate.set()
    planner = SlowPlanner(render_turn(AssistantTurn(thoughts="Wait.", actions=[ToolCall(API_name="hang", API_params={})],
                                                    value="")))
    with serving(tw.build_app(hang, 1 << 20)) as address, \
            chat_stack(planner, workers=[WorkerInfo(**tw.registration(hang, address, tw.described(hang)))]) as url:
        with caplog.at_level("INFO", logger="mmedagent.serve.tool_worker"):
            r = httpx.post(f"{url}/chat", json={"question": "Wait, then answer.", "max_steps": 2}, timeout=10, trust_env=False)
    rid = r.headers["x-request-id"]
    steps = [json.loads(line) for line in r.text.splitlines() if json.loads(line)["type"] == "step"]
    assert steps, r.text
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "mmedagent.serve.tool_worker"]
    assert any(line.startswith(f"call {rid}: ok in ") for line in lines), lines


def test_a_client_that_leaves_during_a_tool_call_gets_no_further_planner_call():
    """The run stops before the next tool round: the planner is not called again for an answer nobody reads."""
    from mmedagent.protocol import AssistantTurn, ToolCall, render_turn

    hang = Hang()
    planner = SlowPlanner(render_turn(AssistantTurn(thoughts="Wait.", actions=[ToolCall(API_name="hang", API_params={})],
                                                    value="")))
    with chat_stack(planner, {"hang": hang}) as url:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
            with client.stream("POST", "/chat", json={"question": "Wait, then answer."}):
                # the first turn is written: the tool call now runs (reading the stream for it raced the last
                # piece: with every line read before the turn's end was noted, the next read waited on the tool)
                assert planner.ended.wait(10) and planner.calls == 1
        time.sleep(1.0)  # the server sees the connection close (on loopback, within milliseconds)
        hang.gate.set()  # the tool returns after the client left
        time.sleep(0.5)
        assert planner.calls == 1


def test_a_client_that_leaves_a_plain_openai_request_stops_the_run():
    """A non-streamed ``/v1/chat/completions`` whose client leaves while a tool runs stops too: the planner is
    not called again for an answer nobody reads."""
    import socket
    from urllib.parse import urlsplit

    from mmedagent.protocol import AssistantTurn, ToolCall, render_turn

    hang = Hang()
    planner = SlowPlanner(render_turn(AssistantTurn(thoughts="Wait.", actions=[ToolCall(API_name="hang", API_params={})],
                                                    value="")))
    with chat_stack(planner, {"hang": hang}) as url:
        where = urlsplit(url)
        body = json.dumps({"messages": [{"role": "user", "content": "Wait, then answer."}]}).encode()
        with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 10
            while (planner.calls < 1 or not planner.ended.is_set()) and time.monotonic() < deadline:
                time.sleep(0.02)  # the first turn is written: the tool call now runs
            assert planner.calls == 1 and planner.ended.is_set()
        time.sleep(1.0)  # the server sees the connection close (on loopback, within milliseconds)
        hang.gate.set()  # the tool returns after the client left
        time.sleep(0.5)
        assert planner.calls == 1


class TurnWriter:
    """A model worker's planner that writes one final turn a character (a token) at a time, as a
    planner does: it ends at a stop string or its token budget, and reports its counts."""

    def __init__(self, turn: str):
        self.turn, self.gens = turn, []
        self.context = 10_000  # tokens left in the model's context after the prompt

    def stream(self, messages, image, max_new_tokens=256, stop=None, **gen):
        self.gens.append({"max_new_tokens": max_new_tokens, "stop": stop, **gen})
        text = self.turn[:min(max_new_tokens, self.context)]
        cut = min((text.find(s) for s in stop or [] if s in text), default=-1)
        finish = "stop" if cut >= 0 else "eos" if text == self.turn else "length"
        text = text[:cut] if cut >= 0 else text
        self.last_stats = {"prompt_tokens": 10, "new_tokens": len(text), "finish": finish}
        yield text


@pytest.fixture
def agent_api():
    """An httpx client of the controller's OpenAI API over a model worker serving a :class:`TurnWriter`."""
    from mmedagent.protocol import AssistantTurn, render_turn

    planner = TurnWriter(render_turn(AssistantTurn(thoughts="The question is about the lobe; no tool is needed.",
                                                   actions=[], value="It is in the left lobe. Anything else?")))
    with chat_stack(planner) as url, httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        yield client, planner


def agent_answer(client, **extra):
    """(content, finish_reason) of a plain and of a streamed completion, which must agree."""
    body = {"messages": [{"role": "user", "content": "Where is it?"}], **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    plain = r.json()["choices"][0]
    events = client.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    streamed = (content, chunks[-1]["choices"][0]["finish_reason"])
    assert streamed == (plain["message"]["content"], plain["finish_reason"])
    return streamed


def test_stop_sequences_cut_the_agents_answer_not_the_planners_turns(agent_api):
    """``stop`` is for the answer the client reads: given to the planner it cut the turn ("lobe" is in
    its thoughts) and the half-written turn came back as the answer."""
    client, planner = agent_api
    assert agent_answer(client) == ("It is in the left lobe. Anything else?", "stop")
    assert agent_answer(client, stop=["lobe", ""]) == ("It is in the left ", "stop")
    assert agent_answer(client, stop="Anything") == ("It is in the left lobe. ", "stop")
    assert all(gen["stop"] is None for gen in planner.gens)


def test_an_answer_cut_off_by_max_tokens_finishes_with_length(agent_api):
    """OpenAI clients detect a truncated answer by ``finish_reason``; the agent said "stop" whatever happened."""
    client, planner = agent_api
    content, finish = agent_answer(client, max_tokens=30)
    assert finish == "length" and content == planner.turn[:30]  # the cut-off turn, as the trace's parse error says
    assert agent_answer(client, max_tokens=1000)[1] == "stop"
    planner.context = 40  # the model's context runs out before the token budget: the planner says so
    assert agent_answer(client, max_tokens=1000) == (planner.turn[:40], "length")


@pytest.mark.parametrize("answer, problem", [
    (httpx.Response(200, text="<html>proxy error</html>"), "body: Invalid JSON"),
    (httpx.Response(200, json={"result": {"slept": 1.0}}), "for_model: Field required"),
    (httpx.Response(200, json={"result": {}, "for_model": {}, "overlay": {"boxes": "Doe^John"}}), "overlay.boxes: "),
])
def test_a_tool_worker_answering_garbage_is_a_clear_error_naming_it(answer, problem, caplog):
    """Not a bare "KeyError: 'for_model'" or a pydantic dump quoting what the worker sent (it may
    describe the patient's image): the worker, the bad field, and what to check. What the model reads
    holds neither the exception's type nor the worker's address; the controller's log has the address."""
    from mmedagent.dispatcher import Dispatcher
    from mmedagent.serve.remote import remote_tool_class

    reg = WorkerRegistry(expiry_s=60)
    reg.register(tool_worker("http://10.0.0.1:8000", "nap"))
    tool = remote_tool_class("nap", {"needs_image": False})(
        reg, httpx.Client(transport=httpx.MockTransport(lambda request: answer)), 5.0, lambda: ["nap"])
    outcome = Dispatcher({"nap": tool}, timeout_s=5).dispatch(ToolCall(API_name="nap", API_params={}), None)
    assert not outcome.ok and outcome.error.startswith(
        "tool worker for 'nap' answered with a malformed result ("), outcome.error
    assert problem in outcome.error and outcome.error.endswith("is it an mmedagent tool worker?")
    assert "tool worker for 'nap' at http://10.0.0.1:8000 answered with a malformed result" in caplog.text
    assert "Doe" not in outcome.error and "proxy" not in outcome.error


def test_a_chat_goes_to_another_model_worker_when_its_own_is_gone():
    """Two model workers, one killed: the dead one (the oldest, so chosen first) is dropped at the
    refused connection, not at heartbeat expiry, and its chats go to the other one meanwhile."""
    from mmedagent.serve.remote import WorkerError, WorkerPlanner

    def workers(request):
        if request.url.host == "10.0.0.1":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "10.0.0.3":
            return httpx.Response(200, text="<html>not a model worker</html>")
        return httpx.Response(200, text='{"text": "It is "}\n{"text": "benign."}\n')

    reg = WorkerRegistry(expiry_s=60)
    for i in (1, 2):
        reg.register(WorkerInfo(address=f"http://10.0.0.{i}:8000", kind="model", names=["demo"]))
    client = httpx.Client(transport=httpx.MockTransport(workers))
    planner = WorkerPlanner(reg, client, "demo", "c1", 5.0)
    assert planner.address == "http://10.0.0.1:8000"
    assert planner.generate([{"role": "user", "content": "Is it benign?"}], None) == "It is benign."
    assert planner.address == "http://10.0.0.2:8000" and [w.address for w in reg.workers()] == [planner.address]
    reg.remove(planner.address)
    reg.register(WorkerInfo(address="http://10.0.0.3:8000", kind="model", names=["demo"]))
    with pytest.raises(WorkerError, match=r"^model worker for 'demo' answered with "
                                          r"malformed output; is it an mmedagent model worker\?$"):
        WorkerPlanner(reg, client, "demo", "c2", 5.0).generate([{"role": "user", "content": "Is it benign?"}], None)


def test_a_worker_at_its_connection_limit_is_passed_over_with_a_reason():
    """uvicorn's plain-text 503 over max_connections reached the chat as a bare "Service Unavailable" (a model
    worker's even ended the chat, where another worker of the model was free)."""
    from mmedagent.dispatcher import Dispatcher
    from mmedagent.serve.remote import WorkerBusy, WorkerPlanner, remote_tool_class

    def workers(request):
        if request.url.host == "10.0.0.1":
            return httpx.Response(503, text="Service Unavailable", headers={"content-type": "text/plain"})
        return httpx.Response(200, text='{"text": "benign."}\n')

    reg = WorkerRegistry(expiry_s=60)
    client = httpx.Client(transport=httpx.MockTransport(workers))
    reg.register(WorkerInfo(address="http://10.0.0.1:8000", kind="model", names=["demo"]))
    ask = [{"role": "user", "content": "Is it benign?"}]
    with pytest.raises(WorkerBusy, match=r"^model worker for 'demo' is busy: it holds as many connections as it "
                                         r"takes \(max_connections\); try again shortly$"):
        WorkerPlanner(reg, client, "demo", None, 5.0).generate(ask, None)
    reg.register(WorkerInfo(address="http://10.0.0.2:8000", kind="model", names=["demo"]))
    assert WorkerPlanner(reg, client, "demo", None, 5.0).generate(ask, None) == "benign."
    reg.register(tool_worker("http://10.0.0.1:8001", "nap"))
    tool = remote_tool_class("nap", {"needs_image": False})(reg, client, 5.0, lambda: ["nap"])
    outcome = Dispatcher({"nap": tool}, timeout_s=5).dispatch(ToolCall(API_name="nap", API_params={}), None)
    assert not outcome.ok and "tool worker for 'nap' is busy: it holds as many connections" in outcome.error


def test_two_workers_of_one_model_are_one_model_in_the_status():
    """The banner showed the model, and its warning note, once per worker."""
    ctl = ctl_mod.Controller(ServeConfig(tools={}))
    try:
        for port in (8000, 8001):
            ctl.registry.register(WorkerInfo(address=f"http://127.0.0.1:{port}", kind="model", names=["demo"],
                                             info={"note": "demo only"}))
        ctl.registry.register(WorkerInfo(address="http://127.0.0.1:8002", kind="model", names=["other"]))
        assert [m["name"] for m in ctl.status()["models"]] == ["demo", "other"]
    finally:
        ctl.close()


def test_a_connection_broken_before_any_answer_is_tried_again_then_fails_over(caplog):
    """A follow-up sent right after its worker was killed met the pooled keep-alive connection (ReadError, not a
    refused connection) and failed, where a refused one goes to another worker."""
    from mmedagent.serve.remote import WorkerError, WorkerPlanner

    class BreaksAfterOneLine(httpx.SyncByteStream):
        def __iter__(self):
            yield b'{"text": "It is "}\n'
            raise httpx.ReadError("connection reset by peer")

    calls = []

    def workers(request):
        calls.append(request.url.host)
        if request.url.host == "10.0.0.1":  # killed: the pooled connection breaks, a new one is refused
            if calls.count("10.0.0.1") == 1:
                raise httpx.ReadError("connection reset by peer", request=request)
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "10.0.0.3":
            return httpx.Response(200, stream=BreaksAfterOneLine())
        return httpx.Response(200, text='{"text": "benign."}\n')

    reg = WorkerRegistry(expiry_s=60)
    for i in (1, 2):
        reg.register(WorkerInfo(address=f"http://10.0.0.{i}:8000", kind="model", names=["demo"]))
    client = httpx.Client(transport=httpx.MockTransport(workers))
    ask = [{"role": "user", "content": "Is it benign?"}]
    with caplog.at_level(logging.WARNING, logger="mmedagent.serve.remote"):
        assert WorkerPlanner(reg, client, "demo", "c1", 5.0).generate(ask, None) == "benign."
    assert calls == ["10.0.0.1", "10.0.0.1", "10.0.0.2"] and [w.address for w in reg.workers()] == ["http://10.0.0.2:8000"]
    assert "model worker for 'demo' at http://10.0.0.1:8000: not reachable; dropped until it registers again" in caplog.text
    calls.clear()
    reg.register(WorkerInfo(address="http://10.0.0.1:8000", kind="model", names=["demo"]))
    reg.remove("http://10.0.0.2:8000")  # the one worker died mid-call: said so, and dropped
    with pytest.raises(WorkerError, match=r"^model worker for 'demo' stopped responding \(ReadError"):
        WorkerPlanner(reg, client, "demo", "c3", 5.0).generate(ask, None)
    assert calls == ["10.0.0.1", "10.0.0.1"] and not reg.workers()
    reg.register(WorkerInfo(address="http://10.0.0.3:8000", kind="model", names=["demo"]))
    with pytest.raises(WorkerError, match="stopped responding"):  # part of an answer came: not asked again
        WorkerPlanner(reg, client, "demo", "c2", 5.0).generate(ask, None)
    assert calls.count("10.0.0.3") == 1


def test_a_conversations_follow_up_goes_to_the_model_worker_that_answered_it(monkeypatch):
    """The worker that holds a chat's cache gets its next question unless it stalls, leaves or has two calls
    more under way than another; a new chat still goes to the least-loaded worker, the oldest conversations
    are forgotten, and a call without a conversation id is not remembered."""
    from mmedagent.serve import registry as registry_module
    from mmedagent.serve.remote import WorkerPlanner

    served = []

    def workers(request):
        served.append(request.url.host)
        return httpx.Response(200, text='{"text": "benign"}\n')

    reg = WorkerRegistry(expiry_s=60)
    a, b = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    for address in (a, b):
        reg.register(WorkerInfo(address=address, kind="model", names=["demo"]))
    client = httpx.Client(transport=httpx.MockTransport(workers))
    ask = [{"role": "user", "content": "Is it benign?"}]
    assert WorkerPlanner(reg, client, "demo", "c1", 5.0).generate(ask, None) == "benign"
    reg.begin(a)  # another chat's call is under way at the first worker
    assert WorkerPlanner(reg, client, "demo", "c2", 5.0).address == b
    assert WorkerPlanner(reg, client, "demo", "c1", 5.0).address == a
    reg.begin(a)  # two more than the idle worker: the follow-up waits no longer for its cache
    assert WorkerPlanner(reg, client, "demo", "c1", 5.0).address == b
    reg.end(a)
    reg.heartbeat(a, queue_length=1, stalled=True)
    assert WorkerPlanner(reg, client, "demo", "c1", 5.0).address == b
    reg.heartbeat(a, queue_length=0, stalled=False)
    reg.remove(a)
    WorkerPlanner(reg, client, "demo", "c1", 5.0).generate(ask, None)
    assert served == ["10.0.0.1", "10.0.0.2"]
    reg.register(WorkerInfo(address=a, kind="model", names=["demo"]))
    assert WorkerPlanner(reg, client, "demo", "c1", 5.0).address == b  # it answered the last question
    reg.end(a)
    reg.begin(b)
    assert WorkerPlanner(reg, client, "demo", "c1", 5.0).address == b
    monkeypatch.setattr(registry_module, "CONVERSATIONS_KEPT", 2)
    reg.remember("c3", a)
    reg.remember("c4", a)
    assert WorkerPlanner(reg, client, "demo", "c1", 5.0).address == a  # forgotten: the least-loaded worker
    reg.end(b)
    WorkerPlanner(reg, client, "demo", None, 5.0).generate(ask, None)  # no id (the OpenAI route): nothing to remember
    assert list(reg._conversations) == ["c3", "c4"]


LAUNCHER_TERMINATED_WHILE_STARTING = """
import os, signal, sys, time
from mmedagent.serve import launcher as la
from mmedagent.serve.config import load_config

class Launcher(la.Launcher):
    def start_children(self, controller_url, web_port):
        self._spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        print("child", self.children[0].proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # systemd stops the service while it is starting
        time.sleep(10)
        return []

Launcher(load_config(None, port=0, tools={}, no_workers=True), None).run()
"""


def test_a_launcher_stopped_while_starting_its_children_stops_them():
    """A SIGTERM between the first child and uvicorn ended the launcher at once; a child that does not
    watch it (any program) ran on."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER_TERMINATED_WHILE_STARTING], env=serve_env(),
                          capture_output=True, text=True, timeout=60)
    child = int(proc.stdout.split("child ", 1)[1].split()[0])
    alive = Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]
    if alive:
        os.kill(child, 9)
    assert not alive and proc.returncode == 0 and proc.stdout.rstrip().endswith("stopped"), (proc.stdout, proc.stderr[-2000:])


def test_the_planner_dtype_goes_from_the_controller_to_the_model_worker(tmp_path, tiny_models):
    """``--dtype bfloat16`` (docs/model.md's dtype option) reaches the worker's planner through the launcher."""
    from mmedagent.serve import model_worker

    cfg = load_config(None, model_path=str(tiny_models("llava")), dtype="bfloat16", tools={})
    launcher = la.Launcher(cfg, None)
    spawned = []
    launcher._spawn = lambda label, argv, **env: spawned.append(argv)
    launcher.start_children("http://127.0.0.1:9", None)
    argv = next(a for a in spawned if a[1].endswith("model_worker.py"))
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert model_worker.load_host(cfg).info["dtype"] == "bfloat16"
    from mmedagent.serve.config import ConfigError

    with pytest.raises(ConfigError, match="dtype"):
        load_config(None, dtype="float8")
    assert load_config(None, dtype="bf16").dtype == "bf16"  # the recipes' spelling, which the model layer reads


def test_a_tool_failure_is_logged_with_its_exception_for_the_filter_to_reduce_or_show(caplog):
    """The log filter reduces a record's exception to its type and place, or shows it whole with
    MMEDAGENT_LOG_TRACEBACKS=1: a record without one left a tool author nothing to debug."""
    import logging

    from doubles import CrashTool
    from mmedagent.serve.security import RedactFilter

    client = TestClient(tw.build_app(CrashTool(), 1 << 20))
    with caplog.at_level(logging.WARNING, logger="mmedagent.serve.tool_worker"):
        r = client.post("/call", json={"params": {}})
    assert r.status_code == 500 and "weights corrupted" in r.json()["detail"]
    (record,) = [r for r in caplog.records if r.getMessage() == "crash failed"]
    assert isinstance(record.exc_info[1], RuntimeError)
    RedactFilter().filter(record)
    assert record.getMessage().startswith("crash failed [RuntimeError") and record.exc_info is None


def test_a_tool_failing_in_its_worker_reads_to_the_model_as_it_does_in_process():
    """Served and in-process, the model reads a failed call in the same words: neither "WorkerError: crash: crash
    failed: " before the tool's error nor the worker's address; a ToolError of kind "params" is the call's 422."""
    from doubles import CrashTool
    from mmedagent.dispatcher import Dispatcher
    from mmedagent.serve.remote import remote_tool_class
    from mmedagent.tools import ToolError

    class OutOfRange(ToolError):
        failure = "params"

    class Slicer(CrashTool):
        name = "slicer"

        def __call__(self, image, params):
            raise OutOfRange("slice 40 is out of range 0..19")

    for tool in (CrashTool(), Slicer()):
        in_process = Dispatcher([tool]).dispatch(ToolCall(API_name=tool.name, API_params={}), None)
        with serving(tw.build_app(tool, 1 << 20)) as address:
            reg = WorkerRegistry(expiry_s=60)
            reg.register(tool_worker(address, tool.name))
            remote = remote_tool_class(tool.name, {"needs_image": False})(
                reg, httpx.Client(trust_env=False), 5.0, lambda: [tool.name])
            served = Dispatcher([remote]).dispatch(ToolCall(API_name=tool.name, API_params={}), None)
        assert (served.ok, served.error, served.failure) == (False, in_process.error, in_process.failure), served
    assert in_process.error == "slice 40 is out of range 0..19" and in_process.failure == "params"


def test_a_misspelt_tool_is_refused_before_anything_starts(tmp_path):
    """``--tools nosuch`` started the stack with no tools and a worker's usage text on stderr."""
    proc = subprocess.run([sys.executable, str(ROOT / "serve" / "controller.py"), "--tools", "grounding,nosuch",
                           "--no-web", "--port", "0"], env=serve_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("controller.py: error: --tools / the config's tools: unknown tool 'nosuch'; available tools: ")
    assert "grounding" in last and "Traceback" not in proc.stderr


def test_a_worker_checks_what_a_result_shows_the_model_and_the_ui_as_the_dispatcher_does():
    """numpy numbers in for_model() came back from a worker as a bare 500 (in-process they reached the model);
    an overlay() of the wrong type passed the worker and broke the UI later."""
    import numpy as np

    from mmedagent.tools import ToolParams

    class Scored(ToolResult):
        score: float

        def for_model(self):
            return {"score": np.float32(self.score), "n": np.int64(3)}

    class Score(Tool):
        name = "score_np"
        description = "Scores the image."
        Result = Scored
        needs_image = False

        def __call__(self, image, params):
            return Scored(score=0.5)

    class BadOverlay(Scored):
        def overlay(self):
            return {"boxes": []}

    class Drawn(Score):
        name = "drawn_np"
        Result = BadOverlay

        def __call__(self, image, params):
            return BadOverlay(score=0.5)

    assert Score.Params is ToolParams
    r = TestClient(tw.build_app(Score(), 1 << 20)).post("/call", json={"params": {}})
    assert r.status_code == 200 and r.json()["for_model"] == {"score": 0.5, "n": 3}, r.text
    r = TestClient(tw.build_app(Drawn(), 1 << 20)).post("/call", json={"params": {}})
    assert r.status_code == 500 and r.json()["detail"] == ("drawn_np failed: TypeError: BadOverlay.overlay() returned "
                                                          "dict, expected Overlay or None"), r.text


def test_the_controller_tells_the_model_worker_which_tools_the_chat_offers():
    """A constrained planner names only these: the model worker's own registry lacks the controller's plug-ins
    and holds tools no worker serves."""
    from mmedagent.serve.remote import WorkerPlanner

    sent = []

    def model_worker(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, text=json.dumps({"text": "hi"}) + "\n")

    registry = WorkerRegistry(expiry_s=60)
    registry.register(WorkerInfo(address="http://127.0.0.1:9", kind="model", names=["m"]))
    client = httpx.Client(transport=httpx.MockTransport(model_worker))
    assert WorkerPlanner(registry, client, "m", "c", 5.0, None, [Hang]).generate([{"role": "user", "content": "x"}], None) == "hi"
    assert sent[0]["tools"] == [{"name": "hang", "aliases": [], "params": Hang.Params.model_json_schema()}]


def test_unregistering_and_heartbeats_take_a_worker_address_only():
    """Any text was taken as an address: a line break in it forged a log line, and an unknown one was logged
    as a worker that left."""
    ctl = ctl_mod.Controller(ServeConfig())
    try:
        client = TestClient(ctl_mod.build_app(ctl))
        for path in ("/unregister_worker", "/receive_heartbeat"):
            r = client.post(path, json={"address": "http://127.0.0.1:9\n2031-01-01 ERROR forged"})
            assert r.status_code == 422, (path, r.text)
        ctl.registry.register(tool_worker("http://127.0.0.1:9", "hang"))
        assert client.post("/receive_heartbeat", json={"address": "http://127.0.0.1:9"}).json() == {"exist": True}
        assert client.post("/unregister_worker", json={"address": "http://127.0.0.1:9"}).status_code == 200
        assert ctl.registry.names("tool") == []
    finally:
        ctl.close()


def test_a_request_naming_no_wait_limit_waits_the_workers_own(monkeypatch):
    """An older controller (or an OpenAI client) names no wait: kept alive, its chat queued without end; it
    waits the worker's model_timeout_s, then hears the model is busy. An offered tool's empty alias is a 422."""
    from mmedagent.serve import model_worker as mw

    held = Held()
    monkeypatch.setattr(mw, "KEEPALIVE_S", 0.1)
    client = TestClient(mw.build_app(mw.ModelHost(held, "m", {}, 1 << 20, max_wait_s=0.5)))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    first = threading.Thread(target=lambda: client.post("/worker_generate_stream", json=body))
    first.start()
    try:
        wait_until(lambda: client.get("/health").json()["queue_length"] == 1, 5, 0.01)
        events = [json.loads(line) for line in client.post("/worker_generate_stream", json=body).text.splitlines()]
        assert events[-1] == {"error": "model 'm' is busy: no turn came within 0.5 s (1 request(s) were ahead of this "
                                       "one); try again later, or start another model worker for it", "busy": True}
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "is busy" in r.text, r.text
    finally:
        held.free.set()
        first.join(10)
    bad = {**body, "tools": [{"name": "t", "aliases": [" "], "params": {"type": "object", "properties": {}}}]}
    assert client.post("/worker_generate_stream", json=bad).status_code == 422


def test_a_worker_of_another_tool_version_with_an_unknown_question_param_breaks_no_chat():
    """The controller pairs its own Params with the worker's question_param: a field its version lacks was
    refused where the proxy class was made, and every chat, /v1/tools and /v1/models failed with it."""
    from mmedagent.serve.remote import remote_tool_class

    proxy = remote_tool_class("classification", {"question_param": "question_text", "params": {}})
    assert proxy.question_param is None and proxy.Params is get_tool("classification").Params
