#!/usr/bin/env python
"""See mmedagent.model.cli (``python scripts/convert_llava_checkpoint.py --help``); installed, the same command is on the PATH."""

import sys

import mmedagent  # noqa: F401  - arms the torchvision shim first
from mmedagent.model.cli import convert_llava_main

if __name__ == "__main__":
    sys.exit(convert_llava_main())
