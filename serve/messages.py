"""Request-body pieces the controller and the workers share: chat messages and the size limits on them.

The limits keep one request from holding a worker for minutes or exhausting its memory; a prompt
that still exceeds the model's context is refused by the planner itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_QUESTION_CHARS = 20_000
"""A user's question."""
MAX_MESSAGE_CHARS = 100_000
"""Any one message of a conversation (a tool catalog, a tool result, a pasted report)."""
MAX_MESSAGES = 200
"""Messages in one conversation."""
MAX_NEW_TOKENS = 8192
"""Tokens one model call may generate."""


class TextMessage(BaseModel):
    """One ``{"role", "content"}`` message of a conversation, as the agent keeps it."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


def as_dicts(messages: list[TextMessage]) -> list[dict[str, str]]:
    return [m.model_dump() for m in messages]
