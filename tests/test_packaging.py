"""The package as a hospital installs it: the sdist, the wheel built from it (as ``python -m build`` does), and
that wheel installed with ``pip --target`` and run from a folder outside the source tree."""

import importlib.metadata as md
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TREE = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "DEVELOPERS.md", "BENCHMARKS.md", "constraints.txt",
        "mmedagent", "tools", "train", "serve", "data", "docs", "scripts", "tests")
"""What the sdist is built from (the tracked top level; not .venv, caches or build output)."""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _build(backend_call: str, src: Path, out: Path) -> Path:
    code = f"from setuptools import build_meta as b; print(b.{backend_call}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel): the sdist of a copy of the tree, and the wheel built from the unpacked sdist."""
    try:
        setuptools = Version(md.version("setuptools"))
    except md.PackageNotFoundError:
        pytest.skip("setuptools is not installed")
    if setuptools < Version("70.1") and importlib.util.find_spec("wheel") is None:
        pytest.skip("no bdist_wheel: setuptools >= 70.1 or the wheel package is needed")
    root = tmp_path_factory.mktemp("packaging")
    src, out = root / "src", root / "dist"
    out.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for name in TREE:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    sdist = _build("build_sdist", src, out)
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (root / "unpacked").iterdir()
    return sdist, _build("build_wheel", unpacked, out)


@pytest.fixture(scope="session")
def metadata(dists):
    wheel = zipfile.ZipFile(dists[1])
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return Parser().parsestr(wheel.read(name).decode())


def test_the_wheel_holds_the_mmedagent_package_only_with_its_run_time_data(dists):
    names = zipfile.ZipFile(dists[1]).infolist()
    top = {n.filename.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"mmedagent"}  # no top-level tools/, train/, tests/ ...
    files = {n.filename for n in names}
    for module in ("tools/registry.py", "train/train_mem.py", "serve/controller.py", "data/__main__.py",
                   "recipes/__main__.py", "model/tiny.py", "evaluation/cli.py", "train/deepspeed/zero2.json",
                   "train/deepspeed/zero3.json", "train/deepspeed/zero3_offload.json"):
        assert f"mmedagent/{module}" in files
    demo = {f"mmedagent/assets/demo/{p.name}" for p in (ROOT / "mmedagent" / "assets" / "demo").iterdir()}
    assert demo <= files  # the shipped demo planner, complete
    big = [(n.filename, n.file_size) for n in names if n.file_size > 10 * 2**20]
    assert not big, f"files over 10 MB in the wheel: {big}"


def test_the_sdist_carries_what_installing_testing_and_training_from_it_need(dists):
    members = {m.split("/", 1)[1] for m in tarfile.open(dists[0]).getnames() if "/" in m}
    for needed in ("constraints.txt", "tests/conftest.py", "tests/_model_fixtures.py", "tests/doubles.py",
                   "scripts/zero2.json", "scripts/zero3.json", "scripts/evaluate.py", "docs/train.md",
                   "mmedagent/assets/demo/model.safetensors"):
        assert needed in members, f"{needed} is missing from the sdist (MANIFEST.in)"
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]


def test_the_metadata_asks_for_a_python_that_every_pinned_dependency_supports(metadata):
    """A ``pip install`` on an older Python must stop at mmedagent's Requires-Python, not at a pin it cannot
    resolve (``No matching distribution found for transformers==...``)."""
    ours = SpecifierSet(metadata["Requires-Python"])
    oldest = next(v for v in (f"3.{minor}" for minor in range(8, 30)) if v in ours)
    refused = []
    for line in metadata.get_all("Requires-Dist"):
        req = Requirement(line)
        pinned = [s.version for s in req.specifier if s.operator == "=="]
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        needs = dist.metadata["Requires-Python"]
        if pinned and dist.version == pinned[0] and needs and oldest not in SpecifierSet(needs):
            refused.append(f"{req.name}=={dist.version} needs Python {needs}")
    assert not refused, f"Requires-Python {ours} admits Python {oldest}, but: {sorted(set(refused))}"


def test_pins_agree_with_constraints_and_every_extra_installs_with_plain_pip(metadata):
    constraints = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            constraints[canonicalize_name(req.name)] = req.specifier
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist")]
    for req in requirements:
        pinned = [s.version for s in req.specifier if s.operator == "=="]
        if pinned and canonicalize_name(req.name) in constraints:
            assert pinned[0] in constraints[canonicalize_name(req.name)], f"{req} disagrees with constraints.txt"
    # flash-attn's build imports torch, so pip's isolated build of it fails: in an extra it fails the whole install
    assert "flash-attn" not in {canonicalize_name(r.name) for r in requirements}


@pytest.fixture(scope="session")
def installed(dists, tmp_path_factory):
    """The wheel installed with ``pip install --no-deps --target`` (dependencies: this environment's)."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed")
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                           str(target), str(dists[1])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**ENV, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_installed_package_runs_from_outside_the_source_tree(installed, tmp_path):
    check = ("import mmedagent, mmedagent.serve.controller, mmedagent.tools\n"
             "from mmedagent import demo\n"
             "from mmedagent.model import load_planner\n"
             "assert mmedagent.__file__.startswith(%r), mmedagent.__file__\n"
             "assert demo.is_built(demo.PACKAGED)\n"
             "load_planner(str(demo.PACKAGED))\n"
             "print(sorted(t.name for t in mmedagent.tools.list_tools()))\n" % str(installed))
    proc = run_installed(installed, tmp_path, "-c", check)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'retrieval', 'segmentation'" in proc.stdout
    proc = run_installed(installed, tmp_path, "-m", "mmedagent.data", "synth", "--out", "synth", "--n", "2")
    assert proc.returncode == 0 and (tmp_path / "synth" / "train.json").is_file(), proc.stderr[-3000:]
    for args, says in ((["-m", "mmedagent.recipes", "--list"], "diagnosis-qwen2vl"),
                       (["-m", "mmedagent.tools.rag", "--help"], "usage:")):
        proc = run_installed(installed, tmp_path, *args)
        assert proc.returncode == 0 and says in proc.stdout, proc.stderr[-3000:]


def test_every_console_script_starts_from_the_installed_package(installed, tmp_path):
    scripts = sorted(p.name for p in (installed / "bin").iterdir())
    # the controller, then scripts/evaluate.py, make_tiny_model.py, convert_llava_checkpoint.py, merge_lora_weights.py
    assert {"mmedagent-serve", "mmedagent-eval", "mmedagent-make-tiny-model", "mmedagent-convert-llava",
            "mmedagent-merge-lora"} <= set(scripts)
    for name in scripts:
        proc = run_installed(installed, tmp_path, str(installed / "bin" / name), "--help")
        assert proc.returncode == 0 and f"usage: {name}" in proc.stdout, f"{name}: {proc.stderr[-3000:]}"
    proc = run_installed(installed, tmp_path, str(installed / "bin" / "mmedagent-make-tiny-model"), "--arch", "llama",
                         "--out", "tiny")
    assert proc.returncode == 0 and (tmp_path / "tiny" / "config.json").is_file(), proc.stderr[-3000:]


def test_deepspeed_is_told_a_machine_without_accelerators_is_cpu_only(tmp_path, monkeypatch):
    """DeepSpeed printed "Setting accelerator to CPU ..." on stdout, where the serving scripts print only their
    addresses and ready line; a machine with an accelerator device, or a value already set, is left alone."""
    import mmedagent

    monkeypatch.setattr(mmedagent, "ACCELERATOR_DEVICES", (str(tmp_path / "nvidia*"),))
    env = {}
    mmedagent.cpu_only_deepspeed(env, "linux")
    assert env == {"DS_ACCELERATOR": "cpu"}
    env = {"DS_ACCELERATOR": "xpu"}
    mmedagent.cpu_only_deepspeed(env, "linux")
    assert env == {"DS_ACCELERATOR": "xpu"}
    (tmp_path / "nvidia0").touch()
    env = {}
    mmedagent.cpu_only_deepspeed(env, "linux")
    assert env == {}
    (tmp_path / "nvidia0").unlink()
    mmedagent.cpu_only_deepspeed(env, "darwin")  # Apple's MPS has no device file
    assert env == {}


def test_wrapping_a_model_in_lora_prints_no_library_deprecation_warning():
    """peft read transformers' deprecated ``is_gradient_checkpointing`` on every wrap: a FutureWarning after every
    merge, recipe and adapter load."""
    script = ("import mmedagent\n"
              "from peft import LoraConfig, get_peft_model\n"
              "from transformers import LlamaConfig, LlamaForCausalLM\n"
              "model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,\n"
              "    num_attention_heads=2, num_key_value_heads=2, vocab_size=64))\n"
              "get_peft_model(model, LoraConfig(target_modules=['q_proj']))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is_gradient_checkpointing" not in proc.stderr
