"""Load any supported checkpoint through transformers' native classes.

Families: ``llava`` (LlavaForConditionalGeneration), ``qwen2_vl`` (Qwen2-VL / Qwen2.5-VL),
``mllama`` (Llama-3.2-Vision) and ``causal_lm`` (a text-only LM). Also accepted: a peft adapter
directory (stacked on its recorded base model, see ``adapters.adapter_base``, or an explicit base) and an original
LLaVA-layout checkpoint (``LlavaLlamaForCausalLM``, converted on load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmedagent.hub import is_hub_id, prefer_cache_when_unreachable

FAMILIES = {
    "llava": "llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "mllama": "mllama",
}


def _local_json(path_or_id: str | Path, name: str) -> dict[str, Any] | None:
    f = Path(path_or_id) / name
    return json.loads(f.read_text()) if f.is_file() else None


class BackendUnavailable(ValueError):
    """A device, attention kernel or quantization that this machine or model cannot run; the message says what
    to use instead (one line for a command to print)."""


class ModelNotFoundError(OSError):
    """A checkpoint that cannot be found or read: a local path that does not exist or holds no model
    config, or a hub id that is unknown, gated or unreachable. Entry points report it as one ``error:`` line."""


def check_new_output_dir(out: str | Path) -> None:
    """A ``ValueError`` unless ``out`` does not exist or is an empty directory: a model saved among other files
    mixes with them (a stale shard index, an adapter_config.json or another model's config is what loads next)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory: choose a new output directory")


def home_expanded(path_or_id: Any) -> Any:
    """``~/ckpt`` as the home folder's ``ckpt`` (a shell leaves ``~`` as it is in a quoted or config-file path);
    anything else (a hub id, None) unchanged."""
    return Path(path_or_id).expanduser() if isinstance(path_or_id, (str, Path)) and str(path_or_id).startswith("~") \
        else path_or_id


def load_config(path_or_id: str | Path) -> Any:
    """``AutoConfig.from_pretrained(path_or_id)``; :class:`ModelNotFoundError` with a one-line reason when
    the checkpoint cannot be found or read (call :func:`mmedagent.hub.prefer_cache_when_unreachable` first)."""
    from transformers import AutoConfig

    path_or_id = home_expanded(path_or_id)
    local = Path(str(path_or_id))
    if local.is_dir() and not (local / "config.json").is_file():  # transformers: "should have a model_type key"
        inside = sorted(p.parent.name for p in local.glob("*/config.json"))
        hint = f"; checkpoints inside it: {', '.join(inside)}" if inside else ""
        raise ModelNotFoundError(f"{path_or_id}: not a checkpoint folder (no config.json){hint}")
    try:
        return AutoConfig.from_pretrained(str(path_or_id))
    except ValueError as e:  # e.g. a model type this transformers does not know: its message runs to a paragraph
        raise ValueError(f"{path_or_id}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if Path(str(path_or_id)).expanduser().exists():
            raise ModelNotFoundError(f"{path_or_id}: not a loadable checkpoint: {first}") from None
        raise ModelNotFoundError(f"{path_or_id}: no such local directory (relative paths are read from {Path.cwd()}) "
                                 f"and not loadable as a hub id: {first}") from None


def is_adapter(path_or_id: str | Path) -> bool:
    return (Path(path_or_id) / "adapter_config.json").is_file()


def is_original_llava(config: dict[str, Any] | None) -> bool:
    """An original LLaVA / LLaVA-Med / MMedAgent layout (vision tower referenced, projector in the LM)."""
    if not config:
        return False
    archs = config.get("architectures") or []
    return "mm_vision_tower" in config or any(a.startswith("LlavaLlama") for a in archs)


def family_of(config: Any) -> str:
    """Map a transformers config to one of the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not hasattr(config, "vision_config"):
        return "causal_lm"
    raise ValueError(
        f"unsupported model type {model_type!r}: supported are {', '.join(sorted(FAMILIES))} and text-only causal LMs"
    )


def resolve_device(device: str | None) -> str:
    """``device`` checked (None or ``auto``: CUDA when there is one, else CPU)."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device!r} requested but CUDA is not available; use cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailable(f"device {device!r} requested but MPS (Apple GPU) is not available; use cpu")
    return str(device)


_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_dtype(dtype: Any, device: str) -> Any:
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            return dtype
        name = dtype.removeprefix("torch.")
        value = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (use e.g. float32, bfloat16, float16, or auto)")
        return value
    return dtype


def resolve_attn(attn_implementation: str | None, device: str, dtype: Any, model_class: Any) -> str:
    """The attention kernel: by default ``flash_attention_2`` where it can run (CUDA, flash-attn installed,
    float16 / bfloat16 weights, a model class that supports it: Mllama does not), else ``sdpa``. ``dtype``: the
    dtype the layers compute in. An explicit ``flash_attention_2`` that cannot run is a clear error here rather
    than transformers' (or flash-attn's, at the first call) own."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    half = dtype in (torch.float16, torch.bfloat16)
    supported = bool(getattr(model_class, "_supports_flash_attn", False))
    if attn_implementation is None:
        usable = device.startswith("cuda") and half and supported and is_flash_attn_2_available()
        return "flash_attention_2" if usable else "sdpa"
    if attn_implementation == "flash_attention_2":
        if not supported:
            raise BackendUnavailable(f"flash_attention_2 requested but {model_class.__name__} does not support it; use 'sdpa'")
        if not half:
            raise BackendUnavailable(f"flash_attention_2 runs in float16 or bfloat16, not {str(dtype).replace('torch.', '')}: "
                             "load with dtype bfloat16 (or float16), or use 'sdpa'")
        if not is_flash_attn_2_available():
            raise BackendUnavailable("flash_attention_2 requested but flash-attn is not installed (needs CUDA); use 'sdpa'")
    return attn_implementation


PARTS = {
    "llava": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "qwen2_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "mllama": ("model.vision_model", "model.multi_modal_projector", "model.language_model"),
    "causal_lm": (None, None, "model"),
}
"""Each family's (vision encoder, projector, language model) modules in transformers' layout."""

VISION_MODULES = tuple(vision.removeprefix("model.") for vision, _, _ in PARTS.values() if vision)
"""Where each family keeps its vision encoder, under ``model.``."""

UNQUANTIZED = ("lm_head", *dict.fromkeys(m for vision, projector, _ in PARTS.values() for m in (vision, projector) if m))
"""Modules a 4-bit / 8-bit base keeps in its 16-bit dtype, as LLaVA does: the output head (transformers'
default), the vision encoder and the projector (small next to the LM; a quantized projector cannot be trained
or have MMedAgent's projector weights loaded into it)."""


def parts(family: str) -> tuple[str | None, str | None, str]:
    """(vision encoder, projector, language model) module names of ``family``."""
    if family not in PARTS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(PARTS)}")
    return PARTS[family]


def bitsandbytes_missing() -> str | None:
    """What a quantised base or an 8-bit optimizer lacks on this machine (no CUDA GPU, no working bitsandbytes),
    or None."""
    import torch

    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    try:
        import bitsandbytes  # noqa: F401
    except ModuleNotFoundError:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    except Exception as e:  # noqa: BLE001 - installed but broken (e.g. built for another CUDA)
        return f"bitsandbytes does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: Any) -> Any:
    """A BitsAndBytesConfig (:func:`bnb_config`), or None; a clear error where bitsandbytes or a GPU is missing."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit / load_in_8bit")
    if missing := bitsandbytes_missing():
        raise BackendUnavailable(f"4-bit/8-bit loading needs a CUDA GPU with bitsandbytes, but {missing}; "
                                 "load without quantization")
    return bnb_config(4 if load_in_4bit else 8, compute_dtype)


def bnb_config(bits: int, compute_dtype: Any) -> Any:
    """bitsandbytes' config for a ``bits``-bit (4 or 8) base: NF4 with double quantization computing in
    ``compute_dtype`` (``"auto"``: bfloat16), or LLM.int8; :data:`UNQUANTIZED` kept as they are."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(UNQUANTIZED))
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype if compute_dtype != "auto" else torch.bfloat16,
        llm_int8_skip_modules=list(UNQUANTIZED),
    )


_SAVED_WITHOUT = ("a checkpoint saved without its tokenizer and processor (a Trainer checkpoint-N, a model saved on "
                  "its own) needs those files of the model it was trained from copied into it (tokenizer*, "
                  "special_tokens_map.json, preprocessor_config.json, processor_config.json, chat_template.jinja)")


def _has_vocabulary_file(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in ("tokenizer.*", "*.model", "vocab.*", "*.tiktoken"))


def load_processor(path_or_id: str | Path, family: str, declared_tokenizer: bool = False) -> Any:
    """AutoProcessor for vision families, AutoTokenizer for text-only models. A local folder without a
    tokenizer or processor is a ``ValueError`` that says so (transformers builds an empty tokenizer for some
    models, and asks to install sentencepiece for others). ``declared_tokenizer``: the tokenizer class its
    ``tokenizer_config.json`` names (an original LLaVA folder's ``model_type: llava`` would otherwise make
    transformers read LLaMA's ``tokenizer.model`` without its leading-space rule: other token ids)."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    from mmedagent.model.templates import tokenizer_of

    folder = Path(str(path_or_id)).expanduser()
    no_tokenizer = f"{path_or_id} holds no tokenizer (tokenizer.json, tokenizer.model, vocab.json): {_SAVED_WITHOUT}"
    loader = AutoTokenizer if family == "causal_lm" else AutoProcessor
    if declared_tokenizer and family == "causal_lm":
        declared = (_local_json(folder, "tokenizer_config.json") or {}).get("tokenizer_class")
        loader = (tokenizer_class_from_name(declared) if isinstance(declared, str) else None) or AutoTokenizer
    try:
        processor = loader.from_pretrained(str(path_or_id))
    except (OSError, ValueError) as e:
        if not folder.is_dir():
            raise  # a hub id: the loader's own message
        if not _has_vocabulary_file(folder):
            raise ValueError(no_tokenizer) from None
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"{path_or_id}: its {'tokenizer' if family == 'causal_lm' else 'processor'} cannot be "
                         f"loaded: {reason} ({_SAVED_WITHOUT})") from None
    tokenizer = tokenizer_of(processor)
    if len(tokenizer.get_vocab()) <= len(tokenizer.added_tokens_decoder):  # nothing but its special tokens
        raise ValueError(no_tokenizer)
    return processor


def model_class(config: Any, family: str) -> Any:
    """The transformers class that loads ``config``'s checkpoint of ``family``, as the auto class picks it: from
    its mapping, and of several classes for one config the one its ``architectures`` names."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if family == "causal_lm" else MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    try:
        classes = mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no {'causal LM' if family == 'causal_lm' else 'image-text-to-text'} "
                         f"model for a {type(config).__name__}") from None
    if not isinstance(classes, (list, tuple)):
        return classes
    named = set(getattr(config, "architectures", None) or ())
    return next((c for c in classes if c.__name__ in named), classes[0])


def _load_base(path: str, cls: Any, kwargs: dict[str, Any]) -> Any:
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(info["missing_keys"])
    if missing:  # transformers would only warn and leave them random: a planner that cannot work
        raise ValueError(f"{path}: {len(missing)} weights missing from the checkpoint ({', '.join(missing[:3])}"
                         f"{', …' if len(missing) > 3 else ''}); it is incomplete or not of this architecture")
    return model


def load_model_and_processor(
    path_or_id: str | Path,
    *,
    dtype: Any = None,
    device: str | None = None,
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    base: str | Path | None = None,
    merge_adapter: bool = False,
    vision_tower: str | Path | None = None,
) -> tuple[Any, Any, str]:
    """Load ``(model, processor, family)`` from a local directory or hub id, in eval mode.

    ``path_or_id`` may be a plain checkpoint, an original LLaVA-layout checkpoint (converted on
    the fly), or a peft adapter directory (stacked on ``base`` or on the base it records,
    :func:`mmedagent.model.adapters.adapter_base`; ``merge_adapter=True`` merges it into the weights). ``vision_tower``:
    the CLIP tower for an original LLaVA checkpoint when its ``mm_vision_tower`` is not reachable here.
    For a bare tokenizer-only model the "processor" is the tokenizer.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    path_or_id, base = home_expanded(path_or_id), home_expanded(base)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    quant = quantization_config(load_in_4bit, load_in_8bit, torch_dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if not is_deepspeed_zero3_enabled():  # ZeRO-3 places (partitions) the weights itself
        kwargs["device_map"] = {"": device}  # straight there: host RAM need not hold the whole model first

    adapter_dir = None
    if is_adapter(path_or_id):
        from mmedagent.model.adapters import adapter_base

        adapter_dir = Path(path_or_id)
        model_path: str | Path = base or adapter_base(adapter_dir)
    elif base is not None:
        raise ValueError(f"base {base!r} given but {path_or_id!r} is not an adapter directory (no adapter_config.json)")
    else:
        model_path = path_or_id

    prefer_cache_when_unreachable(model_path, vision_tower)
    model_path = _ensure_hf_layout(model_path, vision_tower)
    config = load_config(model_path)
    family = family_of(config)
    if adapter_dir is not None:
        from mmedagent.model.adapters import check_base_family

        check_base_family(adapter_dir, model_path, family)
    # An adapter directory may carry its own processor (e.g. with added tokens); MMedAgent's LoRA
    # folders hold only a tokenizer copy, so a vision model needs a processor config there.
    own = ("tokenizer_config.json",) if family == "causal_lm" else ("processor_config.json", "preprocessor_config.json")
    processor_dir = adapter_dir if adapter_dir and any((adapter_dir / f).is_file() for f in own) else model_path
    processor = load_processor(processor_dir, family)  # before the weights: a folder without one fails at once
    cls = model_class(config, family)
    compute = quant.bnb_4bit_compute_dtype if load_in_4bit else torch_dtype  # the dtype the layers compute in
    if compute == "auto":  # the checkpoint's own dtype
        compute = resolve_dtype(str(getattr(config, "dtype", None) or "float32"), device)
    kwargs["attn_implementation"] = resolve_attn(attn_implementation, device, compute, cls)
    model = _load_base(str(model_path), cls, kwargs)
    if adapter_dir is not None:
        from mmedagent.model.adapters import apply_adapter

        model = apply_adapter(model, adapter_dir, merge=merge_adapter)
    if quant is None:
        model.to(device)
    model.eval()
    return model, processor, family


def _ensure_hf_layout(path_or_id: str | Path, vision_tower: str | Path | None = None) -> str | Path:
    """Original LLaVA-layout checkpoints are converted once to the transformers layout (in the cache)."""
    config = _local_json(path_or_id, "config.json")
    if config is None and is_hub_id(path_or_id) and not str(path_or_id).startswith("hf-hub:"):
        path_or_id = original_llava_snapshot(str(path_or_id)) or path_or_id
        config = _local_json(path_or_id, "config.json")
    if not is_original_llava(config):
        if vision_tower is not None:
            raise ValueError(f"vision_tower= applies to original LLaVA checkpoints; {path_or_id} is not one")
        return path_or_id
    from mmedagent.model.llava_convert import converted_cache_dir

    return converted_cache_dir(Path(path_or_id), vision_tower=vision_tower)


def original_llava_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of hub repo ``repo_id`` (fetched, or from the cache) when it is an original LLaVA
    checkpoint (e.g. ``microsoft/llava-med-v1.5-mistral-7b``), which transformers cannot read; else None."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception:  # not found, gated, offline and not cached: load_config reports it
        return None
    return Path(snapshot_download(repo_id)) if is_original_llava(config) else None
