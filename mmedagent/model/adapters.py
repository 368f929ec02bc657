"""LoRA adapters (peft) on top of a loaded base model: ours and MMedAgent's."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmedagent.hub import is_hub_id

log = logging.getLogger(__name__)


TRAIN_MANIFEST = "mmedagent_train.json"
"""Written by ``train/train_mem.py`` next to its output (``write_manifest``): what it was trained from
(base model, family, template), so nothing is guessed from folder names."""


def _json_in(folder: str | Path, name: str) -> dict[str, Any]:
    """``folder/name`` read as JSON, ``{}`` when there is no such file."""
    f = Path(folder) / name
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model of a LoRA adapter directory.

    Candidates, in order: the training manifest's ``base_model`` (absolute when it was a local path,
    and the original checkpoint when that was in LLaVA layout), then peft's ``base_model_name_or_path``
    (the flag as typed: often relative, or a conversion cache folder). The first that is a local
    path here wins, else the first hub id; a ``ValueError`` naming them when none is usable.
    """
    adapter_dir = Path(adapter_dir)
    candidates = []
    for name, key in ((TRAIN_MANIFEST, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        value = _json_in(adapter_dir, name).get(key)
        if value and value not in candidates:
            candidates.append(str(value))
    local = [c for c in candidates if Path(c).expanduser().exists()]
    hub = [c for c in candidates if is_hub_id(c)]
    if local or hub:
        return (local or hub)[0]
    tried = ", ".join(repr(c) for c in candidates) or "nothing recorded"
    raise ValueError(f"{adapter_dir}: the adapter's base model is not found here ({tried}); pass the base model "
                     f"(--model-base BASE, or load_planner(BASE, adapter={str(adapter_dir)!r}))")


def apply_adapter(model: Any, adapter_dir: str | Path, *, merge: bool = False) -> Any:
    """Stack the LoRA adapter in ``adapter_dir`` on ``model``; with ``merge`` fold it into the weights.

    Our adapters (peft, projector trained through ``modules_to_save``) load as they are.
    MMedAgent/LLaVA LoRA output (original key layout + ``non_lora_trainables.bin``) is rewritten
    for transformers' Llava first, and its projector (with its own activation) is loaded into the
    model — whatever the folder is called. Adapters saved under transformers 4.x (its module names) load
    too (:func:`legacy_key_mapping`). An adapter that does not fit ``model`` (another architecture or size,
    weights with no place in it or missing) is a ``ValueError``, not a half-applied adapter: the recorded
    architecture is checked before anything is loaded; a misfit found while loading leaves ``model`` partly
    changed (load it again before other use).
    """
    from peft import PeftConfig, PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    from mmedagent.model.llava_convert import convert_llava_lora, is_original_lora, load_projector

    adapter_dir = Path(adapter_dir)
    base = getattr(model, "name_or_path", "") or type(model).__name__
    misfit = f"{adapter_dir} does not fit the base model {base}"
    llava = getattr(getattr(model, "model", None), "multi_modal_projector", None) is not None
    original = is_original_lora(adapter_dir, llava)  # (its recorded class, if any, is the LLaVA codebase's)
    trained_on = (_json_in(adapter_dir, "adapter_config.json").get("auto_mapping") or {}).get("base_model_class")
    if not original and trained_on and trained_on != type(model).__name__:
        raise ValueError(f"{misfit}: it was trained on a {trained_on}, the base is a {type(model).__name__}")
    with tempfile.TemporaryDirectory(prefix="mmedagent-lora-") as tmp:
        if original:
            if not llava:
                raise ValueError(f"{adapter_dir} is a LLaVA-layout LoRA but the base model is not a Llava model")
            hidden = model.config.get_text_config().hidden_size
            converted, projector, kind = convert_llava_lora(adapter_dir, tmp, hidden)
            if projector:
                try:
                    load_projector(model, projector, kind)
                except ValueError as e:
                    raise ValueError(f"{misfit}: {e}") from None
            else:
                log.warning("%s holds no projector weights: keeping the base model's projector", adapter_dir.name)
            adapter_dir = converted
        config = PeftConfig.from_pretrained(str(adapter_dir))
        config.inference_mode = True
        # as PeftModel.from_pretrained does, but keeping the load result (what did not load), which it drops
        peft_model = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)(model, config)
        try:
            loaded = peft_model.load_adapter(str(adapter_dir), "default", key_mapping=legacy_key_mapping(model))
        except (RuntimeError, KeyError) as e:  # "size mismatch for …", or a module the base lacks
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            raise ValueError(f"{misfit}: {detail[:300]}") from None
        for keys, what in ((loaded.unexpected_keys, "adapter weights have no place in it"),
                           (loaded.missing_keys, "LoRA weights its config places in the base are not in it")):
            if keys:  # peft would skip the first and leave the second at their initial values
                keys = sorted(keys)
                raise ValueError(f"{misfit}: {len(keys)} {what} ({', '.join(keys[:2])}"
                                 f"{', …' if len(keys) > 2 else ''})")
        peft_model.eval()
        return peft_model.merge_and_unload() if merge else peft_model


def legacy_key_mapping(model: Any) -> dict[str, str] | None:
    """Renames of an adapter's weights from transformers 4.x module names to ``model``'s (Qwen2-VL:
    ``model.layers.*`` → ``model.language_model.layers.*``, ``visual.*`` → ``model.visual.*``), taken from
    transformers' own checkpoint conversion, for the models whose adapters peft does not rename itself
    (it renames Llava's and Mllama's); None when there is nothing to rename."""
    from transformers.conversion_mapping import (
        WeightRenaming, get_checkpoint_conversion_mapping, get_model_conversion_mapping,
    )

    if get_checkpoint_conversion_mapping(model.config.model_type) is not None:
        return None  # peft applies this model type's conversion itself
    renames = {r.source_patterns[0]: r.target_patterns[0] for r in get_model_conversion_mapping(model)
               if type(r) is WeightRenaming and len(r.source_patterns) == 1 and r.source_patterns[0].startswith("^")}
    return renames or None


def merge_lora(model_path: str | Path, model_base: str | Path | None, save_path: str | Path, *,
               dtype: Any = "auto", vision_tower: str | Path | None = None) -> Path:
    """Merge a LoRA adapter (ours or MMedAgent's) into its base and save model + processor, by default in
    the base checkpoint's dtype. ``vision_tower``: a local copy of an original-layout base's CLIP tower.

    The output is a plain transformers checkpoint (an original-layout base comes out converted);
    the projector — from ``modules_to_save`` or ``non_lora_trainables.bin`` — is part of it.
    """
    from mmedagent.model.loading import check_new_output_dir, is_adapter, load_model_and_processor

    if not is_adapter(model_path):
        raise ValueError(f"{model_path} is not a LoRA adapter directory (no adapter_config.json)")
    out = Path(save_path)
    check_new_output_dir(out)  # an adapter's, a base's or an earlier merge's files would mix with the merged model's
    model, processor, _ = load_model_and_processor(model_path, base=model_base, dtype=dtype, device="cpu",
                                                   merge_adapter=True, vision_tower=vision_tower)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = _json_in(model_path, TRAIN_MANIFEST)
    if info:  # keeps the conversation template the adapter was trained with
        (out / TRAIN_MANIFEST).write_text(json.dumps({**info, "lora": False,
                                                      "merged_from": str(Path(model_path).resolve())}, indent=1))
    from mmedagent.model import SETTINGS_FILE

    if (Path(model_path) / SETTINGS_FILE).is_file():  # how to serve it (system prompt, constrain): as the adapter
        shutil.copyfile(Path(model_path) / SETTINGS_FILE, out / SETTINGS_FILE)
    return out


def recorded_template(path: str | Path) -> str | None:
    """The conversation template recorded by training (``mmedagent_train.json``), if any."""
    return _json_in(path, TRAIN_MANIFEST).get("template")


def check_base_family(adapter_dir: str | Path, base: Any, family: str) -> None:
    """A ``ValueError`` when training recorded (``mmedagent_train.json``) another model family for the adapter
    in ``adapter_dir`` than ``base``'s ``family``: its LoRA weights can fit a same-sized base of another family."""
    trained = _json_in(adapter_dir, TRAIN_MANIFEST).get("family")
    if trained and trained != family:
        raise ValueError(f"{adapter_dir} was trained on a {trained} model but the base {base} is {family}: "
                         "pass the base it was trained on (--model-base)")
