#!/usr/bin/env python
"""Merge a LoRA adapter into its base model and save a standalone checkpoint (model + processor).

    python scripts/merge_lora_weights.py --model-path ADAPTER --model-base BASE --save-model-path OUT

Works for mmedagent's adapters (peft, projector in modules_to_save) and MMedAgent/LLaVA LoRA
output (adapter_model.bin + non_lora_trainables.bin): the projector is always kept, whatever
the folder is called. An original LLaVA-layout base is converted to the transformers layout.
"""

import argparse

import mmedagent  # noqa: F401  - arms the torchvision shim first
from mmedagent.model.adapters import merge_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="LoRA adapter directory")
    ap.add_argument("--model-base", default=None, help="base model (default: the one the adapter records: its "
                    "training manifest's base_model, else peft's base_model_name_or_path)")
    ap.add_argument("--save-model-path", required=True, help="output directory")
    ap.add_argument("--vision-tower", default=None, help="an original LLaVA base's CLIP tower, when its "
                    "mm_vision_tower (a hub id) cannot be loaded here: a local folder")
    ap.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: auto, the base checkpoint's "
                    "own dtype; float32 takes twice the memory and disk of a float16 base)")
    a = ap.parse_args()
    try:
        out = merge_lora(a.model_path, a.model_base, a.save_model_path, dtype=a.dtype, vision_tower=a.vision_tower)
    except (OSError, ValueError) as e:  # not an adapter, base not found: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
    print(f"merged {a.model_path} into {a.model_base or 'its base'} -> {out}")


if __name__ == "__main__":
    main()
