"""One-command fine-tuning recipes on the project's own training, model and serving layers.

``python -m mmedagent.recipes NAME [--tiny] [--out DIR] [--model ID_OR_PATH] [--data SOURCE] ...``
with NAME one of :data:`RECIPES`. See docs/recipes.md.
"""

from __future__ import annotations

import importlib

RECIPES = {
    "radiology-llama32v": "mmedagent.recipes.radiology:RadiologyLlama32V",
    "diagnosis-qwen2vl": "mmedagent.recipes.diagnosis:DiagnosisQwen2VL",
    "dialogue-llama3": "mmedagent.recipes.dialogue:DialogueLlama3",
}


def get_recipe(name: str) -> type:
    """The :class:`~mmedagent.recipes.base.Recipe` subclass called ``name``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    module, cls = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["RECIPES", "get_recipe"]
