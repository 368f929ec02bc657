"""The recipe run: data → (before answers) → training → merge/export → after answers + metrics → push.

Every step is the project's own machinery: :func:`mmedagent.train.run.main` (``train/train_mem.py``)
trains, :func:`mmedagent.model.adapters.merge_lora` (``scripts/merge_lora_weights.py``) merges the LoRA
adapter, and :func:`mmedagent.model.load_planner` — the loader of ``serve/model_worker.py`` — loads the
exported model to answer the held-out questions, so what a recipe reports is what the served model says.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shlex
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmedagent.locks import holding
from mmedagent.model.loading import bitsandbytes_missing
from mmedagent.recipes.config import RecipeConfig
from mmedagent.recipes.data import Example


def serve_script(name: str) -> Path:
    """``serve/<name>`` of this installation (``mmedagent.serve`` is the ``serve/`` folder)."""
    import mmedagent.serve

    return Path(mmedagent.serve.__file__).with_name(name)


@dataclass
class Prepared:
    """What a recipe's data step produced."""

    train_file: Path
    splits: dict[str, list[Example]]  # held-out examples by split name ("heldout", "val", "test")
    counts: dict[str, int] = field(default_factory=dict)
    eval_file: Path | None = None  # validation data whose loss training logs (``--eval_data_path``)


TRAIN_FLAGS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "max_steps",
    "num_train_epochs",
    "weight_decay",
    "optim",
    "bf16",
    "gradient_checkpointing",
    "model_max_length",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "seed",
)
"""Settings passed to ``train_mem.py`` under their own (HF TrainingArguments) names."""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def say(msg: str) -> None:
    print(f"[recipe] {msg}", flush=True)


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-4, mean ROUGE-L F and mean METEOR (exact match) — :mod:`mmedagent.evaluation.metrics`."""
    from mmedagent.evaluation.metrics import bleu4, meteor_exact, rouge_l

    n = len(references)
    return {
        "bleu4": bleu4(predictions, references),
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "meteor": sum(meteor_exact(p, r) for p, r in zip(predictions, references)) / n,
    }


def side_by_side(rows: list[dict[str, str]], columns: list[str], width: int = 38) -> str:
    """A plain-text table, each cell wrapped to ``width`` characters."""
    wrapped = [[textwrap.wrap(str(r.get(c, "")), width) or [""] for c in columns] for r in rows]
    line = "+" + "+".join("-" * (width + 2) for _ in columns) + "+"
    out = [line, "|" + "|".join(f" {c.upper():<{width}} " for c in columns) + "|", line]
    for cells in wrapped:
        for k in range(max(len(c) for c in cells)):
            out.append("|" + "|".join(f" {(c[k] if k < len(c) else ''):<{width}} " for c in cells) + "|")
        out.append(line)
    return "\n".join(out)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_hub_token() -> None:
    """Fail before training when ``--push-to-hub`` has no token to push with (the token is never shown)."""
    from huggingface_hub import get_token

    if not get_token():
        raise ValueError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")


PUSH_IGNORE = ["checkpoint-*", "checkpoint-*/**", "*.pt", "*.pth", "training_args.bin", "rng_state*",
               ".*"]
"""Never uploaded: resumable checkpoints, optimizer / scheduler / RNG state, the training arguments, and
hidden files (a full fine-tuning export is the training folder itself)."""


def push_to_hub(folder: Path, repo: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="mmedagent recipe export",
                      ignore_patterns=PUSH_IGNORE)
    return str(url)


def check_train_argv(argv: list[str], skip_training: bool = False) -> None:
    """Parse the ``train_mem.py`` command line as ``train_mem.py`` will (unknown flags, bad values, flags
    that need hardware this machine lacks): a ValueError now instead of a failure after models load. Then
    refuse what ``train_mem.py`` would refuse: resuming a checkpoint in its ``--output_dir`` started with
    other data or settings (ResumeError); with ``skip_training`` (nothing trains), a training output made
    from other data (ValueError)."""
    from mmedagent.train.args import parse_args
    from mmedagent.train.run import RUN_FILE, check_fingerprint, run_fingerprint
    from mmedagent.train.trainer import latest_checkpoint

    try:
        parsed = parse_args(argv)
    except ValueError as e:
        raise ValueError(f"train_mem.py flags: {e}") from None
    fingerprint = run_fingerprint(*parsed)
    output_dir, explicit = parsed[2].output_dir, parsed[2].resume_from_checkpoint
    del parsed  # (a --deepspeed config registers itself globally while its arguments live)
    gc.collect()
    if skip_training:
        try:
            saved = json.loads((Path(output_dir) / RUN_FILE).read_text())
        except (OSError, ValueError):  # a run from a version without the fingerprint: used as before
            return
        if saved.get("data_sha256") != fingerprint["data_sha256"]:
            raise ValueError(f"--skip-training: {output_dir} was trained on other data than this run's (the data or "
                             "the settings that split it changed); rerun with those it was trained with, or use "
                             "another --out")
        return
    resume = explicit or latest_checkpoint(output_dir)
    if resume:
        check_fingerprint(output_dir, resume, fingerprint, bool(explicit))


LOCK_FILE = ".recipe.lock"

STAGING = ".staging"
"""``OUT/.staging/NAME``: where the data step writes what becomes ``OUT/NAME`` (``data``, ``tiny-data``), moved
into place only once the training command is checked: a refused rerun leaves ``OUT`` as it was."""


def run_lock(out: Path):
    """Hold ``OUT/.recipe.lock`` while a recipe runs there: the same command started again while the first run
    still works (a second terminal, a requeued job) is refused instead of writing the same checkpoints."""
    return holding(out / LOCK_FILE, lambda holder: ValueError(
        f"{out} is in use by another recipe run ({holder}): wait for it to end or stop it, then rerun this command "
        "to resume; or use another --out"), remove=True)


class Recipe:
    """One workflow; subclasses define the data step, the defaults and what the report holds."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[RecipeConfig]]
    tiny_arch: ClassVar[str]
    compare_before: ClassVar[bool] = False
    """Generate the held-out answers with the base model too (before/after report)."""

    def __init__(self, cfg: RecipeConfig, train_extra: list[str] | None = None):
        self.cfg = cfg
        self.train_extra = list(train_extra or [])
        self.out = Path(cfg.out or Path("runs") / self.name).resolve()  # absolute in summary.json and messages
        self.settings: dict[str, Any] = {}
        self.data_split: str | None = cfg.data_split
        """The split / slice to take from local tabular data (None: data downloaded already as that split)."""

    # ------------------------------------------------------------------ hooks

    def prepare(self, data: Path) -> Prepared:
        """Convert ``data`` into files in ``self.staged("data")``; paths written into them (and the held-out
        examples' images) are the ones they will have in ``OUT/data`` (:meth:`placed`)."""
        raise NotImplementedError

    def tiny_data(self, folder: Path) -> Path:
        raise NotImplementedError

    def score(self, split: str, examples: list[Example], answers: list[str]) -> dict[str, float]:
        return text_metrics(answers, [e.reference for e in examples])

    def next_steps(self, export: Path) -> list[str]:
        """Serve the export: the command lines (absolute paths: they run from anywhere)."""
        return [
            shlex.join(["python", str(serve_script("controller.py")), "--model-path", str(Path(export).resolve())])
            + "   # browser chat with uploaded images (tools on their published weights; offline: add --tool-weights demo)",
            shlex.join(["python", str(serve_script("cli.py")), "--image", "scan.dcm"])
            + "   # in a second terminal: chat with it",
        ]

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """The whole run (see docs/recipes.md), holding ``OUT``'s lock throughout."""
        t0 = time.monotonic()
        cfg = self.cfg
        self.settings = cfg.resolved()
        if cfg.tiny:
            self.settings["model"] = str(self.out / "tiny-base")  # what --tiny trains, not the default hub model
        self.out.mkdir(parents=True, exist_ok=True)
        with run_lock(self.out):
            return self._run(t0)

    def _run(self, t0: float) -> dict[str, Any]:
        cfg = self.cfg
        say(f"{self.name}: effective configuration")
        print(json.dumps(self.settings | {"out": str(self.out), "train_extra": self.train_extra}, indent=2), flush=True)
        if cfg.qlora and cfg.lora and cfg.bits is None and self.settings["bits"] == 16:
            say(f"{bitsandbytes_missing()}: QLoRA's 4-bit base needs a CUDA GPU with bitsandbytes, so LoRA trains on a "
                "16-bit base here (bits 16)")
        if cfg.push_to_hub:
            check_hub_token()
        skip_training = cfg.skip_training and not cfg.stop_after_data  # (--stop-after-data goes first)
        if skip_training and not (self.train_dir() / "mmedagent_train.json").is_file():
            raise ValueError(f"--skip-training: {self.train_dir()} holds no finished training run")

        stage = self.out / STAGING
        self._restore_from(stage)
        shutil.rmtree(stage, ignore_errors=True)  # left by a run killed in its data step
        try:
            base, data = self._inputs()
            say(f"base model: {base}")
            if not cfg.tiny:
                from mmedagent.train.run import backbone_family

                backbone_family(str(base))  # a missing path or unreachable hub id fails now, in one line
            staged = self.prepare(data)
            prepared = Prepared(self.placed(staged.train_file), staged.splits, staged.counts,
                                staged.eval_file and self.placed(staged.eval_file))
            say(f"data: {prepared.counts} -> {prepared.train_file}")

            argv = self.train_argv(base, prepared.train_file, prepared.eval_file)
            import mmedagent.train

            script = Path(mmedagent.train.__file__).with_name("train_mem.py")
            say("train: " + shlex.join(["python", str(script), *argv]))  # paths absolute: it runs from anywhere
            # checked on the staged files, which hold the same bytes under the same names
            check_train_argv(self.train_argv(base, staged.train_file, staged.eval_file), skip_training)
            self._move_into_place(stage)
        finally:
            self._restore_from(stage)  # interrupted between the two moves: the old data goes back, not away
            shutil.rmtree(stage, ignore_errors=True)
        if cfg.stop_after_data:
            say(
                "--stop-after-data: run the line above (e.g. under `deepspeed`), then this command with --skip-training"
            )
            return {"recipe": self.name, "train_file": str(prepared.train_file), "train_argv": argv}

        heldout = [e for ex in prepared.splits.values() for e in ex]
        if not heldout:
            say("nothing held out: no answers to generate or score")
        before = self.generate(str(base), heldout, quantised=True) if self.compare_before and heldout else None

        trained = self.train_dir() if cfg.skip_training else self.train(argv)
        export = self.export(trained)
        after = self.generate(str(export), heldout) if heldout else []

        report = self.report(prepared, before, after)
        summary = {
            "recipe": self.name,
            "base_model": str(base),
            "train_output": str(trained),
            "lora": cfg.lora,
            "export": str(export),
            "loss_curve": str(trained / "loss.png") if (trained / "loss.png").is_file() else None,
            "metrics": report["metrics"],
            "wall_s": round(time.monotonic() - t0, 1),
        }
        if cfg.push_to_hub:
            summary["hub"] = push_to_hub(export, cfg.push_to_hub, cfg.private)
            say(f"pushed {export} to {summary['hub']}")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"done in {summary['wall_s']} s; summary: {self.out / 'summary.json'}")
        for cmd in self.next_steps(export):
            say(f"next: {cmd}")
        return summary

    def _inputs(self) -> tuple[Path | str, Path]:
        cfg = self.cfg
        if cfg.tiny:
            from mmedagent.model.tiny import make_tiny_model

            base = self.out / "tiny-base"
            if not (base / "config.json").is_file():
                make_tiny_model(self.tiny_arch, base, seed=cfg.seed)
            say(f"--tiny: random {self.tiny_arch} checkpoint in {base}")
            return base, self._materialise() if cfg.data else self.tiny_data(self.staged("tiny-data"))
        if not cfg.model:
            raise ValueError("--model is required (a hub id or a local checkpoint)")
        if not cfg.data:
            raise ValueError(
                "--data is required (a file, a folder or a Hugging Face dataset name); "
                "or use --tiny to try the recipe on generated data"
            )
        return cfg.model, self._materialise()

    def _materialise(self) -> Path:
        """The local data; a hub dataset is downloaded as ``--data-split`` already (so it is not split again)."""
        from mmedagent.recipes.data import materialise

        cfg = self.cfg
        if not Path(cfg.data).exists():
            self.data_split = None
        return materialise(cfg.data, cfg.data_split, self.out / "source-data", cfg.data_config)

    def staged(self, name: str) -> Path:
        """Where the data step writes ``OUT/<name>`` (see :data:`STAGING`)."""
        return self.out / STAGING / name

    def placed(self, path: str | Path) -> Path:
        """``path`` as it will be once the staged folders are moved into place."""
        stage = self.out / STAGING
        return self.out / Path(path).relative_to(stage) if Path(path).is_relative_to(stage) else Path(path)

    def _restore_from(self, stage: Path) -> None:
        """Put back an ``OUT/NAME`` that a run killed inside :meth:`_move_into_place` left as ``stage/.NAME.old``."""
        for old in sorted(stage.glob(".*.old")) if stage.is_dir() else []:
            target = self.out / old.name[1:-len(".old")]
            if not target.exists():
                old.rename(target)

    def _move_into_place(self, stage: Path) -> None:
        """Each ``stage/NAME`` replaces ``OUT/NAME``."""
        for staged in sorted(stage.iterdir()):  # (listed before any .NAME.old is made)
            target = self.out / staged.name
            if target.exists():
                target.rename(stage / f".{staged.name}.old")
            staged.rename(target)

    # ------------------------------------------------------------------ steps

    def train_dir(self) -> Path:
        """Where training writes: ``OUT/adapter`` (LoRA) or ``OUT/model`` (full fine-tuning)."""
        return self.out / ("adapter" if self.settings["lora"] else "model")

    def train_argv(self, base: Path | str, train_file: Path, eval_file: Path | None = None) -> list[str]:
        """The ``train_mem.py`` command line for this recipe's settings (plus the flags after ``--``)."""
        s = self.settings
        flags: dict[str, Any] = {
            "model_name_or_path": Path(base) if Path(base).exists() else base,  # a local folder by absolute path
            "data_path": train_file,
            "eval_data_path": eval_file,
            "output_dir": self.train_dir(),
            "lora_enable": s["lora"],
            "bits": s["bits"],
            "save_strategy": "steps",
            "report_to": "none",
            "warmup_steps": _num(s["warmup_steps"]),
        }
        flags.update({k: s[k] for k in TRAIN_FLAGS})
        if s.get("image_max_tokens"):  # Qwen2-VL: images scaled down to fit the cutoff (diagnosis-qwen2vl)
            flags["image_max_tokens"] = s["image_max_tokens"]
        if s["lora"]:
            lora_flags = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_vision")
            flags.update({k: s[k] for k in lora_flags})
        argv = [x for k, v in flags.items() if v is not None
                for x in (f"--{k}", str(v.resolve()) if isinstance(v, Path) else str(v))]
        return argv + self.train_extra

    def train(self, argv: list[str]) -> Path:
        from mmedagent.train.run import main as train_main

        t0 = time.monotonic()
        out = train_main(argv)
        free_memory()
        say(f"trained in {time.monotonic() - t0:.1f} s -> {out}")
        return out

    def export(self, trained: Path) -> Path:
        """LoRA: merge the adapter into a fresh (unquantised) base in ``export_dtype`` and save a plain
        checkpoint (``scripts/merge_lora_weights.py``'s function). Full fine-tuning: the training output."""
        if not self.settings["lora"]:
            return trained
        from mmedagent.model.adapters import merge_lora

        target = self.out / "merged"
        # merged into a fresh folder, moved into place only when complete: a failed merge keeps the last export
        tmp, old = self.out / ".merged.tmp", self.out / ".merged.old"
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        try:
            merge_lora(trained, None, tmp, dtype=self.settings["export_dtype"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            free_memory()
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        say(f"merged LoRA into the base, saved {self.settings['export_dtype']} model -> {target}")
        return target

    def generate(self, model_path: str, examples: list[Example], quantised: bool = False) -> list[str | None]:
        """Greedy answers of the model at ``model_path``, loaded as the model worker loads it; None for an
        example the model refuses (e.g. a prompt longer than its context), said as it happens."""
        from mmedagent.imaging import load_image
        from mmedagent.model import load_planner

        bits = self.settings["bits"] if quantised else 16
        planner = load_planner(model_path, load_in_4bit=bits == 4, load_in_8bit=bits == 8)
        answers: list[str | None] = []
        for e in examples:
            image = load_image(e.image).image if e.image else None
            try:
                answers.append(planner.generate(e.messages, image, max_new_tokens=self.settings["max_new_tokens"],
                                                temperature=0.0))
            except ValueError as err:  # the served model refuses it too: not scored, the run goes on
                say(f"held-out {e.id}: not answered: {err}")
                answers.append(None)
        del planner
        free_memory()
        return answers

    def report(self, prepared: Prepared, before: list[str | None] | None, after: list[str | None]) -> dict[str, Any]:
        """Per-split metrics (after, and before when generated) over the examples every model answered, the
        answers side by side; written to ``out/report.json`` and ``out/report.txt`` and printed."""
        rows, metrics, k = [], {}, 0
        for split, examples in prepared.splits.items():
            n = len(examples)
            if not n:
                continue  # nothing held out for this split
            runs = {"after": after[k : k + n]} | ({"before": before[k : k + n]} if before is not None else {})
            answered = [j for j in range(n) if all(got[j] is not None for got in runs.values())]
            metrics[split] = {"n": len(answered)}
            if len(answered) < n:
                metrics[split]["not_answered"] = n - len(answered)
            if answered:
                scored = [examples[j] for j in answered]
                for name, got in runs.items():
                    metrics[split][name] = self.score(split, scored, [got[j] for j in answered])
            for j, e in enumerate(examples):
                row = {"split": split, "id": e.id, "reference": e.reference}
                row |= {name: got[j] if got[j] is not None else "(not answered)" for name, got in runs.items()}
                rows.append(row)
            k += n
        columns = (
            (["split"] if len(prepared.splits) > 1 else [])
            + ["reference"]
            + (["before", "after"] if before is not None else ["after"])
        )
        table = side_by_side(rows, columns)
        lines = [table, "", json.dumps(metrics, indent=2)]
        (self.out / "report.txt").write_text("\n".join(lines) + "\n")
        report = {"examples": rows, "metrics": metrics}
        (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if rows:
            say("held-out answers" + (" before / after fine-tuning" if before is not None else ""))
            print(table, flush=True)
            say("metrics: " + json.dumps(metrics))
        return report


def run_cli(recipe: Recipe) -> int:
    """Run; bad data and bad settings end with their message (no traceback) and exit status 2."""
    from mmedagent.data.formats import DataError
    from mmedagent.model.loading import ModelNotFoundError
    from mmedagent.train.trainer import ResumeError

    try:
        recipe.run()
    except (DataError, ValueError, ModelNotFoundError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class CaptionRecipe(Recipe):
    """Image + caption data → instruction pairs (``prompt`` + image → caption), a held-out part kept aside."""

    tiny_layout: ClassVar[dict[str, Any]] = {}
    """:func:`~mmedagent.recipes.data.tiny_caption_dataset` options (``long``, ``fmt``)."""

    @property
    def prompt(self) -> str:
        raise NotImplementedError

    def tiny_data(self, folder: Path) -> Path:
        from mmedagent.recipes.data import tiny_caption_dataset

        return tiny_caption_dataset(folder, self.cfg.tiny_rows, self.cfg.seed, size=48, **self.tiny_layout)

    def prepare(self, data: Path) -> Prepared:
        from mmedagent.recipes.data import (
            CaptionItem,
            caption_key,
            caption_record,
            duplicate_count,
            read_captions,
            split,
            write_examples,
            write_sharegpt,
        )

        cfg = self.cfg
        folder = self.staged("data")
        items = read_captions(data, cfg.image_folder, folder / "images", self.data_split,
                              cfg.image_column, cfg.caption_column)
        key = caption_key(items)
        train, heldout = split(items, [self.cfg.eval_samples], self.cfg.seed, key=key,
                               flags="--eval-samples")

        def final(item: CaptionItem) -> CaptionItem:  # an image exported to the staged folder: its OUT/data path
            return dataclasses.replace(item, image=str(self.placed(item.image)))

        train_file = write_sharegpt([caption_record(final(i), self.prompt) for i in train], folder / "train.json")
        examples = [Example(i.id, self.prompt, i.caption, image=final(i).image) for i in heldout]
        write_examples(examples, folder / "heldout.jsonl")
        counts = {"train": len(train), "heldout": len(heldout)} | duplicate_count(items, key)
        return Prepared(train_file, {"heldout": examples}, counts)
