"""Weights for every tool of the demo stack, offline: tiny random ones, built once and cached.

``python serve/controller.py`` with no weights configured serves the tools with these (see
``--tool-weights`` in ``docs/serve.md``), so the demo planner's calls reach real tools on a
machine that cannot download the published checkpoints. Grounding DINO, MedSAM, open_clip and the
report model are tiny random models built from configs by :mod:`mmedagent.tools._tiny` (their
outputs are well-formed and meaningless); retrieval keeps its real default, the packaged
all-MiniLM-L6-v2 over ICD-10-CM.

The weights live in ``$MMEDAGENT_CACHE/demo-tools/<key>`` (default ``~/.cache/mmedagent``), where
the key hashes the builders' source and the versions of the libraries that write the files:
changing either builds afresh (and drops the stale copies).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from mmedagent import cache

TINY_NOTE = "tiny random weights — demo only"
REAL_RAG_NOTE = "all-MiniLM-L6-v2 over ICD-10-CM (real)"
WEIGHTS_NOTES = {
    "grounding": TINY_NOTE,
    "segmentation": TINY_NOTE,
    "grounding_segmentation": TINY_NOTE,
    "classification": TINY_NOTE,
    "report_generation": TINY_NOTE,
    "retrieval": REAL_RAG_NOTE,
}
TINY_TOOLS = frozenset(n for n, note in WEIGHTS_NOTES.items() if note == TINY_NOTE)
# Libraries whose save formats the cached files depend on.
_LIBRARIES = ("torch", "transformers", "open_clip_torch", "segment-anything", "safetensors")
_BUILD_VERSION = "1"  # bump when the layout below changes
# Modules whose source builds the files (read, not imported: the key is computed on every start).
_BUILDERS = ("mmedagent.tools._tiny", "mmedagent.model.tiny", __name__)
_DONE = "complete"


def weights_note(tool: str) -> str:
    """What the banner says about a tool's demo weights ("" for tools the demo does not provide)."""
    return WEIGHTS_NOTES.get(tool, "")


def cache_root() -> Path:
    return cache.cache_root("demo-tools")


def _source(module: str) -> bytes:
    loaded = sys.modules.get(module)
    origin = getattr(loaded, "__file__", None) or importlib.util.find_spec(module).origin
    return Path(origin).read_bytes()


def build_key() -> str:
    """Hash of the builders' source (``tools/_tiny.py``, ``mmedagent/model/tiny.py``, this module)
    and the versions of the libraries that write the files."""
    h = hashlib.sha256(_BUILD_VERSION.encode())
    for module in _BUILDERS:
        h.update(_source(module))
    for lib in _LIBRARIES:
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    return h.hexdigest()[:16]


def _options(root: Path) -> dict[str, dict[str, Any]]:
    # a random tiny detector finds boxes everywhere; keep its best one, as on the one-lesion synthetic
    # images the demo planner was trained on
    grounding = {"model": str(root / "grounding-dino"), "max_boxes": 1}
    segmentation = {"checkpoint": str(root / "medsam" / "tiny_medsam.pth"), "variant": "medsam"}
    return {
        "grounding": grounding,
        "segmentation": segmentation,
        "grounding_segmentation": {"grounding": dict(grounding), "segmentation": dict(segmentation)},
        "classification": {"model": str(root / "open-clip")},
        "report_generation": {"model": str(root / "report-llava"), "conv_template": "vicuna_v1", "max_new_tokens": 48},
        "retrieval": {},  # the real default: packaged MiniLM over the ICD-10-CM preset index
    }


def _build(target: Path) -> None:
    import mmedagent  # noqa: F401  - torchvision shim before transformers / open_clip / segment_anything
    from mmedagent.tools import _tiny

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        _tiny.save_tiny_grounding_dino(tmp / "grounding-dino")
        _tiny.save_tiny_sam(tmp / "medsam", "tiny_medsam", variant="medsam")
        _tiny.save_tiny_open_clip(tmp / "open-clip")
        _tiny.save_tiny_report_model(tmp / "report-llava")
        (tmp / _DONE).write_text(TINY_NOTE + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)  # atomic: a concurrent start never sees half the weights
        except OSError:
            if not (target / _DONE).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in target.parent.iterdir():  # copies from older builders
        if stale != target and not stale.name.startswith(".") and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def demo_tool_options(cache_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Constructor options of every built-in tool for the demo stack, keyed by tool name.

    The tiny weights are built on the first call (about 10 s of CPU) under ``cache_dir``
    (default :func:`cache_root`) and reused afterwards.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / build_key()
    if not (target / _DONE).is_file():
        print(f"building tiny demo tool weights into {target} (once)", file=sys.stderr, flush=True)
        _build(target)
    return _options(target)
