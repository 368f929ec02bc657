#!/usr/bin/env python
"""Evaluate a planner's tool use and answers, or compare two reports.

    python scripts/evaluate.py --model PATH_OR_URL|demo --data FILE [--image-folder DIR]
        [--tool-mode live|gold] [--tools NAME ...] [--json-out FILE] [--out RUN_DIR [--resume]]
    python scripts/evaluate.py --predictions PREDICTIONS.jsonl --data FILE [--tool-mode live|gold] [--json-out FILE]
    python scripts/evaluate.py --compare A.json B.json --out DIR

See docs/eval.md; the logic lives in mmedagent.evaluation.
"""

import sys

import mmedagent  # noqa: F401  - arms the torchvision shim before anything imports torchvision
from mmedagent.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
