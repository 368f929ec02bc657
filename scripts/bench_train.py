"""Step time of the training framework vs a bare torch loop on the same LoRA model and batch.

    python scripts/bench_train.py                      # CPU: a "cpu"-preset tiny LLaVA (random weights)
    python scripts/bench_train.py --model PATH --bf16  # any LLaVA checkpoint, e.g. on a GPU

Framework and bare steps alternate (a callback runs one bare step after each framework step), so
both see the same machine load. Framework: ``mmedagent.train.run.build_trainer`` (the code path of ``train/train_mem.py``: HF Trainer,
data loader with lazy tokenisation + image decoding, peft LoRA, projector learning-rate group,
gradient clipping, LR schedule). Bare: the same prepared model, one pre-collated batch, and
``forward / backward / AdamW step / zero_grad``. Every record is identical, so both see the same
batch shape. On CUDA it also reports MFU against a measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mmedagent  # noqa: F401, I001  - before transformers (arms the torchvision shim)
from mmedagent.argtypes import at_least
import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._sync()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        self.times.append(time.perf_counter() - self._t)

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()


class BareStep(TrainerCallback):
    """After each framework step, one bare ``forward / backward / AdamW step / zero_grad`` on its own model."""

    def __init__(self, model, batch, bf16: bool):
        self.model, self.batch, self.bf16 = model, batch, bf16
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kw):
        StepTimer._sync()
        t = time.perf_counter()
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        StepTimer._sync()
        self.times.append(time.perf_counter() - t)


def write_data(root: Path, n: int, image_size: int) -> Path:
    from mmedagent.train.fixture import PLANNER_CASES

    case = PLANNER_CASES[0]
    case.image().resize((image_size, image_size)).save(root / "case.png")
    (root / "train.json").write_text(json.dumps([case.record("case.png").to_dict()] * n))
    return root / "train.json"


def matmul_peak_tflops(dtype=torch.bfloat16, n: int = 8192, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def image_size(model: str) -> int:
    """The vision tower's input size of a LLaVA checkpoint; one ``error:`` line (exit 2) if it cannot be read."""
    from mmedagent.model.loading import ModelNotFoundError, load_config

    try:
        config = load_config(model)
    except (ModelNotFoundError, ValueError) as e:
        fail(str(e))
    size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if not isinstance(size, int):
        fail(f"{model}: not a LLaVA checkpoint (its config has no vision_config.image_size)")
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="LLaVA checkpoint (default: build a cpu-preset tiny LLaVA)")
    ap.add_argument("--batch", type=at_least(1), default=4)
    ap.add_argument("--steps", type=at_least(1), default=12, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--lora_r", type=at_least(1), default=16)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--workers", type=at_least(0), default=0, help="data loader workers of the framework run")
    a = ap.parse_args()
    if a.model is not None:
        image_size(a.model)  # before anything is built
    with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:  # the model, data and run: removed after
        print(json.dumps(bench(a, Path(folder))))


def bench(a: argparse.Namespace, tmp: Path) -> dict:
    """The framework's and the bare loop's step times, built and run in ``tmp``."""
    from mmedagent.train.run import build_trainer

    model_path = a.model
    if model_path is None:
        from mmedagent.model.tiny import make_tiny_model

        model_path = str(make_tiny_model("llava", tmp / "model", preset="cpu"))
    data = write_data(tmp, a.batch * (a.steps + a.warmup), image_size(model_path))
    total = a.steps + a.warmup
    argv = ["--model_name_or_path", model_path, "--version", "v1", "--data_path", str(data),
            "--image_folder", str(tmp), "--output_dir", str(tmp / "out"), "--per_device_train_batch_size",
            str(a.batch), "--max_steps", str(total), "--lora_r", str(a.lora_r), "--lora_alpha", str(2 * a.lora_r),
            "--lora_dropout", "0", "--learning_rate", "1e-4", "--mm_projector_lr", "2e-5", "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", str(10**6), "--disable_tqdm", "True",
            "--dataloader_num_workers", str(a.workers), "--bf16", str(a.bf16), "--seed", "0"]

    # bare loop: a second, identically prepared model (same seed) and one pre-collated batch
    bare_trainer, _ = build_trainer(argv)
    model = bare_trainer.model.to(bare_trainer.args.device).train()
    batch = bare_trainer.data_collator([bare_trainer.train_dataset[i] for i in range(a.batch)])
    batch = {k: v.to(bare_trainer.args.device) for k, v in batch.items()}
    bare = BareStep(model, batch, a.bf16)

    trainer, _ = build_trainer(argv)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.add_callback(bare)  # runs after the timer: framework and bare steps alternate, under the same load
    trainer.train()
    framework_s = statistics.median(timer.times[a.warmup:])
    bare_s = statistics.median(bare.times[a.warmup:])

    tokens = int(batch["attention_mask"].sum())
    result = {"device": str(trainer.args.device), "torch_threads": torch.get_num_threads(), "batch": a.batch,
              "tokens_per_batch": tokens, "framework_step_s": round(framework_s, 4), "bare_step_s": round(bare_s, 4),
              "ratio": round(framework_s / bare_s, 3)}
    if torch.cuda.is_available():
        # LoRA on a frozen base: forward (2N) + activation gradients (2N) per token; weight gradients
        # only for the small adapters, ignored. Vision tokens counted like text tokens (approximate).
        n_params = sum(p.numel() for p in model.parameters())
        peak = matmul_peak_tflops()
        result.update(matmul_peak_tflops=round(peak, 1),
                      mfu=round(4 * n_params * tokens / framework_s / 1e12 / peak, 4))
    return result


if __name__ == "__main__":
    main()
