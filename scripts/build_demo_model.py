#!/usr/bin/env python
"""Build the embedded demo planner (see mmedagent/demo.py and docs/eval.md).

    python scripts/build_demo_model.py [--out DIR] [--budget-s 900] [--n-images 80]
    python scripts/build_demo_model.py --reevaluate [--out DIR]   # after a change to decoding or scoring

Default output: $MMEDAGENT_CACHE/demo (~/.cache/mmedagent/demo). Prints the held-out report.
"""

import argparse
import sys
from pathlib import Path

import mmedagent  # noqa: F401  - arms the torchvision shim before anything imports torchvision
from mmedagent import demo
from mmedagent.evaluation.scoring import markdown_summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default {demo.demo_dir()})")
    p.add_argument("--budget-s", type=float, default=900.0, help="stop training rounds after about this long")
    p.add_argument("--n-images", type=int, default=80, help="synthetic images (1/5 go to the evaluation split)")
    p.add_argument("--round-epochs", type=int, default=3, help="epochs per training round")
    p.add_argument("--variants", type=int, default=2, help="training records per tool-use example (new phrasings)")
    p.add_argument("--box-variants", type=int, default=None,
                   help="training records per box-prompted segmentation example (default: --variants)")
    p.add_argument("--box-drills", type=int, default=demo.BOX_DRILLS,
                   help="planning-only records per box-prompted segmentation example, each copying a random box "
                        "(drawn anew every epoch)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reevaluate", action="store_true",
                   help="do not train: evaluate the built model (--out, default the demo model) again on the "
                        "held-out split of its build and replace its report")
    a = p.parse_args()
    if a.reevaluate:
        report = demo.reevaluate(a.out)
        print(markdown_summary(report))
        return 0 if report["routes"] else 1
    report = demo.build(a.out, n_images=a.n_images, budget_s=a.budget_s, round_epochs=a.round_epochs, lr=a.lr,
                        seed=a.seed, variants=a.variants, box_variants=a.box_variants,
                        box_drills=a.box_drills)
    print(markdown_summary(report))
    print(f"routes: {report['routes']} (targets {report['targets']}); built in {report['build']['elapsed_s']} s",
          file=sys.stderr)
    return 0 if report["routes"] else 1


if __name__ == "__main__":
    sys.exit(main())
