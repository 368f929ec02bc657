"""HF ``Trainer`` with LLaVA's two additions (projector learning rate, modality-grouped batches),
plus the run's outputs: the trained-model manifest, the loss curve and checkpoint discovery."""

from __future__ import annotations

import json
import logging
import re
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from mmedagent.model import SETTINGS_FILE
from mmedagent.model.adapters import TRAIN_MANIFEST

log = logging.getLogger(__name__)


def modality_grouped_indices(lengths: list[int], megabatch: int, generator: torch.Generator) -> list[int]:
    """LLaVA's modality-length grouping: image (length > 0) and text-only (< 0) samples never share a
    megabatch; inside one, samples are sorted by length; megabatches are shuffled. The leftover
    partial megabatches go last."""
    megas: list[list[int]] = []
    for group in ([i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n <= 0]):
        perm = [group[k] for k in torch.randperm(len(group), generator=generator).tolist()]
        megas += [sorted(perm[k:k + megabatch], key=lambda i: -abs(lengths[i])) for k in range(0, len(perm), megabatch)]
    full = [m for m in megas if len(m) == megabatch]
    rest = [i for m in megas if len(m) < megabatch for i in m]
    return [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]] + rest


class ModalityGroupedSampler(torch.utils.data.Sampler):
    def __init__(self, lengths: list[int], megabatch: int, seed: int):
        self.lengths, self.megabatch, self.seed, self.epoch = lengths, megabatch, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.megabatch, g))


class _Loaded(Exception):
    """Raised by :class:`_StopAtTrainBegin`: the checkpoint is loaded."""


class _StopAtTrainBegin(TrainerCallback):
    """Ends ``train()`` where training would begin: after the model is prepared (the DeepSpeed engine made)
    and the checkpoint loaded, before any step."""

    def on_train_begin(self, args, state, control, **kwargs):
        raise _Loaded


class MMedTrainer(Trainer):
    """``Trainer`` with a separate projector learning rate and ``group_by_modality_length``; ``manifest``
    (:func:`write_manifest`'s fields) is written with every saved model, each ``checkpoint-N`` included, so
    a mid-run checkpoint loads for serving as the final output does."""

    def __init__(self, *args: Any, projector: str | None = None, manifest: dict[str, Any] | None = None,
                 serving: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.projector = projector
        self.manifest = manifest
        self.serving = serving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.manifest is not None and self.args.should_save:
            write_manifest(out, **self.manifest)
        if self.serving and self.args.should_save and not (out / SETTINGS_FILE).is_file():
            (out / SETTINGS_FILE).write_text(json.dumps(self.serving, indent=1) + "\n")  # never over the user's own

    def restore(self, checkpoint: str) -> None:
        """Load ``checkpoint`` (weights, optimizer, scheduler, state) as ``train(resume_from_checkpoint=...)``
        does and stop before the first step: for a checkpoint that already reached the last step, whose
        outputs are then written with ``save_model``. Loading goes through ``train()`` because under DeepSpeed
        only its engine can load a checkpoint (ZeRO-3: into partitioned weights) and save the model."""
        self.callback_handler.callbacks.insert(0, _StopAtTrainBegin())  # before any logger or progress bar starts
        try:
            self.train(resume_from_checkpoint=checkpoint)
        except _Loaded:
            pass
        finally:
            self.callback_handler.callbacks = [c for c in self.callback_handler.callbacks
                                               if not isinstance(c, _StopAtTrainBegin)]
            self.is_in_train = False

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_by_modality_length and hasattr(dataset, "modality_lengths"):
            megabatch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return ModalityGroupedSampler(dataset.modality_lengths, megabatch, self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        lr = self.args.mm_projector_lr
        if self.optimizer is not None or lr is None or self.projector is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        key = "." + self.projector.rsplit(".", 1)[-1] + "."
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name in decay, key in f".{name}"), []).append(p)
        # the language model's decayed group first: the Trainer logs param_groups[0]'s learning rate
        param_groups = [
            {"params": ps, "weight_decay": self.args.weight_decay if is_decay else 0.0, **({"lr": lr} if is_proj else {})}
            for (is_decay, is_proj), ps in sorted(groups.items(), key=lambda kv: (kv[0][1], not kv[0][0]))
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


# --------------------------------------------------------------------------- checkpoints and outputs

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_complete(path: Path) -> bool:
    """Whether ``path`` was saved whole: rank 0 writes ``trainer_state.json`` last of its files, but the other
    ranks write their ``rng_state_<rank>.pth`` without a barrier after it, so each of those must be whole
    too (``torch.save`` writes a zip whose directory comes last)."""
    return (path / "trainer_state.json").is_file() and all(zipfile.is_zipfile(f) for f in path.glob("rng_state*.pth"))


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-N`` (:func:`checkpoint_complete`), or None. A checkpoint cut short
    by a kill is skipped."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = [(int(m[1]), p) for p in out.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        if checkpoint_complete(path):
            return str(path)
        log.warning("skipping incomplete checkpoint %s", path)
    return None


class ResumeError(RuntimeError):
    """Resuming failed because the checkpoint's saved state does not fit the current run's settings."""


_OPTIMIZER_LOADS = ("_load_optimizer_and_scheduler", "_load_zero_checkpoint")
_WEIGHT_LOADS = ("_load_from_checkpoint", "deepspeed_load_checkpoint")
"""Where transformers (and DeepSpeed, under ``deepspeed_load_checkpoint``) load a checkpoint's saved state."""


def resume_error(exc: BaseException, checkpoint: str, explicit: bool) -> ResumeError | None:
    """A ``ResumeError`` that explains ``exc`` when it was raised while loading ``checkpoint``'s saved state
    (e.g. ``loaded state dict has a different number of parameter groups`` after --mm_projector_lr changed);
    None for any other error, which must propagate as it is."""
    if not isinstance(exc, (ValueError, RuntimeError, KeyError, IndexError)):
        return None
    names = {f.name for f in traceback.extract_tb(exc.__traceback__)}
    if names.intersection(_OPTIMIZER_LOADS):
        what = "optimizer state does"
    elif names.intersection(_WEIGHT_LOADS):
        what = "saved weights do"
    else:
        return None
    how = ("drop --resume_from_checkpoint (or point it at a checkpoint saved with the current flags)" if explicit
           else "use a new --output_dir (the newest checkpoint-N in --output_dir is resumed automatically)")
    cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return ResumeError(
        f"resuming from {checkpoint} failed: its {what} not match the current settings (was it saved with "
        f"other --mm_projector_lr / --lora_* / --freeze_mm_mlp_adapter flags, another --deepspeed config or "
        f"number of ranks?). Rerun with the flags it was saved with, or to start afresh {how}. ({cause})")


def write_manifest(output_dir: str | Path, *, base_model: str, family: str, template: str | None,
                   lora: bool, model_max_length: int, image_aspect_ratio: str | None) -> Path:
    """The small file that tells the model layer and the merge script how to load this output."""
    base = Path(base_model)
    manifest = {
        "format": 1,
        "base_model": str(base.resolve()) if base.exists() else base_model,
        "family": family,
        "template": template,
        "lora": lora,
        "model_max_length": model_max_length,
        "image_aspect_ratio": image_aspect_ratio,
    }
    path = Path(output_dir) / TRAIN_MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def plot_loss(log_history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Training (and validation) loss against step, as a PNG (None when nothing was logged)."""
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None,
            label="training")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], marker="o", label="validation")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
