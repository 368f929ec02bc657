"""Shared helpers of the training tests: tiny checkpoints, small data sets in every format, launches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN_MEM = ROOT / "train" / "train_mem.py"
QUESTIONS = ["Can you locate the tumor in this MRI image?", "Where is the nodule in this lung CT?",
             "Find the lesion in this brain MRI.", "Locate the fracture in this bone X-ray."]
TARGETS = ["tumor", "nodule", "lesion", "fracture"]


def tool_record(k: int, image: str) -> dict:
    """An MMedAgent-format tool-use record: plan (grounding call) -> tool output -> answer."""
    q, target = QUESTIONS[k % len(QUESTIONS)], TARGETS[k % len(TARGETS)]
    return {"id": f"r{k}", "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{q}"},
        {"from": "gpt", "thoughts": f"I should locate the {target} first.",
         "actions": [{"API_name": "grounding dino", "API_params": {"image": "<imagepath>", "prompts": [target]}}],
         "value": "I will locate it. Please wait."},
        {"from": "human", "value": f"grounding dino output: {{'boxes': [[0.41, 0.54, 0.76, 0.75]], 'logits': [0.95], "
                                   f"'phrases': ['{target}']}}\n\nAnswer my first question: {q}"},
        {"from": "gpt", "thoughts": "The tool found it.", "actions": [],
         "value": f"The {target} is in the lower right region."}]}


TEXT_RECORD = {"id": "t0", "conversations": [
    {"from": "human", "value": "What is the first-line treatment of community-acquired pneumonia?"},
    {"from": "gpt", "value": "Empirical antibiotics, chosen by severity and local resistance."}]}


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n small non-square PNGs (so 'pad' has work to do); returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for k in range(n):
        name = f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (40, 28 + 4 * k, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def write_mmedagent(path: Path, images: list[str], n: int, text_only: int = 0) -> Path:
    records = [tool_record(k, images[k % len(images)]) for k in range(n)] + [TEXT_RECORD] * text_only
    path.write_text(json.dumps(records, indent=1))
    return path


def write_sharegpt(path: Path, folder: Path, n: int) -> Path:
    """LLaMA-Factory sharegpt (``messages`` + ``images`` with absolute paths), one JSON per line."""
    from mmedagent.protocol import Record

    lines = []
    for k in range(n):
        rec = Record.from_dict(tool_record(k, str(folder / f"img{k % 4}.png")))
        role = {"human": "user", "gpt": "assistant"}
        lines.append(json.dumps({"messages": [{"role": role[m.role], "content": m.text()} for m in rec.conversations],
                                 "images": rec.images}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """Images plus the same tool-use records as MMedAgent JSON and as sharegpt JSONL."""
    root = tmp_path_factory.mktemp("train-data")
    images = write_images(root / "images", 4)
    return {"root": root, "images": root / "images",
            "mmedagent": write_mmedagent(root / "mmedagent.json", images, 8),
            "mixed": write_mmedagent(root / "mixed.json", images, 4, text_only=2),
            "sharegpt": write_sharegpt(root / "sharegpt.jsonl", root / "images", 8)}


def write_original_llava_of(llava_dir: Path, out: Path, tower_ref: str | None = None, **layout) -> Path:
    """The tiny transformers LLaVA ``llava_dir`` saved in the original LLaVA layout at ``out``, and its CLIP tower
    at ``out.parent / "clip-tower"``, which ``mm_vision_tower`` names unless ``tower_ref`` is given.
    Returns the tower."""
    from _model_fixtures import write_original_llava
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    tower = out.parent / "clip-tower"
    model.model.vision_tower.save_pretrained(tower)
    AutoProcessor.from_pretrained(llava_dir).image_processor.save_pretrained(tower)
    write_original_llava(model, llava_dir, out, tower_ref or tower, **layout)
    return tower


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env() -> dict[str, str]:
    # one thread per rank: tiny models, 2 shared cores; more threads only fight each other
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def command(args: list[str], ranks: int | None, port: int | None = None) -> list[str]:
    """``deepspeed --num_gpus N train/train_mem.py ...`` (or plain ``python train/train_mem.py`` for None)."""
    if ranks is None:
        return [sys.executable, str(TRAIN_MEM), *args]
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(port or free_port()), str(TRAIN_MEM), *args]


def shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers of the run on ``port`` (one per rank, 66 MB each)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def run_training(args: list[str], ranks: int | None = None, timeout: float = 300) -> str:
    port = free_port()
    proc = subprocess.run(command(args, ranks, port), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          check=False, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{out[-6000:]}"
    assert not shm_buffers(port), "a finished run left its shared-memory buffers in /dev/shm"
    return out


def checkpoint_saved(checkpoint: Path, ranks: int | None) -> bool:
    """Whether every rank has finished writing ``checkpoint``. Rank 0 writes ``trainer_state.json`` last of
    its files, after DeepSpeed's closing barrier; each rank writes its ``rng_state_<rank>.pth`` after that
    barrier too, with no barrier after it: a rank may still be writing its own when ``trainer_state.json``
    appears. A file ``torch.save`` has not finished does not load (its zip directory comes last)."""
    import torch

    if not (checkpoint / "trainer_state.json").is_file():
        return False
    names = ["rng_state.pth"] if not ranks or ranks == 1 else [f"rng_state_{r}.pth" for r in range(ranks)]
    for name in names:
        try:
            torch.load(checkpoint / name, weights_only=False)
        except Exception:  # not there yet, or cut short
            return False
    return True


def run_until(args: list[str], ranks: int | None, checkpoint: Path, timeout: float = 300) -> str:
    """Start training and SIGKILL the whole process group as soon as every rank has saved ``checkpoint``
    (a ``checkpoint-N`` folder): killed mid-run, with that checkpoint whole."""
    fd, name = tempfile.mkstemp(suffix=".log")  # a file, not a pipe: a full pipe would stall the run
    os.close(fd)
    log = Path(name)
    with open(log, "w") as sink:
        port = free_port()
        proc = subprocess.Popen(command(args, ranks, port), cwd=ROOT, env=train_env(), stdout=sink,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not checkpoint_saved(checkpoint, ranks):
                if proc.poll() is not None:
                    raise AssertionError(f"training ended ({proc.returncode}) before {checkpoint.name} was saved:\n"
                                         f"{log.read_text()[-6000:]}")
                assert time.monotonic() < deadline, f"no complete {checkpoint} after {timeout}s"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for buffer in shm_buffers(port):  # a killed rank cannot remove its own
                buffer.unlink(missing_ok=True)
    return log.read_text()


def base_args(model: Path, data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--lora_r", "8", "--lora_alpha", "16",
            "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0",
            "--disable_tqdm", "True", *extra]


def losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
