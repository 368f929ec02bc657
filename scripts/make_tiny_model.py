#!/usr/bin/env python
"""See mmedagent.model.cli (``python scripts/make_tiny_model.py --help``); installed, the same command is on the PATH."""

import sys

import mmedagent  # noqa: F401  - arms the torchvision shim first
from mmedagent.model.cli import make_tiny_model_main

if __name__ == "__main__":
    sys.exit(make_tiny_model_main())
