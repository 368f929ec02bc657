"""Shared fixtures. Everything is tiny and built locally; nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The property tests draw the same examples on every run (a CI run cannot fail on a new draw);
# HYPOTHESIS_PROFILE=explore draws new ones each run, to look for bugs.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import mmedagent  # noqa: E402,F401  - arms the torchvision shim before anything imports torchvision


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random checkpoints by architecture (llava, qwen2_vl, mllama, llama), built once per session."""
    from mmedagent.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = make_tiny_model(arch, root / arch, seed=0)
        return built[arch]

    return get
