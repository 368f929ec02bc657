"""Proxies the agent loop uses in the controller: remote tools (Tool subclasses that post to a tool
worker), the model-worker planner, and a planner for any OpenAI-compatible server."""

from __future__ import annotations

import copy
import json
import logging
import threading
from contextvars import ContextVar
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmedagent.protocol import IMAGE_TOKEN
from mmedagent.serve.config import BACKEND_API_KEY_ENV, is_loopback, validation_problems
from mmedagent.serve.httpclient import error_detail, make_client, timeout
from mmedagent.serve.registry import NoWorkerError, WorkerRegistry
from mmedagent.serve.uploads import png_data_url
from mmedagent.tools import Overlay, Tool, ToolError, ToolParams, ToolResult, UnknownToolError, get_tool

log = logging.getLogger(__name__)


REQUEST_ID_HEADER = "X-Request-ID"
"""The controller's id of a chat request: sent to the model and tool workers, which log it too, and to the client."""
CHAT_REQUEST_ID: ContextVar[str | None] = ContextVar("chat_request_id", default=None)
"""The request id of the chat being run (set by the controller): its tool calls carry it to their workers."""


def shown_url(url: str) -> str:
    """``url`` as clients and logs may see it: without a user, password, query or fragment (a backend
    URL may carry its credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def api_root(url: str) -> str:
    """The API root (``.../v1``) of an OpenAI-compatible server named by its host root, its ``.../v1`` or a
    ``.../chat/completions`` URL."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url.removesuffix("/chat/completions")
    return url if url.endswith("/v1") else url + "/v1"


def loggable_id(value: str | None) -> str | None:
    """A request id as it may be logged: letters, digits and dashes, at most 64 (else none)."""
    return value if value and len(value) <= 64 and value.replace("-", "").isalnum() and value.isascii() else None


TOOL_FAILED = "{tool} failed: "
"""How a tool worker's answer for a call the tool failed begins; the rest is what the model reads, as it
reads an in-process tool's failure (:func:`~mmedagent.dispatcher.error_text`)."""


class WorkerError(ToolError, RuntimeError):
    """A worker failed or went away during a call; the message says which and why, without the worker's
    address (the controller's log has it): a tool's is what the model reads."""


class WorkerBusy(WorkerError):
    """No worker could take the call now (each was hung, still loading or busy)."""

    failure = "unavailable"


class ToolInputError(ToolError, ValueError):
    """The tool worker refused the call's params or image (a 4xx answer)."""

    failure = "params"


def _describe_http_error(what: str, err: httpx.HTTPError) -> str:
    if isinstance(err, httpx.TimeoutException):
        return f"{what} did not answer in time ({type(err).__name__})"
    if isinstance(err, httpx.ConnectError):
        return f"{what} is not reachable (connection refused)"
    return f"{what} stopped responding ({type(err).__name__}: {err})"


def _request_id_header() -> dict[str, str] | None:
    """The chat's request id (:data:`CHAT_REQUEST_ID`) for the service called, whose log then names it too."""
    rid = CHAT_REQUEST_ID.get()
    return {REQUEST_ID_HEADER: rid} if rid else None


AT_LIMIT = "is busy: it holds as many connections as it takes (max_connections); try again shortly"


def _is_json(response: httpx.Response) -> bool:
    """Whether the answer is the service's own (JSON), not its HTTP server's (uvicorn's plain-text 503 over its
    connection limit)."""
    return response.headers.get("content-type", "").startswith("application/json")


class _Unavailable(Exception):
    """A worker answered that it cannot take the call now (hung or still loading): try another one."""


def _with_failover(registry: WorkerRegistry, kind: str, name: str, what: str, address: str,
                   call: Callable[[str], Iterator[Any]]) -> Iterator[Any]:
    """What ``call(address)`` yields, from the first worker of ``kind`` ``name`` that takes the call,
    starting at ``address`` and trying each worker at most once.

    A worker whose connection is refused (it is gone; the call never started) is dropped at once (it
    registers again when it comes back), and one whose ``call`` raises :class:`_Unavailable` is passed
    over, when another worker serves ``name``; else either is a :class:`WorkerError`, as is any other
    transport failure, naming ``what`` and the worker. A connection that breaks before anything came
    back (a kept-alive connection to a worker just killed, or one the worker had closed) is tried
    once more on a new connection, where a gone worker refuses it.
    """
    tried: list[str] = []
    broken: httpx.HTTPError | None = None  # the connection that broke before any answer, tried again once
    while True:
        tried.append(address)
        registry.begin(address)
        answered = False
        try:
            for item in call(address):
                answered = True
                yield item
            return
        except httpx.ConnectError as e:
            registry.remove(address)
            failure: WorkerError = WorkerError(_describe_http_error(what, broken or e))  # died mid-call, or was gone
        except _Unavailable as e:
            failure = WorkerBusy(str(e))
        except (httpx.ReadError, httpx.RemoteProtocolError) as e:
            if answered or broken is not None:
                log.warning("%s at %s: %s", what, address, type(e).__name__)
                raise WorkerError(_describe_http_error(what, e)) from None
            broken = e
            tried.remove(address)
            continue
        except httpx.HTTPError as e:
            log.warning("%s at %s: %s", what, address, type(e).__name__)
            raise WorkerError(_describe_http_error(what, e)) from None
        finally:
            registry.end(address)
        log.warning("%s at %s: %s", what, address, "busy" if isinstance(failure, WorkerBusy)
                    else "not reachable; dropped until it registers again")
        try:
            address = registry.pick(kind, name, exclude=tried)
        except NoWorkerError:
            raise failure from None


# --------------------------------------------------------------------------- tools


class RemoteResult(ToolResult):
    """A tool worker's answer: the full result, the model's view and the overlay, computed there."""

    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any] = Field(default_factory=dict)
    model_view: dict[str, Any] = Field(default_factory=dict)
    overlay_data: Overlay | None = None
    worker_elapsed_s: float = 0.0

    def for_model(self) -> dict[str, Any]:
        return self.model_view

    def overlay(self) -> Overlay | None:
        return self.overlay_data


class CallAnswer(BaseModel):
    """What a tool worker answers to ``POST /call`` (``serve/tool_worker.py``)."""

    result: dict[str, Any]
    for_model: dict[str, Any]
    overlay: Overlay | None = None
    elapsed_s: float = 0.0


class RemoteTool(Tool):
    """Base of the per-tool proxy classes made by :func:`remote_tool_class`."""

    Result = RemoteResult
    worker_name: ClassVar[str]

    def __init__(self, registry: WorkerRegistry, client: httpx.Client, timeout_s: float, available: Callable[[], list[str]]):
        super().__init__()
        self.registry, self.client, self.timeout_s, self.available = registry, client, timeout_s, available

    def __call__(self, image: Any, params: ToolParams) -> RemoteResult:
        body = {"params": params.model_dump(mode="json"), "image": png_data_url(image) if image is not None else None}
        [(address, r)] = _with_failover(self.registry, "tool", self.worker_name, f"tool worker for {self.name!r}",
                                        self._pick(), lambda address: self._post(address, body))
        if 400 <= r.status_code < 500:
            raise ToolInputError(error_detail(r))
        if r.status_code != 200:
            detail = error_detail(r)
            failed = TOOL_FAILED.format(tool=self.name)
            raise WorkerError(detail.removeprefix(failed) if detail.startswith(failed) else f"{self.name}: {detail}")
        try:
            answer = CallAnswer.model_validate_json(r.content)
        except ValidationError as e:  # its values stay out: they may describe the patient's image
            log.warning("tool worker for %r at %s answered with a malformed result", self.name, address)
            raise WorkerError(f"tool worker for {self.name!r} answered with a malformed result "
                              f"({validation_problems(e, 'body')}); is it an mmedagent tool worker?") from None
        return RemoteResult(data=answer.result, model_view=answer.for_model, overlay_data=answer.overlay,
                            worker_elapsed_s=answer.elapsed_s)

    def _post(self, address: str, body: dict[str, Any]) -> Iterator[tuple[str, httpx.Response]]:
        r = self.client.post(f"{address}/call", json=body, timeout=timeout(self.timeout_s), headers=_request_id_header())
        if r.status_code == 503:  # this worker is hung or still loading; another one may serve the tool
            raise _Unavailable(error_detail(r) if _is_json(r) else f"tool worker for {self.name!r} {AT_LIMIT}")
        yield address, r

    def _pick(self) -> str:
        try:
            return self.registry.pick("tool", self.worker_name)
        except NoWorkerError:
            raise WorkerBusy(
                f"no worker is serving tool {self.name!r} right now; available tools: {', '.join(self.available()) or '(none)'}"
            ) from None


def _schema_params(schema: dict[str, Any]) -> type[ToolParams]:
    """Params for a tool the controller cannot import: any fields pass here (the worker validates),
    and the prompt shows the worker's JSON schema."""

    class RemoteParams(ToolParams):
        model_config = ConfigDict(extra="allow")

        @classmethod
        def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return copy.deepcopy(schema)  # as pydantic's: a dict of the caller's own

    return RemoteParams


def remote_tool_class(name: str, info: dict[str, Any]) -> type[RemoteTool]:
    """A proxy class for the tool a worker registered; it validates with the real ``Params`` when
    the tool is importable here, otherwise with the worker's schema."""
    try:
        params = get_tool(name).Params
    except UnknownToolError:
        params = _schema_params(info.get("params") or {"type": "object", "properties": {}})
    question = info.get("question_param")
    if question is not None and question not in params.model_fields and params.model_config.get("extra") != "allow":
        log.warning("tool %s: the worker's question_param %r is no field of this version's Params; not filled", name,
                    question)  # another version of the tool: the chat goes on without it
        question = None
    return type(
        f"Remote{''.join(p.capitalize() for p in name.replace('-', '_').split('_'))}",
        (RemoteTool,),
        {
            "name": name,
            "worker_name": name,
            "aliases": tuple(info.get("aliases", ())),
            "description": info.get("description", ""),
            "needs_image": bool(info.get("needs_image", True)),
            "question_param": question,
            "weights_note": info.get("weights_note", ""),
            "Params": params,
            "__module__": __name__,
        },
    )


# --------------------------------------------------------------------------- planners


def _iter_ndjson(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON objects of an NDJSON body; a :class:`ValueError` at a line that is not one."""
    for line in response.iter_lines():
        if line.strip():
            event = json.loads(line)
            if not isinstance(event, dict):
                raise ValueError(f"an NDJSON line holds a {type(event).__name__}, not an object")
            yield event


class WorkerPlanner:
    """The agent's planner in the controller: one model worker, chosen once per chat so that the
    planning and answer passes of a conversation reach the same model (and its KV cache); a
    follow-up question under the same ``conversation_id`` goes to that worker again while it serves."""

    def __init__(self, registry: WorkerRegistry, client: httpx.Client, model: str, conversation_id: str | None, timeout_s: float,
                 request_id: str | None = None, tools: Sequence[type[Tool]] | None = None):
        self.registry, self.client, self.model = registry, client, model
        # what the chat offers: a constrained planner names only these (plug-ins the model worker never imported too)
        self.tools = None if tools is None else [{"name": t.name, "aliases": list(t.aliases),
                                                  "params": t.Params.model_json_schema()} for t in tools]
        self.conversation_id, self.timeout_s = conversation_id, timeout_s
        self.headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
        self.what = f"model worker for {model!r}"
        self.address = registry.pick("model", model, conversation=conversation_id)
        self.last_stats: dict[str, int] = {}  # the last call's token counts, as the worker reports them

    def _body(self, messages: Sequence[dict[str, str]], image: Any, gen: dict[str, Any]) -> dict[str, Any]:
        return {
            "messages": list(messages),
            "image": png_data_url(image) if image is not None else None,
            "conversation_id": self.conversation_id,
            "max_wait_s": self.timeout_s,  # a busy model says so, before this client's read timeout
            **({"tools": self.tools} if self.tools is not None else {}),
            **gen,
        }

    def generate(self, messages: Sequence[dict[str, str]], image: Any, **gen: Any) -> str:
        return "".join(self.stream(messages, image, **gen))

    def stream(self, messages: Sequence[dict[str, str]], image: Any, **gen: Any) -> Iterator[str]:
        """The reply in pieces. A worker that is gone (connection refused: the call never started) is
        dropped at once, and the chat goes on with another worker of the model if there is one."""
        body = self._body(messages, image, gen)
        self.last_stats = {}
        yield from _with_failover(self.registry, "model", self.model, self.what, self.address,
                                  lambda address: self._stream(address, body))

    def _stream(self, address: str, body: dict[str, Any]) -> Iterator[str]:
        what, self.address = self.what, address  # the chat's later passes go to this worker too
        try:
            with self.client.stream("POST", f"{address}/worker_generate_stream", json=body, headers=self.headers,
                                    timeout=timeout(self.timeout_s)) as r:
                if r.status_code != 200:
                    r.read()
                    if r.status_code == 503 and not _is_json(r):  # its server's connection limit: another may take it
                        raise _Unavailable(f"{what} {AT_LIMIT}")
                    raise WorkerError(f"{what}: {error_detail(r)}")
                for event in _iter_ndjson(r):
                    if event.get("busy"):  # no turn came: another worker of the model may have one
                        raise _Unavailable(f"{what}: {event['error']}")
                    if "error" in event:
                        raise WorkerError(f"{what}: {event['error']}")
                    if event.get("text"):
                        yield event["text"]
                    if "stats" in event:
                        self.last_stats = event["stats"]
            if self.conversation_id is not None:  # a client's own id: its next question comes under it
                self.registry.remember(self.conversation_id, address)
        except ValueError:  # not NDJSON objects
            log.warning("%s at %s answered with malformed output", what, address)
            raise WorkerError(f"{what} answered with malformed output; is it an mmedagent model worker?") from None


def to_openai_messages(messages: Sequence[dict[str, str]], image: Any) -> list[dict[str, Any]]:
    """Agent messages → OpenAI chat messages; the image becomes an ``image_url`` part of the user
    message that holds ``<image>``."""
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m["content"]
        if image is not None and m["role"] == "user" and IMAGE_TOKEN in content:
            text = content.replace(IMAGE_TOKEN, "", 1).lstrip("\n")
            out.append(
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(image)}}, {"type": "text", "text": text}]}
            )
            image = None  # one image per conversation
        else:
            out.append({"role": m["role"], "content": content})
    return out


class OpenAIPlanner:
    """A planner served by any OpenAI-compatible endpoint (vLLM, another mmedagent model worker...).

    ``base_url`` is the API root, e.g. ``http://gpu-box:8000/v1`` (:func:`api_root` makes one of other forms).
    Without ``model`` the backend's first listed model is used, or, with ``list_models=False``, requests name
    no model (the server's default). The backend batches requests, so calls may run side by side (up to
    ``max_concurrency``); ``last_stats`` is per calling thread.
    """

    max_concurrency = 32

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout_s: float = 300.0,
                 *, list_models: bool = True):
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self.shown = shown_url(self.base_url)  # in messages: the URL may carry credentials
        # an outside endpoint may be reached only through the environment's proxy; the stack's own never is
        self.client = make_client(api_key, timeout_s, proxy_from_env=not is_loopback(urlsplit(self.base_url).hostname or ""))
        self.model = model or (self._first_model() if list_models else None)
        self._calls = threading.local()

    @property
    def last_stats(self) -> dict[str, int]:
        """The token counts of this thread's last call."""
        return getattr(self._calls, "stats", {})

    @last_stats.setter
    def last_stats(self, stats: dict[str, int]) -> None:
        self._calls.stats = stats

    def _first_model(self) -> str:
        try:
            r = self.client.get(f"{self.base_url}/models")
        except httpx.HTTPError as e:
            raise WorkerError(self._scrub(f"cannot list models at {self.shown}: {type(e).__name__}: {e}")) from None
        if r.status_code in (401, 403):
            raise WorkerError(f"{self.shown} refused this server's key ({r.status_code}) to list its models: give the "
                              f"backend's own key (model_backend_api_key, or env {BACKEND_API_KEY_ENV})")
        if r.status_code != 200:
            raise WorkerError(self._scrub(f"cannot list models at {self.shown} ({r.status_code}): {error_detail(r)}"))
        try:
            return r.json()["data"][0]["id"]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise WorkerError(self._scrub(f"cannot list models at {self.shown}: {type(e).__name__}: {e}")) from None

    def info(self) -> dict[str, Any]:
        return {"name": self.model, "family": "openai-compatible", "backend": self.shown}

    def _scrub(self, message: str) -> str:
        """``message`` with the backend URL as it may be shown (an httpx error quotes the whole URL)."""
        return message.replace(self.base_url, self.shown)

    def _count(self, response: dict[str, Any]) -> None:
        """The backend's token usage, where a response (or a stream's last chunk) carries it, as ``last_stats``."""
        usage = response.get("usage")
        if isinstance(usage, dict) and {"prompt_tokens", "completion_tokens"} <= usage.keys():
            self.last_stats = {"prompt_tokens": usage["prompt_tokens"], "new_tokens": usage["completion_tokens"]}

    def _body(self, messages, image, gen: dict[str, Any], stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {**({"model": self.model} if self.model else {}),
                                "messages": to_openai_messages(messages, image), "stream": stream}
        if stream:  # without it OpenAI and vLLM send no usage in a stream
            body["stream_options"] = {"include_usage": True}
        if "max_new_tokens" in gen:
            body["max_tokens"] = gen["max_new_tokens"]
        for k in ("temperature", "top_p", "stop"):
            if gen.get(k) is not None:
                body[k] = gen[k]
        return body

    def generate(self, messages: Sequence[dict[str, str]], image: Any, **gen: Any) -> str:
        return self.complete(messages, image, **gen)["choices"][0]["message"]["content"] or ""

    def complete(self, messages: Sequence[dict[str, str]], image: Any, **gen: Any) -> Any:
        """The backend's whole answer (parsed JSON), for a caller that reads more than the text."""
        self.last_stats = {}
        try:
            r = self.client.post(f"{self.base_url}/chat/completions", json=self._body(messages, image, gen, False),
                                 headers=_request_id_header())
        except httpx.HTTPError as e:
            raise WorkerError(self._scrub(_describe_http_error(f"model backend {self.shown}", e))) from None
        if r.status_code != 200:
            raise WorkerError(self._scrub(f"model backend {self.shown}: {error_detail(r)}"))
        data = r.json()
        self._count(data)
        return data

    def stream(self, messages: Sequence[dict[str, str]], image: Any, **gen: Any) -> Iterator[str]:
        self.last_stats = {}
        try:
            with self.client.stream("POST", f"{self.base_url}/chat/completions", json=self._body(messages, image, gen, True),
                                    headers=_request_id_header()) as r:
                if r.status_code != 200:
                    r.read()
                    raise WorkerError(self._scrub(f"model backend {self.shown}: {error_detail(r)}"))
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):  # a failure mid-stream (vLLM, our model worker): not a short answer
                        error = chunk["error"]
                        raise WorkerError(self._scrub(f"model backend {self.shown}: "
                                                      f"{error.get('message', error) if isinstance(error, dict) else error}"))
                    self._count(chunk)
                    choices = chunk.get("choices") or [{}]
                    piece = (choices[0].get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except httpx.HTTPError as e:
            raise WorkerError(self._scrub(_describe_http_error(f"model backend {self.shown}", e))) from None
