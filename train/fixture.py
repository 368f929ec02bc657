"""A tiny trained planner for end-to-end tests: a tiny LLaVA overfit, through the real
``train/train_mem.py`` code path, on a handful of MMedAgent-format tool-use records.

Afterwards, under greedy decoding, ``load_planner(dir).generate(...)`` emits exactly the trained
planning turn for each case (:data:`PLANNER_CASES`): the question plus the case's image in, the
case's tool calls out. The result is cached on disk, keyed by a hash of everything that shapes it
(cases, training flags, the training / model-layer / protocol sources, library versions).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mmedagent.cache import cache_root
from mmedagent.protocol import (
    AssistantTurn,
    Record,
    ToolCall,
    ToolOutcome,
    assistant_message,
    tool_result_message,
)

IMAGE_SIZE = 32


@dataclass(frozen=True)
class PlannerCase:
    """One trained conversation: question + image -> planning turn -> tool outputs -> answer."""

    question: str
    color: tuple[int, int, int]
    plan: AssistantTurn
    outcomes: tuple[ToolOutcome, ...] = field(default_factory=tuple)
    answer: AssistantTurn | None = None

    @property
    def calls(self) -> list[ToolCall]:
        return list(self.plan.actions)

    def image(self) -> Image.Image:
        """The case's image: a square in the case's colour with a grey frame."""
        im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
        im.paste(Image.new("RGB", (IMAGE_SIZE - 8, IMAGE_SIZE - 8), self.color), (4, 4))
        return im

    def record(self, image_name: str) -> Record:
        turns = [{"from": "human", "value": f"<image>\n{self.question}"}, assistant_message(self.plan).to_dict()]
        if self.answer is not None:
            turns += [tool_result_message(list(self.outcomes), self.question).to_dict(),
                      assistant_message(self.answer).to_dict()]
        return Record.from_dict({"image": image_name, "conversations": turns})


def _call(name: str, **params) -> ToolCall:
    return ToolCall(API_name=name, API_params=params)


PLANNER_CASES: tuple[PlannerCase, ...] = (
    PlannerCase(
        question="Can you locate the tumor in this MRI image?", color=(200, 40, 40),
        plan=AssistantTurn(thoughts="I should locate the tumor first.",
                           actions=[_call("grounding dino", image="<imagepath>", prompts=["tumor"])],
                           value="I will locate it. Please wait."),
        outcomes=(ToolOutcome(tool="grounding dino", output={"boxes": [[0.41, 0.54, 0.76, 0.75]], "logits": [0.95],
                                                             "phrases": ["tumor"]}),),
        answer=AssistantTurn(thoughts="The tumor was found.", value="The tumor is in the lower right region.")),
    PlannerCase(
        question="What modality is this image?", color=(40, 200, 40),
        plan=AssistantTurn(thoughts="Classify the modality.", actions=[_call("BiomedClip")], value="Please wait."),
        outcomes=(ToolOutcome(tool="BiomedClip", output={"label": "brain MRI"}),),
        answer=AssistantTurn(thoughts="The classifier answered.", value="This is a brain MRI.")),
    PlannerCase(
        question="Segment the nodule in this lung CT.", color=(40, 40, 200),
        plan=AssistantTurn(thoughts="Find and segment the nodule.",
                           actions=[_call("grounding dino + MedSAM", image="<imagepath>", prompts=["nodule"])],
                           value="Segmenting. Please wait."),
        outcomes=(ToolOutcome(tool="grounding dino + MedSAM", output={"boxes": [[0.12, 0.34, 0.56, 0.78]],
                                                                      "logits": [0.8], "phrases": ["nodule"]}),),
        answer=AssistantTurn(thoughts="The nodule was segmented.", value="The nodule is in the upper left.")),
    PlannerCase(
        question="Write a report for this chest X-ray.", color=(200, 200, 40),
        plan=AssistantTurn(thoughts="Generate a report.", actions=[_call("ChatCAD-G")], value="Please wait."),
        outcomes=(ToolOutcome(tool="ChatCAD-G", output={"report": "No acute cardiopulmonary abnormality."}),),
        answer=AssistantTurn(thoughts="The report is ready.", value="No acute cardiopulmonary abnormality.")),
    PlannerCase(
        question="Is this image in color?", color=(200, 40, 200),
        plan=AssistantTurn(thoughts="I can answer directly.", value="Yes, it is in color.")),
)

TRAIN_FLAGS = (
    "--version", "v1", "--lora_enable", "True", "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0",
    "--learning_rate", "6e-3", "--mm_projector_lr", "1e-3", "--max_steps", "120", "--warmup_ratio", "0.05",
    "--lr_scheduler_type", "cosine", "--per_device_train_batch_size", "5", "--weight_decay", "0",
    "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
    "--dataloader_num_workers", "0", "--model_max_length", "512", "--disable_tqdm", "True",
)


def _fingerprint() -> str:
    import peft
    import torch
    import transformers

    here = Path(__file__).resolve().parent
    import mmedagent.model
    import mmedagent.protocol

    sources = sorted(here.glob("*.py")) + sorted(Path(mmedagent.model.__file__).parent.glob("*.py"))
    sources.append(Path(mmedagent.protocol.__file__))
    h = hashlib.sha256()
    h.update(json.dumps([c.record("x.png").to_dict() for c in PLANNER_CASES] + [c.color for c in PLANNER_CASES],
                        sort_keys=True).encode())
    h.update(" ".join(TRAIN_FLAGS).encode())
    h.update(f"{torch.__version__} {transformers.__version__} {peft.__version__}".encode())
    for src in sources:
        h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()[:16]


def _other_boxes(case: PlannerCase, seed: int, n: int = 2) -> list[PlannerCase]:
    """``case`` with other detector boxes (1–3 of them) and the same answer: the answer turn must not
    hinge on the exact numbers a live detector returns."""
    import random

    if not any("boxes" in (o.output or {}) for o in case.outcomes):
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        outcomes = []
        for o in case.outcomes:
            output = dict(o.output or {})
            if "boxes" in output:
                k = rng.randint(1, 3)
                boxes = []
                for _ in range(k):
                    x1, y1 = rng.randint(0, 60) / 100, rng.randint(0, 60) / 100
                    boxes.append([x1, y1, round(x1 + rng.randint(5, 39) / 100, 2), round(y1 + rng.randint(5, 39) / 100, 2)])
                output.update(boxes=boxes, logits=[round(rng.uniform(0.3, 1.0), 2) for _ in boxes],
                              phrases=[output["phrases"][0]] * k)
            outcomes.append(ToolOutcome(tool=o.tool, output=output))
        out.append(PlannerCase(case.question, case.color, case.plan, tuple(outcomes), case.answer))
    return out


def default_cache_dir() -> Path:
    return cache_root("tiny_planner")


def trained_tiny_planner(cache_dir: str | Path | None = None) -> Path:
    """The trained tiny planner's output directory (LoRA adapter + projector + processor + manifest),
    training it first (≈20 s of training, ≈1 min with start-up, on 2 CPU cores) unless a cached copy with the same fingerprint exists."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / f"planner-{_fingerprint()}"
    out = entry / "out"
    with open(root / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per entry; others wait and reuse its result
        if (entry / "DONE").is_file():
            return out
        _build(entry)
        (entry / "DONE").write_text("ok\n")
    return out


def _build(entry: Path) -> None:
    from mmedagent.model.tiny import make_tiny_model

    base = make_tiny_model("llava", entry / "base", seed=0)
    images = entry / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for k, case in enumerate(PLANNER_CASES):
        case.image().save(images / f"case{k}.png")
        records.append(case.record(f"case{k}.png").to_dict())
        records += [c.record(f"case{k}.png").to_dict() for c in _other_boxes(case, k)]
    data = entry / "train.json"
    data.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    cmd = [sys.executable, "-m", "mmedagent.train.train_mem", "--model_name_or_path", str(base),
           "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(entry / "out"), *TRAIN_FLAGS]
    # one thread: for a model this small, more threads only add contention on a busy CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training the tiny planner failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-4000:]}")
