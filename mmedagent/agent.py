"""The agent loop: plan → run every tool call of the turn → feed results back → answer.

The planner is anything with ``generate(messages, image, **gen) -> str`` (and optionally
``stream(...)`` yielding text pieces): the in-process model, a model worker over HTTP, or an
OpenAI-compatible endpoint. Messages are OpenAI-style ``{"role", "content"}`` dicts; the image
travels beside them and belongs to the first user message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import (
    IMAGE_TOKEN,
    AssistantTurn,
    ToolOutcome,
    TurnParseError,
    parse_turn,
    render_tool_results,
    strip_image_token,
    system_prompt,
    without_image_token,
)
from mmedagent.tools.base import Overlay

ChatMessage = dict[str, str]
EventCallback = Callable[[str, Any], None]


@runtime_checkable
class Planner(Protocol):
    """What the agent loop needs from a model."""

    def generate(self, messages: Sequence[ChatMessage], image: Any | None, **gen: Any) -> str: ...


def token_counts(planner: Any) -> tuple[int, int] | None:
    """(prompt tokens, new tokens) of a planner's last call, where it reports them (``last_stats``)."""
    stats = getattr(planner, "last_stats", None)
    if isinstance(stats, dict) and {"prompt_tokens", "new_tokens"} <= stats.keys():
        return int(stats["prompt_tokens"]), int(stats["new_tokens"])
    return None


def openai_usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class AgentStep(BaseModel):
    """One planner call and the tool calls it made."""

    index: int
    raw: str
    turn: AssistantTurn | None = None
    parse_error: str | None = None
    outcomes: list[ToolOutcome] = Field(default_factory=list)
    overlays: list[Overlay | None] = Field(default_factory=list)
    model_s: float = 0.0
    tools_s: float = 0.0
    prompt_tokens: int | None = None  # as the planner reports them (``last_stats``)
    new_tokens: int | None = None
    finish: str | None = None  # why the planner's reply ended ("eos", "stop", "length"), where it says


def cut_off_error(step: AgentStep, error: TurnParseError) -> str:
    """The parse error of a reply that ran out of tokens: what ran out and what to do, then what is missing."""
    after = f" after {step.new_tokens} tokens" if step.new_tokens is not None else ""
    return (f"the reply was cut off{after}, before its turn was complete: the token budget (max_new_tokens) or the "
            f"model's context ran out; raise max_new_tokens, or start a new conversation if this one is long ({error})")


class AgentResult(BaseModel):
    answer: str
    steps: list[AgentStep]
    messages: list[ChatMessage]
    stopped: Literal["answer", "max_steps", "parse_error", "length"]  # length: a reply cut off before its turn ended
    wall_s: float = 0.0

    @property
    def tool_calls(self) -> list[str]:
        return [a.API_name for s in self.steps if s.turn for a in s.turn.actions]

    @property
    def usage(self) -> dict[str, int] | None:
        """OpenAI-style token usage of the planner calls; None where the planner does not report it."""
        if not self.steps or any(s.prompt_tokens is None or s.new_tokens is None for s in self.steps):
            return None
        return openai_usage(sum(s.prompt_tokens or 0 for s in self.steps), sum(s.new_tokens or 0 for s in self.steps))


def with_one_image_marker(messages: Sequence[ChatMessage], has_image: bool) -> list[ChatMessage]:
    """Copies of ``messages`` holding the image marker once: on the first user
    message that already holds it (else the first user message); nowhere without an image. A marker a
    user typed, or one in any other message, is removed."""
    target = next((i for i, m in enumerate(messages) if m["role"] == "user" and IMAGE_TOKEN in m["content"]),
                  next((i for i, m in enumerate(messages) if m["role"] == "user"), None))
    out = []
    for i, m in enumerate(messages):
        content = without_image_token(m["content"])
        if has_image and i == target:
            content = f"{IMAGE_TOKEN}\n{content}"
        out.append({**m, "content": content})
    return out


class Agent:
    """Runs the plan/act/answer loop for one question at a time (history carried by the caller)."""

    def __init__(
        self,
        planner: Planner,
        dispatcher: Dispatcher,
        max_steps: int = 3,
        system: str | None = None,
        **gen: Any,
    ):
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        self.planner, self.dispatcher, self.max_steps, self.gen = planner, dispatcher, max_steps, gen
        self.system = system if system is not None else system_prompt(type(t) for t in dispatcher.tools.values())

    def _generate(self, messages: list[ChatMessage], image: Any, on_event: EventCallback | None) -> str:
        stream = getattr(self.planner, "stream", None)
        if on_event is None or stream is None:
            return self.planner.generate(messages, image, **self.gen)
        pieces = []
        for piece in stream(messages, image, **self.gen):  # type: Iterator[str]
            pieces.append(piece)
            on_event("token", piece)
        return "".join(pieces)

    def run(
        self,
        question: str,
        image: Any | None = None,
        history: Sequence[ChatMessage] | None = None,
        on_event: EventCallback | None = None,
    ) -> AgentResult:
        """Answer ``question`` about ``image``; ``history`` is the ``messages`` of an earlier result."""
        started = time.monotonic()
        # quoted again in every tool-result message, as the data builders and the evaluation quote it
        question = strip_image_token(question)
        messages = with_one_image_marker([*(history or []), {"role": "user", "content": question}], image is not None)
        if self.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system})

        steps: list[AgentStep] = []
        answer, stopped = "", "max_steps"
        for index in range(self.max_steps):
            t0 = time.monotonic()
            raw = self._generate(messages, image, on_event)
            step = AgentStep(index=index, raw=raw, model_s=time.monotonic() - t0)
            if counts := token_counts(self.planner):
                step.prompt_tokens, step.new_tokens = counts
            if isinstance(finish := (getattr(self.planner, "last_stats", None) or {}).get("finish"), str):
                step.finish = finish
            steps.append(step)
            # only the framework places the image: a marker the model or a tool wrote would be another image
            messages.append({"role": "assistant", "content": without_image_token(raw)})
            try:
                step.turn = parse_turn(raw, strict=False)
            except TurnParseError as e:
                cut = step.finish == "length"
                step.parse_error = cut_off_error(step, e) if cut else str(e)
                answer, stopped = raw.strip(), "length" if cut else "parse_error"
            else:
                answer = step.turn.value
                if not step.turn.actions:
                    stopped = "answer"
            if stopped != "max_steps" or index == self.max_steps - 1:
                if on_event:  # the last step: its calls (if any) are not run, no planner call is left to read them
                    on_event("step", step)
                break
            t1 = time.monotonic()
            step.outcomes, results = self.dispatcher.dispatch_all(step.turn.actions, image, question)
            step.overlays = [r.overlay() if r is not None else None for r in results]
            step.tools_s = time.monotonic() - t1
            if on_event:
                on_event("step", step)
            messages.append({"role": "user", "content": render_tool_results(step.outcomes, question)})
        result = AgentResult(answer=answer, steps=steps, messages=messages, stopped=stopped, wall_s=time.monotonic() - started)
        if on_event:
            on_event("answer", result)
        return result
