"""Original LLaVA-layout checkpoints (LLaVA ≤1.5, LLaVA-Med v1.x, MMedAgent) → transformers' Llava.

The original layout is a ``LlavaLlamaForCausalLM``: a Llama LM under ``model.*`` + ``lm_head``,
the projector under ``model.mm_projector.*`` (``linear`` or ``mlp2x_gelu``) and the CLIP vision
tower referenced by ``mm_vision_tower`` (a path or hub id, loaded separately). The converted
directory loads with plain ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained``:

- weights renamed (``model.X`` → ``model.language_model.X``, projector → ``multi_modal_projector``;
  a ``linear`` projector becomes ``linear_1`` + identity activation + identity ``linear_2``);
- the tower's weights copied in, ``vision_feature_layer = mm_vision_select_layer`` (-2),
  ``mm_vision_select_feature`` ``patch`` → select strategy ``default`` (drop CLS);
- the processor: the tower's CLIP preprocessing, padded to a square with the mean colour when
  ``image_aspect_ratio == "pad"`` (LLaVA's ``expand2square``), the tokenizer with an ``<image>``
  token (embeddings grown by one row if it was missing) and a Vicuna v1 chat template.

MMedAgent's LoRA output (``adapter_model.bin`` with original-layout keys + ``non_lora_trainables.bin``
holding the projector) is converted by :func:`convert_llava_lora`; the projector is never dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmedagent import cache
from mmedagent.hub import prefer_cache_when_unreachable
from mmedagent.protocol import DEFAULT_SYSTEM

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_NON_LLM_CONFIG_KEYS = (
    "architectures", "model_type", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
)

# Vicuna v1 (mmedagent.model.templates "vicuna_v1") as a chat template, so the converted
# checkpoint also works with conv_template=None.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}{%- if part.type == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{{ bos_token }}{%- if messages and messages[0].role == 'system' -%}{{ render(messages[0].content) + ' ' }}"
    "{%- else -%}{{ " + json.dumps(DEFAULT_SYSTEM + " ") + " }}{%- endif -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{{ 'USER: ' + render(m.content) + ' ' }}"
    "{%- elif m.role == 'assistant' -%}{{ 'ASSISTANT: ' + render(m.content) + eos_token }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _read_config(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory")
    f = src / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{src} has no config.json")
    return json.loads(f.read_text())


def _transformers_layout(cfg: dict[str, Any]) -> str | None:
    """The architecture of a checkpoint already in transformers' own layout (nothing to convert), else None."""
    archs = cfg.get("architectures") or []
    if "mm_vision_tower" in cfg or any(a.startswith("LlavaLlama") for a in archs):
        return None  # original LLaVA layout
    if "text_config" in cfg or any(a.endswith(("ForConditionalGeneration", "ForCausalLM")) for a in archs):
        return archs[0] if archs else cfg.get("model_type", "transformers")
    return None


def load_state_dict(src: Path, patterns: tuple[str, ...] = ("*.safetensors", "pytorch_model*.bin")) -> dict[str, Any]:
    """All tensors of a checkpoint directory (safetensors preferred, else ``.bin`` shards)."""
    import torch

    for pattern in patterns:
        files = sorted(f for f in src.glob(pattern) if not f.name.startswith(("adapter_", "non_lora")))
        if files:
            break
    else:
        raise FileNotFoundError(f"no weights ({' or '.join(patterns)}) in {src}")
    state: dict[str, Any] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


PROJECTOR_ACT = {"linear": "linear", "mlp2x_gelu": "gelu"}
"""Original ``mm_projector_type`` → transformers' ``projector_hidden_act`` (``linear``: identity ``linear_2``)."""


def projector_kind(state: dict[str, Any], prefix: str, declared: str | None = None) -> str:
    """The projector type the tensors under ``prefix`` hold (``linear`` or ``mlp2x_gelu``): the weights decide,
    as LLaVA keeps a pretrained projector whatever ``mm_projector_type`` (``declared``) the config names."""
    if declared is not None and declared not in PROJECTOR_ACT:
        raise ValueError(f"unsupported mm_projector_type {declared!r} (supported: {', '.join(PROJECTOR_ACT)})")
    names = sorted(k[len(prefix):] for k in state if k.startswith(prefix))
    if {"weight", "bias"} <= set(names) and len(names) == 2:
        kind = "linear"
    elif set(names) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        kind = "mlp2x_gelu"
    else:
        raise ValueError(f"the projector tensors ({', '.join(names)}) are neither a linear nor an mlp2x_gelu "
                         "projector (supported: Linear; Linear, GELU, Linear)")
    if declared is not None and declared != kind:
        log.warning("mm_projector_type is %r but the projector weights are %s: using %s", declared, kind, kind)
    return kind


def _projector_state(state: dict[str, Any], prefix: str, kind: str, hidden: int) -> dict[str, Any]:
    """Original projector tensors under ``prefix`` → ``multi_modal_projector.linear_{1,2}``."""
    import torch

    out = {}
    if kind == "linear":
        w = state[prefix + "weight"]
        out["linear_1.weight"], out["linear_1.bias"] = w, state[prefix + "bias"]
        out["linear_2.weight"] = torch.eye(hidden, dtype=w.dtype)
        out["linear_2.bias"] = torch.zeros(hidden, dtype=w.dtype)
    else:
        for src_i, dst in (("0", "linear_1"), ("2", "linear_2")):
            for p in ("weight", "bias"):
                out[f"{dst}.{p}"] = state[f"{prefix}{src_i}.{p}"]
    return out


def load_projector(model: Any, state: dict[str, Any], kind: str) -> None:
    """Load ``state`` (from :func:`_projector_state`) into ``model``'s Llava projector and set its activation
    to ``kind``'s, so a projector of another type than the base's keeps its own function."""
    from transformers.activations import ACT2FN

    module = model.model.multi_modal_projector
    param = next(module.parameters())
    try:
        module.load_state_dict({k: v.to(param.dtype) for k, v in state.items()}, strict=True)
    except RuntimeError as e:  # "size mismatch for …"
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"projector: {detail}") from None
    module.act = ACT2FN[PROJECTOR_ACT[kind]]
    model.config.projector_hidden_act = PROJECTOR_ACT[kind]


_TEXT_CONFIGS = {"LlavaLlamaForCausalLM": "LlamaConfig", "LlavaMistralForCausalLM": "MistralConfig"}


def _text_config_class(cfg: dict[str, Any]) -> Any:
    """The transformers config class of the LM inside an original LLaVA checkpoint (Llama unless named)."""
    import transformers

    arch = (cfg.get("architectures") or ["LlavaLlamaForCausalLM"])[0]
    if arch in _TEXT_CONFIGS:
        return getattr(transformers, _TEXT_CONFIGS[arch])
    if arch.startswith("Llava"):
        raise ValueError(f"unsupported original LLaVA architecture {arch!r} (supported: {', '.join(_TEXT_CONFIGS)})")
    return transformers.LlamaConfig


def llava_image_processor(source: Any, do_pad: bool) -> Any:
    """A ``LlavaImageProcessor`` with ``source``'s CLIP preprocessing (resize, crop, rescale, mean / std) that,
    with ``do_pad``, first pads each image to a square with the mean colour (LLaVA's ``expand2square`` for
    ``image_aspect_ratio == "pad"``). Used for converted checkpoints and by training with
    ``--image_aspect_ratio pad``, so the saved processor pads at inference exactly as in training."""
    from transformers import LlavaImageProcessor

    return LlavaImageProcessor(
        do_pad=do_pad, size=source.size, crop_size=source.crop_size, image_mean=source.image_mean,
        image_std=source.image_std, resample=source.resample, do_center_crop=source.do_center_crop,
        rescale_factor=source.rescale_factor, do_convert_rgb=True,
    )


def _load_tower(tower_ref: str, origin: str, option: str) -> tuple[Any, Any]:
    """The CLIP vision model and image processor at ``tower_ref`` (a CLIP vision or full CLIP checkpoint, as
    ``openai/clip-vit-large-patch14-336``); one-line errors for a tower that cannot be read or whose weights do
    not fit a CLIP vision model (transformers would initialise those at random, with a warning)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel

    prefer_cache_when_unreachable(tower_ref)
    try:
        tower, info = CLIPVisionModel.from_pretrained(tower_ref, dtype=torch.float32, output_loading_info=True)
        clip_proc = CLIPImageProcessor.from_pretrained(tower_ref)
    except OSError as e:
        raise FileNotFoundError(f"vision tower {tower_ref!r} ({origin}) could not be loaded; pass its local path "
                                f"with {option}") from e
    except RuntimeError as e:  # "size mismatch …": the weights are not of the model its config describes
        raise ValueError(f"vision tower {tower_ref!r} ({origin}): its weights do not fit its config.json") from e
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"vision tower {tower_ref!r} ({origin}) is not a CLIP vision checkpoint: {len(missing)} of its "
                         f"weights are missing ({', '.join(missing[:2])}, …); pass the CLIP tower with {option}")
    return tower, clip_proc


def convert_llava_checkpoint(
    src: str | Path, dst: str | Path, *, vision_tower: str | Path | None = None, dtype: Any = None,
    tower_option: str | None = None,
) -> Path:
    """Convert the original-layout checkpoint ``src`` into a transformers Llava directory ``dst``.

    ``tower_option``: how the caller's users pass ``vision_tower`` (e.g. ``--vision-tower`` for a
    command line), named in the errors that ask for it; default ``vision_tower=``."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    src, dst = Path(src), Path(dst)
    cfg = _read_config(src)
    if (src / "adapter_config.json").is_file():  # MMedAgent's release: a LoRA folder with the base's config.json
        raise ValueError(f"{src} is a LoRA adapter, not a full checkpoint: merge it into its base with "
                         "scripts/merge_lora_weights.py, or load it with load_planner(BASE, adapter=...)")
    arch = _transformers_layout(cfg)
    if arch:
        raise ValueError(f"{src} is already in transformers layout ({arch}): nothing to convert; load it directly "
                         "(from_pretrained, --model_name_or_path)")
    from mmedagent.model.loading import check_new_output_dir, load_processor

    check_new_output_dir(dst)  # --dst = --src overwrote the original's config.json
    if cfg.get("mm_use_im_start_end"):  # LLaVA-Med v1.0 (MMedAgent's base; MMedAgent itself trained without them)
        log.warning("%s was trained with image start/end tokens (mm_use_im_start_end), which transformers' LLaVA does "
                    "not place around the image: converted without them, fine for a model fine-tuned from it with "
                    "--mm_use_im_start_end False (MMedAgent); the checkpoint itself may answer worse", src.name)
    aspect = str(cfg.get("image_aspect_ratio") or "square")
    if aspect.startswith("anyres"):  # its image tiles (and image_newline) have no place in transformers' Llava
        raise ValueError(f"{src}: image_aspect_ratio {aspect!r} (LLaVA-NeXT / LLaVA-1.6 tiling) is not supported; "
                         "supported are 'pad' and 'square' (LLaVA-1.5, LLaVA-Med, MMedAgent)")
    tower_ref = str(vision_tower or cfg.get("mm_vision_tower") or cfg.get("vision_tower") or "")
    if not tower_ref:
        raise ValueError(f"{src}/config.json names no vision tower (mm_vision_tower); pass "
                         f"{tower_option or 'vision_tower='} with the CLIP tower's path or hub id")
    text_config_class = _text_config_class(cfg)
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ValueError(f"unsupported mm_vision_select_feature {select!r}")
    option = tower_option or "--vision-tower / vision_tower="
    tower, clip_proc = _load_tower(tower_ref, f"given as {option}" if vision_tower else "from mm_vision_tower", option)

    if (src / "mm_projector.bin").is_file() and not any(src.glob("*.safetensors")) \
            and not any(src.glob("pytorch_model*.bin")):
        raise ValueError(f"{src} holds only mm_projector.bin (LLaVA's pretraining stage: the projector without the "
                         "language model), not a full checkpoint; use the checkpoint fine-tuned from it")
    tokenizer = load_processor(src, "causal_lm", declared_tokenizer=True)  # before the weights: a folder without one fails at once
    legacy_spacing(tokenizer, src)
    state = load_state_dict(src)
    added = tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    text_kwargs = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in _NON_LLM_CONFIG_KEYS}
    for k in ("image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
              "use_mm_proj", "vision_tower", "tokenizer_padding_side", "tokenizer_model_max_length"):
        text_kwargs.pop(k, None)
    text_config = text_config_class(**text_kwargs)
    hidden = text_config.hidden_size
    tied = bool(cfg.get("tie_word_embeddings", False))
    if "lm_head.weight" not in state and not tied:
        raise ValueError(f"{src} has no lm_head.weight and its config.json has tie_word_embeddings false: "
                         "the checkpoint is incomplete")

    # --- weights
    new: dict[str, Any] = {}
    proj_prefix = "model.mm_projector."
    for k, v in state.items():
        if k.startswith(proj_prefix):
            continue
        if k.startswith("model.vision_tower."):
            continue  # the tower comes from mm_vision_tower (the same weights when both exist)
        if k.startswith("model."):
            new["model.language_model." + k[len("model."):]] = v
        elif k == "lm_head.weight":
            if not tied:  # tied: the output layer is the input embeddings
                new[k] = v
        else:
            raise ValueError(f"unexpected tensor {k!r} in {src}")
    if not any(k.startswith(proj_prefix) for k in state):
        raise ValueError(f"{src} holds no projector (model.mm_projector.*); refusing to convert without it")
    kind = projector_kind(state, proj_prefix, cfg.get("mm_projector_type"))
    for k, v in _projector_state(state, proj_prefix, kind, hidden).items():
        new["model.multi_modal_projector." + k] = v
    for k, v in tower.state_dict().items():
        new["model.vision_tower." + k] = v
    in_features = new["model.multi_modal_projector.linear_1.weight"].shape[1]
    if in_features != tower.config.hidden_size:
        raise ValueError(f"the projector of {src} takes {in_features}-dim vision features but the vision tower "
                         f"{tower_ref!r} gives {tower.config.hidden_size}: use the tower it was trained with "
                         f"(mm_vision_tower {cfg.get('mm_vision_tower')!r})")
    if added:
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in new:
                w = new[key]
                new[key] = torch.cat([w, w.mean(0, keepdim=True)], 0)
    vocab = new["model.language_model.embed_tokens.weight"].shape[0]
    if vocab < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the embeddings only {vocab}")
    text_config.vocab_size = vocab

    vision_config = tower.config
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_id,
        projector_hidden_act=PROJECTOR_ACT[kind],
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2 + (select == "cls_patch"),
        multimodal_projector_bias=True, tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    target_dtype = dtype or getattr(torch, str(cfg.get("torch_dtype", "float32")).replace("torch.", ""), torch.float32)
    try:
        loaded = model.load_state_dict({k: v.to(target_dtype) for k, v in new.items()}, strict=False, assign=True)
    except RuntimeError as e:  # "size mismatch for …"
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"{src}: the weights do not fit its config.json: {detail}") from None
    missing = [k for k in loaded.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"{src}: the weights do not fit its config.json: missing {missing[:3]}, "
                         f"unexpected {loaded.unexpected_keys[:3]}")
    if tied:
        model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # --- processor
    image_processor = llava_image_processor(clip_proc, do_pad=aspect == "pad")
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=VICUNA_V1_CHAT_TEMPLATE,
    )
    tokenizer.chat_template = VICUNA_V1_CHAT_TEMPLATE
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)  # saves the tokenizer too
    return dst


def legacy_spacing(tokenizer: Any, src: Path) -> None:
    """Tokenize as LLaVA trained: its code loads the slow sentencepiece tokenizer (``use_fast=False``), which in
    its legacy mode (the default unless ``tokenizer_config.json`` sets ``"legacy": false``) starts every stretch
    of text between special tokens with "▁" (``</s>USER`` → ``</s>`` ``▁USER``, and the text after the image).
    transformers' fast tokenizer does that at the start of the input only (``prepend_scheme="first"``): the
    model would read ids it was never trained on at every turn."""
    try:
        legacy = json.loads((src / "tokenizer_config.json").read_text()).get("legacy", True)
    except (OSError, ValueError, AttributeError):
        legacy = True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if legacy is False or backend is None:
        return
    from tokenizers import pre_tokenizers

    pre = backend.pre_tokenizer
    parts = [pre] if not isinstance(pre, pre_tokenizers.Sequence) else _items(pre)
    for part in parts:
        if isinstance(part, pre_tokenizers.Metaspace) and part.prepend_scheme == "first":
            part.prepend_scheme = "always"
            tokenizer.init_kwargs["legacy"] = True  # saved: a LlamaTokenizer load of the folder rebuilds it so too
            tokenizer.legacy = True


def _items(sequence: Any) -> list[Any]:
    items, i = [], 0
    while True:
        try:
            items.append(sequence[i])
        except IndexError:
            return items
        i += 1


CONVERSION = "2"
"""Raised when conversion changes what it writes (2: legacy tokenizer spacing), so cached conversions are redone."""


def _fingerprint(path: Path, *extra: str) -> str:
    h = hashlib.sha1("\0".join([str(path.resolve()), CONVERSION, *extra]).encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return cache.cache_root("converted")


def converted_cache_dir(src: Path, *, vision_tower: str | Path | None = None) -> Path:
    """Convert ``src`` once into the cache (``$MMEDAGENT_CACHE``, default ~/.cache/mmedagent) and return it;
    ``vision_tower`` replaces the config's ``mm_vision_tower`` (e.g. a local copy of the CLIP tower)."""
    out = cache_root() / f"llava-{_fingerprint(src, str(vision_tower or ''))}"
    if (out / "config.json").is_file():
        return out
    log.info("converting original LLaVA checkpoint %s to the transformers layout in %s", src.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        convert_llava_checkpoint(src, tmp, vision_tower=vision_tower)
        try:
            tmp.rename(out)
        except OSError:  # another process (a second rank, the server) converted it at the same time
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- MMedAgent LoRA output

_LORA_PREFIX = "base_model.model.model."
_LLM_LINEAR = r".*\.language_model\..*\.({names})"


def adapter_keys(adapter_dir: Path) -> set[str]:
    """The tensor names in a peft adapter directory's weight file (none when it has no weight file)."""
    import torch

    st, binf = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as f:
            return set(f.keys())
    if binf.is_file():
        return set(torch.load(binf, map_location="cpu", weights_only=True))
    return set()


def is_original_lora(adapter_dir: Path, llava_base: bool = True) -> bool:
    """MMedAgent/LLaVA LoRA output: projector in non_lora_trainables.bin, or, for a Llava base (whose own
    adapters' keys hold ``language_model.``), original-layout keys — a text-only Llama's LoRA has those too."""
    if (adapter_dir / "non_lora_trainables.bin").is_file():
        return True
    return llava_base and any(k.startswith(_LORA_PREFIX + "layers.") for k in adapter_keys(adapter_dir))


def _load_adapter_weights(adapter_dir: Path) -> dict[str, Any]:
    import torch

    st, binf = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if binf.is_file():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no adapter_model.safetensors / adapter_model.bin in {adapter_dir}")


def convert_llava_lora(adapter_dir: str | Path, dst: str | Path,
                       hidden_size: int) -> tuple[Path, dict[str, Any], str | None]:
    """Rewrite an original-layout LoRA for transformers' Llava; return ``(adapter_dir, projector_state, kind)``.

    The projector state (full projector weights in the adapter file, as peft saves ``modules_to_save=["mm_projector"]``,
    else ``non_lora_trainables.bin``'s, keys ``…mm_projector.*``) is returned
    in ``multi_modal_projector`` naming, with its :func:`projector_kind` (None: no projector), for
    :func:`load_projector` into the base model before the adapter.
    """
    import torch

    adapter_dir, dst = Path(adapter_dir), Path(dst)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = _load_adapter_weights(adapter_dir)
    renamed, saved_projector = {}, {}
    for k, v in weights.items():
        if ".mm_projector." in k:
            if "lora_" in k:
                raise ValueError(f"{adapter_dir}: LoRA on the projector ({k}) is not supported; train the projector "
                                 "in full (LLaVA's non_lora_trainables.bin, or modules_to_save)")
            saved_projector[k[k.index("mm_projector."):]] = v  # full weights (modules_to_save=["mm_projector"])
            continue
        if k.startswith(_LORA_PREFIX) and not k.startswith(_LORA_PREFIX + "language_model."):
            k = _LORA_PREFIX + "language_model." + k[len(_LORA_PREFIX):]
        renamed[k] = v
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # leaf names (find_all_linear_names): restrict to the LM, not the CLIP tower
        names = sorted({t.split(".")[-1] for t in targets})
        cfg["target_modules"] = _LLM_LINEAR.format(names="|".join(names))
    cfg.pop("modules_to_save", None)
    cfg["base_model_name_or_path"] = None
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in renamed.items()}, str(dst / "adapter_model.safetensors"))

    proj = {}
    extra = adapter_dir / "non_lora_trainables.bin"
    if extra.is_file():
        raw = torch.load(extra, map_location="cpu", weights_only=True)
        unknown = [k for k in raw if "mm_projector." not in k]
        if unknown:
            raise ValueError(f"non_lora_trainables.bin holds tensors other than the projector: {unknown[:5]}")
        proj = {k[k.index("mm_projector."):]: v for k, v in raw.items()}
    proj = saved_projector or proj  # LLaVA loads the adapter after non_lora_trainables.bin: the adapter's wins
    if not proj:
        return dst, {}, None
    kind = projector_kind(proj, "mm_projector.")
    return dst, _projector_state(proj, "mm_projector.", kind, hidden_size), kind
