"""The model layer's commands: ``scripts/make_tiny_model.py``, ``scripts/convert_llava_checkpoint.py`` and
``scripts/merge_lora_weights.py`` in a checkout, ``mmedagent-make-tiny-model``, ``mmedagent-convert-llava`` and
``mmedagent-merge-lora`` once installed. Each prints one ``error:`` line (exit status 2) for bad input."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

MAKE_TINY = """Write a tiny random checkpoint (model + tokenizer + processor) that loads like a real one.

    python scripts/make_tiny_model.py --arch llava --out /tmp/tiny-llava      (installed: mmedagent-make-tiny-model)
    python scripts/make_tiny_model.py --arch llava --out /tmp/cpu-llava --preset cpu   # hidden 512, 8 layers, 224 px
"""

CONVERT = """Convert an original LLaVA-layout checkpoint (LLaVA-Med v1.x, MMedAgent) to transformers' Llava.

    python scripts/convert_llava_checkpoint.py --src DIR --dst DIR [--vision-tower PATH_OR_ID]
    (installed: mmedagent-convert-llava)

The output loads with plain LlavaForConditionalGeneration.from_pretrained / AutoProcessor.
"""

MERGE = """Merge a LoRA adapter into its base model and save a standalone checkpoint (model + processor).

    python scripts/merge_lora_weights.py --model-path ADAPTER --model-base BASE --save-model-path OUT
    (installed: mmedagent-merge-lora)

Works for mmedagent's adapters (peft, projector in modules_to_save) and MMedAgent/LLaVA LoRA
output (adapter_model.bin + non_lora_trainables.bin): the projector is always kept, whatever
the folder is called. An original LLaVA-layout base is converted to the transformers layout.
"""


def _parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def _error(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def make_tiny_model_main(argv: Sequence[str] | None = None) -> int:
    from mmedagent.model.tiny import ARCHS, PRESETS, make_tiny_model

    ap = _parser(MAKE_TINY)
    ap.add_argument("--arch", required=True, choices=ARCHS)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="size preset (default: tiny)")
    ap.add_argument("--hidden", type=int, help="text hidden size")
    ap.add_argument("--layers", type=int, help="text layers")
    ap.add_argument("--heads", type=int, help="text attention heads")
    ap.add_argument("--vision-hidden", type=int, help="vision hidden size")
    ap.add_argument("--vision-layers", type=int, help="vision layers")
    ap.add_argument("--image-size", type=int, help="vision input side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sizes = {k: v for k, v in dict(hidden=a.hidden, layers=a.layers, heads=a.heads, vision_hidden=a.vision_hidden,
                                   vision_layers=a.vision_layers).items() if v is not None}
    try:
        out = make_tiny_model(a.arch, a.out, seed=a.seed, image_size=a.image_size, preset=a.preset, **sizes)
    except ValueError as e:  # sizes that do not fit together
        return _error(e)
    print(f"wrote {a.arch} ({a.preset}) checkpoint to {out}")
    return 0


def convert_llava_main(argv: Sequence[str] | None = None) -> int:
    from mmedagent.model.llava_convert import convert_llava_checkpoint

    ap = _parser(CONVERT)
    ap.add_argument("--src", required=True, help="original checkpoint directory (config.json with mm_vision_tower)")
    ap.add_argument("--dst", required=True, help="output directory")
    ap.add_argument("--vision-tower", default=None, help="CLIP vision tower path or id (default: mm_vision_tower)")
    a = ap.parse_args(argv)
    try:
        out = convert_llava_checkpoint(a.src, a.dst, vision_tower=a.vision_tower, tower_option="--vision-tower")
    except (FileNotFoundError, ValueError) as e:  # a bad --src / --vision-tower, or a checkpoint we cannot convert
        return _error(e)
    print(f"converted {a.src} -> {out}")
    return 0


def merge_lora_main(argv: Sequence[str] | None = None) -> int:
    from mmedagent.model.adapters import merge_lora

    ap = _parser(MERGE)
    ap.add_argument("--model-path", required=True, help="LoRA adapter directory")
    ap.add_argument("--model-base", default=None, help="base model (default: the one the adapter records: its "
                    "training manifest's base_model, else peft's base_model_name_or_path)")
    ap.add_argument("--save-model-path", required=True, help="output directory")
    ap.add_argument("--vision-tower", default=None, help="an original LLaVA base's CLIP tower, when its "
                    "mm_vision_tower (a hub id) cannot be loaded here: a local folder")
    ap.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: auto, the base checkpoint's "
                    "own dtype; float32 takes twice the memory and disk of a float16 base)")
    a = ap.parse_args(argv)
    try:
        out = merge_lora(a.model_path, a.model_base, a.save_model_path, dtype=a.dtype, vision_tower=a.vision_tower)
    except (OSError, ValueError) as e:  # not an adapter, base not found
        return _error(e)
    print(f"merged {a.model_path} into {a.model_base or 'its base'} -> {out}")
    return 0
