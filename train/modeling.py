"""Model preparation for training: LLaVA flags, freezing, LoRA / QLoRA through peft, Mllama's image-free rows.

Where the parts of each backbone live (transformers 5 classes, after the model layer loaded them):

=========  ===================  ============================  ========================
family     vision encoder       projector                     language model
=========  ===================  ============================  ========================
llava      model.vision_tower   model.multi_modal_projector   model.language_model
qwen2_vl   model.visual         model.visual.merger           model.language_model
mllama     model.vision_model   model.multi_modal_projector   model.language_model
causal_lm  -                    -                             model
=========  ===================  ============================  ========================
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from mmedagent.model.loading import parts
from mmedagent.train.args import FlagError, ModelArguments, TrainingArguments

log = logging.getLogger(__name__)

def projector_name(family: str) -> str | None:
    return parts(family)[1]


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; keep a name check for other backends
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _linear_leaves(model: nn.Module, under: str, excluded: tuple[str, ...]) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if name.startswith(under + ".") and not name.startswith(excluded) and _is_linear(module)}


def lora_target_regex(model: nn.Module, family: str, names: str | None = None, vision_too: bool = False) -> str:
    """A peft ``target_modules`` regex over the language model's Linear layers (never lm_head or the
    projector); ``names`` (comma-separated) restricts the language model's leaf names. ``vision_too``
    adds every Linear layer of the vision encoder (attention and MLP), still without the projector."""
    vision, projector, lm = parts(family)
    excluded = tuple(p + "." for p in (vision, projector) if p)
    leaves = _linear_leaves(model, lm, excluded) - {"lm_head"}
    if names:
        wanted = {n.strip() for n in names.split(",") if n.strip()}
        unknown = wanted - leaves
        if unknown:
            raise FlagError(f"--lora_target_modules {sorted(unknown)} are not Linear layers of the language model; "
                             f"available: {sorted(leaves)}")
        leaves = wanted
    if not leaves:
        raise ValueError(f"no Linear layers found under {lm!r}")
    pattern = rf"{re.escape(lm)}\..*\.({'|'.join(sorted(map(re.escape, leaves)))})"
    if vision_too:
        if vision is None:
            raise FlagError("--lora_vision: this model has no vision encoder")
        skip = (projector + ".",) if projector else ()
        vision_leaves = _linear_leaves(model, vision, skip)
        if not vision_leaves:
            raise ValueError(f"--lora_vision: no Linear layers found under {vision!r}")
        not_projector = rf"(?!{re.escape(projector)}\.)" if projector else ""
        pattern += rf"|{not_projector}{re.escape(vision)}\..*\.({'|'.join(sorted(map(re.escape, vision_leaves)))})"
    return rf"^(?:{pattern})$"


def apply_llava_flags(model: nn.Module, model_args: ModelArguments) -> None:
    """Check / apply MMedAgent's LLaVA flags against a transformers LLaVA checkpoint."""
    cfg = model.config
    if model_args.mm_projector_type is not None:
        have = getattr(cfg, "mm_projector_type", None) or f"mlp2x_{cfg.projector_hidden_act}"
        if model_args.mm_projector_type != have:
            raise FlagError(f"--mm_projector_type {model_args.mm_projector_type} does not match the checkpoint's "
                             f"projector ({have}); transformers' LLaVA projector is Linear-{cfg.projector_hidden_act}-"
                             "Linear (mlp2x_gelu).")
    if model_args.vision_tower is not None:
        recorded = getattr(cfg, "mm_vision_tower", None) or getattr(cfg.vision_config, "_name_or_path", "") or ""
        if recorded and recorded.rstrip("/").split("/")[-1] != model_args.vision_tower.rstrip("/").split("/")[-1]:
            raise FlagError(f"--vision_tower {model_args.vision_tower} differs from the checkpoint's vision tower "
                             f"({recorded}); transformers' LLaVA trains the tower stored in the checkpoint.")
        log.warning("--vision_tower %s: using the vision tower stored in the checkpoint", model_args.vision_tower)
    if model_args.mm_vision_select_layer is not None and model_args.mm_vision_select_layer != cfg.vision_feature_layer:
        # Changing it here would change only this process's model: the adapter stores LoRA weights, not the
        # config, so merging and loading would feed the trained model another layer's features.
        raise FlagError(f"--mm_vision_select_layer {model_args.mm_vision_select_layer} differs from the checkpoint's "
                         f"vision_feature_layer ({cfg.vision_feature_layer}), and a LoRA adapter cannot carry another "
                         "layer: the merged or served model would use the checkpoint's. Leave the flag out (or pass "
                         f"{cfg.vision_feature_layer}), or train from a checkpoint whose config.json has "
                         f"vision_feature_layer {model_args.mm_vision_select_layer}.")
    if model_args.mm_vision_select_feature is not None:
        strategy = {"patch": "default", "cls_patch": "full"}[model_args.mm_vision_select_feature]
        if strategy != cfg.vision_feature_select_strategy:
            raise FlagError(f"--mm_vision_select_feature {model_args.mm_vision_select_feature} changes the number of "
                             f"image tokens the processor inserts (checkpoint: {cfg.vision_feature_select_strategy}); "
                             "convert the checkpoint with the other strategy instead.")


def _keep_imageless_rows(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook of an Mllama cross-attention layer: rows (samples) in which no token attends to an image
    leave the layer unchanged, as a text-only prompt does at inference (where transformers skips the layer).

    transformers' Mllama zeroes only the MLP half of such a layer for rows fully masked out; the attention
    half still adds ``tanh(gate) * attention`` over every image token of the batch. The layer still runs
    (and stays in the autograd graph) for every row, which ZeRO-3 needs; only its result is not used."""
    rows = kwargs.get("full_text_row_masked_out_mask")
    hidden = args[0] if args else kwargs.get("hidden_states")
    if rows is None or hidden is None:
        return output
    out = output[0] if isinstance(output, tuple) else output
    has_image = rows.flatten(1).any(dim=1).view(-1, *([1] * (hidden.dim() - 1)))
    kept = torch.where(has_image, out, hidden)
    return (kept, *output[1:]) if isinstance(output, tuple) else kept


def keep_imageless_rows(model: nn.Module) -> int:
    """Mllama: make samples without an image pass the cross-attention layers unchanged in training, as they do
    at inference (see :func:`_keep_imageless_rows`): text-only records in a batch with images, and the
    masked-out blank image that ZeRO-3 adds to image-free batches (:class:`~mmedagent.train.dataset.Collator`).
    Returns how many layers it hooked (each at most once)."""
    hooked = 0
    for module in model.modules():
        if type(module).__name__ == "MllamaCrossAttentionDecoderLayer":
            if not getattr(module, "_mmedagent_keeps_imageless_rows", False):
                module.register_forward_hook(_keep_imageless_rows, with_kwargs=True)
                module._mmedagent_keeps_imageless_rows = True
            hooked += 1
    return hooked


def prepare_model(model: nn.Module, family: str, args: TrainingArguments) -> nn.Module:
    """Freeze the vision encoder, set up LoRA (or full fine-tuning) and the projector's trainability."""
    vision, projector, _ = parts(family)
    if family == "mllama" and not keep_imageless_rows(model):
        raise ValueError("no MllamaCrossAttentionDecoderLayer found in the Mllama model")
    train_projector = projector is not None and not args.freeze_mm_mlp_adapter
    model.config.use_cache = False
    if args.lora_enable:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if args.bits in (4, 8):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=args.activation_checkpointing,
                gradient_checkpointing_kwargs=args.activation_checkpointing_kwargs)
            if vision is not None:  # peft made every unquantized weight float32; the frozen encoder needs no more
                model.get_submodule(vision).to(torch_dtype(args))  # than the training dtype (as LLaVA's QLoRA)
        config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias=args.lora_bias,
            target_modules=lora_target_regex(model, family, args.lora_target_modules, args.lora_vision),
            modules_to_save=[projector.rsplit(".", 1)[-1]] if train_projector else None,
            task_type="CAUSAL_LM")
        model = get_peft_model(model, config, autocast_adapter_dtype=False)  # dtypes: master_weights_fp32
    else:
        for name, p in model.named_parameters():
            in_vision = vision is not None and name.startswith(vision + ".") and not (
                projector and name.startswith(projector + "."))
            p.requires_grad_(not in_vision)
        if projector is not None and not train_projector:
            for p in model.get_submodule(projector).parameters():
                p.requires_grad_(False)
    if not args.deepspeed:
        master_weights_fp32(model)
    if args.activation_checkpointing:
        model.enable_input_require_grads()
    numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: full size
    n_train, n_all = sum(n for n, g in numel if g), sum(n for n, _ in numel)
    log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))
    return model


def master_weights_fp32(model: nn.Module) -> None:
    """Make every trainable tensor float32 (the frozen rest keeps the loading dtype).

    ``--bf16`` / ``--fp16`` load the model in that dtype, and the Trainer's mixed precision expects fp32
    weights to update: in fp16, Adam's epsilon (1e-8) is 0, so the first update is NaN (loss 0, grad_norm nan
    from the second step; on a GPU the gradient scaler refuses fp16 gradients), and in bf16 (8 bits of
    mantissa) updates below ~0.4% of a weight are rounded away. Not under DeepSpeed, which keeps fp32 master
    weights itself (and ZeRO-3 needs one dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def torch_dtype(args: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
