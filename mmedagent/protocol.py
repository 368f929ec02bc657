"""The one turn format: assistant turns, tool-result turns and training records.

Everything that turns a planner turn into text or back — training, the data builders, serving and
evaluation — goes through this module, so the model is served with exactly the wording it was
trained on. The default text form is MMedAgent's::

    "thoughts🤔" I should locate the lesion first.
    "actions🚀" [{"API_name": "grounding dino", "API_params": {"image": "<imagepath>", "prompts": ["tumor"]}}]
    "value👉" I will locate it. Please wait.

Parsing is strict JSON (after normalising the single-quoted, Python-literal JSON that models
often emit, and closing a bracket left open before an outer closer); nothing is ever evaluated.
Every failure is a :class:`TurnParseError`. Tool outputs are Python-literal mappings or, as in
MMedAgent's report, RAG and classification outputs, plain text.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

IMAGE_PLACEHOLDER = "<imagepath>"
"""What the model writes for the conversation's image in ``API_params``; never a real path."""

IMAGE_TOKEN = "<image>"
"""Marks where the image goes in the first human message (LLaVA convention)."""

THOUGHTS_MARK = '"thoughts🤔"'
ACTIONS_MARK = '"actions🚀"'
VALUE_MARK = '"value👉"'
MARKS = (THOUGHTS_MARK, ACTIONS_MARK, VALUE_MARK)
"""The turn markers; a turn holds each at most once."""
THOUGHTS_OPEN, ACTIONS_OPEN, VALUE_OPEN = f"{THOUGHTS_MARK} ", f"\n{ACTIONS_MARK} ", f"\n{VALUE_MARK} "
"""What a rendered turn writes before its thoughts (one line), its actions (JSON on one line) and its value:
:func:`render_turn` writes them and constrained decoding (``mmedagent.model.constrain``) holds the model to them."""


class TurnParseError(ValueError):
    """Model text that is not a valid assistant turn."""


class ToolCall(BaseModel):
    """One tool call: the name the model used and its raw parameters."""

    model_config = ConfigDict(populate_by_name=True)

    API_name: str = Field(min_length=1)
    API_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("API_name")
    @classmethod
    def _strip_name(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("API_name is empty")
        return v


class AssistantTurn(BaseModel):
    """A planner turn: reasoning, zero or more tool calls, and text for the user."""

    thoughts: str = ""
    actions: list[ToolCall] = Field(default_factory=list)
    value: str = ""


Failure = Literal["unknown", "params", "unavailable", "timeout", "error"]
"""Why a tool call failed: an unknown tool, params or image it refused, a tool that cannot take calls now
(not loaded, busy, no worker), no answer in time, or the tool failed while running."""


class ToolOutcome(BaseModel):
    """What one tool call produced, as fed back to the model (and shown in traces)."""

    tool: str
    ok: bool = True
    output: dict[str, Any] | None = None
    text: str | None = None
    """An output that is plain text, not a mapping (MMedAgent's reports, RAG passages and labels); fed back verbatim."""
    error: str | None = None
    elapsed_s: float = 0.0
    failure: Failure | None = Field(default=None, exclude=True)
    """Why a call failed, for a server's status code; not part of the conversation or the trace."""


class ToolResultTurn(BaseModel):
    """The human-side turn that carries tool outputs back to the model."""

    outcomes: list[ToolOutcome]
    question: str


# --------------------------------------------------------------------------- rendering


def render_turn(turn: AssistantTurn) -> str:
    """Render an assistant turn to the text the model emits."""
    actions = [a.model_dump() for a in turn.actions]
    return f"{THOUGHTS_OPEN}{turn.thoughts}{ACTIONS_OPEN}{json.dumps(actions, ensure_ascii=False)}{VALUE_OPEN}{turn.value}"


def _python_repr(value: Any) -> str:
    # MMedAgent's records carry tool outputs as Python reprs; keep that wording exactly.
    return repr(value)


def name_key(name: str) -> str:
    """A tool name as calls are matched to it: case, ``_`` / ``-`` / spaces and the spaces around ``+``
    do not count ("grounding_dino+sam" is "Grounding DINO + SAM", as LLaVA-Plus and MMedAgent write them)."""
    return re.sub(r"\s*\+\s*", "+", " ".join(re.sub(r"[_\-\s]+", " ", name).split())).casefold()


def render_tool_results(outcomes: Sequence[ToolOutcome], question: str) -> str:
    """The one wording that feeds tool outputs back to the model.

    ``{tool} output: {result}`` per call (MMedAgent's training wording; a text output as is),
    ``{tool} error: {message}`` for a failed call, then ``Answer my first question: {question}``. An
    ``<image>`` marker written in an output is dropped: the conversation's one image is the user's.
    """
    lines = []
    for o in outcomes:
        if not o.ok:
            lines.append(f"{o.tool} error: {o.error}")
        elif o.text is not None:
            lines.append(f"{o.tool} output: {o.text}")
        else:
            lines.append(f"{o.tool} output: {_python_repr(o.output or {})}")
    return without_image_token("\n".join(lines)) + f"\n\nAnswer my first question: {question}"


_RESULT_LINE = re.compile(r"^(?P<tool>\S.*?) (?P<kind>output|error): (?P<body>.*)$")
_QUESTION = "\n\nAnswer my first question: "


def _is_json_like(value: Any) -> bool:
    """Only what JSON can carry: numbers, strings, booleans, None, lists and string-keyed mappings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_like(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_like(v) for k, v in value.items())
    return False


def _output_outcome(tool: str, body: str) -> ToolOutcome:
    """A mapping when ``body`` is a Python dict literal of JSON-like values (or a JSON object: data
    written with ``true`` / ``false`` / ``null``), else the text as is."""
    try:
        output = ast.literal_eval(body)  # literals only; never code
    except Exception:  # SyntaxError, ValueError, TypeError ({[1]: 2}), MemoryError, RecursionError: text
        try:
            output = _strict_json(body)
        except (ValueError, RecursionError):
            output = None
    if isinstance(output, dict) and _is_json_like(output):
        return ToolOutcome(tool=tool, output=output)
    return ToolOutcome(tool=tool, text=body)


def _result_entries(head: str, starts: Callable[[str], bool]) -> list[tuple[str, str, list[str]]]:
    """``(tool, kind, body lines)`` per outcome: a ``{tool} output/error:`` line whose tool ``starts``
    accepts (any, for the first) begins one; other lines continue it."""
    entries: list[tuple[str, str, list[str]]] = []
    for line in head.split("\n"):
        m = _RESULT_LINE.match(line)
        if m and (not entries or starts(m["tool"])):
            entries.append((m["tool"], m["kind"], [m["body"]]))
        elif entries:
            entries[-1][2].append(line)
        elif line.strip():
            raise TurnParseError(f"not a tool-result line: {line[:80]!r}")
    return entries


def parse_tool_results(text: str, calls: Sequence[str] | None = None) -> ToolResultTurn:
    """Parse a tool-result turn (as written by :func:`render_tool_results` or found in data).

    Each ``{tool} output: …`` / ``{tool} error: …`` line starts an outcome; lines that do not start
    one continue it (a multi-line report or passage). ``calls``, the names the turn before called: a
    line naming another tool ("Cardiac output: 5.2 L/min" in a report) then continues the outcome too,
    when that reads one outcome per call."""
    head, sep, question = text.rpartition(_QUESTION)
    if not sep:
        raise TurnParseError("tool-result turn lacks 'Answer my first question:'")
    entries = _result_entries(head, lambda tool: True)
    if calls and len(entries) != len(calls):
        named = {name_key(c) for c in calls}
        by_name = _result_entries(head, lambda tool: name_key(tool) in named)
        if len(by_name) == len(calls):
            entries = by_name
    if not entries:
        raise TurnParseError("tool-result turn has no tool output")
    outcomes = [ToolOutcome(tool=tool, ok=False, error="\n".join(body)) if kind == "error"
                else _output_outcome(tool, "\n".join(body)) for tool, kind, body in entries]
    return ToolResultTurn(outcomes=outcomes, question=question)


def is_tool_result_text(text: str) -> bool:
    try:
        parse_tool_results(text)
    except TurnParseError:
        return False
    return True


# --------------------------------------------------------------------------- parsing


def _last_written(out: list[str]) -> str:
    """The last character other than whitespace in the pieces written so far ("" for none)."""
    return next((piece.rstrip()[-1] for piece in reversed(out) if piece.strip()), "")


def _normalise_json(text: str) -> str:
    """Turn single-quoted / Python-literal JSON into strict JSON; strings are re-quoted only, and a comma
    before a closing bracket (``"top_k": 3, }``: Python allows it, and the constrained decoder lets it through)
    is dropped."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            quote, j, buf = c, i + 1, []
            while j < n and text[j] != quote:
                ch = text[j]
                if ch == "\\" and j + 1 < n:
                    nxt = text[j + 1]
                    if quote == "'" and nxt == "'":
                        buf.append("'")
                    else:
                        buf.append(ch + nxt)
                    j += 2
                    continue
                if quote == "'" and ch == '"':
                    buf.append('\\"')
                else:
                    buf.append(ch)
                j += 1
            if j >= n:
                raise TurnParseError("unterminated string in actions")
            out.append('"' + "".join(buf) + '"')
            i = j + 1
            continue
        if c.isalpha():
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            out.append({"True": "true", "False": "false", "None": "null"}.get(word, word))
            i = j
            continue
        if c == "," and text[i + 1:].lstrip()[:1] in ("}", "]") and _last_written(out) not in ("", "[", "{", ","):
            i += 1  # a trailing comma after a value; "[,]" stays the error it is
            continue
        out.append(c)
        i += 1
    return "".join(out)


_CLOSER = {"[": "]", "{": "}"}
_OPENER = {"]": "[", "}": "{"}


def _close_open_brackets(text: str) -> str:
    """Strict JSON text with the brackets a mismatched closer implies: ``[{"a": {}]`` (an object left
    open inside a list, as in MMedAgent's released evaluation turns) becomes ``[{"a": {}}]``.
    Brackets still open at the end (a truncated turn) are left so: that stays an error."""
    out: list[str] = []
    stack: list[str] = []
    open_count = {"[": 0, "{": 0}
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
            continue
        if c in _CLOSER:
            stack.append(c)
            open_count[c] += 1
        elif c in _OPENER and open_count[_OPENER[c]]:
            while stack[-1] != _OPENER[c]:
                out.append(_CLOSER[stack[-1]])
                open_count[stack.pop()] -= 1
            open_count[stack.pop()] -= 1
        out.append(c)
        i += 1
    return "".join(out)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _strict_json(text: str) -> Any:
    """``json.loads`` that refuses NaN / Infinity and numbers too large for a float."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def _parse_actions(raw: str) -> list[ToolCall]:
    raw = raw.strip()
    if not raw:
        return []
    try:
        data = _strict_json(raw)
    except (ValueError, RecursionError):
        try:
            data = _strict_json(_close_open_brackets(_normalise_json(raw)))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, a non-finite or over-long number
            raise TurnParseError(f"actions are not valid JSON: {e}") from None
    if data is None:  # "actions🚀" None / null: no call, as an empty list
        return []
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise TurnParseError("actions must be a JSON list")
    calls = []
    for k, item in enumerate(data):
        if not isinstance(item, dict):
            raise TurnParseError(f"action {k} is not an object")
        try:
            calls.append(ToolCall.model_validate(item))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "action"
            raise TurnParseError(f"action {k}: {where}: {first['msg']}") from None
    return calls


def parse_turn(text: str, strict: bool = True) -> AssistantTurn:
    """Parse model text into an :class:`AssistantTurn`; raises only :class:`TurnParseError`.

    With ``strict=False``, text that carries none of the turn markers is taken as a plain answer
    (how a model answers without tools, and how plain LLaVA data is rendered), unless it is only the
    start of a marker (a turn cut off at its first tokens).
    """
    if not isinstance(text, str):
        raise TurnParseError("model output is not text")
    positions = {m: text.find(m) for m in MARKS}
    if all(p < 0 for p in positions.values()):
        if strict:
            raise TurnParseError("no turn markers (thoughts🤔 / actions🚀 / value👉) in model output")
        if (stripped := text.strip()) and any(m.startswith(stripped) for m in MARKS):
            raise TurnParseError(f"the model output stops inside a turn marker: {stripped}")
        return AssistantTurn(value=text.strip())
    for m in (ACTIONS_MARK, VALUE_MARK):
        if positions[m] < 0:
            raise TurnParseError(f"missing {m} in model output")
    for m in MARKS:
        if positions[m] >= 0 and text.count(m) > 1:
            raise TurnParseError(f"{m} appears more than once")
    t, a, v = positions[THOUGHTS_MARK], positions[ACTIONS_MARK], positions[VALUE_MARK]
    if not (a < v and (t < 0 or t < a)):
        raise TurnParseError("turn markers out of order (thoughts, actions, value)")
    thoughts = text[t + len(THOUGHTS_MARK) : a].strip() if t >= 0 else ""
    actions = _parse_actions(text[a + len(ACTIONS_MARK) : v])
    value = text[v + len(VALUE_MARK) :].strip()
    return AssistantTurn(thoughts=thoughts, actions=actions, value=value)


# --------------------------------------------------------------------------- records


class Message(BaseModel):
    """One turn of a training record, MMedAgent/LLaVA style (``from`` + ``value``)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    role: Literal["human", "gpt", "system"] = Field(alias="from")
    value: str = ""
    thoughts: str | None = None
    actions: list[ToolCall] | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v: Any) -> Any:
        return {"user": "human", "assistant": "gpt", "model": "gpt"}.get(v, v)

    @property
    def is_tool_turn(self) -> bool:
        """A gpt turn in the thoughts/actions/value form (as opposed to plain text)."""
        return self.role == "gpt" and (self.thoughts is not None or self.actions is not None)

    def assistant_turn(self) -> AssistantTurn:
        return AssistantTurn(thoughts=self.thoughts or "", actions=self.actions or [], value=self.value)

    def text(self) -> str:
        """The exact text this turn has in the model's context."""
        return render_turn(self.assistant_turn()) if self.is_tool_turn else self.value

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"from": self.role}
        if self.thoughts is not None:
            d["thoughts"] = self.thoughts
        if self.actions is not None:
            d["actions"] = [a.model_dump() for a in self.actions]
        d["value"] = self.value
        return d


class Record(BaseModel):
    """One training / evaluation record: an optional image and a conversation."""

    model_config = ConfigDict(extra="allow")

    id: str | int | None = None
    image: str | list[str] | None = None
    conversations: list[Message]

    @field_validator("conversations")
    @classmethod
    def _non_empty(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("conversations is empty")
        return v

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        if "image" not in d and "image_id" in d:
            d = {**d, "image": d["image_id"]}
        return cls.model_validate(d)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.id is not None:
            d["id"] = self.id
        if self.image is not None:
            d["image"] = self.image
        d["conversations"] = [m.to_dict() for m in self.conversations]
        d.update(self.model_extra or {})
        return d

    @property
    def images(self) -> list[str]:
        if self.image is None:
            return []
        return [self.image] if isinstance(self.image, str) else list(self.image)

    def first_question(self) -> str:
        for m in self.conversations:
            if m.role == "human":
                return strip_image_token(m.value)
        return ""

    def tool_calls(self) -> list[ToolCall]:
        return [a for m in self.conversations if m.role == "gpt" for a in (m.actions or [])]


def without_image_token(text: str) -> str:
    """``text`` without image markers (each with the line break after it): only the framework places the image."""
    return text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")


def strip_image_token(text: str) -> str:
    return without_image_token(text).strip()


def tool_result_message(outcomes: Sequence[ToolOutcome], question: str) -> Message:
    return Message(role="human", value=render_tool_results(outcomes, question))


def assistant_message(turn: AssistantTurn) -> Message:
    return Message(role="gpt", thoughts=turn.thoughts, actions=list(turn.actions), value=turn.value)


# --------------------------------------------------------------------------- system prompt


DEFAULT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def _without_extensions(node: Any) -> Any:
    """A JSON schema without its ``x-...`` extension keys (decoding hints, not for the prompt)."""
    if isinstance(node, dict):
        return {k: _without_extensions(v) for k, v in node.items() if not k.startswith("x-")}
    if isinstance(node, list):
        return [_without_extensions(v) for v in node]
    return node


def params_schema(tool: Any) -> dict[str, Any]:
    """The JSON schema of ``tool.Params`` with nested models written out in place: the prompt shows
    their fields, and two tools' nested models of the same name never share one definition."""
    schema = copy.deepcopy(tool.Params.model_json_schema())  # a copy: the class may hand out one dict every time
    defs = schema.pop("$defs", {})

    def inline(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [inline(v, seen) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen:
                raise TypeError(f"{tool.name}: Params model {name} refers to itself; tool parameters cannot be recursive")
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**inline(defs[name], (*seen, name)), **inline(rest, seen)}
        return {k: inline(v, seen) for k, v in node.items()}

    return inline(schema, ())


def render_tool_catalog(tools: Iterable[Any]) -> str:
    """Tool names, aliases, descriptions and parameter JSON schemas, for the system prompt."""
    lines = []
    for t in tools:
        schema = _without_extensions(params_schema(t))
        props = {k: {kk: vv for kk, vv in v.items() if kk != "title"} for k, v in schema.get("properties", {}).items()}
        aliases = f" (also: {', '.join(t.aliases)})" if getattr(t, "aliases", ()) else ""
        lines.append(f"- {t.name}{aliases}: {t.description} Params: {json.dumps(props, ensure_ascii=False)}")
    return "\n".join(lines)


def actions_json_schema(tools: Iterable[Any]) -> dict[str, Any]:
    """JSON schema of a turn's action list: each call names a tool (or an alias) and carries
    parameters valid for that tool's ``Params`` schema, plus the image placeholder."""
    calls = []
    for t in tools:
        params = params_schema(t)
        params["properties"] = {"image": {"const": IMAGE_PLACEHOLDER}, **params.get("properties", {})}
        calls.append({
            "type": "object",
            "properties": {"API_name": {"enum": [t.name, *getattr(t, "aliases", ())]}, "API_params": params},
            "required": ["API_name", "API_params"],
            "additionalProperties": False,
        })
    if not calls:  # no tool offered: the action list stays empty
        return {"type": "array", "maxItems": 0}
    return {"type": "array", "items": {"anyOf": calls}}


def system_message(choice: str | None, tools: Iterable[Any], text: str | None = None) -> str:
    """The system message a planner is served with: ``"plain"`` (:data:`DEFAULT_SYSTEM`), ``"none"``
    (empty: no system message), ``"text"`` (``text``: the one its training records had, as a model
    directory's ``mmedagent.json`` records it in ``system_text``) or, for ``"catalog"`` / ``None``, the
    catalog of ``tools``."""
    if choice == "plain":
        return DEFAULT_SYSTEM
    if choice == "none":
        return ""
    if choice == "text":
        if not isinstance(text, str) or not text.strip():
            raise ValueError("system prompt 'text' needs the text the model was trained with (mmedagent.json's "
                             "system_text); none was given")
        return text
    if choice not in (None, "catalog"):
        raise ValueError(f"unknown system prompt {choice!r}; use catalog, plain, none or text")
    return system_prompt(tools)


_CATALOG_INTRO = " The assistant can call tools. Each assistant turn is written as\n"
"""What follows the base text in a system prompt that lists the tools."""


def system_setting(text: str | None) -> dict[str, str] | None:
    """The ``mmedagent.json`` setting that serves a model with the system message ``text`` its training records
    had (None or empty: none), the inverse of :func:`system_message`; None for a tool catalog, which is served
    as the live tools' (the default)."""
    if not text:
        return {"system_prompt": "none"}
    if text == DEFAULT_SYSTEM:
        return {"system_prompt": "plain"}
    if text.startswith(DEFAULT_SYSTEM + _CATALOG_INTRO):
        return None
    return {"system_prompt": "text", "system_text": text}



def system_prompt(tools: Iterable[Any] | None = None, base: str = DEFAULT_SYSTEM) -> str:
    """The planner's system prompt; lists the tools and the turn format when tools are given."""
    tools = list(tools or [])
    if not tools:
        return base
    return (
        f"{base}{_CATALOG_INTRO}"
        f"{THOUGHTS_MARK} reasoning\n{ACTIONS_MARK} a JSON list of "
        '{"API_name": tool, "API_params": {...}} (empty list to answer directly)\n'
        f"{VALUE_MARK} text for the human.\n"
        f'Use "{IMAGE_PLACEHOLDER}" for the image. Tools:\n{render_tool_catalog(tools)}'
    )
