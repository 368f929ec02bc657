"""LoRA adapters (peft) on top of a loaded base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def apply_adapter(model: Any, adapter_dir: str | Path, *, merge: bool = False) -> Any:
    """Stack the peft adapter in ``adapter_dir`` on ``model``; with ``merge`` fold it into the weights.

    Modules trained in full (``modules_to_save``, e.g. our projector) come back with the adapter.
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return peft_model.merge_and_unload() if merge else peft_model
