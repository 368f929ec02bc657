"""Recipe settings: one dataclass per recipe, every field a command-line flag.

``--lora-r 32`` (or ``--lora_r 32``) overrides ``lora_r``; booleans take ``--x`` / ``--no-x``.
Fields left at ``None`` are resolved for the machine at run time (:meth:`RecipeConfig.resolved`):
4-bit base and 8-bit AdamW only with a CUDA GPU and bitsandbytes, bf16 only where the GPU supports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class RecipeConfig:
    """Settings shared by every recipe; each recipe subclasses it with its own defaults."""

    # where things come from and go to
    model: str = ""
    """Base checkpoint: hub id or local directory."""
    data: str | None = None
    """Training data: a JSON/JSONL/CSV/TSV file, a saved HF dataset folder, a parquet file or an HF dataset name."""
    data_config: str | None = None
    """Configuration (subset) name when ``data`` is an HF dataset name, e.g. ``25M_demo``."""
    data_split: str = "train"
    """Split to use when ``data`` is an HF dataset name; slices work (``train[:2000]``)."""
    image_folder: str | None = None
    """Folder that relative image paths in the data refer to (default: the data file's folder)."""
    out: str = ""
    """Output directory (data, adapter, merged model, reports)."""
    tiny: bool = False
    """Tiny random checkpoint of the same architecture + generated data of the same layout (CPU, minutes)."""
    tiny_rows: int = 12
    """Rows of generated data with ``--tiny``."""
    push_to_hub: str | None = None
    """Upload the merged model to this hub repo (token from HF_TOKEN or `hf auth login`)."""
    private: bool = True
    """Create the hub repo private."""
    seed: int = 3407
    stop_after_data: bool = False
    """Write the training data, print the ``train_mem.py`` line and stop (to train under ``deepspeed``)."""
    skip_training: bool = False
    """Use the finished training output already in ``out`` (e.g. from ``deepspeed``); export and evaluate it."""

    # fine-tuning method
    lora: bool = True
    """LoRA (True) or full fine-tuning (False)."""
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str | None = None
    """Comma-separated Linear leaf names of the language model (default: all of them)."""
    lora_vision: bool = False
    """LoRA on the vision encoder's attention and MLP layers too (``--lora_vision``)."""
    bits: int | None = None
    """4 / 8: quantised frozen base (QLoRA); 16: off; None: 4 on a CUDA GPU with bitsandbytes when ``qlora``,
    else 16."""
    qlora: bool = False
    """Prefer a 4-bit base where a GPU allows it."""

    # optimisation (HF TrainingArguments names)
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 5
    """Warm-up: a step count, or a fraction of the run when below 1."""
    max_steps: int = -1
    """-1: train for ``num_train_epochs``."""
    num_train_epochs: float = 1.0
    weight_decay: float = 0.01
    optim: str | None = None
    """None: adamw_8bit on a CUDA GPU with bitsandbytes, else adamw_torch (a bitsandbytes optimizer needs both)."""
    bf16: bool | None = None
    """None: where the GPU supports it."""
    gradient_checkpointing: bool | None = None
    """None: on with a GPU, off on CPU."""
    model_max_length: int = 2048
    logging_steps: int = 1
    save_steps: int = 500
    save_total_limit: int = 2

    # evaluation / comparison
    max_new_tokens: int = 128
    export_dtype: str = "bfloat16"
    """dtype of the merged model written to ``out/merged``."""

    TINY: ClassVar[dict[str, Any]] = {}
    """Overrides applied by ``--tiny`` to fields the user did not set."""

    def validate(self) -> None:
        """Reject settings that make no sense (one clear ValueError), before any work is done."""
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length", "logging_steps",
                    "save_steps", "max_new_tokens", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max-steps must be a positive number of steps, or -1 to train for --num-train-epochs; "
                             f"got {self.max_steps}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ValueError(f"--num-train-epochs must be above 0 (or give --max-steps), got {self.num_train_epochs}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be above 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be 0 or more (below 1: a fraction of the run), "
                             f"got {self.warmup_steps}")
        if not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-alpha must be above 0 and --lora-dropout in [0, 1); got {self.lora_alpha}, "
                             f"{self.lora_dropout}")
        if self.tiny_rows < 2:
            raise ValueError(f"--tiny-rows must be at least 2, got {self.tiny_rows}")
        if self.bits not in (None, 4, 8, 16):
            raise ValueError(f"--bits must be 4 or 8 (a quantised base, QLoRA) or 16 (off), got {self.bits}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"--save-total-limit must be at least 1, got {self.save_total_limit}")
        export_dtype(self.export_dtype)

    def resolved(self) -> dict[str, Any]:
        """The effective settings on this machine (auto values filled in); ValueError for nonsense settings."""
        import torch

        from mmedagent.model.loading import bitsandbytes_missing
        from mmedagent.train.args import bitsandbytes_optimizers

        self.validate()
        cuda = torch.cuda.is_available()
        missing = bitsandbytes_missing()
        out = dataclasses.asdict(self)
        out["export_dtype"] = export_dtype(self.export_dtype)
        if self.bits is None:
            out["bits"] = 4 if (missing is None and self.qlora and self.lora) else 16
        if self.optim is None:
            out["optim"] = "adamw_8bit" if missing is None else "adamw_torch"
        if self.bf16 is None:
            out["bf16"] = bool(cuda and torch.cuda.is_bf16_supported())
        if self.gradient_checkpointing is None:
            out["gradient_checkpointing"] = cuda
        if out["bits"] in (4, 8) and missing:
            raise ValueError(f"--bits {out['bits']} (a quantised base, QLoRA) needs a CUDA GPU with bitsandbytes, but "
                             f"{missing}; use --bits 16 on this machine (LoRA on a 16-bit base)")
        if missing and out["optim"] in bitsandbytes_optimizers():
            raise ValueError(f"--optim {out['optim']} is a bitsandbytes optimizer: it needs a CUDA GPU with "
                             f"bitsandbytes, but {missing}; use --optim adamw_torch on this machine")
        if out["bits"] in (4, 8) and not self.lora:
            raise ValueError("a quantised base (--bits 4/8) needs --lora")
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub)
        return out


EXPORT_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                 "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def export_dtype(name: str) -> str:
    """The torch dtype name for ``--export-dtype`` (``bf16`` = ``bfloat16``, ...); ValueError if unknown."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in EXPORT_DTYPES:
        raise ValueError(f"--export-dtype {name!r} is not a dtype for the merged model; "
                         "use bfloat16, float16 or float32")
    return EXPORT_DTYPES[key]


def held_out_share(value: float, flag: str) -> None:
    """A held-out size: 0 (none), a share in (0, 1), or a whole number of records."""
    if value < 0 or (value >= 1 and not float(value).is_integer()):
        raise ValueError(f"--{flag} must be 0 (none held out), a share below 1 or a whole number of records; "
                         f"got {value}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def check_repo_id(repo: str) -> None:
    """``owner/name`` with hub-legal characters; raises ValueError otherwise."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo) or ".." in repo:
        raise ValueError(f"--push-to-hub wants a hub repo id 'owner/name', got {repo!r}")


def _field_type(f: dataclasses.Field, cls: type) -> tuple[type, bool]:
    """(scalar type, optional) of a dataclass field."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


def _parse_optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "auto", "") else (_parse_bool(text) if kind is bool else kind(text))

    parse.__name__ = kind.__name__
    return parse


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


NOTEBOOK_NAMES = {
    "learning_rate": ("lr",),
    "num_train_epochs": ("epochs", "num_epochs"),
    "per_device_train_batch_size": ("batch_size",),
    "model_max_length": ("max_seq_length", "max_length", "cutoff_len"),
}
"""Other names of settings, as fine-tuning notebooks (unsloth / TRL ``max_seq_length``, LLaMA-Factory
``cutoff_len``) write them; ``--load-in-4bit`` is ``--bits 4``."""


def add_config_args(parser: argparse.ArgumentParser, cls: type[RecipeConfig]) -> None:
    """One flag per field (``--a-b`` and ``--a_b``, plus its :data:`NOTEBOOK_NAMES`); unset flags stay out of
    the namespace."""
    defaults = cls()
    group = parser.add_argument_group(f"{cls.__name__} settings (defaults shown)")
    for f in dataclasses.fields(cls):
        kind, optional = _field_type(f, cls)
        names = (f.name, *NOTEBOOK_NAMES.get(f.name, ()))
        flags = [flag for n in names for flag in dict.fromkeys((f"--{_flag(n)}", f"--{n}"))]
        default = getattr(defaults, f.name)
        doc = f"(default: {default})"
        if kind is bool and not optional:
            group.add_argument(
                *flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=doc
            )
        else:
            group.add_argument(
                *flags,
                dest=f.name,
                type=_parse_optional(kind) if optional else kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=doc,
            )
    group.add_argument("--load-in-4bit", "--load_in_4bit", dest="bits", action="store_const", const=4,
                       default=argparse.SUPPRESS,
                       help="the same as --bits 4 (QLoRA; needs a CUDA GPU with bitsandbytes)")


def unknown_flag_error(unknown: list[str]) -> str:
    """The error for arguments no recipe setting takes: a ``train_mem.py`` flag is shown after ``--``."""
    from transformers import HfArgumentParser

    from mmedagent.train.args import DataArguments, ModelArguments, TrainingArguments

    train_flags = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))._option_string_actions
    parts = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        as_train = "--" + flag[2:].replace("-", "_")
        parts.append(f"{flag} (a train_mem.py flag: give it after `--`, e.g. `-- {as_train} VALUE`)"
                     if as_train in train_flags else flag)
    if not parts:
        return f"unexpected argument(s) {' '.join(unknown)}: every value must follow its --flag"
    return f"unknown setting(s): {', '.join(parts)}; see --help"


def config_from_args(cls: type[RecipeConfig], given: dict[str, Any]) -> RecipeConfig:
    """Defaults, then the ``--tiny`` overrides, then what the user gave."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in given.items() if k in names}
    values = dict(cls.TINY) if given.get("tiny") else {}
    values.update(given)
    return cls(**values)


@dataclass
class CaptionConfig(RecipeConfig):
    """Settings of the image + caption recipes."""

    eval_samples: int = 4
    """Held-out records for before/after and metrics."""
    image_column: str = "image"
    """The data's image column: a path (relative to ``--image-folder``) or the image itself (ROCO's CSV: ``name``)."""
    caption_column: str = "caption"
    """The data's caption column: the answer trained on (e.g. ``findings`` or ``report`` of a MIMIC-CXR table)."""

    def validate(self) -> None:
        super().validate()
        if self.eval_samples < 0:
            raise ValueError(f"--eval-samples must be 0 (hold nothing out) or more, got {self.eval_samples}")


__all__ = ["CaptionConfig", "RecipeConfig", "add_config_args", "check_repo_id",
           "config_from_args", "export_dtype", "held_out_share", "unknown_flag_error"]

