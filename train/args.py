"""Command-line arguments of ``train/train_mem.py``: MMedAgent's recipe flags, as written.

Three ``HfArgumentParser`` dataclasses (model / data / training). Backbone-specific flags default to
``None`` ("not given"), so :func:`check_backbone_flags` can reject those that do not apply to the
loaded backbone instead of silently ignoring them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers

log = logging.getLogger(__name__)

TEMPLATE_ALIASES = {"v1": "vicuna_v1", "vicuna": "vicuna_v1", "llava_v1": "vicuna_v1"}
"""LLaVA ``--version`` names -> model-layer template names (the model layer's ``vicuna_v1`` renders LLaVA's
``llava_v1`` conversation exactly: its system prompt, ``USER:`` / ``ASSISTANT:`` and ``</s>``)."""

NATIVE_ASPECT = {"qwen2_vl": "Qwen2-VL resizes each image to its own grid of patches",
                 "mllama": "Mllama tiles each image by its aspect ratio"}
"""Families that keep an image's aspect ratio themselves, so ``--image_aspect_ratio pad`` does not apply."""


class FlagError(ValueError):
    """A flag that is wrong, does not apply, or needs hardware this machine lacks: ``train/train_mem.py``
    reports it as one ``error: ...`` line (exit status 2) instead of a traceback."""


LLAVA_ONLY = ("vision_tower", "mm_vision_select_layer", "mm_vision_select_feature", "mm_projector_type",
              "mm_use_im_start_end", "mm_use_im_patch_token")
IMAGE_ONLY = ("image_folder", "image_aspect_ratio", "mm_projector_lr", "freeze_mm_mlp_adapter", "image_max_tokens")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Base checkpoint (HF layout or original LLaVA layout)."})
    version: str | None = field(default=None, metadata={
        "help": "Chat template: 'v1' / 'vicuna' / 'llava_v1' (= vicuna_v1, MMedAgent) or a model-layer template name "
                "(vicuna_v1, llama3, qwen2); default: the processor's own chat template."})
    vision_tower: str | None = field(default=None, metadata={
        "help": "LLaVA only. Must agree with the checkpoint's vision tower (transformers' LLaVA keeps it inside)."})
    mm_vision_select_layer: int | None = field(default=None, metadata={
        "help": "LLaVA only: vision feature layer; must equal the checkpoint's vision_feature_layer (an adapter "
                "cannot carry another)."})
    mm_vision_select_feature: str | None = field(default=None, metadata={
        "help": "LLaVA only: 'patch' (drop CLS) or 'cls_patch'."})
    mm_projector_type: str | None = field(default=None, metadata={
        "help": "LLaVA only: must match the checkpoint's projector (transformers' LLaVA: mlp2x_gelu)."})
    mm_use_im_start_end: bool | None = field(default=None, metadata={"help": "LLaVA only; only False is supported."})
    mm_use_im_patch_token: bool | None = field(default=None, metadata={"help": "LLaVA only; only False is supported."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "sdpa / eager / flash_attention_2; default: the model layer's choice."})
    tune_mm_mlp_adapter: bool | None = field(default=None, metadata={
        "help": "LLaVA's; only False (its fine-tuning value) is taken: the projector-only pretraining stage is not "
                "supported."})
    freeze_backbone: bool | None = field(default=None, metadata={
        "help": "LLaVA's; taken as a no-op under LoRA, which keeps the language model frozen anyway; True is refused "
                "with --lora_enable False."})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "Training data; a comma-separated list is allowed."})
    image_folder: str | None = field(default=None, metadata={
        "help": "Folder(s) that relative image paths refer to; one for all data files or one per file."})
    image_aspect_ratio: str | None = field(default=None, metadata={
        "help": "LLaVA only for 'pad': the saved processor pads images to a square with its mean colour (MMedAgent), "
                "in training and at inference; 'square': the processor as it is."})
    eval_data_path: str | None = field(default=None, metadata={
        "help": "Validation data (same formats; comma-separated list allowed): its loss is logged at "
                "--eval_strategy and after training."})
    eval_image_folder: str | None = field(default=None, metadata={
        "help": "Image folder(s) of --eval_data_path (default: --image_folder)."})
    image_max_tokens: int | None = field(default=None, metadata={
        "help": "Qwen2-VL only: at most this many image tokens per image (one per 28 x 28 pixels): larger images "
                "are scaled down, keeping their aspect ratio. It lowers the processor's own limit (max_pixels), "
                "never raises it, and is saved with the processor, so inference scales the same way."})
    lazy_preprocess: bool = field(default=True, metadata={
        "help": "Accepted for compatibility; preprocessing is always lazy (per item, in the data loader)."})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """``transformers.TrainingArguments`` plus LLaVA/MMedAgent's LoRA, projector and length options."""

    model_max_length: int = field(default=2048, metadata={
        "help": "Sequences are truncated to this many tokens (never inside the image tokens)."})
    lora_enable: bool = field(default=True, metadata={"help": "LoRA (default) or full fine-tuning (False)."})
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = field(default="none", metadata={"help": "none / all / lora_only"})
    lora_target_modules: str | None = field(default=None, metadata={
        "help": "Comma-separated module names; default: every Linear of the language model except lm_head."})
    lora_vision: bool = field(default=False, metadata={
        "help": "LoRA on the vision encoder's Linear layers too (attention and MLP; never the projector)."})
    mm_projector_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the vision-language projector (default: --learning_rate)."})
    freeze_mm_mlp_adapter: bool | None = field(default=None, metadata={"help": "Keep the projector frozen."})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "Batch image and text-only records separately, each grouped by length."})
    bits: int = field(default=16, metadata={"help": "4 or 8: QLoRA with bitsandbytes (CUDA only); 16: off."})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "Warm-up as a fraction of the training steps (MMedAgent's flag; sets --warmup_steps)."})
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)

    def __post_init__(self):
        import torch
        from transformers.utils import is_torch_tf32_available

        from mmedagent.model.loading import bitsandbytes_missing

        # Without use_cpu every CPU rank believes it is alone (unsharded data) and bf16 is refused.
        if not torch.cuda.is_available():
            self.use_cpu = True
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise FlagError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise FlagError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise FlagError(f"--max_steps must be a positive number of steps, or -1 to train for --num_train_epochs; "
                            f"got {self.max_steps}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise FlagError(f"--num_train_epochs must be above 0 (or give --max_steps), got {self.num_train_epochs}")
        if self.model_max_length < 1:
            raise FlagError(f"--model_max_length must be at least 1, got {self.model_max_length}")
        if self.bits not in (4, 8, 16):
            raise FlagError(f"--bits must be 4, 8 or 16, got {self.bits}")
        missing = bitsandbytes_missing()
        if self.bits in (4, 8) and missing:
            raise FlagError(f"--bits {self.bits} (QLoRA) needs a CUDA GPU with bitsandbytes, but {missing}. "
                            "Use --bits 16 here.")
        optim = str(getattr(self.optim, "value", self.optim))
        if missing and optim in bitsandbytes_optimizers() and not _deepspeed_optimizer(self.deepspeed):
            raise FlagError(f"--optim {optim} is a bitsandbytes optimizer: it needs a CUDA GPU with bitsandbytes, "
                            f"but {missing}. Use --optim adamw_torch here.")
        if self.tf32 and not is_torch_tf32_available():
            raise FlagError("--tf32 True needs a CUDA GPU of the Ampere generation or newer; "
                            f"{'this GPU is older' if torch.cuda.is_available() else 'this machine has no GPU'}. "
                            "Leave --tf32 out (or pass --tf32 False).")
        if self.fp16 and not self.bf16 and not torch.cuda.is_available():  # (both: transformers' own error)
            # without this, the model would load and train in plain fp16 (no autocast, no loss scaling on CPU):
            # its weights turn NaN at the first update, and the run "succeeds" with loss 0
            raise FlagError("--fp16 True needs a CUDA GPU: on CPU there is no fp16 mixed precision (DeepSpeed's CPU "
                            "backend has no fp16 either). Use --bf16 True (or neither) on CPU.")
        if self.bits in (4, 8) and not self.lora_enable:
            raise FlagError(f"--bits {self.bits} quantises the frozen base model; it needs --lora_enable True")
        if self.mm_projector_lr is not None and self.freeze_mm_mlp_adapter:
            raise FlagError("--mm_projector_lr sets the projector's learning rate, but --freeze_mm_mlp_adapter True "
                            "keeps the projector frozen: drop one of them")
        if self.lora_vision and not self.lora_enable:
            raise FlagError("--lora_vision adds LoRA to the vision encoder; it needs --lora_enable True")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise FlagError(f"--lora_bias must be none, all or lora_only, got {self.lora_bias!r}")
        # MMedAgent's --gradient_checkpointing is this project's flag too: taken as transformers 5's new name
        # (transformers would warn of the old one at every run)
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        if self.activation_checkpointing_kwargs is None:
            # non-reentrant checkpointing works with frozen embeddings (LoRA) without extra hooks
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        super().__post_init__()


class _Parser(transformers.HfArgumentParser):
    def error(self, message: str):
        """A bad value or an ambiguous flag: one line, not argparse's usage of every TrainingArguments flag."""
        raise FlagError(message)


DEEPSPEED_CONFIGS = Path(__file__).parent / "deepspeed"
"""The shipped ZeRO configs (``scripts/zero2.json`` etc. in a checkout link to them)."""


def _deepspeed_optimizer(config: Any) -> bool:
    """Whether a DeepSpeed config (a dict, or a JSON file's path) brings its own optimizer, which ``--optim`` then
    does not choose."""
    if isinstance(config, (str, Path)) and Path(config).is_file():
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError):
            return False
    return isinstance(config, dict) and "optimizer" in config


def bitsandbytes_optimizers() -> set[str]:
    """The ``--optim`` names the Trainer builds from bitsandbytes (``adamw_8bit``, ``paged_adamw_32bit``, ...)."""
    from transformers import trainer_optimizer

    names = getattr(trainer_optimizer, "_BITSANDBYTES_OPTIMIZERS", ())  # transformers' own list (private: may move)
    return {str(getattr(name, "value", name)) for name in names}


def shipped_deepspeed_config(argv: list[str]) -> list[str]:
    """``argv`` with a ``--deepspeed`` file that is not there but is named like a shipped config
    (MMedAgent's ``--deepspeed ./scripts/zero2.json`` run outside a checkout) replaced by the shipped one."""
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag != "--deepspeed" or not (eq or i + 1 < len(out)):
            continue
        value = value if eq else out[i + 1]
        shipped = DEEPSPEED_CONFIGS / Path(value).name
        if not Path(value).exists() and shipped.is_file():
            log.info("--deepspeed %s: not found here; using the shipped %s", value, shipped)
            out[i:i + (1 if eq else 2)] = [f"--deepspeed={shipped}"]
        elif not Path(value).exists() and value.endswith(".json"):  # not JSON text or base64, which DeepSpeed takes too
            names = ", ".join(sorted(p.name for p in DEEPSPEED_CONFIGS.glob("*.json")))
            raise FlagError(f"--deepspeed {value}: no such file; the shipped configs are {names} "
                            "(e.g. --deepspeed scripts/zero2.json)")
        break
    return out


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = _Parser((ModelArguments, DataArguments, TrainingArguments))
    argv = shipped_deepspeed_config(sys.argv[1:] if argv is None else argv)
    try:
        model_args, data_args, training_args, unknown = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True)
    except FlagError:
        raise
    except ValueError as e:  # transformers' own flag checks, e.g. --bf16 with --fp16, a missing --deepspeed file
        raise FlagError(str(e).strip().splitlines()[0]) from None
    if unknown:
        raise FlagError(unknown_flags(parser, unknown))
    if model_args.tune_mm_mlp_adapter:
        raise FlagError("--tune_mm_mlp_adapter True (LLaVA's projector-only pretraining stage) is not supported; the "
                        "projector trains by default (--freeze_mm_mlp_adapter True keeps it frozen)")
    if model_args.freeze_backbone and not training_args.lora_enable:
        raise FlagError("--freeze_backbone True with --lora_enable False would train the projector alone, which is "
                        "not supported: use --lora_enable True (the language model stays frozen under LoRA)")
    check_report_to(training_args.report_to)
    if data_args.image_max_tokens is not None and data_args.image_max_tokens < 4:
        raise FlagError(f"--image_max_tokens must be at least 4, got {data_args.image_max_tokens}")
    if data_args.image_aspect_ratio not in (None, "pad", "square"):
        raise FlagError(f"--image_aspect_ratio must be 'pad' or 'square', got {data_args.image_aspect_ratio!r}")
    template_name(model_args.version)  # an unknown --version fails here, before any model loads
    return model_args, data_args, training_args


def check_report_to(report_to: list[str]) -> None:
    """FlagError for a ``--report_to`` integration that is unknown or not installed (e.g. MMedAgent's ``wandb``),
    found here rather than by the Trainer once the data is checked and the model loaded."""
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        callbacks = get_reporting_integration_callbacks(report_to)
    except ValueError as e:
        raise FlagError(f"--report_to: {e}") from None
    for name, callback in zip(report_to, callbacks):
        try:
            callback()  # what the Trainer does first; each one checks that its package is there
        except (RuntimeError, ImportError) as e:
            raise FlagError(f"--report_to {name}: {str(e).strip().splitlines()[0]} Or pass --report_to none.") from None


NOT_TAKEN = {
    "--overwrite_output_dir": "gone from transformers 5; an --output_dir with checkpoints resumes the newest: use a "
                              "new --output_dir to start afresh",
    "--pretrain_mm_mlp_adapter": "the projector comes from --model_name_or_path; use a checkpoint that contains it",
}
"""LLaVA / transformers 4 flags this script does not take, and why (instead of a nearest-name guess)."""


def unknown_flags(parser: transformers.HfArgumentParser, unknown: list[str]) -> str:
    """The error for arguments no flag takes: why for :data:`NOT_TAKEN`, else the nearest known flag for each
    (typos, flags that transformers renamed, e.g. --evaluation_strategy -> --eval_strategy)."""
    known = [o for o in parser._option_string_actions if o.startswith("--") and "-" not in o[2:]]  # not --a-b aliases
    parts = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if flag in NOT_TAKEN:
            parts.append(f"{flag} ({NOT_TAKEN[flag]})")
        elif flag.startswith("--"):
            near = difflib.get_close_matches(flag, known, n=3)
            parts.append(f"{flag} (did you mean {' / '.join(near)}?)" if near else flag)
    if not parts:
        return f"unexpected argument(s) {' '.join(unknown)}: every value must follow its --flag"
    return f"unknown flag(s): {', '.join(parts)}; see python train/train_mem.py --help"


def template_name(version: str | None) -> str | None:
    """The model-layer template for ``--version`` (None: the processor's chat template); FlagError if unknown."""
    from mmedagent.model.templates import TEMPLATES

    if not version:
        return None
    name = TEMPLATE_ALIASES.get(version, version)
    if name not in TEMPLATES:
        aliases = ", ".join(f"{a} (= {t})" for a, t in TEMPLATE_ALIASES.items())
        raise FlagError(f"--version {version!r} is not a conversation template; choose one of {aliases}, "
                        f"{', '.join(TEMPLATES)}, or leave --version out for the processor's own chat template")
    return name


def _given(args: object, names: tuple[str, ...]) -> list[str]:
    fields = {f.name for f in dataclasses.fields(args)}
    return [n for n in names if n in fields and getattr(args, n) is not None]


def check_backbone_flags(family: str, model_args: ModelArguments, data_args: DataArguments,
                         training_args: TrainingArguments) -> None:
    """Reject flags that do not apply to ``family`` ("llava", "qwen2_vl", "mllama", "causal_lm")."""
    bad = []
    if family != "llava":
        bad += _given(model_args, LLAVA_ONLY)
    if family == "causal_lm":
        bad += _given(data_args, IMAGE_ONLY) + _given(training_args, IMAGE_ONLY)
    if bad:
        flags = ", ".join(f"--{n}" for n in bad)
        raise FlagError(f"{flags} do(es) not apply to {model_args.model_name_or_path} (a {family} backbone): "
                         f"{'image options need a vision backbone' if family == 'causal_lm' else 'LLaVA-only options'}"
                         "; remove them.")
    if family not in ("qwen2_vl", "causal_lm") and data_args.image_max_tokens is not None:
        raise FlagError(f"--image_max_tokens applies to Qwen2-VL only: {model_args.model_name_or_path} is a {family} "
                        "backbone; remove it.")
    if family in NATIVE_ASPECT and data_args.image_aspect_ratio == "pad":
        raise FlagError(f"--image_aspect_ratio pad applies to LLaVA only: {model_args.model_name_or_path} (a {family} "
                         f"backbone) keeps each image's aspect ratio itself ({NATIVE_ASPECT[family]}); remove it.")
    if family == "llava":
        if model_args.mm_use_im_start_end:
            raise FlagError("--mm_use_im_start_end True is not supported: transformers' LLaVA places image "
                             "features at the <image> tokens without start/end tokens. Use False.")
        if model_args.mm_use_im_patch_token:
            raise FlagError("--mm_use_im_patch_token True is not supported (no patch tokens in transformers' "
                             "LLaVA). Use False.")
        if model_args.mm_vision_select_feature not in (None, "patch", "cls_patch"):
            raise FlagError(f"--mm_vision_select_feature must be patch or cls_patch, got "
                             f"{model_args.mm_vision_select_feature!r}")
