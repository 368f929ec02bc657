"""Tiny random tool weights built from configs and saved the way users' weights are stored.

Used by the demo stack (:mod:`mmedagent.demo_tools`, ``python serve/controller.py`` with no
weights configured) and by the tests. The weights are random: outputs are well-formed but
meaningless.

* Grounding DINO: a transformers checkpoint directory (``save_pretrained``) with a BERT WordPiece
  tokenizer whose special tokens sit at BERT's ids (Grounding DINO hard-codes 101, 102, 1012, 1029).
* SAM / MedSAM: a ``.pth`` state dict plus the JSON architecture config beside it.
* open_clip: a directory with ``open_clip_config.json`` and ``open_clip_model.safetensors``, as a
  downloaded hub repo; open_clip's bundled BPE tokenizer works offline.
* Report model: a tiny LLaVA from :func:`mmedagent.model.tiny.make_tiny_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

GROUNDING_WORDS = ["tumor", "lesion", "cell", "nucleus", "liver", "kidney", "brain", "lung", "heart", "mass"]

TINY_SAM = {
    "image_size": 64,
    "patch_size": 8,
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1],
    "window_size": 4,
    "prompt_embed_dim": 32,
    "mask_in_chans": 4,
    "decoder_depth": 1,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _bert_vocab() -> list[str]:
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 1012 - len(vocab))]
    vocab.append(".")  # id 1012
    vocab += [f"[unused{i}]" for i in range(1012, 1028)]
    vocab.append("?")  # id 1029
    return vocab + GROUNDING_WORDS + list("abcdefghijklmnopqrstuvwxyz")


def save_tiny_grounding_dino(out: Path) -> Path:
    """A random Grounding DINO (32-d, 128-160 px inputs) with its processor, in ``out``."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    vocab = _bert_vocab()
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            image_size=128,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(out)
    # Grounding DINO needs images of at least 128 px; keep them small for CPU.
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 160})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return Path(out)


def save_tiny_sam(out_dir: Path, stem: str, variant: str | None = None) -> Path:
    """``out_dir/stem.pth`` + ``out_dir/stem.json`` (the architecture; ``variant`` only if given)."""
    import torch

    from mmedagent.tools.segmentation import build_sam

    torch.manual_seed(0)
    model = build_sam(TINY_SAM)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{stem}.pth"
    torch.save(model.state_dict(), ckpt)
    config = dict(TINY_SAM, **({"variant": variant} if variant else {}))
    (out_dir / f"{stem}.json").write_text(json.dumps(config), encoding="utf-8")
    return ckpt


def save_tiny_open_clip(out: Path) -> Path:
    """A random open_clip model (32-d, 32 px) as a local directory ``classification`` loads."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}),
        encoding="utf-8",
    )
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{out}")  # config only: random weights
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def save_tiny_report_model(out: Path) -> Path:
    """A random tiny LLaVA (model layer's ``tiny`` preset) that ``report_generation`` loads with
    the ``vicuna_v1`` template."""
    from mmedagent.model.tiny import make_tiny_model

    return Path(make_tiny_model("llava", out, seed=0))
