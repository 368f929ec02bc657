"""OpenAI chat-completions compliance: the model worker's endpoint (in process, a scripted planner)
and the client side that drives any OpenAI-compatible backend (serve/remote.py)."""

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from doubles import ScriptedPlanner
from mmedagent.serve import openai_api as oa
from mmedagent.serve.model_worker import ModelHost, build_app
from mmedagent.serve.remote import OpenAIPlanner, WorkerError

USER = [{"role": "user", "content": "hi"}]


def worker(planner):
    return TestClient(build_app(ModelHost(planner, "tiny", {}, 1 << 20)))


def test_n_above_one_is_refused_by_name():
    client = worker(ScriptedPlanner(["one"]))
    r = client.post("/v1/chat/completions", json={"messages": USER, "n": 2})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "n" and "only n=1 is supported" in error["message"]
    r = client.post("/v1/chat/completions", json={"messages": USER, "n": 1})
    assert r.status_code == 200 and [c["message"]["content"] for c in r.json()["choices"]] == ["one"]


def sse(*chunks):
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_an_outside_backend_is_reached_through_the_environments_proxy_and_the_stacks_own_never():
    """A judge or backend on the internet is often reachable only through a hospital's proxy (the evaluation's
    own client honoured HTTPS_PROXY); a loopback service must never be routed through one."""
    assert OpenAIPlanner("https://api.example.com/v1", "gpt-x").client.trust_env  # httpx reads HTTPS_PROXY & co.
    for local in ("http://127.0.0.1:21001/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1"):
        assert not OpenAIPlanner(local, "m").client.trust_env


def test_a_streamed_backend_is_asked_for_its_usage():
    """OpenAI and vLLM send a stream's usage only when asked (``stream_options.include_usage``),
    in a last chunk with no choices."""

    def backend(request):
        body = json.loads(request.content)
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {"content": "Yes."}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
        return httpx.Response(200, text=sse(*chunks), headers={"content-type": "text/event-stream"})

    planner = OpenAIPlanner("http://backend/v1", model="m")
    planner.client = httpx.Client(transport=httpx.MockTransport(backend))
    assert "".join(planner.stream(USER, None)) == "Yes."
    assert planner.last_stats == {"prompt_tokens": 7, "new_tokens": 2}


class FailsMidStream:
    def stream(self, messages, image, **gen):
        yield "Thought: "
        raise RuntimeError("CUDA out of memory")


def test_a_failure_mid_stream_is_an_error_not_a_short_answer():
    """The model worker reports a failure mid-stream as an ``error`` chunk (as vLLM does); the
    client that forwards to such a backend raises it instead of returning the text so far."""
    planner = OpenAIPlanner("http://testserver/v1", model="tiny")
    planner.client = worker(FailsMidStream())
    with pytest.raises(WorkerError, match="CUDA out of memory"):
        "".join(planner.stream(USER, None))
    # the event holds only OpenAI's error object ("error" is no finish_reason), then [DONE]
    events = [e for e in worker(FailsMidStream()).post(
        "/v1/chat/completions", json={"messages": USER, "stream": True}).text.split("\n\n") if e]
    assert json.loads(events[-2].removeprefix("data: ")) == {"error": {
        "message": "generation failed: RuntimeError: CUDA out of memory", "type": "server_error", "param": None,
        "code": None}}
    assert events[-1] == "data: [DONE]"


def test_errors_of_the_openai_routes_have_openais_shape():
    """The model worker's OpenAI routes answer errors in OpenAI's shape: the ``openai`` client reads only
    ``error.message``; a FastAPI ``{"detail"}`` body reaches its user as "Error code: 400" alone."""
    client = TestClient(build_app(ModelHost(ScriptedPlanner([]), "tiny", {}, 1 << 20)))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]})
    assert r.status_code == 400 and r.json() == {"error": {
        "message": "tool-role messages are not supported: mmedagent runs the tools itself",
        "type": "invalid_request_error", "param": None, "code": None}}
    r = client.post("/v1/chat/completions", json={"messages": USER, "n": 2, "temperature": 7})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "temperature" and error["type"] == "invalid_request_error"
    assert error["message"] == ("temperature: Input should be less than or equal to 2; "
                                "n: only n=1 is supported (one choice per request); send n requests instead")
    assert "7" not in error["message"]  # the value sent is not echoed
    r = client.post("/v1/chat/completions", json={"messages": USER * 201})  # a long chat: what to do, not a limit dump
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and r.json()["error"]["message"] == (
        "messages: this conversation is too long to go on (201 messages, at most 200): start a new conversation to ask more")
    r = client.post("/v1/chat/completions", json={"messages": USER, "model": "gpt-4o"})
    assert r.status_code == 404 and r.json()["error"]["message"] == (
        "model 'gpt-4o' is not served here; this worker serves 'tiny'")
    # the worker's own routes keep their answers
    r = client.post("/worker_generate_stream", json={"messages": "x"})
    assert r.status_code == 422 and "detail" in r.json()


def test_stop_strings_and_conversation_ids_are_bounded():
    """Every stop string is looked for after every token: 100,000 of them held the one model slot for hours."""
    client = TestClient(build_app(ModelHost(ScriptedPlanner(["fine"] * 4), "tiny", {}, 1 << 20)))
    for stop in (["x"] * 17, "x" * 1001, ["x" * 1001]):
        r = client.post("/v1/chat/completions", json={"messages": USER, "stop": stop})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    raw = {"messages": USER}
    assert client.post("/worker_generate_stream", json={**raw, "stop": ["x"] * 17}).status_code == 422
    assert client.post("/worker_generate_stream", json={**raw, "conversation_id": "c" * 129}).status_code == 422
    assert client.post("/v1/chat/completions", json={"messages": USER, "stop": ["x"] * 16}).status_code == 200
    assert client.post("/worker_generate_stream", json={**raw, "stop": ["x"] * 16, "conversation_id": "c" * 128}
                       ).status_code == 200


def test_a_body_that_is_not_json_or_is_empty_is_named_so():
    """Not "14: JSON decode error" with ``param`` "14": the body is named, and the parser's reason given."""
    client = worker(ScriptedPlanner([]))
    for body, message in ((b'{"messages": [', "the body is not valid JSON (Expecting value at character 14)"),
                          (b"", 'the body is empty; send a JSON object with "messages"')):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text
        assert r.json()["error"]["message"] == f"request: {message}"


def test_client_defined_tools_are_refused_by_name_rather_than_never_called():
    """A client's ``tools`` would silently never be called (mmedagent runs its own): refused, naming the field."""
    client = worker(ScriptedPlanner(["one", "two"]))
    function = {"name": "lookup_patient", "parameters": {"type": "object"}}
    for extra, field in (({"tools": [{"type": "function", "function": function}]}, "tools"),
                         ({"tool_choice": "required"}, "tool_choice"), ({"functions": [function]}, "functions"),
                         ({"tool_choice": {"type": "function", "function": {"name": "lookup_patient"}}}, "tool_choice")):
        r = client.post("/v1/chat/completions", json={"messages": USER, **extra})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == field, r.text
        assert error["message"] == f"{field}: {oa.CLIENT_TOOLS_REFUSED}" and "lookup_patient" not in error["message"]
    for extra in ({"tools": [], "tool_choice": "auto"}, {"tool_choice": "none"}):  # what generic clients send: fine
        assert client.post("/v1/chat/completions", json={"messages": USER, **extra}).status_code == 200



def test_the_model_workers_raw_turns_stop_at_the_requests_stop_sequences():
    """Raw model text: the planner itself stops there (the agent's endpoint cuts its answer instead)."""

    class Recording:
        def __init__(self):
            self.gens = []

        def stream(self, messages, image, **gen):
            self.gens.append(gen)
            yield "one"

    planner = Recording()
    client = worker(planner)
    for stop, given in (("\n", ["\n"]), (["Observation:", ""], ["Observation:"]), ([""], None), (None, None)):
        assert client.post("/v1/chat/completions", json={"messages": USER, "stop": stop}).status_code == 200
        assert planner.gens[-1].get("stop") == given, stop


def test_a_backend_urls_credentials_are_shown_to_no_client():
    """A backend URL may carry its credentials (user:password@, ?api-key=): they reached /v1/models, the
    status banner and the web UI of every client."""
    from mmedagent.serve.config import ServeConfig
    from mmedagent.serve.model_worker import load_host

    host = load_host(ServeConfig(model_backend_url="https://svc:hunter2@gpu-box:8443/v1?api-key=s3cr3t#x",
                                 model_backend_model="med-llava"))
    shown = json.dumps([host.info, host.name])
    assert "hunter2" not in shown and "s3cr3t" not in shown and "svc" not in shown
    assert host.info["backend"] == "https://gpu-box:8443/v1" and host.info["note"] == "forwarded to https://gpu-box:8443/v1"


def test_the_stacks_api_key_reaches_only_a_backend_on_this_machine(monkeypatch):
    """The stack's own key went as the bearer token to any --backend-url (a hosted vLLM or API learnt it); a
    backend elsewhere gets only its own key (model_backend_api_key or env MMEDAGENT_BACKEND_API_KEY)."""
    from mmedagent.serve.config import BACKEND_API_KEY_ENV, ServeConfig
    from mmedagent.serve.model_worker import load_host

    stack_key, own_key = "stack-key-0123456789abcdef", "backend-key-0123456789"
    monkeypatch.delenv(BACKEND_API_KEY_ENV, raising=False)

    def token(url: str, **settings) -> str | None:
        planner = load_host(ServeConfig(model_backend_url=url, model_backend_model="m", api_key=stack_key, **settings)).planner
        return planner.client.headers.get("authorization")

    assert token("https://gpu-box:8443/v1") is None
    assert token("http://127.0.0.1:8000/v1") == f"Bearer {stack_key}"
    assert token("https://gpu-box:8443/v1", model_backend_api_key=own_key) == f"Bearer {own_key}"
    monkeypatch.setenv(BACKEND_API_KEY_ENV, own_key)
    assert token("https://gpu-box:8443/v1") == f"Bearer {own_key}"
    assert token("http://localhost:8000/v1") == f"Bearer {own_key}"


def test_a_backend_that_refuses_the_key_when_asked_for_its_models_names_the_setting(monkeypatch):
    """It read "HTTPStatusError: Client error '401 Unauthorized' … For more information check: https://developer.mozilla…"."""
    import httpx
    import pytest

    from mmedagent.serve import remote
    from mmedagent.serve.remote import OpenAIPlanner, WorkerError

    answers = {"/v1/models": httpx.Response(401, json={"detail": "missing or wrong API key"})}
    real = remote.make_client

    def client(*args, **kwargs):
        made = real(*args, **kwargs)
        made._transport = httpx.MockTransport(lambda request: answers[request.url.path])
        return made

    monkeypatch.setattr(remote, "make_client", client)
    with pytest.raises(WorkerError, match=r"^https://gpu-box:8443/v1 refused this server's key \(401\) to list its "
                                          r"models: give the backend's own key \(model_backend_api_key, or env "
                                          r"MMEDAGENT_BACKEND_API_KEY\)$"):
        OpenAIPlanner("https://svc:hunter2@gpu-box:8443/v1", None, "stack-key")
    answers["/v1/models"] = httpx.Response(500, text="upstream down")
    with pytest.raises(WorkerError, match=r"^cannot list models at https://gpu-box:8443/v1 \(500\): upstream down$"):
        OpenAIPlanner("https://gpu-box:8443/v1", None, None)


def test_a_forwarding_worker_passes_the_chats_request_id_to_its_backend():
    """The backend's log said "request -": a chat could not be followed from the controller to the backend."""
    seen = []

    def backend(request):  # the host streams: an SSE answer
        seen.append(request.headers.get("x-request-id"))
        return httpx.Response(200, text='data: {"choices": [{"delta": {"content": "fine"}}]}\n\ndata: [DONE]\n\n')

    planner = OpenAIPlanner("http://127.0.0.1:9/v1", "m")
    planner.client = httpx.Client(transport=httpx.MockTransport(backend))
    host = ModelHost(planner, "m", {}, 1 << 20)
    assert "".join(host.stream(USER, None, {}, request_id="chat-7f3a")) == "fine"
    assert "".join(host.stream(USER, None, {})) == "fine"
    assert seen == ["chat-7f3a", None]


def test_a_backend_failure_names_the_backend_without_its_credentials():
    import httpx
    import pytest

    from mmedagent.serve.remote import OpenAIPlanner, WorkerError

    planner = OpenAIPlanner("https://svc:hunter2@gpu-box:8443/v1?api-key=s3cr3t", "m")
    planner.client = httpx.Client(transport=httpx.MockTransport(
        lambda request: httpx.Response(500, json={"error": {"message": f"upstream failed for {request.url}"}})))
    for call in (lambda: planner.generate([{"role": "user", "content": "x"}], None),
                 lambda: "".join(planner.stream([{"role": "user", "content": "x"}], None))):
        with pytest.raises(WorkerError) as failure:
            call()
        assert "gpu-box:8443/v1" in str(failure.value)
        assert "hunter2" not in str(failure.value) and "s3cr3t" not in str(failure.value), str(failure.value)
