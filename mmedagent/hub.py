"""Hugging Face Hub access on machines that cannot reach it (air-gapped hospital servers).

Without this, every file of a hub id is retried five times over ~25 s before the Hub client falls
back to its cache, so a cached model takes minutes to load offline and a missing one minutes to
fail. :func:`prefer_cache_when_unreachable` probes the Hub once per process instead and, when it
cannot be reached, switches the process (and its children) to offline mode: cached ids load at
once, and missing ones fail at once with the loader's own "not in the cached files" error.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
"""File names ending so are checkpoints on disk, never hub ids."""


def is_hub_id(ref: str | os.PathLike) -> bool:
    """Whether a model reference names a Hub repo (``org/name``, ``hf-hub:org/name``) rather than a local
    path (existing, explicitly relative or absolute, or a checkpoint file name)."""
    text = str(ref)
    if text.startswith("hf-hub:"):
        return True
    if ":" in text or text.startswith((".", "/", "~")) or Path(text).expanduser().exists():
        return False  # a local path, a URL, or another library's scheme (``local-dir:``)
    return text.count("/") <= 1 and bool(text.strip("/")) and Path(text).suffix not in WEIGHT_SUFFIXES


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hub endpoint answers at all (any HTTP status), probed once per process."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        return False
    return True


def prefer_cache_when_unreachable(*refs: str | os.PathLike | None) -> None:
    """Before loading ``refs``: if one is a hub id and the Hub cannot be reached, go offline.

    A no-op when every ref is local or offline mode is already on (``HF_HUB_OFFLINE=1``).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not any(r is not None and is_hub_id(r) for r in refs):
        return
    if hub_reachable():
        return
    log.warning("%s cannot be reached: hub ids load from the local cache only (as with HF_HUB_OFFLINE=1)", constants.ENDPOINT)
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
