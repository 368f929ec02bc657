"""The training run behind ``train/train_mem.py``: arguments -> validated data -> model -> Trainer -> outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from transformers.integrations import is_deepspeed_zero3_enabled

from mmedagent.hub import is_hub_id, prefer_cache_when_unreachable
from mmedagent.locks import holding
from mmedagent.protocol import system_setting
from mmedagent.model.llava_convert import converted_cache_dir, llava_image_processor
from mmedagent.model.loading import (family_of, is_original_llava, load_config, load_model_and_processor,
                                     original_llava_snapshot)
from mmedagent.model.templates import check_template, tokenizer_of
from mmedagent.data.formats import DataError
from mmedagent.train.args import FlagError, check_backbone_flags, parse_args, template_name
from mmedagent.train.dataset import IGNORE_INDEX, Collator, SupervisedDataset, load_samples, split_list
from mmedagent.train.modeling import apply_llava_flags, prepare_model, projector_name, torch_dtype
from mmedagent.train.trainer import MMedTrainer, ResumeError, latest_checkpoint, plot_loss, resume_error

log = logging.getLogger("mmedagent.train")


def original_llava(path: str) -> Path | None:
    """The folder of ``path`` when it is an original LLaVA checkpoint (converted on load): the folder itself,
    or a hub id's snapshot; else None."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file() and is_hub_id(path) and not path.startswith("hf-hub:"):
        return original_llava_snapshot(path)
    return Path(path) if config_file.is_file() and is_original_llava(json.loads(config_file.read_text())) else None


def backbone_family(path: str) -> str:
    """The model family, from the config alone (before any weights are loaded)."""
    prefer_cache_when_unreachable(path)
    if original_llava(path) is not None:
        return "llava"
    try:
        config = load_config(path)  # ModelNotFoundError: a missing path or an unreachable / unknown hub id
    except ValueError as e:  # a model type this transformers does not know; the message starts with the path
        raise FlagError(f"--model_name_or_path {e}") from None
    try:
        return family_of(config)
    except ValueError as e:
        raise FlagError(f"--model_name_or_path {path}: {e}") from None


def cap_image_tokens(processor, max_tokens: int) -> None:
    """``--image_max_tokens`` for Qwen2-VL: lower the image processor's largest image area (its
    ``size["longest_edge"]``, formerly ``max_pixels``) to ``max_tokens`` image tokens, each
    ``(patch_size * merge_size)²`` pixels (28 x 28 for Qwen2-VL); never raises it. Saved with the output,
    so inference scales images as training did."""
    ip = processor.image_processor
    side = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))
    max_pixels = max_tokens * side * side
    size = ip.size
    current = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
    shortest = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
    if current is not None and current <= max_pixels:
        return
    if shortest and max_pixels < shortest:
        raise FlagError(f"--image_max_tokens {max_tokens} ({max_pixels} px) is below the processor's smallest image "
                        f"area ({shortest} px)")
    ip.size = {"shortest_edge": shortest, "longest_edge": max_pixels}
    if hasattr(ip, "max_pixels"):
        ip.max_pixels = max_pixels
    log.info("--image_max_tokens %d: images larger than %d px are scaled down (the processor allowed %s px)",
             max_tokens, max_pixels, current)


def padding_processor(processor) -> None:
    """``--image_aspect_ratio pad`` for LLaVA: the processor itself pads (a ``LlavaImageProcessor`` with
    ``do_pad``, built like a converted checkpoint's), so the processor the Trainer saves with the adapter
    pads at inference exactly as in training."""
    current = processor.image_processor
    if type(current).__name__ == "LlavaImageProcessor" and current.do_pad:
        return
    processor.image_processor = llava_image_processor(current, do_pad=True)
    log.info("--image_aspect_ratio pad: %s -> LlavaImageProcessor(do_pad=True), saved with the output",
             type(current).__name__)


@contextlib.contextmanager
def _without_zero3(args):
    """Models built here are whole: transformers builds every model ZeRO-3-partitioned while a ZeRO-3 config is set."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(args.hf_deepspeed_config)


def _setup_logging(args) -> None:
    """Our messages at INFO on the main process of each node, WARNING elsewhere; transformers' own
    level follows ``--log_level`` / ``--log_level_replica``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("mmedagent").setLevel(logging.INFO if args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(args.get_process_log_level())


def build_trainer(argv: list[str] | None = None, parsed=None) -> tuple[MMedTrainer, dict]:
    """Parse flags, validate all data, load and prepare the model: the ready ``Trainer`` and run info."""
    model_args, data_args, args = parsed or parse_args(argv)
    _setup_logging(args)
    family = backbone_family(model_args.model_name_or_path)
    check_backbone_flags(family, model_args, data_args, args)
    template = template_name(model_args.version)

    samples = load_samples(data_args.data_path, data_args.image_folder, vision=family != "causal_lm")
    log.info("%d training records from %s", len(samples), data_args.data_path)
    eval_samples = []
    if data_args.eval_data_path:
        folder, folder_flag = ((data_args.eval_image_folder, "--eval_image_folder") if data_args.eval_image_folder else
                               (data_args.image_folder, "--image_folder (the default of --eval_image_folder)"))
        eval_samples = load_samples(data_args.eval_data_path, folder, vision=family != "causal_lm",
                                    flags=("--eval_data_path", folder_flag))
        log.info("%d validation records from %s", len(eval_samples), data_args.eval_data_path)
    elif args.eval_strategy != "no":
        strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
        raise FlagError(f"--eval_strategy {strategy} needs validation data: --eval_data_path")

    transformers.set_seed(args.seed)  # before the adapters and any new weights are initialised, as Trainer seeds too late
    if args.deepspeed and args.world_size > 1:
        # ZeRO-3 partitions weights while they load (zero.Init), which asks DeepSpeed's own
        # communication layer for the world size; on CPU nothing has set that layer up yet.
        import deepspeed

        deepspeed.init_distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # --vision_tower (e.g. a local copy of the CLIP tower on an offline server) is the tower an original LLaVA
    # checkpoint is converted with; a transformers LLaVA keeps its own (checked by apply_llava_flags).
    original = original_llava(model_args.model_name_or_path) if family == "llava" else None
    try:
        if original is not None:
            # Converted into the cache before loading (which then finds it there): by the first rank of each
            # machine only (all ranks at once: minutes for a 7B model, and all but one fail to move theirs into
            # the cache), and outside ZeRO-3 (its partitioned weights cannot be copied into the converted model).
            with args.main_process_first(local=True, desc="converting the original LLaVA checkpoint"), \
                    _without_zero3(args):
                try:
                    converted_cache_dir(original, vision_tower=model_args.vision_tower)
                except ValueError as e:  # e.g. MMedAgent's released LoRA folder, which holds its base's config.json
                    raise FlagError(f"--model_name_or_path {model_args.model_name_or_path}: {e}") from None
        model, processor, loaded_family = load_model_and_processor(
            model_args.model_name_or_path, dtype=torch_dtype(args),
            device=f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu",
            attn_implementation=model_args.attn_implementation,
            load_in_4bit=args.bits == 4, load_in_8bit=args.bits == 8,
            vision_tower=model_args.vision_tower if original is not None else None)
    except FileNotFoundError as e:
        if original is None or not str(e).startswith("vision tower "):
            raise
        what = (f"--vision_tower {model_args.vision_tower}" if model_args.vision_tower else
                f"the vision tower of {model_args.model_name_or_path} (its mm_vision_tower)")
        reason = str(e.__cause__ or e).strip().splitlines()[0]
        raise FlagError(f"{what} could not be loaded ({reason}); pass the CLIP tower's local path with "
                        "--vision_tower") from None
    assert loaded_family == family, (loaded_family, family)
    try:
        check_template(template, processor)
    except ValueError as e:  # another family's markers: turns the model would read as text and never end
        raise FlagError(f"--version {model_args.version}: {e}") from None
    if family == "llava":
        apply_llava_flags(model, model_args)
        if data_args.image_aspect_ratio == "pad":
            padding_processor(processor)
    if data_args.image_max_tokens is not None:
        cap_image_tokens(processor, data_args.image_max_tokens)
    model = prepare_model(model, family, args)

    def dataset_of(records):
        data = SupervisedDataset(records, processor, family, template, args.model_max_length)
        checked, trained = {}, False
        for i, s in enumerate(records):  # fail fast: one record of every file through the whole pipeline
            if s.source not in checked:
                checked[s.source] = s.where
                trained |= bool((data[i]["labels"] != IGNORE_INDEX).any())
        if not trained:
            raise DataError(f"{', '.join(checked.values())}: no answer token is left to train on after truncation to "
                            f"--model_max_length {args.model_max_length}; raise --model_max_length")
        return data

    dataset = dataset_of(samples)
    eval_dataset = dataset_of(eval_samples) if eval_samples else None
    tok = tokenizer_of(processor)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # every rank runs the vision modules at every step (see Collator)
    vision_every_step = family != "causal_lm" and (args.world_size > 1 or is_deepspeed_zero3_enabled())
    blank = dataset.blank_image_item() if vision_every_step else None
    info = {"base_model": model_args.model_name_or_path, "family": family, "template": template,
            "lora": args.lora_enable, "model_max_length": args.model_max_length,
            "image_aspect_ratio": data_args.image_aspect_ratio}
    # served as trained: with no system message where the records had none (not with the tool catalog, the
    # serving default for models that say nothing), with the records' one system text where they share one
    systems = {s.messages[0]["content"] if s.messages[0]["role"] == "system" else None for s in samples}
    if len(systems) > 1:  # no one setting serves the model as it was trained
        log.warning("the records have %d different system messages (or none): mmedagent.json records none, so serving "
                    "and evaluation send their default (the tool catalog); pass --system-prompt when serving, or give "
                    "every record the same system message", len(systems))
    trainer = MMedTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                          data_collator=Collator(pad_id, family, blank), processing_class=processor,
                          projector=projector_name(family), manifest=info,
                          serving=system_setting(systems.pop()) if len(systems) == 1 else None)
    return trainer, info


RUN_FILE = "mmedagent_run.json"
"""Written into ``--output_dir`` when training starts: a fingerprint of the data and the settings, so that
resuming a checkpoint with other data or settings is refused."""

FINGERPRINT_FLAGS = (
    "model_name_or_path", "version", "lora_enable", "lora_r", "lora_alpha", "lora_dropout", "lora_bias",
    "lora_target_modules", "lora_vision", "bits", "learning_rate", "mm_projector_lr", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "optim", "per_device_train_batch_size", "gradient_accumulation_steps",
    "model_max_length", "seed", "freeze_mm_mlp_adapter", "image_aspect_ratio", "image_max_tokens",
    "group_by_modality_length", "vision_tower",
)
"""The settings that shape what a resumed run computes. Not the run's length (``--max_steps``,
``--num_train_epochs``: a longer run continues a finished one), nor logging, saving or evaluation cadence."""


def _file_digest(path: Path, h) -> None:
    if path.is_dir():
        for f in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            _file_digest(f, h)
        return
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def run_fingerprint(model_args, data_args, args) -> dict:
    """The data (the bytes of every ``--data_path`` / ``--eval_data_path`` file; not of the images they name)
    and the settings in :data:`FINGERPRINT_FLAGS`."""
    h = hashlib.sha256()
    for flag in ("data_path", "eval_data_path"):
        for p in split_list(getattr(data_args, flag)):
            h.update(f"{flag}:{Path(p).name}\0".encode())
            if Path(p).exists():
                _file_digest(Path(p), h)
    settings = {}
    for name in FINGERPRINT_FLAGS:
        for obj in (model_args, data_args, args):
            if hasattr(obj, name):
                value = getattr(obj, name)
                settings[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
                break
    return {"data_sha256": h.hexdigest(), "settings": settings}


def check_fingerprint(output_dir: str, checkpoint: str, fingerprint: dict, explicit: bool) -> None:
    """ResumeError when ``checkpoint``'s run was started with other data or settings (a run without a
    fingerprint, from an older version, is resumed as before)."""
    for folder in (Path(checkpoint).parent, Path(output_dir)):
        saved_file = folder / RUN_FILE
        if saved_file.is_file():
            break
    else:
        return
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        return
    changed = [k for k in fingerprint["settings"] if k in saved.get("settings", {})
               and saved["settings"][k] != fingerprint["settings"][k]]
    what = (["the training data"] if saved.get("data_sha256") != fingerprint["data_sha256"] else []) + [
        f"--{k} ({saved['settings'][k]!r} -> {fingerprint['settings'][k]!r})" for k in changed]
    if what:
        how = ("drop --resume_from_checkpoint" if explicit else
               f"remove the checkpoint-* folders from {output_dir}")
        raise ResumeError(
            f"{checkpoint} was trained with other settings than this run: {', '.join(what)} changed. Resume with the "
            f"data and flags it was started with, or start afresh: use a new --output_dir (recipes: a new --out) or "
            f"{how}.")


def _finished(checkpoint: str, args) -> int | None:
    """The checkpoint's step when it already reached the end of the run (``--max_steps``, or the number
    of steps its epochs came to when it had trained for ``--num_train_epochs``), else None."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    step = int(state.get("global_step") or 0)
    if args.max_steps > 0:
        end = args.max_steps
    elif args.num_train_epochs <= float(state.get("epoch") or 0) + 1e-6:
        end = int(state.get("max_steps") or 0)
    else:  # more epochs than the checkpoint's run: it continues
        return None
    return step if end and step >= end else None


def release_deepspeed_shm() -> None:
    """Unlink this rank's shared-memory all-reduce buffer. DeepSpeed's CPU backend creates one per rank
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, 66 MB) when all ranks are on
    one machine and never removes it: without this, every CPU run leaves them behind until the
    machine's memory is gone. Peers that mapped it keep their mapping."""
    if "LOCAL_SIZE" not in os.environ or "RANK" not in os.environ:
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{os.environ['RANK']}")
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()


LOCK_FILE = ".train.lock"


@contextlib.contextmanager
def output_dir_lock(args) -> Iterator[None]:
    """Hold ``--output_dir``'s lock while this job trains into it (its first process takes it for the job): the
    same command started again meanwhile (a requeued job, a second terminal) is refused instead of writing
    the same checkpoints. The lock file is removed when the run ends, and so is a folder the run made and
    left empty (a run refused before writing anything)."""
    if args.process_index != 0:
        yield
        return
    out = Path(args.output_dir)
    made = not out.exists()
    try:
        with holding(out / LOCK_FILE, lambda holder: FlagError(
                f"{args.output_dir} is in use by another training run ({holder}): wait for it to end, or use "
                "another --output_dir"), remove=True):
            yield
    finally:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()


def main(argv: list[str] | None = None) -> Path:
    """Train; returns the output directory (adapter or full model, processor, manifest, loss curve).

    A run whose newest checkpoint already reached the last step is not trained again: with its final
    outputs present nothing is done; otherwise they are written from that checkpoint."""
    parsed = parse_args(argv)
    _setup_logging(parsed[2])
    with output_dir_lock(parsed[2]):
        return _train(parsed)


def _train(parsed) -> Path:
    model_args, data_args, args = parsed
    explicit = bool(args.resume_from_checkpoint)
    if explicit and not (Path(args.resume_from_checkpoint) / "trainer_state.json").is_file():
        missing = not Path(args.resume_from_checkpoint).is_dir()
        raise FlagError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: "
                        + ("no such folder" if missing else "not a complete checkpoint (no trainer_state.json)"))
    resume = args.resume_from_checkpoint or latest_checkpoint(args.output_dir)
    fingerprint = run_fingerprint(model_args, data_args, args)
    if resume:
        check_fingerprint(args.output_dir, resume, fingerprint, explicit)
    done_at = _finished(resume, args) if resume else None
    out = Path(args.output_dir)
    if done_at is not None and (out / "mmedagent_train.json").is_file() and not explicit:
        log.info("already trained: %s reached the last step (%d); nothing to do (start afresh with a new "
                 "--output_dir)", resume, done_at)
        return out

    trainer, _ = build_trainer(parsed=parsed)

    def save_fingerprint():
        if trainer.is_world_process_zero():
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".{RUN_FILE}.tmp"
            tmp.write_text(json.dumps(fingerprint, indent=1) + "\n")
            os.replace(tmp, out / RUN_FILE)

    if not resume:
        save_fingerprint()  # before the first checkpoint; a resumed run keeps the one it was started with
    if done_at is not None:
        log.info("%s already reached the last step (%d): not training again; writing the outputs from it",
                 resume, done_at)
    elif resume:
        log.info("resuming from %s", resume)
    try:
        if done_at is not None:
            trainer.restore(resume)
        else:
            trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        explained = resume_error(e, resume, explicit=explicit) if resume else None
        if explained is None:
            raise
        raise explained from e
    if resume:
        save_fingerprint()  # (equal to the saved one, or the first for a run saved without one)
    if trainer.eval_dataset is not None:
        trainer.save_metrics("eval", trainer.evaluate())
    trainer.save_state()
    trainer.save_model(args.output_dir)  # with the manifest (mmedagent_train.json), written last
    if trainer.is_world_process_zero():
        curve = plot_loss(trainer.state.log_history, Path(args.output_dir) / "loss.png")
        log.info("saved to %s%s", args.output_dir, f" (loss curve {curve.name})" if curve else "")
    return Path(args.output_dir)
