"""The model layer: load any supported vision-language (or text-only) checkpoint as the agent's planner.

Heavy libraries (torch, transformers, peft) are imported inside the functions, so importing this
package is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmedagent.model.loading import load_model_and_processor
from mmedagent.model.templates import TEMPLATES, render_prompt, render_segments

__all__ = ["SETTINGS_FILE", "TEMPLATES", "load_model_and_processor", "load_planner", "planner_settings", "render_prompt",
           "render_segments"]

SETTINGS_FILE = "mmedagent.json"
"""How to serve a model directory, e.g. ``{"system_prompt": "plain", "constrain": true}``."""


def planner_settings(path: Any) -> dict[str, Any]:
    """A local model directory's :data:`SETTINGS_FILE`, or ``{}``."""
    f = Path(str(path)) / SETTINGS_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def load_planner(path_or_id: Any, **options: Any) -> Any:
    """Load a :class:`mmedagent.model.planner.HFPlanner` (``"demo"``: the demo planner); see its ``load``
    for the options."""
    from mmedagent.demo import resolve_model
    from mmedagent.model.planner import HFPlanner

    return HFPlanner.load(resolve_model(path_or_id) if isinstance(path_or_id, str) else path_or_id, **options)
