"""Where mmedagent keeps what it builds once (demo models, converted checkpoints, RAG indexes):
``$MMEDAGENT_CACHE``, default ``~/.cache/mmedagent``."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MMEDAGENT_CACHE"


def cache_root(*parts: str) -> Path:
    """The cache folder, or a path inside it."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "mmedagent", *parts)
