"""Request-body pieces the controller and the workers share: chat messages and the size limits on them.

The limits keep one request from holding a worker for minutes or exhausting its memory; a prompt
that still exceeds the model's context is refused by the planner itself.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_QUESTION_CHARS = 20_000
"""A user's question."""
MAX_MESSAGE_CHARS = 100_000
"""Any one message of a conversation (a tool catalog, a tool result, a pasted report)."""
MAX_MESSAGES = 200
"""Messages in one conversation a client sends."""


def too_long_conversation(n_messages: int) -> str | None:
    """What to tell a client whose conversation has grown past :data:`MAX_MESSAGES` (each question adds
    its answer and every tool round), else None."""
    if n_messages <= MAX_MESSAGES:
        return None
    return (f"this conversation is too long to go on ({n_messages} messages, at most {MAX_MESSAGES}): "
            "start a new conversation to ask more")


MAX_STEPS = 10
"""Planner calls in one agent run."""
MAX_PROMPT_MESSAGES = MAX_MESSAGES + 2 * MAX_STEPS + 2
"""Messages in one model call: a client's conversation, the question, the system message and each
step's reply and tool results."""
MAX_NEW_TOKENS = 8192
"""Tokens one model call may generate."""
DEFAULT_NEW_TOKENS = 256
"""A model call's budget when the request names none."""
MAX_STOPS = 16
"""Stop strings in one model call (each is looked for after every token generated)."""
MAX_STOP_CHARS = 1000
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
ConversationId = Annotated[str, Field(max_length=128)]


def stop_note(stopped: str) -> str | None:
    """What a client shows beside an answer whose agent run did not end on a plain answer."""
    if stopped == "max_steps":
        return ("stopped at the step limit (max_steps in the server config, or the request's max_steps): the model's "
                "last tool call was not run, so its answer may be incomplete")
    if stopped == "parse_error":
        return "the model's reply was not in the turn format; it is shown as it came"
    if stopped == "length":
        return ("the model's reply was cut off before its turn was complete (the token budget, max_new_tokens, or the "
                "model's context ran out); it is shown as it came: raise max_new_tokens, or start a new conversation")
    return None


class TextMessage(BaseModel):
    """One ``{"role", "content"}`` message of a conversation, as the agent keeps it (a model worker
    takes these as composed; the planner refuses a prompt longer than the model's context)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ClientMessage(TextMessage):
    """A message a client sends back in its history."""

    content: str = Field(max_length=MAX_MESSAGE_CHARS)


def as_dicts(messages: list[TextMessage]) -> list[dict[str, str]]:
    return [m.model_dump() for m in messages]
