"""Text-prompted detection with Grounding DINO (transformers), MMedAgent's ``grounding dino`` tool."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, field_validator

from mmedagent.hub import prefer_cache_when_unreachable
from mmedagent.tools._boxes import MAX_PROMPTS, as_pil_rgb, missing_local_folder, nms, pick_device, weights_error
from mmedagent.tools.base import Overlay, Tool, ToolParams, ToolResult

DEFAULT_MODEL = "IDEA-Research/grounding-dino-base"
MODEL_TYPES = ("grounding-dino", "mm-grounding-dino")
"""transformers model types read as Grounding DINO (MM-Grounding-DINO shares its processor and outputs)."""


def clean_prompts(prompts: list[str]) -> list[str]:
    """Strip every prompt and drop repeats (ignoring case and spacing: the detector lowercases, and a repeat
    spends text tokens on nothing); an empty one, or one of separators only (Grounding DINO splits phrases
    at '.'), is an error that says which."""
    cleaned: dict[str, str] = {}
    for i, p in enumerate(prompts):
        p = " ".join(p.split())
        if not any(c.isalnum() for c in p):
            raise ValueError(f"prompt {i} is {'empty' if not p else f'{p!r}, which names nothing'}; give the object "
                             "to find, e.g. 'tumor'")
        cleaned.setdefault(p.casefold(), p)
    return list(cleaned.values())


class GroundingParams(ToolParams):
    prompts: list[str] = Field(min_length=1, max_length=MAX_PROMPTS,
                               description=f"Things to find, e.g. ['tumor']; joined with ' . ' (at most {MAX_PROMPTS}).")
    box_threshold: float = Field(0.3, ge=0.0, le=1.0, description="Minimum box confidence.")
    text_threshold: float = Field(0.25, ge=0.0, le=1.0, description="Minimum token score for a phrase.")

    _strip = field_validator("prompts")(clean_prompts)


class GroundingResult(ToolResult):
    boxes: list[list[float]] = Field(description="[x1, y1, x2, y2] normalised to [0, 1], best first.")
    logits: list[float] = Field(description="Confidence of each box.")
    phrases: list[str] = Field(description="Prompt words each box matched.")

    def overlay(self) -> Overlay:
        return Overlay(boxes=self.boxes, labels=self.phrases)


class GroundingTool(Tool):
    """Grounding DINO via transformers (``GroundingDinoForObjectDetection``, ``MMGroundingDinoForObjectDetection``).

    Options: ``model`` (hub id or local directory saved with ``save_pretrained``; default
    ``IDEA-Research/grounding-dino-base``; any Grounding DINO or MM-Grounding-DINO fine-tune in transformers
    format works), ``device`` (default cuda when available), ``nms_iou`` (0.8, as MMedAgent), ``max_boxes``
    (keep at most this many boxes, best first; default all).
    """

    name = "grounding"
    aliases = ("grounding dino",)
    description = (
        "Find and locate objects (lesions, organs, cells, ...) named by text prompts; "
        "returns boxes [x1, y1, x2, y2] normalised to [0, 1], their confidence and matched phrases."
    )
    Params = GroundingParams
    Result = GroundingResult

    def load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

        ref = str(self.options.get("model", DEFAULT_MODEL))
        self.device = pick_device(self.options.get("device"))
        self.nms_iou = float(self.options.get("nms_iou", 0.8))
        max_boxes = self.options.get("max_boxes")
        self.max_boxes = int(max_boxes) if max_boxes is not None else None
        if self.max_boxes is not None and self.max_boxes < 1:
            raise ValueError(f"max_boxes must be at least 1, got {max_boxes}")
        how = (f"Download a Grounding DINO checkpoint in transformers format (e.g. `hf download {DEFAULT_MODEL} "
               "--local-dir DIR`) and pass model=DIR, or allow hub access.")
        if (missing := missing_local_folder(ref)) is not None:
            raise weights_error(self.name, ref, how, missing)
        prefer_cache_when_unreachable(ref)
        source = os.path.expanduser(ref)
        try:
            model_type = AutoConfig.from_pretrained(source).model_type
        except (OSError, ValueError) as e:  # ValueError: a config.json without model_type
            raise weights_error(self.name, ref, how, e) from e
        if model_type not in MODEL_TYPES:  # it would load, its weights dropped or the wrong modules built
            raise ValueError(f"grounding: {ref!r} holds a {model_type!r} model, not Grounding DINO (model_type "
                             f"{' or '.join(map(repr, MODEL_TYPES))}). {how}")
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(source).to(self.device).eval()
        except OSError as e:
            raise weights_error(self.name, ref, how, e) from e
        self._special = set(self.processor.tokenizer.all_special_tokens)
        self._torch = torch
        self.weights_note = f"Grounding DINO: {ref}"

    def _phrase(self, label: str) -> str:
        words = [w for w in label.replace(".", " ").split() if w not in self._special]
        return " ".join(words)

    def _check_shape(self, width: int, height: int) -> None:
        """Refuse an image so elongated that the processor would scale its short side to no pixels
        (transformers' own error then speaks of size keys, not of the image)."""
        longest = getattr(self.processor.image_processor.size, "longest_edge", None)
        if longest and round(longest * min(width, height) / max(width, height)) < 1:
            raise ValueError(f"the image is {width}x{height} pixels: this Grounding DINO scales its long side to "
                             f"{longest} px, which leaves the short side no pixel; crop it or pad it to a ratio "
                             f"under {longest}:1")

    def detect(self, image: Any, prompts: list[str], box_threshold: float, text_threshold: float) -> GroundingResult:
        """Boxes for the prompts on an image (what ``__call__`` does, without a params object)."""
        img = as_pil_rgb(image)
        self._check_shape(*img.size)
        text = " . ".join(p.lower() for p in prompts) + " ."
        inputs = self.processor(images=img, text=text, return_tensors="pt").to(self.device)
        n_tokens, limit = inputs["input_ids"].shape[1], self.model.config.max_text_len
        if n_tokens > limit:
            raise ValueError(f"the {len(prompts)} prompts make {n_tokens} text tokens; this Grounding DINO reads at "
                             f"most {limit}: give fewer or shorter prompts (or call the tool again for the rest)")
        with self._torch.inference_mode():
            outputs = self.model(**inputs)
        # Without target sizes the boxes stay relative to the image: MMedAgent's [0, 1] convention.
        found = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold
        )[0]
        boxes = found["boxes"].float().clamp(0.0, 1.0).cpu().numpy()
        scores = found["scores"].float().cpu().numpy()
        keep = nms(boxes, scores, self.nms_iou)[: self.max_boxes]
        return GroundingResult(
            boxes=[boxes[i].tolist() for i in keep],
            logits=[float(scores[i]) for i in keep],
            phrases=[self._phrase(found["text_labels"][i]) for i in keep],
        )

    def __call__(self, image: Any, params: GroundingParams) -> GroundingResult:
        return self.detect(image, params.prompts, params.box_threshold, params.text_threshold)
