"""The training run behind ``train/train_mem.py``: arguments -> validated data -> model -> Trainer -> outputs."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import transformers
from transformers.integrations import is_deepspeed_zero3_enabled

from mmedagent.hub import prefer_cache_when_unreachable
from mmedagent.model.llava_convert import llava_image_processor
from mmedagent.model.loading import family_of, is_original_llava, load_model_and_processor
from mmedagent.model.templates import tokenizer_of
from mmedagent.train.args import FlagError, check_backbone_flags, parse_args, template_name
from mmedagent.train.dataset import Collator, SupervisedDataset, load_samples
from mmedagent.train.modeling import apply_llava_flags, prepare_model, projector_name, torch_dtype
from mmedagent.train.trainer import MMedTrainer, latest_checkpoint, plot_loss, resume_error, write_manifest

log = logging.getLogger("mmedagent.train")


def backbone_family(path: str) -> str:
    """The model family, from the config alone (before any weights are loaded)."""
    config_file = Path(path) / "config.json"
    if config_file.is_file() and is_original_llava(json.loads(config_file.read_text())):
        return "llava"
    prefer_cache_when_unreachable(path)
    return family_of(transformers.AutoConfig.from_pretrained(path))


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


def _setup_logging(args) -> None:
    """Our messages at INFO on the main process of each node, WARNING elsewhere; transformers' own
    level follows ``--log_level`` / ``--log_level_replica``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("mmedagent").setLevel(logging.INFO if args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(args.get_process_log_level())


def build_trainer(argv: list[str] | None = None) -> tuple[MMedTrainer, dict]:
    """Parse flags, validate all data, load and prepare the model: the ready ``Trainer`` and run info."""
    model_args, data_args, args = parse_args(argv)
    _setup_logging(args)
    family = backbone_family(model_args.model_name_or_path)
    check_backbone_flags(family, model_args, data_args, args)
    template = template_name(model_args.version)

    samples = load_samples(data_args.data_path, data_args.image_folder, vision=family != "causal_lm")
    log.info("%d training records from %s", len(samples), data_args.data_path)
    eval_samples = []
    if data_args.eval_data_path:
        eval_samples = load_samples(data_args.eval_data_path, data_args.eval_image_folder or data_args.image_folder,
                                    vision=family != "causal_lm")
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
    model, processor, loaded_family = load_model_and_processor(
        model_args.model_name_or_path, dtype=torch_dtype(args),
        device=f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu",
        attn_implementation=model_args.attn_implementation,
        load_in_4bit=args.bits == 4, load_in_8bit=args.bits == 8)
    assert loaded_family == family, (loaded_family, family)
    if family == "llava":
        apply_llava_flags(model, model_args)
        if data_args.image_aspect_ratio == "pad":
            padding_processor(processor)
    model = prepare_model(model, family, args)

    def dataset_of(records):
        data = SupervisedDataset(records, processor, family, template, args.model_max_length)
        checked = set()
        for i, s in enumerate(records):  # fail fast: one record of every file through the whole pipeline
            if s.source not in checked:
                checked.add(s.source)
                data[i]
        return data

    dataset = dataset_of(samples)
    eval_dataset = dataset_of(eval_samples) if eval_samples else None
    tok = tokenizer_of(processor)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    blank = dataset.blank_image_item() if family != "causal_lm" and is_deepspeed_zero3_enabled() else None
    trainer = MMedTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                          data_collator=Collator(pad_id, family, blank), processing_class=processor,
                          projector=projector_name(family))
    info = {"base_model": model_args.model_name_or_path, "family": family, "template": template,
            "lora": args.lora_enable, "model_max_length": args.model_max_length,
            "image_aspect_ratio": data_args.image_aspect_ratio}
    return trainer, info


def main(argv: list[str] | None = None) -> Path:
    """Train; returns the output directory (adapter or full model, processor, manifest, loss curve)."""
    trainer, info = build_trainer(argv)
    args = trainer.args
    resume = args.resume_from_checkpoint or latest_checkpoint(args.output_dir)
    if resume:
        log.info("resuming from %s", resume)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as e:
        explained = resume_error(e, resume, explicit=bool(args.resume_from_checkpoint)) if resume else None
        if explained is None:
            raise
        raise explained from e
    if trainer.eval_dataset is not None:
        trainer.save_metrics("eval", trainer.evaluate())
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        write_manifest(args.output_dir, **info)
        curve = plot_loss(trainer.state.log_history, Path(args.output_dir) / "loss.png")
        log.info("saved to %s%s", args.output_dir, f" (loss curve {curve.name})" if curve else "")
    return Path(args.output_dir)
