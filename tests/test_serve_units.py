"""Serving building blocks without servers: registry, config, uploads, OpenAI parsing, log redaction."""

import base64
import json
import logging
import re
import sys
import time

import pytest
from pydantic import ValidationError

from _serve_fixtures import data_url, sample_png, wait_until
from mmedagent.serve import openai_api as oa
from mmedagent.serve.config import ConfigError, ServeConfig, ToolSpec, load_config
from mmedagent.serve.registry import NoWorkerError, WorkerInfo, WorkerRegistry
from mmedagent.serve.remote import remote_tool_class, to_openai_messages
from mmedagent.serve.security import RedactFilter, check_token
from mmedagent.serve.uploads import UploadError, image_from_data_url, png_data_url, split_data_url


def worker(address, kind="tool", names=("grounding",), queue=0):
    return WorkerInfo(address=address, kind=kind, names=list(names), queue_length=queue)


def test_registry_shortest_queue_and_inflight():
    reg = WorkerRegistry(expiry_s=10)
    reg.register(worker("http://127.0.0.1:1", queue=3))
    reg.register(worker("http://127.0.0.1:2", queue=0))
    reg.register(worker("http://127.0.0.1:3", names=("other",)))
    assert reg.pick("tool", "grounding") == "http://127.0.0.1:2"
    reg.begin("http://127.0.0.1:2")
    reg.begin("http://127.0.0.1:2")
    reg.begin("http://127.0.0.1:2")
    reg.begin("http://127.0.0.1:2")
    assert reg.pick("tool", "grounding") == "http://127.0.0.1:1"  # 4 in flight beats a queue of 3
    reg.heartbeat("http://127.0.0.1:1", 9)
    assert reg.pick("tool", "grounding") == "http://127.0.0.1:2"


def test_registry_expiry_and_unknown_name():
    reg = WorkerRegistry(expiry_s=1.0)
    reg.register(worker("http://127.0.0.1:1"))
    reg.register(worker("http://127.0.0.1:2", names=("classification",)))
    time.sleep(0.6)
    assert reg.heartbeat("http://127.0.0.1:2", 0)
    time.sleep(0.6)
    assert reg.expire() == ["http://127.0.0.1:1"]
    assert not reg.heartbeat("http://127.0.0.1:1", 0)  # the worker will register again
    with pytest.raises(NoWorkerError, match="available tools: classification"):
        reg.pick("tool", "grounding")
    assert reg.known["grounding"]["kind"] == "tool"  # remembered for a clear message later


def test_worker_address_must_be_a_base_url():
    with pytest.raises(ValidationError):
        WorkerInfo(address="file:///etc/passwd", kind="tool", names=["x"])
    for address in ("http://127.0.0.1:1/path", "http://evil.example/?:1", "http://a:1#x", "http://127.0.0.1"):
        with pytest.raises(ValidationError):
            WorkerInfo(address=address, kind="tool", names=["x"])
    for address in ("http://127.0.0.1:21002", "https://gpu-box.lan:8000", "http://[::1]:9"):
        WorkerInfo(address=address, kind="tool", names=["x"])


def test_config_expiry_must_exceed_interval(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="must exceed heartbeat_interval_s"):
        ServeConfig(heartbeat_interval_s=5, heartbeat_expiry_s=5)
    path = tmp_path / "serve.yaml"
    path.write_text("port: 9000\ntools:\n  grounding: {options: {device: cpu}}\n  nap: {in_process: true}\n")
    monkeypatch.setenv("MMEDAGENT_API_KEY", "from-env-0a9b8c7d6e")
    cfg = load_config(path, port=9100, web_port=None)
    assert cfg.port == 9100 and cfg.host == "127.0.0.1"
    assert cfg.tools["grounding"].options == {"device": "cpu"} and cfg.tools["nap"].in_process
    assert cfg.api_key == "from-env-0a9b8c7d6e" and "from-env" not in repr(cfg)
    # --tools / --in-process-tools choose the tools; each keeps its file settings unless a flag changes them
    cfg = load_config(path, tools={"nap": {}, "grounding": {"in_process": True}, "classification": {}})
    assert list(cfg.tools) == ["nap", "grounding", "classification"] and cfg.tools["nap"].in_process
    assert cfg.tools["grounding"].in_process and cfg.tools["grounding"].options == {"device": "cpu"}
    path.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match=r"invalid settings in .*serve\.yaml: prot: Extra inputs are not permitted"):
        load_config(path)


def test_config_errors_are_one_line_and_never_show_the_api_key(tmp_path):
    """Bad settings beside an API key (flag or file), a missing or malformed file: one ``error:`` line
    naming the setting, exit 2; the key is never printed."""
    import subprocess
    from pathlib import Path

    bad = tmp_path / "bad.yaml"
    bad.write_text("api_key: s3cr3t-file\nheartbeat_interval_s: 10\nheartbeat_expiry_s: 5\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("api_key: s3cr3t-file0123456\nprot: 21001\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text('api_key: "s3cr3t-yaml\nport: 1\n')
    controller = str(Path(__file__).resolve().parents[1] / "serve" / "controller.py")
    cases = [
        (["--api-key", "s3cr3t-flag", "--heartbeat-interval", "10", "--heartbeat-expiry", "5"], "must exceed heartbeat_interval_s"),
        (["--config", str(bad)], "must exceed heartbeat_interval_s"),
        (["--config", str(tmp_path / "nope.yaml")], "cannot read the config file"),
        (["--api-key", "s3cr3t-short"], "error: invalid settings: the API key has 12 characters; use at least 16"),
        (["--config", str(broken)], "not valid YAML at line"),
        (["--config", str(typo)], "prot: Extra inputs are not permitted"),
        (["--log-level", "verbose"], "unknown log level; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        # a model worker that would start, fail to load and leave the stack without a model
        (["--model-path", str(tmp_path / "no-such-model"), "--no-web"], f"{tmp_path / 'no-such-model'} does not exist"),
    ]
    for argv, expected in cases:
        proc = subprocess.run([sys.executable, controller, *argv], capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and expected in out and "Traceback" not in out, out[-2000:]
        assert "s3cr3t" not in out, out[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "usage:" not in out, out[-2000:]  # not the flags' usage text


@pytest.mark.parametrize(
    "url, status, reason",
    [
        ("/etc/passwd", 400, "base64 data URLs"),
        ("file:///etc/passwd", 400, "file is not accepted"),
        ("http://127.0.0.1:1/x.png", 400, "http is not accepted"),
        ("data:image/png,abc", 400, "base64 encoded"),
        ("data:text/plain;base64,aGVsbG8=", 415, "unsupported image type"),
        ("data:image/png;base64,@@@@", 400, "not valid base64"),
        ("data:image/png;base64,", 400, "empty"),
        (data_url(b"hello world"), 400, "not a recognised image"),
        (data_url(sample_png()[:60]), 400, "could not read the image"),
    ],
)
def test_bad_uploads_are_refused_with_a_reason(url, status, reason):
    with pytest.raises(UploadError) as err:
        image_from_data_url(url, max_bytes=1 << 20)
    assert err.value.status == status and reason in err.value.reason


def test_upload_limit_and_good_image():
    big = data_url(b"\0" * 5000)
    with pytest.raises(UploadError) as err:
        split_data_url(big, max_bytes=4000)
    assert err.value.status == 413
    img = image_from_data_url(data_url(sample_png()), max_bytes=1 << 20).image
    assert img.mode == "RGB" and img.size == (48, 40)
    assert png_data_url(img) is png_data_url(img)  # encoded once per image


def test_an_upload_decodes_to_at_most_32_pixels_a_byte(monkeypatch):
    """A decompression bomb (a 36-megapixel PNG of 50 kB) is refused before it is decoded; the same
    file is the operator's to allow with MMEDAGENT_MAX_PIXELS."""
    import io

    from PIL import Image

    from mmedagent.serve.uploads import decode_image, pixel_limit

    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")
    bomb = buf.getvalue()
    with pytest.raises(UploadError, match="declares 36,000,000 pixels.*decompression bomb"):
        decode_image(bomb)
    assert pixel_limit(len(bomb)) == 32 << 20 and pixel_limit(5 << 20) == 160 << 20
    monkeypatch.setenv("MMEDAGENT_MAX_PIXELS", str(10**8))
    assert pixel_limit(len(bomb)) > 36_000_000


def test_images_travel_as_png_grey_in_one_channel_and_only_within_the_upload_limit():
    import io

    import numpy as np
    from PIL import Image

    from mmedagent.serve.uploads import sendable_png

    rng = np.random.default_rng(0)
    grey = Image.fromarray(np.repeat(rng.integers(0, 255, (64, 64, 1), dtype=np.uint8), 3, axis=2))
    sent = Image.open(io.BytesIO(base64.b64decode(sendable_png(grey, 1 << 20).split(",", 1)[1])))
    assert sent.mode == "L" and image_from_data_url(png_data_url(grey), 1 << 20).image.tobytes() == grey.tobytes()
    noise = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))  # ~190 kB as PNG
    with pytest.raises(UploadError, match=r"as the lossless PNG .* more than its upload limit \(0\.1 MB.*downscale") as err:
        sendable_png(noise, 100_000)
    assert err.value.status == 413


def test_openai_messages_round_trip():
    url = data_url(sample_png())
    req = oa.ChatCompletionRequest.model_validate(
        {"model": "m", "max_tokens": 7, "stop": "X", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Where?"}]},
        ]}
    )
    messages, image = oa.split_messages(req.messages)
    assert image == url
    assert messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<image>\nWhere?"}]
    assert req.gen({"max_new_tokens": 256, "temperature": 0.0}) == {"max_new_tokens": 7, "temperature": 0.0}
    assert req.stops() == ["X"]  # apart: the model worker's planner stops at them, the agent cuts its answer
    pil = image_from_data_url(url, 1 << 20).image
    back = to_openai_messages(messages, pil)
    assert back[1]["content"][0]["type"] == "image_url" and back[1]["content"][1] == {"type": "text", "text": "Where?"}
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "image_url", "image_url": {"url": data_url(sample_png((8, 8)))}}]}]
    with pytest.raises(UploadError, match="only one image"):
        oa.split_messages(oa.ChatCompletionRequest.model_validate({"messages": two}).messages)


def test_redaction_and_tokens():
    key = "sk-very-secret-123"
    f = RedactFilter([key])
    payload = base64.b64encode(sample_png() * 3).decode()
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "key=%s auth=%s img=%s tail", (key, "Bearer abc.def", "data:image/png;base64," + payload), None)
    f.filter(rec)
    text = rec.getMessage()
    assert key not in text and "abc.def" not in text and payload[:40] not in text and text.endswith("tail")
    from mmedagent.imaging import _resolve_window

    def logged(fail):
        try:
            fail()
        except Exception:
            rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "upload failed for %s", ("req-7",), sys.exc_info())
        f.filter(rec)
        return logging.Formatter().format(rec)

    # a library's text may quote the data: only its type and the last place in our code remain
    text = logged(lambda: _resolve_window(("Zzyzx^Quixote", 1)))
    assert "Zzyzx" not in text and re.fullmatch(r"upload failed for req-7 \[ValueError at imaging\.py:\d+\]", text), text
    text = logged(lambda: split_data_url("data:image/png;base64,@@", 100))  # our own exception keeps its text
    assert re.fullmatch(r"upload failed for req-7 \[UploadError: image data URL is not valid base64 at uploads\.py:\d+\]", text), text
    assert check_token(None, None) and check_token("Bearer k", "k")
    assert not check_token(None, "k") and not check_token("Bearer x", "k") and not check_token("k", "k")


def test_remote_tool_class_uses_worker_schema_for_unknown_tools():
    schema = {"type": "object", "properties": {"level": {"type": "integer"}}}
    cls = remote_tool_class("somewhere_else", {"params": schema, "aliases": ["se"], "description": "d", "needs_image": False})
    assert cls.names() == ("somewhere_else", "se") and not cls.needs_image
    assert cls.Params.model_json_schema() == schema
    assert cls.Params.model_validate({"level": 2}).model_dump() == {"level": 2}


def test_remote_proxies_keep_what_the_dispatcher_reads_from_a_tool_class():
    """A proxy built from a worker's schema behaves like the tool class in the dispatcher: ChatCAD-R
    called with ``{}`` through a tool worker gets the user's question, as it does in-process."""
    from mmedagent.dispatcher import Dispatcher
    from mmedagent.protocol import ToolCall
    from mmedagent.tools import get_tool

    for name in ("grounding", "segmentation", "grounding_segmentation", "classification", "report_generation", "retrieval"):
        tool = get_tool(name)
        proxy = remote_tool_class(name, tool.schema())
        assert {**proxy.schema(), "result": None} == {**tool.schema(), "result": None}, name
    proxy = remote_tool_class("retrieval", get_tool("retrieval").schema())(None, None, 1.0, list)
    _, params = Dispatcher([proxy]).prepare(ToolCall(API_name="ChatCAD-R", API_params={}), None, "What is the code for hypertension?")
    assert params.query == "What is the code for hypertension?"


def test_model_path_demo_serves_the_embedded_demo_model(tmp_path, monkeypatch):
    import json
    import shutil

    from mmedagent import demo
    from mmedagent.model.tiny import make_tiny_model
    from mmedagent.serve.model_worker import load_host

    monkeypatch.setenv("MMEDAGENT_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "PACKAGED", tmp_path / "not-shipped")
    with pytest.raises(FileNotFoundError, match="build_demo_model"):
        demo.demo_model_path(build_if_missing=False)
    built = make_tiny_model("llava", tmp_path / "built")
    shutil.copytree(built, demo.demo_dir())
    (demo.demo_dir() / demo.SETTINGS_FILE).write_text(json.dumps({"system_prompt": "none", "demo": True,
                                                                 "constrain": True}))
    host = load_host(ServeConfig(model_path="demo"))
    assert host.info["demo"] is True and host.info["note"] == demo.NOTE
    assert host.info["system_prompt"] == "none"
    assert host.info["constrain"] is True  # the model directory's default ...
    assert load_host(ServeConfig(model_path="demo", constrain=False)).info["constrain"] is False  # ... a flag overrides
    plain = load_host(ServeConfig(model_path=str(built)))
    assert plain.info["demo"] is False and plain.info["constrain"] is False


def test_a_model_trained_with_its_own_system_text_is_served_with_it(tmp_path):
    """A model directory whose records all had one system text (mmedagent.json "text" + system_text) is served with
    that text, not the tool catalog; the worker refuses to start without the text instead of failing every chat."""
    from mmedagent.model.tiny import make_tiny_model
    from mmedagent.serve.controller import Controller
    from mmedagent.serve.model_worker import load_host
    from mmedagent.serve.registry import WorkerInfo

    built = make_tiny_model("llava", tmp_path / "m")
    (built / "mmedagent.json").write_text(json.dumps({"system_prompt": "text", "system_text": "You are a radiologist."}))
    host = load_host(ServeConfig(model_path=str(built)))
    assert (host.info["system_prompt"], host.info["system_text"]) == ("text", "You are a radiologist.")
    assert load_host(ServeConfig(model_path=str(built), system_prompt="none")).info.get("system_text") is None
    ctl = Controller(ServeConfig())
    ctl.registry.register(WorkerInfo(address="http://127.0.0.1:9", kind="model", names=["m"], info=host.info))
    seen = []

    class Recording:
        address = "http://127.0.0.1:9"

        def __init__(self, *args, **kwargs):
            pass

        def generate(self, messages, image, **gen):
            seen.append(messages[0])
            return 'The answer.'

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mmedagent.serve.controller.WorkerPlanner", Recording)
        ctl.run_agent("m", "Is it benign?", None, [], {}, 1, "c1")
    assert seen == [{"role": "system", "content": "You are a radiologist."}]
    (built / "mmedagent.json").write_text(json.dumps({"system_prompt": "text"}))
    with pytest.raises(ValueError, match="needs the text the model was trained with"):
        load_host(ServeConfig(model_path=str(built)))


def test_an_unwritable_cache_stops_the_launcher_in_one_line_instead_of_every_tool_failing(tmp_path):
    """The demo tool weights could not be built, so every tool fell back to published weights an offline
    server does not have, and failed in a line of its own that did not name the cache."""
    from mmedagent.serve.launcher import resolve_tool_specs

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot build the demo tool weights in the cache .*a-file.*set "
                                         r"cache_dir in the config, or MMEDAGENT_CACHE, to a writable folder"):
        resolve_tool_specs(ServeConfig(cache_dir=str(blocker / "cache"), tools={"segmentation": ToolSpec()}))


def test_health_says_whether_a_chat_can_be_answered_and_ready_answers_503_until_then():
    from fastapi.testclient import TestClient

    from mmedagent.serve.controller import Controller, build_app

    ctl = Controller(ServeConfig(tools={}))
    ctl.loading = ["retrieval"]
    try:
        with TestClient(build_app(ctl)) as client:
            assert client.get("/health").json() == {"ok": True, "ready": False, "models": 0, "tool_workers": 0,
                                                    "loading": ["retrieval"]}
            r = client.get("/ready")
            assert r.status_code == 503 and "no model worker is registered" in r.json()["detail"]
            ctl.registry.register(worker("http://127.0.0.1:9", kind="model", names=("demo",)))
            assert client.get("/health").json()["ready"] is True
            r = client.get("/ready")
            assert r.status_code == 200 and r.json() == {"ready": True, "models": ["demo"], "tools": [], "loading": ["retrieval"]}
    finally:
        ctl.close()


def test_a_tool_still_loading_is_a_503_not_unknown():
    from fastapi.testclient import TestClient

    from mmedagent.serve.controller import Controller, build_app

    ctl = Controller(ServeConfig(tools={"retrieval": ToolSpec()}))
    ctl.loading = ["retrieval"]
    try:
        with TestClient(build_app(ctl)) as client:
            r = client.post("/v1/tools/ChatCAD-R", json={"params": {"question": "asthma"}})
            assert r.status_code == 503 and "'retrieval' is still loading" in r.json()["detail"]
            r = client.post("/v1/tools/no_such_tool", json={"params": {}})
            assert r.status_code == 404 and "unknown tool" in r.json()["detail"]
    finally:
        ctl.close()


def test_the_launcher_restarts_a_crashed_child_but_not_a_stopped_or_failing_one(monkeypatch):
    import signal as sig

    from mmedagent.serve import launcher as la

    def child(code, ran_s):
        c = la.Child("worker", [sys.executable, "-c", f"import os, signal; os.kill(os.getpid(), {-code}) if {code} < 0 else exit({code})"], {})
        c.proc.wait(30)
        c.started -= ran_s
        return c

    tended = la.Launcher(ServeConfig())
    crashed, killed, stopped, clean, early = child(1, 60), child(-sig.SIGKILL, 60), child(-sig.SIGTERM, 60), child(0, 60), child(1, 1)
    unloadable = child(la.EXIT_CANNOT_LOAD, 60)  # its weights are missing: a restart would fail the same way
    tended.children = [crashed, killed, stopped, clean, early, unloadable]
    first = {c: c.proc for c in tended.children}
    tended._tend_children()
    assert crashed.proc is not first[crashed] and killed.proc is not first[killed]  # started again
    assert all(c.proc is first[c] and c.reported for c in (stopped, clean, early, unloadable))
    killed.proc.wait(30)
    tended.children = [crashed]
    monkeypatch.setattr(la, "RESTART_MIN_UPTIME_S", 0.0)
    for _ in range(la.RESTART_LIMIT[0]):  # up to the restart budget, then reported
        crashed.proc.wait(30)
        tended._tend_children()
    assert crashed.reported and len(crashed.restarts) == la.RESTART_LIMIT[0] + 1
    tended.children = [killed]
    tended.stopping.set()  # shutting down: nothing is restarted
    tended._tend_children()
    assert not killed.reported and killed.proc.returncode == -sig.SIGKILL


def test_workers_that_cannot_load_exit_with_the_status_the_launcher_does_not_restart(tmp_path):
    """A missing checkpoint is one clear line and EXIT_CANNOT_LOAD, not a traceback and a restart loop."""
    import os
    import subprocess
    from pathlib import Path

    from mmedagent.serve.worker_base import EXIT_CANNOT_LOAD

    serve_dir = Path(__file__).resolve().parents[1] / "serve"
    missing = tmp_path / "no-such-checkpoint"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in (["model_worker.py", "--model-path", str(missing), "--no-register"],
                 ["tool_worker.py", "--tool", "grounding", "--options", f'{{"model": "{missing}"}}']):
        proc = subprocess.run([sys.executable, str(serve_dir / argv[0]), *argv[1:]], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == EXIT_CANNOT_LOAD, proc.stderr[-2000:]
        assert "could not load" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_generation_stops_when_its_consumer_goes_away():
    """A client that disconnects mid-stream frees the model at once; generation does not run on to
    max_new_tokens while every other request waits."""
    import asyncio
    import itertools
    import threading

    from mmedagent.serve.model_worker import ModelHost, _pump

    produced, finished = [], threading.Event()

    class Endless:
        def stream(self, messages, image, **gen):
            try:
                for i in itertools.count():
                    time.sleep(0.01)
                    produced.append(i)
                    yield str(i)
            finally:
                finished.set()

    host = ModelHost(Endless(), "endless", {}, 1 << 20)

    async def read_one_then_leave():
        pieces = _pump(host.stream([{"role": "user", "content": "hi"}], None, {}))
        async for _ in pieces:
            break
        await pieces.aclose()

    asyncio.run(read_one_then_leave())
    assert finished.wait(2), "generation ran on after its consumer left"
    assert host.slots.acquire(timeout=2)  # the model is free for the next request
    host.slots.release()
    wait_until(lambda: host.queue_length() == 0, 2, 0.01)  # counted down just after the slot is released
    assert len(produced) < 50


def test_a_port_in_use_is_one_clear_line():
    import socket

    from mmedagent.serve.worker_base import bind_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"error: cannot listen on 127\.0\.0\.1:{port} .*in use.*pass --port"):
            bind_socket("127.0.0.1", port)


def test_a_reply_cut_off_by_the_token_budget_finishes_with_length():
    """OpenAI clients detect truncation by ``finish_reason``: "length" when the budget ran out."""
    from mmedagent.serve.model_worker import ModelHost, build_app

    class Counting:
        def stream(self, messages, image, max_new_tokens=256, **gen):
            n = min(max_new_tokens, 5)  # a reply of 5 tokens, unless the budget is smaller
            self.last_stats = {"prompt_tokens": 3, "new_tokens": n}
            yield "x" * n

    class Reporting:  # a planner that says why it stopped (HFPlanner does)
        def stream(self, messages, image, max_new_tokens=256, **gen):
            if max_new_tokens in (3, 10):  # 10: a stop string on the budget's last token
                self.last_stats = {"prompt_tokens": 3, "new_tokens": max_new_tokens,
                                   "finish": "length" if max_new_tokens == 3 else "stop"}
            else:  # the model's context ran out after 40 tokens, well inside the default budget
                self.last_stats = {"prompt_tokens": 3, "new_tokens": 40, "finish": "length"}
            yield "x"

    cases = ((3, "length"), (10, "stop"), (None, "stop"))
    for planner, expected in ((Counting(), cases), (Reporting(), ((3, "length"), (10, "stop"), (None, "length")))):
        check_finish(build_app(ModelHost(planner, "counting", {}, 1 << 20)), expected)


def test_the_chat_trace_says_a_step_was_cut_off_by_the_token_budget():
    from mmedagent.agent import AgentStep
    from mmedagent.serve.controller import step_view

    view = step_view(AgentStep(index=0, raw='"thoughts', new_tokens=2, finish="length"))
    assert view["finish"] == "length" and view["new_tokens"] == 2


def check_finish(app, cases):
    from fastapi.testclient import TestClient

    client = TestClient(app)
    for budget, finish in cases:
        body = {"model": "counting", "messages": [{"role": "user", "content": "hi"}],
                **({"max_tokens": budget} if budget else {})}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == finish, (budget, r.json())
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: {")]
        assert json.loads(events[-1][6:])["choices"][0]["finish_reason"] == finish, budget


def test_a_forwarding_worker_runs_calls_side_by_side_with_their_own_token_counts():
    """With ``--backend-url`` the backend batches: calls are not serialised, and each response
    carries its own call's usage (not another thread's)."""
    import threading

    import httpx
    from fastapi.testclient import TestClient

    from mmedagent.serve.model_worker import ModelHost, build_app
    from mmedagent.serve.remote import OpenAIPlanner

    running, peak, guard = [0], [0], threading.Lock()

    def backend(request: httpx.Request) -> httpx.Response:
        n = len(json.loads(request.content)["messages"][-1]["content"])
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with guard:
            running[0] -= 1
        usage = {"prompt_tokens": n, "completion_tokens": n}
        if not json.loads(request.content)["stream"]:
            return httpx.Response(200, json={"choices": [{"message": {"content": "x" * n}}], "usage": usage})
        chunks = [{"choices": [{"delta": {"content": "x" * n}}]}, {"choices": [], "usage": usage}]
        return httpx.Response(200, text="".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n")

    planner = OpenAIPlanner("http://backend/v1", model="m")
    planner.client = httpx.Client(transport=httpx.MockTransport(backend))
    client = TestClient(build_app(ModelHost(planner, "m", {}, 1 << 20)))
    usages: dict[int, dict] = {}

    def ask(n: int) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "q" * n}]}
        usages[n] = client.post("/v1/chat/completions", json=body).json()["usage"]

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] > 1
    assert all(usages[n]["prompt_tokens"] == usages[n]["completion_tokens"] == n for n in range(1, 5)), usages


def test_a_refused_request_reads_as_a_sentence_in_the_chat():
    """A 422's field list reaches the web UI and CLI as "field: why", not a Python list."""
    import httpx

    from mmedagent.serve.httpclient import error_detail

    r = httpx.Response(422, json={"detail": [{"loc": ["body", "question"], "msg": "String should have at most 20000 characters",
                                              "type": "string_too_long"}]})
    assert error_detail(r) == "body.question: String should have at most 20000 characters"
    assert error_detail(httpx.Response(503, json={"detail": "'retrieval' is still loading"})) == "'retrieval' is still loading"
    assert error_detail(httpx.Response(400, json={"error": {"message": "n: only n=1 is supported", "type": "x"}})) == (
        "n: only n=1 is supported")  # OpenAI-shaped (a backend, our /v1 routes)


def test_the_terminal_chat_says_which_view_of_a_scan_it_sends_and_takes_another(tmp_path, capsys):
    """A 4-D NIfTI: which slice and volume were sent, and flags to choose others (an unreachable
    controller is fine: the image is read and described before the first question)."""
    from pathlib import Path

    import nibabel

    from mmedagent.serve.cli import main

    scan = str(Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz")
    main(["--image", scan, "--controller", "http://127.0.0.1:9", "-q", "hi"])
    err = capsys.readouterr().err
    assert "image: nifti, axial slice 12 (of 0–23), volume 0 (of 0–1), window " in err and "--slice" in err
    main(["--image", scan, "--controller", "http://127.0.0.1:9", "-q", "hi", "--slice", "0", "--volume", "1",
          "--plane", "coronal", "--window", "40,400"])
    assert "image: nifti, coronal slice 0 (of 0–95), volume 1 (of 0–1), window 40/400 (explicit)" in capsys.readouterr().err
    assert main(["--image", scan, "--controller", "http://127.0.0.1:9", "-q", "hi", "--window", "lungish"]) == 2
    assert "unknown window preset 'lungish'" in capsys.readouterr().err


def test_a_conversation_past_the_message_limit_is_told_to_start_a_new_one():
    """50 questions with one tool round each make 201 history messages (with the system message): the
    next question gets one sentence the web UI and CLI show, not a validation dump."""
    from fastapi.testclient import TestClient

    from mmedagent.serve.controller import Controller, build_app
    from mmedagent.serve.httpclient import error_detail
    from mmedagent.serve.messages import MAX_MESSAGES

    rounds = [{"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "a tool call"},
              {"role": "user", "content": "the tool's result"}, {"role": "assistant", "content": "There."}]
    history = [{"role": "system", "content": "tools"}, *rounds * 50]
    ctl = Controller(ServeConfig())
    try:
        with TestClient(build_app(ctl)) as client:
            r = client.post("/chat", json={"question": "And now?", "history": history})
            assert r.status_code == 422
            assert error_detail(r) == (f"this conversation is too long to go on (201 messages, at most {MAX_MESSAGES}): "
                                       "start a new conversation to ask more")
            r = client.post("/chat", json={"question": "And now?", "history": history[:MAX_MESSAGES]})
            assert r.status_code == 503 and "no model worker" in r.json()["detail"]  # within the limit: goes on
    finally:
        ctl.close()


@pytest.mark.parametrize("spec", ["40", "lungish"])
def test_a_window_that_is_neither_preset_nor_center_width_names_both_forms(spec):
    from mmedagent.imaging import parse_window

    with pytest.raises(ValueError) as e:
        parse_window(spec)
    message = str(e.value)
    assert f"unknown window preset {spec!r}" in message and "CENTER,WIDTH" in message and "40,400" in message
    assert "brain" in message and "\n" not in message


@pytest.mark.parametrize("question", ["   ", "<image>", "<image>\n  \n"])
def test_a_question_without_words_is_refused_before_the_agent_runs(question):
    from fastapi.testclient import TestClient

    from mmedagent.serve.controller import Controller, build_app
    from mmedagent.serve.httpclient import error_detail

    ctl = Controller(ServeConfig())
    try:
        with TestClient(build_app(ctl)) as client:
            r = client.post("/chat", json={"question": question})
            assert r.status_code == 422 and "the question is empty" in error_detail(r)
            r = client.post("/chat", json={"question": "<image>\nWhere?"})
            assert r.status_code == 503 and "no model worker" in r.json()["detail"]  # a real question goes on
    finally:
        ctl.close()


def test_a_call_to_a_tool_whose_worker_failed_to_start_says_so_not_unknown_tool():
    """Published tool weights missing offline: the ready line said "failed to start: grounding", then every chat's
    call read "unknown tool 'grounding dino'; available tools: (none)"."""
    from mmedagent.protocol import ToolCall
    from mmedagent.serve.controller import Controller

    ctl = Controller(ServeConfig())
    ctl.failed.add("grounding")  # as the launcher records it
    ctl.dispatcher.tools = ctl.all_tools()
    from doubles import grey_image

    outcome = ctl.dispatcher.dispatch(ToolCall(API_name="grounding dino", API_params={"prompts": ["tumor"]}),
                                      grey_image())
    assert (outcome.error, outcome.failure) == (
        "no worker is serving tool 'grounding' right now; available tools: (none)", "unavailable")
    assert ctl.available_tools() == []  # not offered to the model
