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

pytest_plugins = ("_train_fixtures",)  # its session fixtures (train_data), declared here as pytest wants it


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


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path for plug-in packages (``hosp_*``) and their dist-info (what ``pip install``
    writes); the registry forgets them afterwards."""
    import sys

    import mmedagent.tools as tools_pkg
    from mmedagent.tools import registry

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_extra", {})
    tools_pkg.refresh()
    before = set(sys.modules)
    yield tmp_path
    for mod in set(sys.modules) - before:
        if mod.startswith("hosp_") or mod in ("mmedagent.tools.organ_volume", "mmedagent.tools.dicom_meta"):
            sys.modules.pop(mod)
    monkeypatch.undo()
    tools_pkg.refresh()
