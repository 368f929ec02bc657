"""The stack over real HTTP on loopback: `python serve/controller.py` (controller + tiny model worker
+ a tool worker) and a separately started tool worker that the tests kill and restart.

One stack per module; every request carries the bearer token except where its absence is tested.
"""

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest

from _serve_fixtures import ROOT, ServeProcess, data_url, sample_png, serve_env, wait_until
from doubles import dicom_quoting_a_name

KEY = "sk-test-5b1f0c2e9d"
EXPIRY = 5.0  # ten heartbeat intervals: a beat delayed by a loaded machine does not drop a worker mid-suite


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from mmedagent.model.tiny import make_tiny_model

    logs = tmp_path_factory.mktemp("serve-logs")
    env = serve_env(XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache")))
    tiny = make_tiny_model("llava", tmp_path_factory.mktemp("models") / "tiny-llava")
    ctl = ServeProcess(
        "controller.py",
        ["--no-web", "--port", "0", "--model-path", str(tiny), "--tools", "bright_region", "--in-process-tools", "pixel_stats", "--plugin", "_serve_fixtures", "--api-key", KEY,
         "--heartbeat-interval", "0.5", "--heartbeat-expiry", str(EXPIRY), "--tool-timeout", "6", "--max-upload-mb", "1"],
        logs / "controller.log", env,
    )
    url = ctl.wait_for(r"controller: (http://\S+)", 60).group(1)
    ctl.wait_for(r"^ready: models: tiny-llava; tools: bright_region, pixel_stats$", 180)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, trust_env=False)
    state = {"url": url, "ctl": ctl, "client": client, "logs": logs, "env": env, "extra": []}
    yield state
    for proc in state["extra"]:
        proc.kill()
    client.close()
    assert ctl.stop() is not None


def start_nap_worker(stack, name="nap-worker.log"):
    proc = ServeProcess(
        "tool_worker.py",
        ["--tool", "nap", "--plugin", "_serve_fixtures", "--controller", stack["url"], "--heartbeat-interval", "0.5"],
        stack["logs"] / name, serve_env(MMEDAGENT_API_KEY=KEY),
    )
    stack["extra"].append(proc)
    address = proc.wait_for(r"tool worker nap: (http://\S+)", 60).group(1)
    wait_until(lambda: address in worker_addresses(stack), 20)  # this worker itself: another may serve "nap" already
    return proc, address


def worker_addresses(stack):
    return {w["address"] for w in stack["client"].get("/list_workers").json()["workers"]}


CHAT_ACCESS_LINE = '"POST /v1/chat/completions HTTP/1.1"'  # uvicorn's access log: the controller's last line of a chat


def chat_access_lines(stack):
    return stack["ctl"].output().count(CHAT_ACCESS_LINE)


def tool_names(stack):
    return [t["name"] for t in stack["client"].get("/v1/tools").json()["tools"]]


def chat_body(image_url, question="Where is the bright region?", **extra):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": question}]}], "max_tokens": 12, **extra}


def png_header(width, height):
    """A PNG that declares width×height pixels but carries almost no data (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_binds_loopback_and_every_endpoint_wants_the_token(stack):
    assert stack["url"].startswith("http://127.0.0.1:")
    workers = stack["client"].get("/list_workers").json()["workers"]
    assert {w["kind"] for w in workers} == {"model", "tool"}
    assert all(w["address"].startswith("http://127.0.0.1:") for w in workers)
    bare = httpx.Client(timeout=10, trust_env=False)
    for base in [stack["url"]] + [w["address"] for w in workers]:
        for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/chat"),
                             ("POST", "/register_worker"), ("GET", "/list_workers"), ("POST", "/call"), ("POST", "/worker_generate_stream")]:
            r = bare.request(method, base + path, json={})
            assert r.status_code == 401, (base, path, r.status_code)
            r = bare.request(method, base + path, json={}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
    assert stack["client"].get("/health").json()["ok"]


def test_models_status_and_banner_say_tiny(stack):
    c = stack["client"]
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-llava"]
    status = c.get("/v1/status").json()
    assert status["models"][0]["note"] == ""  # a configured model carries no demo or tiny-checkpoint note
    assert status["tools"] == [
        {"name": "bright_region", "where": "worker", "weights": "no weights (threshold at the mean)"},
        {"name": "pixel_stats", "where": "in-process", "weights": ""},
    ]


def test_openai_chat_non_stream_and_stream(stack):
    c = stack["client"]
    r = c.post("/v1/chat/completions", json=chat_body(data_url(sample_png())))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llava"
    trace = body["mmedagent_trace"]
    assert trace["steps"] and trace["history"][1]["content"].startswith("<image>\n")
    assert body["choices"][0]["message"]["content"] == trace["steps"][-1]["value"]

    def cut_off(steps):  # the tiny random model writes noise to the end of its budget (12), unless it hits its EOS
        return "length" if steps[-1]["new_tokens"] == 12 else "stop"

    assert body["choices"][0]["finish_reason"] == cut_off(trace["steps"])
    assert "bright_region" in trace["history"][0]["content"]  # the system prompt lists the live tools
    usage = body["usage"]  # summed over the planner calls, as the model worker counted them
    assert usage["completion_tokens"] == sum(s["new_tokens"] for s in trace["steps"]) > 0
    assert usage["prompt_tokens"] == sum(s["prompt_tokens"] for s in trace["steps"]) > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    events = []
    with c.stream("POST", "/v1/chat/completions", json=chat_body(data_url(sample_png()), stream=True)) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == cut_off(chunks[-1]["mmedagent_trace"]["steps"])
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == chunks[-1]["mmedagent_trace"]["steps"][-1]["value"]


def test_chat_stream_endpoint_and_follow_up(stack):
    c = stack["client"]
    with c.stream("POST", "/chat", json={"question": "What is shown?", "image": data_url(sample_png()), "max_new_tokens": 8}) as s:
        events = [json.loads(line) for line in s.iter_lines() if line]
    assert any(e["type"] == "token" for e in events) and events[-1]["type"] == "answer"
    history = events[-1]["history"]
    r = c.post("/chat", json={"question": "And now?", "image": data_url(sample_png()), "history": history, "max_new_tokens": 8})
    last = json.loads(r.text.strip().splitlines()[-1])
    assert last["type"] == "answer" and last["history"][: len(history)] == history


def test_tool_call_through_controller_uses_the_conversation_image(stack, tmp_path):
    decoy = tmp_path / "decoy.png"
    decoy.write_bytes(sample_png((10, 10)))
    r = stack["client"].post("/v1/tools/bright finder", json={"params": {"prompts": ["spot"], "image": str(decoy)},
                                                              "image": data_url(sample_png())})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["output"]["boxes"] == [[0.5, 0.5, 1.0, 1.0]]  # computed on the uploaded 48×40 image, not the path
    assert out["overlay"]["labels"] == ["spot"] and out["worker_elapsed_s"] <= out["elapsed_s"]


def test_in_process_tool_runs_in_the_controller(stack):
    r = stack["client"].post("/v1/tools/pixel_stats", json={"params": {}, "image": data_url(sample_png())})
    assert r.status_code == 200, r.text
    assert r.json()["output"] == {"mean": 85.0, "std": 77.94}  # a quarter at 220, the rest at 40 and r.json()["worker_elapsed_s"] is None


def test_unknown_tool_lists_the_available_ones(stack):
    r = stack["client"].post("/v1/tools/MedSAM", json={"params": {}, "image": data_url(sample_png())})
    assert r.status_code == 404 and "available tools: bright_region, pixel_stats" in r.json()["detail"]
    r = stack["client"].post("/v1/tools/bright_region", json={"params": {"prompts": []}, "image": data_url(sample_png())})
    assert r.status_code == 422 and "prompts" in r.json()["detail"]


@pytest.mark.parametrize(
    "image_url, status, reason",
    [
        (data_url(b"GIF? no, text"), 400, "not a recognised image"),
        (data_url(sample_png()[:70]), 400, "could not read the image"),
        (data_url(png_header(50_000, 50_000)), 400, "could not read the image"),
        ("data:image/png;base64,", 400, "empty"),
        ("data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4").decode(), 415, "unsupported image type"),
        (data_url(b"\0" * 1_200_000), 413, "too large"),
        ("/etc/hostname", 400, "data URLs"),
        ("file:///etc/hostname", 400, "data URLs"),
        ("http://169.254.169.254/latest", 400, "data URLs"),
    ],
)
def test_bad_uploads_get_4xx_and_the_server_stays_up(stack, image_url, status, reason):
    c = stack["client"]
    r = c.post("/v1/chat/completions", json=chat_body(image_url))
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]["message"]
    assert c.get("/health").status_code == 200


def test_wrong_request_content_type_and_empty_body(stack):
    c = stack["client"]
    r = c.post("/v1/chat/completions", content=sample_png(), headers={"Content-Type": "image/png"})
    assert 400 <= r.status_code < 500
    r = c.post("/v1/chat/completions", content=b"", headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500
    assert c.get("/health").status_code == 200


def test_dicom_upload_and_logs_hold_no_secrets_images_or_patient_data(stack):
    from pydicom.data import get_testdata_file

    dicom = open(get_testdata_file("CT_small.dcm"), "rb").read()
    seen = chat_access_lines(stack)
    r = stack["client"].post("/v1/chat/completions", json=chat_body(data_url(dicom, "application/dicom")))
    assert r.status_code == 200, r.text
    png = base64.b64encode(sample_png()).decode()
    wait_until(lambda: chat_access_lines(stack) > seen, 10)  # everything logged about this chat is in the logs
    for log in stack["logs"].glob("*.log"):
        text = log.read_text(errors="replace")
        assert "POST /v1/chat/completions" in text or log.name != "controller.log"
        for needle in (KEY, png[:60], base64.b64encode(dicom[:3000]).decode()[200:260], "CompressedSamples", "1CT1", "JFK IMAGING"):
            assert needle not in text, (log.name, needle[:20])


def test_a_corrupt_dicom_is_a_400_and_its_header_stays_out_of_the_logs(stack):
    seen = chat_access_lines(stack)
    r = stack["client"].post("/v1/chat/completions", json=chat_body(data_url(dicom_quoting_a_name(b"Zzyzx^Quixote "),
                                                                             "application/dicom")))
    assert r.status_code == 400 and "could not read the image" in r.json()["error"]["message"] and "Zzyzx" not in r.text
    wait_until(lambda: chat_access_lines(stack) > seen, 10)  # everything logged about this request is in the logs
    assert not any("Zzyzx" in log.read_text(errors="replace") for log in stack["logs"].glob("*.log"))


def test_bad_requests_get_a_4xx_that_echoes_nothing_and_the_server_stays_up(stack):
    c = stack["client"]
    json_body = {"Content-Type": "application/json"}
    nan = json.dumps(chat_body(data_url(sample_png()))).replace('"max_tokens": 12', '"max_tokens": 12, "temperature": NaN')
    r = c.post("/v1/chat/completions", content=nan, headers=json_body)  # a NaN cannot be sent back in JSON
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = c.post("/chat", json={"question": "Mr Zzyzx's scan", "history": [{"content": "Mr Zzyzx"}]})
    assert r.status_code == 422 and "role" in r.text and "Zzyzx" not in r.text
    r = c.post("/v1/chat/completions", json={**chat_body(data_url(sample_png())), "max_tokens": 10**9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    chunked = (b" " * 500_000 for _ in range(4))  # no Content-Length: the cap (--max-upload-mb 1) holds as it streams
    r = c.post("/chat", content=chunked, headers=json_body)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert c.get("/health").status_code == 200


def test_typed_image_markers_and_over_long_prompts_do_not_break_the_chat(stack):
    c = stack["client"]
    body = chat_body(data_url(sample_png()), "Is <image> a tumor? <image>")
    body["messages"][:0] = [{"role": "user", "content": "What does <image> mean?"}, {"role": "assistant", "content": "A marker."}]
    r = c.post("/v1/chat/completions", json=body)  # typed markers, in the question and in the history
    assert r.status_code == 200, r.text
    history = r.json()["mmedagent_trace"]["history"]
    assert sum(m["content"].count("<image>") for m in history) == 1
    r = c.post("/chat", json={"question": "Where is <image>?", "image": data_url(sample_png()), "max_new_tokens": 8})
    assert json.loads(r.text.strip().splitlines()[-1])["type"] == "answer"
    r = c.post("/v1/chat/completions", json=chat_body(data_url(sample_png()), "tumor " * 5000))
    assert r.status_code == 502 and "the model's context is 4096" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json=chat_body(data_url(sample_png()), "tumor " * 5000, stream=True))
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert "the model's context is 4096" in events[-1]["error"]["message"] and "choices" not in events[-1]
    assert r.text.endswith("data: [DONE]\n\n")  # an error event (OpenAI's shape), not finish_reason "error"
    r = c.post("/v1/chat/completions", json=chat_body(data_url(sample_png())))
    assert r.status_code == 200, r.text


def test_killed_tool_worker_errors_fast_is_dropped_and_comes_back(stack):
    c = stack["client"]
    proc, address = start_nap_worker(stack)
    result = {}

    def call():
        result["r"] = c.post("/v1/tools/nap", json={"params": {"seconds": 30}})
        result["end"] = time.monotonic()

    t = threading.Thread(target=call)
    t.start()
    # killed while the call runs there (not before it arrived: that would be a refused connection)
    wait_until(lambda: c.get(f"{address}/health").json()["running"] == 1, 20)
    killed = time.monotonic()
    proc.kill()
    t.join(15)
    assert not t.is_alive() and result["end"] - killed < 5  # at once, not at the 6 s call timeout
    assert result["r"].status_code == 502
    assert "tool worker for 'nap'" in result["r"].json()["detail"] and "stopped responding" in result["r"].json()["detail"]
    wait_until(lambda: address not in worker_addresses(stack), EXPIRY + 5)
    r = c.post("/v1/tools/nap", json={"params": {"seconds": 0}})
    assert r.status_code == 503  # unavailable now, not a worker that failed
    assert "no worker is serving tool 'nap'" in r.json()["detail"] and "available tools: bright_region, pixel_stats" in r.json()["detail"]
    start_nap_worker(stack, "nap-worker-2.log")
    r = c.post("/v1/tools/nap", json={"params": {"seconds": 0.1}})
    assert r.status_code == 200 and r.json()["output"] == {"slept": 0.1}


def test_backend_option_forwards_to_an_openai_compatible_server(stack):
    c = stack["client"]
    direct_url = next(w["address"] for w in c.get("/list_workers").json()["workers"] if w["kind"] == "model")
    proc = ServeProcess("model_worker.py", ["--backend-url", f"{direct_url}/v1", "--no-register", "--port", "0"],
                        stack["logs"] / "forwarder.log", serve_env(MMEDAGENT_API_KEY=KEY))
    stack["extra"].append(proc)
    forward_url = proc.wait_for(r"model worker tiny-llava: (http://\S+)", 60).group(1)
    body = chat_body(data_url(sample_png()), "Describe it.")
    direct = c.post(f"{direct_url}/v1/chat/completions", json=body)
    forwarded = c.post(f"{forward_url}/v1/chat/completions", json=body)
    assert direct.status_code == forwarded.status_code == 200, forwarded.text
    assert direct.json()["usage"]["completion_tokens"] > 0  # the model worker's own count, passed on by a forwarder
    assert forwarded.json()["usage"] == direct.json()["usage"]
    text = direct.json()["choices"][0]["message"]["content"]
    assert text and forwarded.json()["choices"][0]["message"]["content"] == text  # greedy: same turn either way
    with c.stream("POST", f"{forward_url}/v1/chat/completions", json={**body, "stream": True}) as s:
        pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in s.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(pieces) == text


def test_heartbeats_and_health_stay_responsive_under_load(stack):
    c = stack["client"]
    if "nap" not in tool_names(stack):
        start_nap_worker(stack, "nap-worker-3.log")
    address = next(w["address"] for w in c.get("/list_workers").json()["workers"] if w["names"] == ["nap"])
    nap_s = 5.0  # each health poll below is far shorter than one nap: one queued behind a nap would fail
    busy = [threading.Thread(target=c.post, args=("/v1/tools/nap",), kwargs={"json": {"params": {"seconds": nap_s}}}) for _ in range(3)]
    busy += [threading.Thread(target=c.post, args=("/v1/chat/completions",), kwargs={"json": chat_body(data_url(sample_png()))}) for _ in range(3)]
    for t in busy:
        t.start()

    def nap_load_reported():  # the heartbeat carried the load (while the naps run)
        return any(w["queue_length"] > 0 for w in c.get("/list_workers").json()["workers"] if w["names"] == ["nap"])

    wait_until(nap_load_reported, 20)  # only true while the naps run: a later look fails as before
    worst = 0.0
    for _ in range(10):
        for url in (f"{stack['url']}/health", f"{address}/health"):
            t0 = time.monotonic()
            assert c.get(url).status_code == 200
            worst = max(worst, time.monotonic() - t0)
        time.sleep(0.1)
    for t in busy:
        t.join(60)
    assert worst < 2.0, worst  # slow on a loaded machine, but not queued behind a 5 s nap


def test_a_killed_model_worker_is_restarted_and_the_chat_goes_on(stack):
    c = stack["client"]
    ctl = stack["ctl"].proc.pid
    children = Path(f"/proc/{ctl}/task/{ctl}/children").read_text().split()
    worker = next(int(p) for p in children if b"model_worker.py" in Path(f"/proc/{p}/cmdline").read_bytes())

    def model_addresses():
        return {w["address"] for w in c.get("/list_workers").json()["workers"] if w["kind"] == "model"}

    old = model_addresses()

    def replaced():
        now = model_addresses()
        return now and not now & old

    os.kill(worker, signal.SIGKILL)  # as the kernel's OOM killer would
    stack["ctl"].wait_for(r"model worker exited with code -9 .*; restarting it", 10)
    wait_until(replaced, 120)
    r = c.post("/v1/chat/completions", json=chat_body(data_url(sample_png())))
    assert r.status_code == 200, r.text


def test_a_chat_is_one_log_line_under_the_request_id_the_client_gets(stack):
    """An operator finds a clinician's failed or slow chat by its id: which model worker, which tools, how
    long; the model worker logs the same id. Nothing of the question or the answer is in either line."""
    c = stack["client"]
    r = c.post("/v1/chat/completions", json=chat_body(data_url(sample_png()), "Where is Mrs Qwertyuiop's lesion?"))
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert r.headers["x-request-id"] == rid
    worker = next(w["address"] for w in c.get("/list_workers").json()["workers"] if w["kind"] == "model")
    line = stack["ctl"].wait_for(rf"chat {rid}: .*", 10).group(0)
    steps = len(r.json()["mmedagent_trace"]["steps"])
    assert f"model tiny-llava at {worker}; {steps} steps; tools: " in line and " s; ended by " in line, line
    stack["ctl"].wait_for(rf"request {rid}: \d+ prompt and \d+ new tokens in [\d.]+ s, after [\d.]+ s waiting for the model", 10)
    with c.stream("POST", "/chat", json={"question": "And Mrs Qwertyuiop?", "image": data_url(sample_png()), "max_new_tokens": 8}) as s:
        rid = s.headers["x-request-id"]
        s.read()
    stack["ctl"].wait_for(rf"chat {rid}: model tiny-llava at ", 10)
    assert "Qwertyuiop" not in stack["ctl"].output()


def test_a_worker_stopped_with_sigterm_unregisters_at_once_and_exits_cleanly(stack):
    """systemd and the launcher stop a worker with SIGTERM: it used to die of the signal re-raised after
    uvicorn's shutdown, before unregistering, and stayed listed until its heartbeats expired."""
    proc, address = start_nap_worker(stack, "nap-worker-sigterm.log")
    os.kill(proc.proc.pid, signal.SIGTERM)
    assert proc.proc.wait(30) == 0
    stack["ctl"].wait_for(rf"worker {re.escape(address)} left", 10)


def test_a_worker_stopped_mid_call_exits_without_waiting_for_the_call(stack):
    """SIGTERM during a 40-second call: the worker unregisters and exits within uvicorn's 3-second grace,
    rather than waiting for the call (a hung tool: forever), which the launcher then had to SIGKILL."""
    proc, address = start_nap_worker(stack, "nap-worker-midcall.log")
    worker = httpx.Client(base_url=address, headers={"Authorization": f"Bearer {KEY}"}, trust_env=False)
    threading.Thread(target=lambda: worker.post("/call", json={"params": {"seconds": 40}}, timeout=60),
                     daemon=True).start()  # to this worker itself: the controller might pick another nap worker
    wait_until(lambda: worker.get("/health").json()["running"] == 1, 20)  # the call is running
    os.kill(proc.proc.pid, signal.SIGTERM)
    assert proc.proc.wait(20) == 0
    stack["ctl"].wait_for(rf"worker {re.escape(address)} left", 10)


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too
    except FileNotFoundError:
        return False


def test_the_children_stop_when_the_launcher_is_killed(tmp_path):
    """A launcher killed without stopping its children (SIGKILL, the OOM killer) left them running: they held
    their ports and memory, and registered again with the next launcher's controller beside its own workers."""
    ctl = ServeProcess("controller.py", ["--no-web", "--port", "0", "--tools", "nap", "--plugin", "_serve_fixtures",
                                         "--backend-url", "http://127.0.0.1:9/v1"], tmp_path / "controller.log", serve_env())
    worker = None
    try:
        ctl.wait_for(r"^ready: .*tools: nap", 120)
        children = Path(f"/proc/{ctl.proc.pid}/task/{ctl.proc.pid}/children").read_text().split()
        worker = next(int(p) for p in children if b"tool_worker.py" in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(ctl.proc.pid, signal.SIGKILL)
        wait_until(lambda: not _alive(worker), 30)
        assert not _alive(worker)
        assert ctl.wait_for(r"the launcher \(pid \d+\) is gone; stopping", 5)
    finally:
        ctl.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_web_port_in_use_stops_the_launcher_at_start_in_one_line(tmp_path):
    """The web UI used to fail in its own process with 'uncaught error [OSError]', be restarted and fail
    again, while the rest of the stack ran on without it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, str(ROOT / "serve" / "controller.py"), "--no-workers", "--port", "0",
                               "--web-port", str(port)], env=serve_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use): "
                                                   "another server is using it; stop it or pass --web-port")
    assert "web UI:" not in proc.stdout
