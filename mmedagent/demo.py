"""The embedded demo planner: a small LLaVA trained on the synthetic set until it routes.

``demo`` names it everywhere (``--model demo``, ``--model-path demo``): :func:`resolve_model`
turns the name into the cached directory, building it first when it is missing. The directory is
``$MMEDAGENT_CACHE/demo`` (default ``~/.cache/mmedagent/demo``) and holds the checkpoint,
``mmedagent.json`` (how to serve it: without a system message, as it was trained) and
``eval_report.json`` / ``eval_report.md`` (its held-out evaluation). It is a demonstration model
trained on synthetic images — not a medical device.

Building (:func:`build`, ``python scripts/build_demo_model.py``): synthesise the set with
``mmedagent.data.synth``, make a random LLaVA with ``mmedagent.model.tiny``, train it with the
project's own ``train/train_mem.py`` (full fine-tuning, CPU), and evaluate it after every round on
the evaluation split restricted to questions whose wording never occurs in training, until
tool-selection accuracy and argument validity reach the targets or the time budget runs out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mmedagent.cache import cache_root
from mmedagent.model import SETTINGS_FILE

NOTE = "demonstration model trained on synthetic images, one question per conversation — not a medical device"
"""Shown beside its answers: it was trained on single questions, so follow-ups in a conversation go astray."""
REPORT_FILE = "eval_report.json"

# ~4M parameters; 64 px images in 16 px patches -> 16 image tokens. The tokenizer is trained on the
# synthetic texts too, which shortens sequences by a third (CPU time is the budget here).
SIZES = {"hidden": 256, "layers": 4, "heads": 4, "vision_hidden": 128, "vision_layers": 2, "patch": 16}
IMAGE_SIZE = 64
BOX_DRILLS = 8
TARGETS = {"tool_selection_accuracy": 0.95, "argument_validity": 0.99}


PACKAGED = Path(__file__).parent / "assets" / "demo"
"""The demo model shipped with the package (small enough to commit); a local build takes precedence."""


def demo_dir() -> Path:
    """Where ``build`` writes the demo model by default."""
    return cache_root() / "demo"


def _locations() -> tuple[Path, Path]:
    return demo_dir(), PACKAGED


def is_built(path: Path | None = None) -> bool:
    """Whether ``path`` (default: the local build or the shipped copy) holds a demo model."""
    if path is None:
        return any(is_built(p) for p in _locations())
    return (path / "config.json").is_file() and (path / SETTINGS_FILE).is_file()


def demo_model_path(build_if_missing: bool = True) -> Path:
    """The demo model's directory: the local build, else the shipped copy, else built now (~15 min on 2 cores)."""
    for path in _locations():
        if is_built(path):
            return path
    if not build_if_missing:
        raise FileNotFoundError(f"the demo model is not built yet ({demo_dir()}); run: python scripts/build_demo_model.py")
    build(demo_dir())
    return demo_dir()


model_path = demo_model_path  # the name serve/model_worker.py looks up


def resolve_model(name_or_path: str) -> str:
    """``demo`` -> the demo model's directory (built if missing); anything else unchanged."""
    return str(demo_model_path()) if name_or_path == "demo" else name_or_path


def demo_report(path: Path | None = None) -> dict[str, Any] | None:
    """The demo model's evaluation report (for the UI banner), or ``None`` if not built."""
    if path is None:
        if not is_built():
            return None
        path = demo_model_path(build_if_missing=False)
    f = path / REPORT_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def heldout_records(train_file: Path, eval_file: Path, out: Path) -> int:
    """Write the evaluation records whose first question never occurs in training; returns the count."""
    from mmedagent.protocol import Record

    def first(d: dict[str, Any]) -> str:
        return Record.from_dict(d).first_question()

    seen = {first(d) for d in json.loads(train_file.read_text(encoding="utf-8"))}
    kept = [d for d in json.loads(eval_file.read_text(encoding="utf-8")) if first(d) not in seen]
    out.write_text(json.dumps(kept, indent=1), encoding="utf-8")
    return len(kept)


def bf16_is_faster() -> bool:
    """Whether this CPU multiplies in bfloat16 clearly faster than in float32 (native bf16 instructions)."""
    import torch

    def seconds(dtype: Any) -> float:
        a = torch.randn(256, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b  # warm-up
        times = []
        for _ in range(5):  # the best of five: a busy moment on a shared machine must not decide it
            t0 = time.perf_counter()
            for _ in range(5):
                a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    return seconds(torch.bfloat16) < 0.7 * seconds(torch.float32)


def train_round(base: Path, out: Path, data: Path, images: Path, epochs: float, lr: float, batch: int,
                bf16: bool = False) -> None:
    """One round of ``train/train_mem.py`` (full fine-tuning on CPU, in bfloat16 if asked) from ``base``
    into ``out``."""
    cmd = [
        sys.executable, "-m", "mmedagent.train.train_mem",
        "--model_name_or_path", str(base), "--data_path", str(data), "--image_folder", str(images),
        "--output_dir", str(out), "--lora_enable", "False", "--num_train_epochs", str(epochs),
        "--per_device_train_batch_size", str(batch), "--learning_rate", str(lr),
        "--lr_scheduler_type", "constant_with_warmup", "--warmup_ratio", "0.05", "--weight_decay", "0.0",
        "--save_strategy", "no", "--report_to", "none", "--group_by_modality_length", "True",
        "--logging_steps", "20", "--model_max_length", "512", "--use_cpu", "True", "--dataloader_num_workers", "0",
        "--seed", "0", "--bf16", str(bf16),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env)


def evaluate_dir(model: Path, data: Path, images: Path) -> dict[str, Any]:
    """Held-out evaluation of a checkpoint as it is served: gold tool outputs, no system message (as it
    was trained), decoding constrained to the turn format and the tools' schemas."""
    from mmedagent.evaluation.readers import load_samples
    from mmedagent.evaluation.runner import AgentRunner
    from mmedagent.evaluation.scoring import build_report
    from mmedagent.model import load_planner
    from mmedagent.tools.registry import list_tools

    samples = load_samples(data)
    runner = AgentRunner(load_planner(model, constrain=True), "gold", list_tools(), image_folder=images, max_steps=2,
                         system="", max_new_tokens=160)
    results = [runner.run(s) for s in samples]
    meta = {"name": "demo", "model": "demo", "data": "synthetic eval split, unseen phrasings only",
            "tokens_counted_by": runner.tokens_counted_by, "constrained_decoding": True}
    return build_report(samples, results, tool_mode="gold", meta=meta)


def _synthetic_set(work: Path, n_images: int, seed: int, variants: int, box_variants: int | None):
    """Synthesise the set into ``work``: (data dir, training file, image folder, held-out file, its size)."""
    from mmedagent.data.synth import synth

    data_dir = work / "synth"
    manifest = synth(data_dir, n=n_images, seed=seed, size=IMAGE_SIZE, variants=variants, box_variants=box_variants)
    train_file, images = data_dir / manifest["files"]["train"]["data"], data_dir / manifest["image_folder"]
    heldout = work / "heldout.json"
    n_held = heldout_records(train_file, data_dir / manifest["files"]["eval"]["data"], heldout)
    return data_dir, train_file, images, heldout, n_held


def _save_report(model: Path, report: dict[str, Any]) -> None:
    from mmedagent.evaluation.scoring import markdown_summary

    report["routes"] = routes(report)
    report["targets"] = TARGETS
    report["note"] = NOTE
    (model / REPORT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (model / "eval_report.md").write_text(markdown_summary(report) + "\n", encoding="utf-8")


def reevaluate(model: Path | None = None) -> dict[str, Any]:
    """Evaluate a built demo model again (after a change to decoding or scoring) on the held-out split
    its build used, re-synthesised from the build record; the report is replaced, the record kept."""
    import mmedagent  # noqa: F401  - torchvision shim before transformers

    model = Path(model or demo_model_path(build_if_missing=False))
    old = demo_report(model)
    if not old or "build" not in old:
        raise FileNotFoundError(f"{model} has no build record ({REPORT_FILE}); build it instead")
    b = old["build"]
    if b["image_size"] != IMAGE_SIZE:
        raise ValueError(f"{model} was built on {b['image_size']} px images; this version synthesises {IMAGE_SIZE} px")
    with tempfile.TemporaryDirectory(prefix="demo-eval-") as work:
        _, _, images, heldout, _ = _synthetic_set(Path(work), b["n_images"], b["seed"], b["variants"], b["box_variants"])
        report = evaluate_dir(model, heldout, images)
    report["build"] = b
    _save_report(model, report)
    return report


def routes(report: dict[str, Any]) -> bool:
    return all((report.get(k) or 0.0) >= v for k, v in TARGETS.items())


def build(out: Path | None = None, *, n_images: int = 80, budget_s: float = 900.0, round_epochs: int = 3,
          lr: float = 1e-3, batch: int = 8, seed: int = 0, variants: int = 2, box_variants: int | None = None,
          box_drills: int = BOX_DRILLS) -> dict[str, Any]:
    """Build the demo model into ``out`` (default :func:`demo_dir`); returns its evaluation report.

    Trains in rounds of ``round_epochs`` (constant learning rate, halved each round; every epoch with
    ``box_drills`` fresh box-copying drills per segmentation example, see
    :func:`mmedagent.data.synth.drill_records`, so boxes cannot be remembered, only copied) until the
    targets in :data:`TARGETS` are met on held-out phrasings or another round would overrun
    ``budget_s``; the best round's checkpoint is kept (the latest among equals) and the report says
    whether it routes.
    """
    import mmedagent  # noqa: F401  - torchvision shim before transformers
    from mmedagent.data.formats import read_records, write_records
    from mmedagent.data.synth import drill_records
    from mmedagent.model.tiny import make_tiny_model

    out = Path(out or demo_dir())
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="demo-build-", dir=out.parent))
    try:
        data_dir, train_file, images, heldout, n_held = _synthetic_set(work, n_images, seed, variants, box_variants)
        base_records = read_records(train_file)
        epochs = max(1, round_epochs)
        _log(f"synthetic set: {len(base_records)} training records (+ fresh box drills every epoch), "
             f"{n_held} held-out records")
        texts = [m.text() for r in base_records for m in r.conversations]
        current = make_tiny_model("llava", work / "base", seed=seed, image_size=IMAGE_SIZE, vocab_size=2000,
                                  corpus=texts, split_digits=True,
                                  coordinate_tokens=True, **SIZES)
        bf16 = bf16_is_faster()
        _log(f"training in {'bfloat16' if bf16 else 'float32'}")
        rounds, best = [], None  # best: (score, checkpoint, report)
        while True:
            k = len(rounds)
            nxt = work / f"round{k}"
            t0 = time.monotonic()
            round_file = work / f"train{k}.json"  # each epoch: the set once, with box drills never seen before
            write_records([r for e in range(epochs) for r in
                           [*base_records, *drill_records(data_dir, box_drills, seed + 1000 * (k * epochs + e + 1),
                                                          f"train-drill-{k}.{e}-")]], round_file)
            train_round(current, nxt, round_file, images, 1, lr / 2**k, batch, bf16)
            report = evaluate_dir(nxt, heldout, images)
            current = nxt
            rounds.append({"round": k, "epochs": epochs, "train_eval_s": round(time.monotonic() - t0, 1),
                           "tool_selection_accuracy": report["tool_selection_accuracy"],
                           "argument_validity": report["argument_validity"]})
            _log(f"round {k}: tool selection {report['tool_selection_accuracy']:.3f}, "
                 f"argument validity {report['argument_validity'] or 0:.3f}")
            score = (routes(report), report["tool_selection_accuracy"] + (report["argument_validity"] or 0.0))
            if best is None or score >= best[0]:
                best = (score, nxt, report)
            elapsed = time.monotonic() - started
            per_round = elapsed / len(rounds)
            if routes(report) or elapsed + per_round > budget_s:
                break
        _, current, report = best
        report["build"] = {"rounds": rounds, "kept_round": int(current.name.removeprefix("round")),
                           "elapsed_s": round(time.monotonic() - started, 1), "n_images": n_images,
                           "image_size": IMAGE_SIZE, "sizes": SIZES, "lr": lr, "batch": batch, "seed": seed,
                           "variants": variants, "box_variants": box_variants or variants, "box_drills": box_drills,
                           "bf16": bf16,
                           "command": "python scripts/build_demo_model.py"}
        settings = {"system_prompt": "none", "constrain": True, "demo": True, "note": NOTE}
        (current / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
        _save_report(current, report)
        for f in ("trainer_state.json", "training_args.bin"):
            (current / f).unlink(missing_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(current, out)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
