#!/usr/bin/env python
"""How well a planner copies a box from the question into its segmentation call.

    python scripts/bench_box_copy.py --model demo [--n 20] [--seed 7] [--phrasings train heldout]

Draws a synthetic set with ``--seed`` (the demo planner is trained with seed 0, so any other seed
gives boxes and images it never saw), asks ``--n`` times per phrasing bank to segment a random box in
a training-split image, and reports, from the greedy plan, how many boxes were copied exactly, how
many calls validate, and the mean IoU of the written box with the asked one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import mmedagent  # noqa: F401  - arms the torchvision shim first
from mmedagent.argtypes import at_least


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="planner directory or hub id ('demo': the demo planner)")
    ap.add_argument("--n", type=at_least(1), default=20, help="questions per phrasing bank")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--phrasings", nargs="+", default=["train", "heldout"], choices=["train", "heldout"])
    ap.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=None,
                    help="constrained decoding (default: the model directory's setting)")
    ap.add_argument("--system-prompt", choices=["catalog", "plain", "none"], default=None,
                    help="system message: the tools' catalog, the plain instruction, or none "
                         "(default: the model directory's setting, else the catalog)")
    a = ap.parse_args()

    from pathlib import Path

    from PIL import Image

    from mmedagent.data.synth import drill_records, synth
    from mmedagent.demo import resolve_model
    from mmedagent.evaluation.metrics import box_iou
    from mmedagent.model import load_planner, planner_settings
    from mmedagent.model.loading import ModelNotFoundError, load_config
    from mmedagent.protocol import parse_turn, system_message
    from mmedagent.tools.registry import get_tool, list_tools

    path = resolve_model(a.model)
    try:  # one line, before the model loads: a path that holds no checkpoint, a settings file it cannot serve
        load_config(path)
        settings = planner_settings(path)
        system = system_message(a.system_prompt or settings.get("system_prompt"), list_tools(),
                                settings.get("system_text"))
    except (ModelNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    constrain = a.constrain if a.constrain is not None else bool(settings.get("constrain"))
    planner = load_planner(path, constrain=constrain)
    params = get_tool("segmentation").Params
    with tempfile.TemporaryDirectory() as tmp:
        manifest = synth(tmp, n=a.n + a.n // 4 + 1, seed=a.seed, size=64)  # a.n training images or more
        images = Path(tmp) / manifest["image_folder"]
        print(f"model {a.model}, seed {a.seed}, constrained decoding {constrain}, "
              f"system message {'yes' if system else 'none'}")
        print(f"{'phrasings':<10} {'asked':>5} {'exact':>5} {'valid':>5} {'mean IoU':>8}")
        for bank in a.phrasings:
            records = drill_records(tmp, 1, a.seed, phrasings=bank)[: a.n]  # one random box per image
            exact = valid = 0
            ious = []
            for r in records:
                asked = r.tool_calls()[0].API_params["boxes"][0]
                question = r.conversations[0].value
                messages = [{"role": "user", "content": question}]
                if system:
                    messages.insert(0, {"role": "system", "content": system})
                plan = planner.generate(messages,
                                        Image.open(images / r.images[0]), max_new_tokens=160)
                try:
                    call = next(c for c in parse_turn(plan).actions if c.API_name == "segmentation")
                    written = call.API_params["boxes"][0]
                except (ValueError, StopIteration, KeyError, IndexError, TypeError):
                    ious.append(0.0)
                    continue
                exact += written == asked
                try:
                    params.model_validate({k: v for k, v in call.API_params.items() if k != "image"})
                except ValueError:
                    ious.append(0.0)  # the dispatcher would refuse it
                    continue
                valid += 1
                ious.append(box_iou(written, asked))
            print(f"{bank:<10} {len(records):>5} {exact:>5} {valid:>5} {statistics.fmean(ious):>8.3f}")


if __name__ == "__main__":
    main()
