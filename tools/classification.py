"""Zero-shot image classification with open_clip (BiomedCLIP by default), MMedAgent's ``BiomedClip``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from mmedagent.hub import prefer_cache_when_unreachable
from mmedagent.tools._boxes import as_pil_rgb, missing_local_folder, pick_device, weights_error
from mmedagent.tools.base import Tool, ToolParams, ToolResult

DEFAULT_MODEL = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
DEFAULT_TEMPLATE = "the photo can be classified as "
# MMedAgent's 14 modality labels, in its order.
MODALITY_LABELS = (
    "adenocarcinoma histopathology",
    "brain MRI",
    "covid line chart",
    "diagnostic flowchart",
    "diagnostic scatter plot",
    "squamous cell carcinoma histopathology",
    "immunohistochemistry histopathology",
    "bone X-ray",
    "chest X-ray",
    "abdomen CT",
    "lung CT",
    "pie chart",
    "hematoxylin and eosin histopathology",
    "gross",
)
MAX_LABELS = 100
"""Most candidate labels one call may give: every label is encoded at once (256 tokens each for BiomedCLIP), so a
longer list (a planner looping) is refused as a param."""


class ClassificationParams(ToolParams):
    labels: list[str] | None = Field(
        None, min_length=2, max_length=MAX_LABELS,
        description=f"Candidate labels (2 to {MAX_LABELS}); default: MMedAgent's 14 image-modality labels.",
    )
    template: str = Field(
        DEFAULT_TEMPLATE, description="Prompt put before each label, or with '{}' where the label goes."
    )
    top_k: int = Field(3, ge=1, description="How many ranked labels to return.")

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        cleaned = [label.strip() for label in labels]
        if any(not label for label in cleaned):
            raise ValueError("labels must not be empty strings")
        keys = [" ".join(label.casefold().split()) for label in cleaned]  # BiomedCLIP and CLIP lowercase text
        if len(set(keys)) != len(keys):
            raise ValueError("labels must be distinct (ignoring case and spacing)")
        return cleaned

    @field_validator("template")
    @classmethod
    def _template(cls, template: str) -> str:
        if "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
            raise ValueError(f"template {template!r}: the label's place is written {{}} (e.g. 'a {{}} image'); "
                             "other braces are not allowed")
        return template


def label_prompt(template: str, label: str) -> str:
    """The text encoded for one label: ``template`` with ``{}`` replaced by the label, else the template
    and the label joined by a space (once: MMedAgent's template already ends in one)."""
    if "{}" in template:
        return template.replace("{}", label)
    return f"{template} {label}" if template and not template[-1].isspace() else template + label


class ClassificationResult(ToolResult):
    labels: list[str] = Field(description="Labels ranked by probability, most likely first.")
    probabilities: list[float] = Field(description="Probability of each label (softmax over all candidates).")


class ClassificationTool(Tool):
    """open_clip zero-shot classification.

    Options: ``model`` (default BiomedCLIP ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``;
    any open_clip name such as ``ViT-B-32`` with ``pretrained`` (a tag or weights file), an
    ``hf-hub:`` id, or a local directory holding ``open_clip_config.json`` and the weights — a
    downloaded hub repo), ``pretrained``, ``device``.
    """

    name = "classification"
    aliases = ("BiomedClip",)
    description = (
        "Classify the image among candidate labels (default: its imaging modality, e.g. chest X-ray, brain MRI, "
        "histopathology); returns labels ranked with probabilities."
    )
    Params = ClassificationParams
    Result = ClassificationResult

    def load(self) -> None:
        import open_clip
        import torch

        ref = str(self.options.get("model", DEFAULT_MODEL))
        how = (f"Download the open_clip repo (e.g. `hf download {DEFAULT_MODEL.removeprefix('hf-hub:')} "
               "--local-dir DIR`) and pass model=DIR, give an open_clip model name with pretrained=TAG_OR_FILE, "
               "or allow hub access.")
        if (missing := missing_local_folder(ref)) is not None:
            raise weights_error(self.name, ref, how, missing)
        name = f"local-dir:{Path(ref).expanduser()}" if ":" not in ref and Path(ref).expanduser().is_dir() else ref
        self.device = pick_device(self.options.get("device"))
        prefer_cache_when_unreachable(name)
        try:
            model, preprocess = open_clip.create_model_from_pretrained(
                name, pretrained=self.options.get("pretrained"), device=self.device
            )
            self.tokenizer = open_clip.get_tokenizer(name)
        except (OSError, RuntimeError, ValueError) as e:
            raise weights_error(self.name, ref, how, e) from e
        self.model = model.eval()
        self.preprocess = preprocess
        self._torch = torch
        self._text_cache: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._cache_lock = threading.Lock()
        self.weights_note = f"open_clip: {ref}"

    def _text_features(self, template: str, labels: tuple[str, ...]):
        key = (template, labels)
        with self._cache_lock:
            cached = self._text_cache.get(key)
        if cached is None:
            tokens = self.tokenizer([label_prompt(template, label) for label in labels]).to(self.device)
            cached = self.model.encode_text(tokens, normalize=True)
            with self._cache_lock:
                if len(self._text_cache) >= 64:  # label sets come from the planner: keep the cache bounded
                    self._text_cache.clear()
                self._text_cache[key] = cached
        return cached

    def __call__(self, image: Any, params: ClassificationParams) -> ClassificationResult:
        torch = self._torch
        labels = tuple(params.labels or MODALITY_LABELS)
        pixels = self.preprocess(as_pil_rgb(image))[None].to(self.device)
        with torch.inference_mode():
            image_features = self.model.encode_image(pixels, normalize=True)
            text_features = self._text_features(params.template, labels)
            logits = self.model.logit_scale.exp() * image_features @ text_features.T
            probs = logits.softmax(dim=-1)[0].float().cpu()
        top = probs.argsort(descending=True)[: params.top_k].tolist()
        return ClassificationResult(labels=[labels[i] for i in top], probabilities=[float(probs[i]) for i in top])
