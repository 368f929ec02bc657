#!/usr/bin/env python
"""Convert an original LLaVA-layout checkpoint (LLaVA-Med v1.x, MMedAgent) to transformers' Llava.

    python scripts/convert_llava_checkpoint.py --src DIR --dst DIR [--vision-tower PATH_OR_ID]

The output loads with plain LlavaForConditionalGeneration.from_pretrained / AutoProcessor.
"""

import argparse
import sys

import mmedagent  # noqa: F401  - arms the torchvision shim first
from mmedagent.model.llava_convert import convert_llava_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="original checkpoint directory (config.json with mm_vision_tower)")
    ap.add_argument("--dst", required=True, help="output directory")
    ap.add_argument("--vision-tower", default=None, help="CLIP vision tower path or id (default: mm_vision_tower)")
    a = ap.parse_args()
    try:
        out = convert_llava_checkpoint(a.src, a.dst, vision_tower=a.vision_tower, tower_option="--vision-tower")
    except (FileNotFoundError, ValueError) as e:  # a bad --src / --vision-tower, or a checkpoint we cannot convert
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {a.src} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
