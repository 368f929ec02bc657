"""``diagnosis-qwen2vl``: multimodal diagnosis with Qwen2-VL-2B-Instruct, LoRA on every Linear layer.

MedTrinity-25M-style rows (``image``, ``id``, long ``caption``) are converted to sharegpt
``messages`` + ``images`` records with a diagnosis question (the caption is the answer), written to
``out/data/train.json`` — the same file LLaMA-Factory would take. After training, the LoRA is
merged and exported; held-out images are answered by the exported model through the serving
loader, scored with BLEU-4 / ROUGE-L / METEOR, and ``python serve/controller.py --model-path
out/merged`` serves it for chat with uploaded slices (PNG, JPEG, DICOM, NIfTI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmedagent.recipes.base import CaptionRecipe
from mmedagent.recipes.config import CaptionConfig

QUESTION = "What is the most likely diagnosis? Describe the findings in this image that support it."


@dataclass
class DiagnosisConfig(CaptionConfig):
    model: str = "Qwen/Qwen2-VL-2B-Instruct"
    question: str = QUESTION
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str | None = None  # every Linear layer of the language model
    model_max_length: int = 1024  # LLaMA-Factory's cutoff_len
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    save_steps: int = 5000
    eval_samples: int = 8
    max_new_tokens: int = 256
    image_max_tokens: int | None = None
    """At most this many image tokens per image (Qwen2-VL: one per 28 x 28 pixels); larger images are scaled
    down, keeping their aspect ratio (``--image_max_tokens`` of train_mem.py; LLaMA-Factory's
    ``image_max_pixels`` in tokens). None: half of ``model_max_length``, so an image always leaves room for text."""

    def validate(self) -> None:
        super().validate()
        if self.image_max_tokens is not None and not 4 <= self.image_max_tokens < self.model_max_length:
            raise ValueError(f"--image-max-tokens must be at least 4 and below --model-max-length "
                             f"({self.model_max_length}), got {self.image_max_tokens}")

    def resolved(self) -> dict:
        out = super().resolved()
        if self.image_max_tokens is None:
            out["image_max_tokens"] = max(4, self.model_max_length // 2)
        return out

    TINY: ClassVar[dict] = {
        "num_train_epochs": 1.0,
        "max_steps": 6,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-2,
        "eval_samples": 2,
        "max_new_tokens": 12,
        "model_max_length": 512,
    }


class DiagnosisQwen2VL(CaptionRecipe):
    name = "diagnosis-qwen2vl"
    summary = "Qwen2-VL-2B + LoRA on MedTrinity-style image/caption data; merged model served by serve/controller.py"
    Config = DiagnosisConfig
    tiny_arch = "qwen2_vl"
    tiny_layout: ClassVar[dict] = {"long": True, "fmt": "parquet"}

    @property
    def prompt(self) -> str:
        return self.cfg.question
