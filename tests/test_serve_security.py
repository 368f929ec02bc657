"""Who may reach a server and what it keeps: loopback-only without an API key (bind address, Host
header, worker addresses), and the web UI's uploads and answers."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mmedagent.serve.config import ConfigError, ServeConfig, is_loopback, load_config
from mmedagent.serve.security import GuardMiddleware, LoopbackHostOnly


@pytest.fixture
def no_env_key(monkeypatch):
    monkeypatch.delenv("MMEDAGENT_API_KEY", raising=False)


def test_loopback_names():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "gpu-box", "attacker.example", ""]))


def test_listening_beyond_this_machine_needs_an_api_key(no_env_key, monkeypatch):
    with pytest.raises(ConfigError, match=r"host 0\.0\.0\.0 is reachable from other machines: set an API key"):
        load_config(host="0.0.0.0")
    with pytest.raises(ConfigError, match="set an API key"):
        load_config(host="10.1.2.3")
    assert load_config(host="0.0.0.0", api_key="s3cret-7c1e0b9a4d").host == "0.0.0.0"
    assert load_config(host="localhost").api_key is None
    monkeypatch.setenv("MMEDAGENT_API_KEY", "from-env-0a9b8c7d6e")
    assert load_config(host="0.0.0.0").api_key == "from-env-0a9b8c7d6e"


def _hello() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    def hello() -> dict:
        return {"ok": True}

    return app


@pytest.mark.parametrize("wrap", ["guard", "web"])
def test_without_a_key_only_loopback_host_names_are_answered(wrap):
    """DNS rebinding: a page at attacker.example whose name resolves to 127.0.0.1 sends its own Host."""
    app = GuardMiddleware(_hello(), None, 1 << 20) if wrap == "guard" else LoopbackHostOnly(_hello())
    for base, status in (("http://127.0.0.1:21001", 200), ("http://localhost:7860", 200), ("http://[::1]:80", 200),
                         ("http://attacker.example:21001", 421), ("http://10.0.0.7", 421)):
        r = TestClient(app, base_url=base).get("/hello")
        assert r.status_code == status, (base, r.text)


def test_with_a_key_any_host_name_is_answered_with_the_token():
    from mmedagent.serve.security import RedactFilter

    client = TestClient(GuardMiddleware(_hello(), "s3cret", 1 << 20), base_url="http://gpu-box.lan:21001")
    refused = client.get("/hello")
    assert refused.status_code == 401
    # a worker logs the refusal: it read "missing or wrong [redacted]" (the words "bearer token" taken for one)
    logged = RedactFilter(["s3cret"]).scrub(f"controller refused registration (401): {refused.json()['detail']}")
    assert logged.endswith("missing or wrong API key")
    assert client.get("/hello", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_without_a_key_only_workers_on_this_machine_may_register(no_env_key):
    """Otherwise anyone reaching the controller could name any address, and the controller would post
    conversation images there and pass its answers back."""
    from mmedagent.serve.controller import Controller, build_app

    body = {"kind": "tool", "names": ["grounding"]}
    for key, address, status in ((None, "http://10.0.0.9:8000", 403), (None, "http://127.0.0.1:8000", 200),
                                 ("s3cret-7c1e0b9a4d", "http://10.0.0.9:8000", 200)):
        ctl = Controller(ServeConfig(api_key=key, tools={}))
        try:
            with TestClient(build_app(ctl)) as client:
                r = client.post("/register_worker", json={**body, "address": address})
                assert r.status_code == status, (key, address, r.text)
                assert (address in str(client.get("/list_workers").json())) == (status == 200)
        finally:
            ctl.close()


def test_a_new_image_or_conversation_stops_the_answer_being_streamed():
    """Else the running answer writes one patient's conversation over the next one's."""
    from mmedagent.serve.web import WebChat, build_ui

    deps = build_ui(WebChat("http://127.0.0.1:9", None, 1 << 20)).config["dependencies"]
    asking = {d["id"] for d in deps if d["api_name"].startswith("respond")}
    assert len(asking) == 2
    blocks = {t[0] for d in deps if d["api_name"] in ("load", "view") for t in d["targets"]}  # the upload, its view
    blocks |= {t[0] for d in deps for t in d["targets"] if t[1] == "click" and d["api_name"].startswith("lambda")}  # clear
    for block in blocks:
        cancelling = [set(d["cancels"]) for d in deps if any(t[0] == block for t in d["targets"]) and d["cancels"]]
        assert cancelling == [asking], block


def test_the_banner_follows_tools_that_finish_loading():
    from mmedagent.serve.web import WebChat, build_ui

    deps = build_ui(WebChat("http://127.0.0.1:9", None, 1 << 20)).config["dependencies"]
    assert any(t[1] == "tick" for d in deps if d["api_name"].startswith("status_markdown") for t in d["targets"])


def test_the_web_uis_queue_is_bounded():
    """Gradio's queue takes any number of waiting requests (each holding its upload) unless told otherwise."""
    from mmedagent.serve.web import WEB_QUEUE_SIZE, WebChat, build_ui, queued

    ui = queued(build_ui(WebChat("http://127.0.0.1:9", None, 1 << 20)))
    assert ui._queue.max_size == WEB_QUEUE_SIZE and ui._queue.default_concurrency_limit == 16


def test_the_web_ui_keeps_its_files_private(tmp_path, monkeypatch):
    import stat

    from mmedagent.serve.web import Uploads, private_upload_dir

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    folder = private_upload_dir()
    assert folder.parent == tmp_path and stat.S_IMODE(folder.stat().st_mode) == 0o700
    upload = folder / "0f3a" / "Doe_John_MRN12345.dcm"
    upload.parent.mkdir()
    upload.write_bytes(b"DICM")
    uploads = Uploads()
    uploads.update([str(upload)])  # as Gradio's upload route hands the path out
    assert uploads.take(str(upload)) == b"DICM" and not upload.parent.exists()


def test_an_upload_never_read_is_deleted_once_its_time_is_up(tmp_path, monkeypatch):
    """A tab closed before its upload loaded: the DICOM (a patient's name and IDs) must not wait for the UI to stop."""
    from mmedagent.serve import web

    clock = [1000.0]
    monkeypatch.setattr(web.time, "monotonic", lambda: clock[0])
    left, kept = tmp_path / "0f3a" / "Doe_John_MRN12345.dcm", tmp_path / "77b2" / "scan.dcm"
    for f in (left, kept):
        f.parent.mkdir()
        f.write_bytes(b"DICM")
    uploads = web.Uploads(ttl_s=60)
    uploads.update([str(left)])
    clock[0] += 61
    uploads.update([str(kept)])  # the next upload sweeps the expired one
    assert not left.parent.exists() and str(left) not in uploads
    with pytest.raises(OSError):
        uploads.take(str(left))
    assert uploads.take(str(kept)) == b"DICM"  # within its time: read as ever


def test_a_request_cannot_make_the_web_ui_read_or_delete_a_file_no_upload_handed_out(tmp_path):
    """Gradio lets a request name any file of the UI's folder (another session's preview, say)."""
    from mmedagent.serve.web import Uploads

    preview = tmp_path / "9c1d" / "image.png"
    preview.parent.mkdir()
    preview.write_bytes(b"PNG")
    with pytest.raises(OSError):
        Uploads().take(str(preview))
    assert preview.read_bytes() == b"PNG"


@pytest.mark.parametrize("stopped, title", [("parse_error", "⚠️ Unreadable model turn"), ("max_steps", "🛠️ Tool call: grounding")])
def test_an_answer_that_did_not_end_normally_says_so_in_the_chat(stopped, title):
    import json

    import httpx

    from mmedagent.serve.messages import stop_note
    from mmedagent.serve.web import WebChat

    unreadable = stopped == "parse_error"
    step = {"index": 0, "thoughts": "" if unreadable else "Locate it.", "value": "",
            "actions": [] if unreadable else [{"API_name": "grounding", "API_params": {"prompts": ["tumor"]}}],
            "outcomes": [], "overlays": [], "parse_error": "no actions" if unreadable else None}
    events = [{"type": "step", "step": step},
              {"type": "answer", "answer": "I will locate it. Please wait.", "history": [], "stopped": stopped}]
    web = WebChat("http://controller", None, 1 << 20)
    web.client = httpx.Client(transport=httpx.MockTransport(
        lambda request: httpx.Response(200, text="".join(json.dumps(e) + "\n" for e in events))))
    chat = list(web.respond("Where is the tumor?", [], [], None, None))[-1][0]
    titles = [m.get("metadata", {}).get("title") for m in chat]
    assert title in titles and "⚠️ Note" in titles
    assert chat[titles.index("⚠️ Note")]["content"] == stop_note(stopped) and chat[-1]["content"].startswith("I will")


def test_the_web_ui_keeps_no_upload_on_disk_and_removes_its_files_when_stopped(tmp_path):
    """An upload leaves only its preview behind (no copy, no empty temp file, no run history in the browser:
    the next user of a shared workstation would read it); the launcher, docker and systemd stop the UI
    with SIGTERM: its folder of previews goes too."""
    import os
    import shutil
    import signal

    import httpx
    from gradio_client import Client, handle_file
    from pydicom.data import get_testdata_file

    proc, url, folder = _web_ui(tmp_path)
    try:
        assert folder.name.startswith("mmedagent-web-")
        scan = tmp_path / "Doe_John_MRN12345.dcm"
        shutil.copy(get_testdata_file("CT_small.dcm"), scan)
        shown = Client(url, verbose=False).predict(handle_file(str(scan)), api_name="/load")
        assert shown[2].startswith("Loaded dicom"), shown
        assert [p.name for p in folder.rglob("*") if p.is_file()] == ["image.png"]  # the preview only
        # Gradio keeps each run (question, answer, scan preview) in the browser unless told not to
        assert httpx.get(f"{url}/config", timeout=10).json()["run_history"] is False
        os.kill(proc.proc.pid, signal.SIGTERM)
        assert proc.proc.wait(30) == 0 and not folder.exists()
    finally:
        proc.kill()


def _web_ui(tmp_path):
    """``python serve/web.py`` on a free loopback port (no controller), its Gradio folder under
    ``tmp_path``, serving; returns (process, URL, its private folder)."""
    import socket

    import httpx
    from _serve_fixtures import ServeProcess, serve_env, wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path / "gradio"
    temp.mkdir()
    proc = ServeProcess("web.py", ["--controller", "http://127.0.0.1:9", "--port", str(port)], tmp_path / "web.log",
                        serve_env(GRADIO_TEMP_DIR=str(temp)))

    def serving() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            assert proc.proc.poll() is None, proc.output()
            return False

    try:
        wait_until(serving, 90)
    except BaseException:
        proc.kill()
        raise
    (folder,) = temp.iterdir()
    return proc, f"http://127.0.0.1:{port}", folder


def _gradio_call(url: str, api_name: str, data: list) -> str:
    """One call of a web UI event through Gradio's queue, as a client makes it: its result stream."""
    import httpx

    r = httpx.post(f"{url}/gradio_api/call/{api_name}", json={"data": data}, timeout=30)
    assert r.status_code == 200, r.text
    return httpx.get(f"{url}/gradio_api/call/{api_name}/{r.json()['event_id']}", timeout=60).text


def test_the_web_ui_logs_no_traceback_with_a_patient_file_name_or_question(tmp_path):
    """Gradio prints the traceback of an event's error (``traceback.print_exc()``) and uvicorn that of a
    failed request (with its own log config): in the web UI both go through the redacting log."""
    import os
    import signal

    import httpx

    proc, url, _ = _web_ui(tmp_path)
    try:
        # a path Gradio refuses to read: its error names it
        result = _gradio_call(url, "load", [{"path": "/home/dr/Doe_Jane_MRN998877.dcm", "meta": {"_type": "gradio.FileData"}},
                                            "auto", "axial"])
        assert "event: error" in result
        # a chat Gradio cannot read: its validation error quotes the messages
        result = _gradio_call(url, "respond", ["Does Jane Doe have a mass?",
                                               [{"role": "user", "content": "Jane Doe, MRN 998877, 54 y", "metadata": 5}],
                                               [], None, None])
        assert "event: error" in result
        # a request that fails inside Gradio's upload route: uvicorn's "Exception in ASGI application"
        r = httpx.post(f"{url}/gradio_api/upload", files={"files": (None, "Doe_Jane_MRN998877")}, timeout=30)
        assert r.status_code == 500
        os.kill(proc.proc.pid, signal.SIGTERM)  # its log flushed, then it exits
        assert proc.proc.wait(30) == 0
    finally:
        proc.kill()
    output = proc.output()
    assert "Exception in ASGI application [TypeError" in output, output
    assert output.count("reported by gradio.queueing") == 2, output
    for secret in ("Traceback", "Doe_Jane", "998877", "Jane Doe", "54 y"):
        assert secret not in output, (secret, output)


def test_two_sessions_uploading_the_same_file_at_once_both_see_it(tmp_path):
    """Gradio keeps one copy of a file uploaded twice (named by its content's hash); the first session
    to read it must not delete it from under the second."""
    import httpx
    from pydicom.data import get_testdata_file

    proc, url, folder = _web_ui(tmp_path)
    try:
        scan = open(get_testdata_file("CT_small.dcm"), "rb").read()
        paths = [httpx.post(f"{url}/gradio_api/upload", files={"files": ("Doe_John_MRN12345.dcm", scan)}, timeout=30).json()[0]
                 for _session in range(2)]  # both uploads done before either session reads its file
        assert paths[0] == paths[1]
        for path in paths:
            result = _gradio_call(url, "load", [{"path": path, "meta": {"_type": "gradio.FileData"}}, "auto", "axial"])
            assert "Loaded dicom" in result and "upload is gone" not in result, result
        assert not any(p.name.endswith(".dcm") for p in folder.rglob("*"))  # the last reader deleted it
    finally:
        proc.kill()


def test_a_serve_process_logs_no_traceback_from_a_stray_thread_a_library_or_its_main_thread(tmp_path):
    """Each serve process (controller, workers, web UI) sets up its logging with setup_logging: after it, an
    uncaught exception in a thread or the main thread, and a traceback a library prints, are log records
    reduced to their type, never the raw traceback with the file name or question in it."""
    import subprocess
    import sys

    script = (
        "import threading, traceback\n"
        "from mmedagent.serve.security import setup_logging\n"
        "setup_logging()\n"
        "def read(): open('/nowhere/Doe_Jane_MRN998877.dcm')\n"
        "worker = threading.Thread(target=read, name='loader'); worker.start(); worker.join()\n"
        "try:\n    {}['Does Jane Doe have a mass?']\n"
        "except KeyError:\n    traceback.print_exc()\n"
        "import logging\n"
        "logging.getLogger('mmedagent.serve.x').info('question %d', 'Does Jane Doe have a mass?')  # a wrong format\n"
        "raise ValueError('question: Does Jane Doe have a mass?')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert "uncaught error in thread loader [FileNotFoundError" in proc.stderr, proc.stderr
    assert "reported by __main__ [KeyError" in proc.stderr and "uncaught error [ValueError" in proc.stderr, proc.stderr
    assert "unformattable log call at <string>:" in proc.stderr, proc.stderr
    for secret in ("Traceback", "Doe_Jane", "998877", "Jane Doe"):
        assert secret not in proc.stderr, (secret, proc.stderr)


def test_whole_tracebacks_are_logged_only_when_asked_for_with_a_warning(tmp_path):
    """A tool author debugging on test data sets MMEDAGENT_LOG_TRACEBACKS=1; the key is still removed."""
    import os
    import subprocess
    import sys

    script = ("import logging, traceback\nfrom mmedagent.serve.security import setup_logging\n"
              "setup_logging(secrets=['s3cr3t-key'])\n"
              "try:\n    {}['lookup with s3cr3t-key']\nexcept KeyError:\n"
              "    logging.getLogger('mmedagent.serve.x').exception('failed with s3cr3t-key')\n"
              "    traceback.print_exc()\n"
              "logging.getLogger('mmedagent.serve.x').info('%s', '')\n")
    env = {**os.environ, "MMEDAGENT_LOG_TRACEBACKS": "1"}
    full = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert "MMEDAGENT_LOG_TRACEBACKS=1: whole tracebacks are logged" in full.stderr
    assert "Traceback" in full.stderr and "KeyError: 'lookup with [redacted]'" in full.stderr
    assert "s3cr3t-key" not in full.stderr and "%s" not in full.stderr  # (an empty message stays empty)
    env["MMEDAGENT_LOG_TRACEBACKS"] = "0"
    reduced = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                             cwd=tmp_path)
    assert "Traceback" not in reduced.stderr and "[KeyError at <string>" not in reduced.stderr
    assert "failed with [redacted] [KeyError" in reduced.stderr, reduced.stderr


def test_a_log_level_above_info_quiets_the_loading_progress_bars():
    """``--log-level WARNING`` ("for fewer lines") still printed transformers' "Loading weights" bars. (In a process
    of its own: setup_logging changes the process's loggers.)"""
    import os
    import subprocess
    import sys

    script = ("import os, mmedagent, transformers\n"
              "from huggingface_hub.utils import are_progress_bars_disabled\n"
              "from transformers.utils.logging import is_progress_bar_enabled\n"
              "from mmedagent.serve.security import setup_logging\n"
              "setup_logging('INFO'); print(is_progress_bar_enabled(), are_progress_bars_disabled())\n"
              "setup_logging('WARNING'); print(is_progress_bar_enabled(), are_progress_bars_disabled(),\n"
              "                                os.environ['HF_HUB_DISABLE_PROGRESS_BARS'])\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["True False", "False True 1"]
