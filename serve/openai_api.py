"""The OpenAI chat-completions wire format, shared by the controller (agent answers) and the model
worker (raw model turns): request parsing, images from ``image_url`` parts, responses, SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from mmedagent.protocol import IMAGE_TOKEN, without_image_token
from mmedagent.serve.messages import MAX_MESSAGE_CHARS, MAX_NEW_TOKENS, MAX_STOP_CHARS, MAX_STOPS, too_long_conversation
from mmedagent.serve.uploads import UploadError


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | list[dict[str, Any]] | None = None


CLIENT_TOOLS_REFUSED = ("client-defined tools are not supported: mmedagent calls its own medical tools (the "
                        "controller lists them at GET /v1/tools) and answers in message.content; leave this field out")


class ChatCompletionRequest(BaseModel):
    """The fields we act on; other OpenAI fields (user, seed, logprobs...) are accepted and ignored.
    ``n`` > 1 is refused: one choice per request; so are client-defined tools (``tools``,
    ``functions``, a ``tool_choice`` other than "auto" or "none"), which would never be called."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop sequences of at most {MAX_STOP_CHARS} characters each")
        return stop

    @field_validator("tools", "functions")
    @classmethod
    def _no_client_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError(CLIENT_TOOLS_REFUSED)
        return tools

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_forced_tool(cls, choice: Any) -> Any:
        if choice not in (None, "auto", "none"):
            raise ValueError(CLIENT_TOOLS_REFUSED)
        return choice

    @field_validator("messages")
    @classmethod
    def _not_too_long(cls, messages: list[OpenAIMessage]) -> list[OpenAIMessage]:
        if (message := too_long_conversation(len(messages))) is not None:
            raise ValueError(message)
        return messages

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported (one choice per request); send n requests instead")
        return n

    def gen(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Generation settings: ``defaults`` with the request's budget, temperature and top_p (the stop
        sequences apart: :meth:`stops`)."""
        out = dict(defaults)
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None:
            out["max_new_tokens"] = limit
        for k in ("temperature", "top_p"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def stops(self) -> list[str]:
        """The stop sequences, without empty ones (which would stop nothing)."""
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops`` (which OpenAI clients never see), and whether one was there."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def finish_reason(new_tokens: int | None, max_new_tokens: int, reported: str | None = None) -> str:
    """OpenAI's ``finish_reason``: "length" when the reply was cut off (the planner's own report where
    it gives one, which covers the model's context too; else the token budget used up), else "stop"."""
    if reported is not None:
        return "length" if reported == "length" else "stop"
    return "length" if new_tokens is not None and new_tokens >= max_new_tokens else "stop"


def split_messages(messages: list[OpenAIMessage]) -> tuple[list[dict[str, str]], str | None]:
    """OpenAI messages → agent-style ``{"role", "content"}`` texts plus the one image data URL.

    The image's message gets ``<image>\\n`` in front, as the planner expects; markers typed in the
    text are removed. ``developer`` is read as ``system``. More than one image, or an image part
    without a URL, is a 400.
    """
    out: list[dict[str, str]] = []
    image: str | None = None
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if role == "tool":
            raise UploadError(400, "tool-role messages are not supported: mmedagent runs the tools itself")
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": without_image_token(m.content or "")})
            continue
        texts, has_image = [], False
        for part in m.content:
            kind = part.get("type")
            if kind == "text":
                texts.append(without_image_token(str(part.get("text", ""))))
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise UploadError(400, "image_url part without a url")
                if image is not None and url != image:
                    raise UploadError(400, "only one image per conversation is supported")
                if role != "user":
                    raise UploadError(400, "images are accepted in user messages only")
                image, has_image = url, True
            else:
                raise UploadError(400, f"unsupported content part type {kind!r}; use text and image_url")
        text = "\n".join(texts)
        if len(text) > MAX_MESSAGE_CHARS:
            raise UploadError(400, f"a message's text is longer than {MAX_MESSAGE_CHARS} characters")
        out.append({"role": role, "content": f"{IMAGE_TOKEN}\n{text}" if has_image else text})
    return out, image


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion(cid: str, model: str, content: str, finish: str = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        **extra,
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    """One server-sent event of a streamed completion."""
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_event(message: str) -> str:
    """A failure in the middle of a stream, as OpenAI-compatible servers send it (an event holding only
    the error object); ``[DONE]`` follows."""
    return f"data: {json.dumps(error_body(message, 500), ensure_ascii=False)}\n\n"


def model_list(names: list[str], owner: str = "mmedagent", notes: dict[str, str] | None = None,
               tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``GET /v1/models``; extensions OpenAI clients ignore: each model's ``mmedagent_note`` (e.g.
    "demonstration model ... not a medical device") and ``mmedagent_tools``, the live tools with
    their weights and labels."""
    now = int(time.time())
    data = []
    for n in names:
        entry = {"id": n, "object": "model", "created": now, "owned_by": owner}
        if notes is not None:
            entry["mmedagent_note"] = notes.get(n, "")
        data.append(entry)
    out: dict[str, Any] = {"object": "list", "data": data}
    if tools is not None:
        out["mmedagent_tools"] = tools
    return out


OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _problem(error: dict[str, Any]) -> tuple[str, str]:
    """(field, what is wrong) of one validation error, with no part of the value sent."""
    loc, kind, ctx = tuple(error.get("loc", ())), error.get("type"), error.get("ctx") or {}
    if kind == "json_invalid":  # loc: ("body", offset); ctx: the parser's reason, without the text
        return "", f"the body is not valid JSON ({ctx.get('error', 'decode error')} at character {loc[-1]})"
    if kind == "missing" and loc == ("body",):
        return "", 'the body is empty; send a JSON object with "messages"'
    field = ".".join(str(x) for x in loc if x != "body")
    # a validator's own sentence, without pydantic's "Value error, " in front
    return field, str(ctx["error"]) if kind == "value_error" and "error" in ctx else error.get("msg", "")


def openai_errors(app: FastAPI) -> FastAPI:
    """Answer the errors of ``app``'s OpenAI routes in OpenAI's shape (the ``openai`` client shows
    only ``error.message``), a refused request field as a 400 naming it in ``param``, without
    echoing the value sent; the other routes keep their ``{"detail"}`` answers. Call after
    ``security.without_echoed_input``."""
    not_openai = app.exception_handlers[RequestValidationError]

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if request.url.path not in OPENAI_PATHS:
            return await http_exception_handler(request, exc)
        return JSONResponse(error_body(str(exc.detail), exc.status_code), exc.status_code, headers=exc.headers)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path not in OPENAI_PATHS:
            return await not_openai(request, exc)
        problems = [_problem(e) for e in exc.errors()]
        message = "; ".join(f"{f or 'request'}: {t}" for f, t in problems)
        param = problems[0][0] if problems and problems[0][0] else None
        return JSONResponse(error_body(message, 400, param), 400)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    return app
