#!/usr/bin/env python
"""See mmedagent.model.cli (``python scripts/merge_lora_weights.py --help``); installed, the same command is on the PATH."""

import sys

import mmedagent  # noqa: F401  - arms the torchvision shim first
from mmedagent.model.cli import merge_lora_main

if __name__ == "__main__":
    sys.exit(merge_lora_main())
