"""``dialogue-llama3``: medical QA and doctor–patient dialogue with a text-only Llama-3.

Rows are MedQA-style multiple choice (``question``, ``options``, ``answer_idx``) or free text
(ChatDoctor / Alpaca ``instruction`` + ``input`` + ``output``, MedQuAD ``question`` + ``answer``, ``Patient`` +
``Doctor``, medical-o1 ``Question`` + ``Complex_CoT`` + ``Response``, or chat ``messages``), in any mix.
They are split into train / val / test; the model is fine-tuned with LoRA (r 8, α 32, dropout
0.1) or in full (``--no-lora``), and the val and test answers of the result are scored with BLEU-4,
ROUGE-L and METEOR, plus accuracy on the multiple-choice questions.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mmedagent.protocol import Record
from mmedagent.recipes.base import Prepared, Recipe, serve_script, text_metrics
from mmedagent.recipes.config import RecipeConfig, held_out_share
from mmedagent.recipes.data import (
    Example,
    duplicate_count,
    read_dialogue,
    split,
    tiny_dialogue_file,
    write_examples,
    write_sharegpt,
)


@dataclass
class DialogueConfig(RecipeConfig):
    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: str | None = None  # every Linear layer
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    num_train_epochs: float = 3.0
    model_max_length: int = 1024
    save_steps: int = 1000
    val_fraction: float = 0.1
    """Share (< 1) or number (>= 1) of the records held out for validation."""
    test_fraction: float = 0.1
    """Share (< 1) or number (>= 1) of the records held out for the final test."""
    max_new_tokens: int = 256
    tiny_rows: int = 24

    def validate(self) -> None:
        super().validate()
        held_out_share(self.val_fraction, "val-fraction")
        held_out_share(self.test_fraction, "test-fraction")

    TINY: ClassVar[dict] = {
        "max_steps": 6,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-2,
        "val_fraction": 2,
        "test_fraction": 2,
        "max_new_tokens": 12,
        "model_max_length": 256,
    }


_CHOICE_PATTERNS = (
    re.compile(r"^\W*\(?([A-Z])(?:[.):,]|\s*$|\s+[-–—])"),  # starts with "B." / "(B)" / "B)" / "B" alone
    re.compile(r"\b(?:answer|option|choice)(?:\s+(?:is|would\s+be))?\s*[:\-]?\s*\(?([A-Z])\b(?!\s+[a-z])"),
    re.compile(r"\(([A-Z])\)"),  # "(B)" anywhere
    re.compile(r"(?<![\w.])([A-Z])[.)](?=\s|$)"),  # "B." / "B)" anywhere
    re.compile(r"(?<![\w'])([A-Z])\b(?![.'’]?\w)(?!\s+[a-z])"),  # a lone capital, not the article "A likely ..."
)


def chosen_option(answer: str, options: tuple[str, ...]) -> str | None:
    """The option letter an answer picks: a leading "B." / "(B)", then "answer is B", "(B)" or "B." anywhere,
    then a standalone capital that is not an article or pronoun followed by a word ("A likely diagnosis
    is B. gout" picks B)."""
    for pattern in _CHOICE_PATTERNS:
        found = next((m for m in pattern.findall(answer) if m in options), None)
        if found:
            return found
    return None


class DialogueLlama3(Recipe):
    name = "dialogue-llama3"
    summary = "text-only Llama-3-8B-Instruct, LoRA or full fine-tuning on MedQA / ChatDoctor data; BLEU/ROUGE-L/METEOR"
    Config = DialogueConfig
    tiny_arch = "llama"

    def tiny_data(self, folder: Path) -> Path:
        return tiny_dialogue_file(folder, self.cfg.tiny_rows, self.cfg.seed)

    def prepare(self, data: Path) -> Prepared:
        pairs = read_dialogue(data, self.data_split)
        def key(pair: tuple[Record, Example]) -> tuple:
            return pair[1].context, pair[1].prompt, pair[1].reference

        train, val, test = split(pairs, [self.cfg.val_fraction, self.cfg.test_fraction], self.cfg.seed,
                                  key=key, flags="--val-fraction, --test-fraction")
        folder = self.staged("data")
        train_file = write_sharegpt([r for r, _ in train], folder / "train.json")
        for name, part in (("val", val), ("test", test)):
            write_sharegpt([r for r, _ in part], folder / f"{name}.json")
            write_examples([e for _, e in part], folder / f"{name}.jsonl")
        n_mc = sum(bool(e.options) for _, e in pairs)
        return Prepared(
            train_file,
            {"val": [e for _, e in val], "test": [e for _, e in test]},
            {
                "train": len(train),
                "val": len(val),
                "test": len(test),
                "multiple_choice": n_mc,
                "free_text": len(pairs) - n_mc,
            } | duplicate_count(pairs, key),
            eval_file=folder / "val.json" if val else None,
        )

    def score(self, split: str, examples: list[Example], answers: list[str]) -> dict[str, float]:
        out: dict[str, float] = text_metrics(answers, [e.reference for e in examples])
        mc = [(e, a) for e, a in zip(examples, answers) if e.options]
        if mc:
            out["accuracy"] = sum(chosen_option(a, e.options) == e.reference[0] for e, a in mc) / len(mc)
            out["n_multiple_choice"] = len(mc)
        return out

    def next_steps(self, export: Path) -> list[str]:
        return [
            shlex.join(["python", str(serve_script("controller.py")), "--model-path", str(Path(export).resolve()),
                        "--tools", ""]) + "   # no tools: a text-only chat model",
            shlex.join(["python", str(serve_script("cli.py"))]) + "   # in a second terminal: chat with it",
        ]
