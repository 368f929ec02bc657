"""Step time of the training framework vs a bare torch loop on the same LoRA model and batch.

    python scripts/bench_train.py                      # CPU: a "cpu"-preset tiny LLaVA (random weights)
    python scripts/bench_train.py --model PATH --bf16  # any LLaVA checkpoint, e.g. on a GPU

Framework: ``mmedagent.train.run.build_trainer`` (the code path of ``train/train_mem.py``: HF Trainer,
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

import mmedagent  # noqa: F401  - before transformers (torchvision shim)

import torch
from PIL import Image
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: build a cpu-preset tiny LLaVA)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--workers", type=int, default=0, help="data loader workers of the framework run")
    a = ap.parse_args()

    from mmedagent.train.run import build_trainer

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model_path = a.model
    if model_path is None:
        from mmedagent.model.tiny import make_tiny_model

        model_path = str(make_tiny_model("llava", tmp / "model", preset="cpu"))
    from transformers import AutoConfig

    image_size = AutoConfig.from_pretrained(model_path).vision_config.image_size
    data = write_data(tmp, a.batch * (a.steps + a.warmup), image_size)
    total = a.steps + a.warmup
    argv = ["--model_name_or_path", model_path, "--version", "v1", "--data_path", str(data),
            "--image_folder", str(tmp), "--output_dir", str(tmp / "out"), "--per_device_train_batch_size",
            str(a.batch), "--max_steps", str(total), "--lora_r", str(a.lora_r), "--lora_alpha", str(2 * a.lora_r),
            "--lora_dropout", "0", "--learning_rate", "1e-4", "--mm_projector_lr", "2e-5", "--save_strategy", "no",
            "--report_to", "none", "--logging_steps", str(10**6), "--disable_tqdm", "True",
            "--dataloader_num_workers", str(a.workers), "--bf16", str(a.bf16), "--seed", "0"]

    trainer, _ = build_trainer(argv)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    framework = statistics.median(timer.times[a.warmup:])

    # bare loop: a freshly prepared model (same seed), the same batch every step
    trainer2, _ = build_trainer(argv)
    model = trainer2.model.to(trainer2.args.device).train()
    batch = trainer2.data_collator([trainer2.train_dataset[i] for i in range(a.batch)])
    batch = {k: v.to(trainer2.args.device) for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(trainer2.args.device.type, dtype=torch.bfloat16, enabled=a.bf16)
    times = []
    for _ in range(total):
        StepTimer._sync()
        t = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        StepTimer._sync()
        times.append(time.perf_counter() - t)
    bare = statistics.median(times[a.warmup:])

    tokens = int(batch["attention_mask"].sum())
    result = {"device": str(trainer2.args.device), "torch_threads": torch.get_num_threads(), "batch": a.batch,
              "tokens_per_batch": tokens, "framework_step_s": round(framework, 4), "bare_step_s": round(bare, 4),
              "ratio": round(framework / bare, 3)}
    if torch.cuda.is_available():
        # LoRA on a frozen base: forward (2N) + activation gradients (2N) per token; weight gradients
        # only for the small adapters, ignored. Vision tokens counted like text tokens (approximate).
        n_params = sum(p.numel() for p in model.parameters())
        peak = matmul_peak_tflops()
        result.update(matmul_peak_tflops=round(peak, 1),
                      mfu=round(4 * n_params * tokens / framework / 1e12 / peak, 4))
    print(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main()
