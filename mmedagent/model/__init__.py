"""The model layer: load any supported vision-language (or text-only) checkpoint as the agent's planner.

Heavy libraries (torch, transformers, peft) are imported inside the functions, so importing this
package is cheap.
"""

from __future__ import annotations

from typing import Any

from mmedagent.model.loading import load_model_and_processor
from mmedagent.model.templates import TEMPLATES, render_prompt, render_segments

__all__ = ["TEMPLATES", "load_model_and_processor", "load_planner", "render_prompt", "render_segments"]


def load_planner(path_or_id: Any, **options: Any) -> Any:
    """Load a :class:`mmedagent.model.planner.HFPlanner` (``"demo"``: the demo planner); see its ``load``
    for the options."""
    from mmedagent.demo import resolve_model
    from mmedagent.model.planner import HFPlanner

    return HFPlanner.load(resolve_model(path_or_id) if isinstance(path_or_id, str) else path_or_id, **options)
