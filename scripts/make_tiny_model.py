#!/usr/bin/env python
"""Write a tiny random checkpoint (model + tokenizer + processor) that loads like a real one.

    python scripts/make_tiny_model.py --arch llava --out /tmp/tiny-llava
    python scripts/make_tiny_model.py --arch llava --out /tmp/cpu-llava --preset cpu   # hidden 512, 8 layers, 224 px
"""

import argparse

import mmedagent  # noqa: F401  - arms the torchvision shim first
from mmedagent.model.tiny import ARCHS, PRESETS, make_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    a = ap.parse_args()
    sizes = {k: v for k, v in dict(hidden=a.hidden, layers=a.layers, heads=a.heads, vision_hidden=a.vision_hidden,
                                   vision_layers=a.vision_layers).items() if v is not None}
    try:
        out = make_tiny_model(a.arch, a.out, seed=a.seed, image_size=a.image_size, preset=a.preset, **sizes)
    except ValueError as e:  # sizes that do not fit together: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {a.arch} ({a.preset}) checkpoint to {out}")


if __name__ == "__main__":
    main()
