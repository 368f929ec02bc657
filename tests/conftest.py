"""Shared fixtures. Everything is tiny and built locally; nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mmedagent  # noqa: E402,F401  - arms the torchvision shim before anything imports torchvision
