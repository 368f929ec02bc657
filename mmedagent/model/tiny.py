"""Tiny random checkpoints of every supported architecture, built offline.

Used by the tests, by CI and by anyone trying the stack without weights. Each checkpoint is a
plain ``save_pretrained`` directory (model + tokenizer + processor) that loads through
``AutoProcessor`` / ``AutoModelForImageTextToText`` (or ``AutoModelForCausalLM``), exactly like a
real one. The tokenizer is a byte-level BPE trained here on a small built-in corpus that covers the
MMedAgent turn format, so any text encodes (no unknown tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

ARCHS = ("llava", "qwen2_vl", "mllama", "llama")

# Sizes: "tiny" for tests, "cpu" for CPU benchmarks (a few hundred MB of compute, not of weights).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "vision_hidden": 32, "vision_layers": 2, "image_size": 32, "patch": 8},
    "cpu": {"hidden": 512, "layers": 8, "heads": 8, "vision_hidden": 256, "vision_layers": 4, "image_size": 224, "patch": 14},
}

_MEDICAL = """
The image shows a chest X-ray with a small opacity in the right lower lobe, suggestive of pneumonia.
This brain MRI demonstrates a tumor in the left temporal lobe with surrounding edema.
The abdomen CT scan shows the liver, spleen, kidney, pancreas and a lesion near the gallbladder.
Histopathology: hematoxylin and eosin stain, adenocarcinoma, squamous cell carcinoma, immunohistochemistry.
Locate the lesion, segment the nodule, classify the modality, generate a report, retrieve knowledge.
Can you locate the tumor in this MRI image? What organ is shown? Is there a fracture in the bone X-ray?
The patient presents with cough, fever, dyspnea. Findings: cardiomegaly, effusion, consolidation, atelectasis.
Impression: no acute cardiopulmonary abnormality. Recommend follow-up imaging and clinical correlation.
covid line chart, diagnostic flowchart, diagnostic scatter plot, pie chart, lung CT, gross, cell, organ, disease.
I should use the tool to answer. I will locate it. Please wait. The answer is based on the model outputs.
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions.
USER: ASSISTANT: system user assistant You are a helpful assistant. Answer my first question:
0 1 2 3 4 5 6 7 8 9 10 0.1 0.25 0.3 0.41 0.54 0.76 0.75 0.95 0.8 1.0 100 2024 [[0.12, 0.34, 0.56, 0.78]]
"""

_TURNS = [
    '"thoughts🤔" I should locate the tumor first.\n"actions🚀" [{"API_name": "grounding dino", '
    '"API_params": {"image": "<imagepath>", "prompts": ["tumor"]}}]\n"value👉" I will locate it. Please wait.',
    '"thoughts🤔" Segment it.\n"actions🚀" [{"API_name": "MedSAM", "API_params": {"image": "<imagepath>", '
    '"boxes": [[0.41, 0.54, 0.76, 0.75]]}}]\n"value👉" Segmenting.',
    '"thoughts🤔" Classify.\n"actions🚀" [{"API_name": "BiomedClip", "API_params": {}}]\n"value👉" ok',
    '"thoughts🤔" Report.\n"actions🚀" [{"API_name": "ChatCAD-G", "API_params": {}}, '
    '{"API_name": "ChatCAD-R", "API_params": {"question": "What is it?"}}]\n"value👉" Done.',
    '"thoughts🤔" Answer directly.\n"actions🚀" []\n"value👉" The tumor is in the left lobe.',
    "grounding dino output: {'boxes': [[0.41, 0.54, 0.76, 0.75]], 'logits': [0.95], 'phrases': ['tumor']}"
    "\n\nAnswer my first question: Can you locate the tumor?",
    "grounding dino + MedSAM error: timeout {'label': 'brain MRI', 'score': 0.9} true false null",
]

CORPUS = [line for line in _MEDICAL.strip().splitlines()] + _TURNS * 4

# Special tokens per architecture, as their real tokenizers name them.
_SPECIALS: dict[str, dict[str, Any]] = {
    "llava": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "image": "<image>", "extra": []},
    "qwen2_vl": {
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None, "image": "<|image_pad|>",
        "extra": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
    },
    "mllama": {
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>", "unk": None,
        "image": "<|image|>",
        "extra": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"],
    },
    "llama": {
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>", "unk": None,
        "image": None, "extra": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
    },
}

# Chat templates in the style of the real checkpoints; content may be a string or a list of parts.
# Literal whitespace is written as Jinja string expressions so whitespace control cannot eat it.
def _render_macro(image: str) -> str:
    return (
        "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
        "{%- for part in content -%}{%- if part.type == 'image' -%}{{ '" + image + "' }}"
        "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    )


_CHAT_TEMPLATES = {
    # LLaVA-1.5 (llava-hf) style: Vicuna roles, assistant turns ended by eos.
    "llava": _render_macro("<image>\\n")
    + "{{ bos_token }}{%- for m in messages -%}{%- if m.role == 'system' -%}{{ render(m.content) + ' ' }}"
    "{%- elif m.role == 'user' -%}{{ 'USER: ' + render(m.content) + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + render(m.content) + eos_token }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}",
    "qwen2_vl": _render_macro("<|vision_start|><|image_pad|><|vision_end|>")
    + "{%- for m in messages -%}{%- if loop.first and m.role != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + m.role + '\\n' + render(m.content) + '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}",
    "mllama": _render_macro("<|image|>")
    + "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + render(m.content) + '<|eot_id|>' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}",
}
_CHAT_TEMPLATES["llama"] = _CHAT_TEMPLATES["mllama"].replace("<|image|>", "")


def build_tokenizer(arch: str, vocab_size: int = 1200, corpus: Iterable[str] = (), split_digits: bool = False,
                    coordinate_tokens: bool = False):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``arch``'s special tokens and chat template,
    trained on the built-in corpus plus ``corpus`` (e.g. the texts a small model will be trained on);
    ``split_digits``: numbers become one token per digit, as in Llama and Qwen; ``coordinate_tokens``:
    location tokens: each two-decimal normalised coordinate as JSON writes it (``0.0``, ``0.05``, ``0.7``,
    ``1.0``), standing alone, is one token, so a small model copies a box as four number tokens rather than
    16 digits."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _SPECIALS[arch]
    specials = [t for t in (spec["bos"], spec["eos"], spec["pad"], spec["unk"], spec["image"]) if t] + spec["extra"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*CORPUS, *corpus], trainer)
    named = {"image_token": spec["image"]} if spec["image"] else {}
    if arch == "qwen2_vl":
        named.update(video_token="<|video_pad|>", vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>")
    kwargs = {k + "_token": spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k]}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens=named or None,
        chat_template=_CHAT_TEMPLATES[arch],
        model_max_length=4096,
        **kwargs,
    )
    if coordinate_tokens:
        values = sorted({repr(i / 100) for i in range(101)})
        tokenizer.add_tokens([AddedToken(v, single_word=True, normalized=False) for v in values])
    return tokenizer


def _ids(tokenizer) -> dict[str, int | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llava(tokenizer, p: dict[str, int]):
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
    )

    vision = CLIPVisionConfig(
        hidden_size=p["vision_hidden"], intermediate_size=p["vision_hidden"] * 2, num_hidden_layers=p["vision_layers"],
        num_attention_heads=max(1, p["vision_hidden"] // 16), image_size=p["image_size"], patch_size=p["patch"],
        projection_dim=p["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["hidden"] * 2,
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
        max_position_embeddings=4096, **_ids(tokenizer),
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(p["image_size"] // p["patch"]) ** 2,
    )
    size = p["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=p["patch"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATES["llava"],
    )
    return LlavaForConditionalGeneration(config), processor


def _qwen2_vl(tokenizer, p: dict[str, int]):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    head_dim = p["hidden"] // p["heads"]
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to half the head dim
    text = dict(
        vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["hidden"] * 2,
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
        **_ids(tokenizer),
    )
    vision = dict(
        depth=p["vision_layers"], embed_dim=p["vision_hidden"], hidden_size=p["hidden"], num_heads=max(1, p["vision_hidden"] // 16),
        mlp_ratio=2, patch_size=p["patch"], spatial_merge_size=2, temporal_patch_size=2,
    )
    t = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=t("<|image_pad|>"), video_token_id=t("<|video_pad|>"),
        vision_start_token_id=t("<|vision_start|>"), vision_end_token_id=t("<|vision_end|>"),
    )
    pixels = p["image_size"] ** 2
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    common = dict(size=size, patch_size=p["patch"], merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common), chat_template=_CHAT_TEMPLATES["qwen2_vl"],
    )
    return Qwen2VLForConditionalGeneration(config), processor


def _mllama(tokenizer, p: dict[str, int]):
    import torch
    from transformers import (
        MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor,
    )

    vision = dict(
        hidden_size=p["vision_hidden"], num_hidden_layers=p["vision_layers"], num_global_layers=1,
        attention_heads=max(1, p["vision_hidden"] // 16), intermediate_size=p["vision_hidden"] * 2,
        vision_output_dim=p["vision_hidden"] * 2, image_size=p["image_size"], patch_size=p["patch"],
        max_num_tiles=4, intermediate_layers_indices=[0],
    )
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    text = dict(
        vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["hidden"] * 2,
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
        cross_attention_layers=[p["layers"] - 1], max_position_embeddings=4096, **_ids(tokenizer),
    )
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    image_processor = MllamaImageProcessor(size={"height": p["image_size"], "width": p["image_size"]}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_CHAT_TEMPLATES["mllama"])
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():  # open the cross-attention gates (0 at init, as in training from scratch): trained
        for layer in model.modules():  # Llama-3.2-Vision's are, and with them shut no image reaches the text
            if type(layer).__name__ == "MllamaCrossAttentionDecoderLayer":
                layer.cross_attn_attn_gate.fill_(0.8)
                layer.cross_attn_mlp_gate.fill_(-0.6)
    return model, processor


def _llama(tokenizer, p: dict[str, int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["hidden"] * 2,
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
        max_position_embeddings=4096, **_ids(tokenizer),
    )
    return LlamaForCausalLM(config), None


_BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "mllama": _mllama, "llama": _llama}


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int | None = None,
    preset: str = "tiny",
    vocab_size: int = 1200,
    corpus: Iterable[str] = (),
    split_digits: bool = False,
    coordinate_tokens: bool = False,
    **overrides: int,
) -> Path:
    """Build a random ``arch`` checkpoint and save model, tokenizer and processor to ``out_dir``.

    ``overrides`` replace preset sizes: ``hidden``, ``layers``, ``heads``, ``vision_hidden``,
    ``vision_layers``, ``patch``. ``image_size`` is the vision input side in pixels. ``vocab_size`` and
    ``corpus`` shape the tokenizer (a domain corpus gives shorter sequences); ``split_digits`` /
    ``coordinate_tokens``: see :func:`build_tokenizer`.
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    params = dict(PRESETS[preset])
    unknown = set(overrides) - set(params)
    if unknown:
        raise ValueError(f"unknown size override(s) {sorted(unknown)}; known: {sorted(params)}")
    params.update(overrides)
    if image_size is not None:
        params["image_size"] = image_size
    if params["hidden"] % params["heads"]:
        raise ValueError(f"hidden ({params['hidden']}) must be a multiple of heads ({params['heads']})")
    if arch == "qwen2_vl" and params["image_size"] % (params["patch"] * 2):
        raise ValueError("qwen2_vl needs image_size to be a multiple of 2 * patch")

    import torch

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(arch, vocab_size, corpus, split_digits, coordinate_tokens)
    model, processor = _BUILDERS[arch](tokenizer, params)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (processor or tokenizer).save_pretrained(out)
    if processor is not None:
        tokenizer.save_pretrained(out)
    return out
