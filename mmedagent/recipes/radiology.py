"""``radiology-llama32v``: radiology captioning with Llama-3.2-Vision (Mllama), QLoRA.

Image + expert caption pairs (Radiology_mini / ROCO: ``image``, ``caption``) become instruction
pairs "<image> You are an expert radiographer. Describe accurately what you see in this image." →
caption. A few images are held out and answered by the base model and by the fine-tuned, merged
model; the answers are printed side by side with BLEU-4 / ROUGE-L / METEOR against the captions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmedagent.recipes.base import CaptionRecipe
from mmedagent.recipes.config import CaptionConfig

INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."

ATTENTION_AND_MLP = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class RadiologyConfig(CaptionConfig):
    model: str = "meta-llama/Llama-3.2-11B-Vision-Instruct"
    instruction: str = INSTRUCTION
    qlora: bool = True
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str | None = ATTENTION_AND_MLP
    lora_vision: bool = True
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 5
    max_steps: int = 30
    weight_decay: float = 0.01
    eval_samples: int = 3
    max_new_tokens: int = 128

    TINY: ClassVar[dict] = {
        "max_steps": 6,
        "warmup_steps": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-2,
        "eval_samples": 2,
        "max_new_tokens": 12,
        "model_max_length": 512,
    }


class RadiologyLlama32V(CaptionRecipe):
    name = "radiology-llama32v"
    summary = "Llama-3.2-11B-Vision + QLoRA on radiology image/caption pairs; before/after answers side by side"
    Config = RadiologyConfig
    tiny_arch = "mllama"
    compare_before = True
    tiny_layout: ClassVar[dict] = {"long": False, "fmt": "disk"}

    @property
    def prompt(self) -> str:
        return self.cfg.instruction
