"""Text-prompted segmentation: Grounding DINO boxes, then one SAM/MedSAM mask per box, in-process."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import Field

from mmedagent.tools.base import Overlay, Tool, ToolResult
from mmedagent.tools.grounding import GroundingParams, GroundingTool
from mmedagent.tools.segmentation import SegmentationTool


class GroundingSegmentationResult(ToolResult):
    boxes: list[list[float]] = Field(description="Detected boxes [x1, y1, x2, y2] normalised to [0, 1].")
    logits: list[float] = Field(description="Confidence of each box.")
    phrases: list[str] = Field(description="Prompt words each box matched.")
    areas: list[int] = Field(description="Pixels in the mask of each box.")
    masks: list[dict[str, Any]] = Field(description="COCO RLE mask of each box (for the UI).")

    hidden_from_model = frozenset({"masks"})

    def overlay(self) -> Overlay:
        return Overlay(boxes=self.boxes, labels=self.phrases, masks=self.masks)


def _tool(value: Any, cls: type[Tool]) -> Tool:
    if isinstance(value, cls):
        return value
    if value is None or isinstance(value, dict):
        return cls(**(value or {}))
    raise TypeError(f"expected a {cls.__name__} or a dict of its options, got {type(value).__name__}")


class GroundingSegmentationTool(Tool):
    """Composes :class:`GroundingTool` and :class:`SegmentationTool` (no HTTP hop).

    Options: ``grounding`` and ``segmentation`` — either the running tool instances (their loaded
    weights are shared, nothing is loaded twice) or dicts of their options.
    """

    name = "grounding_segmentation"
    aliases = ("grounding dino + MedSAM", "grounding dino + SAM")
    description = (
        "Find objects named by text prompts and segment each one; returns boxes normalised to [0, 1], "
        "confidences, phrases and mask areas in pixels (masks are drawn for the user)."
    )
    Params = GroundingParams
    Result = GroundingSegmentationResult

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.grounding = _tool(options.get("grounding"), GroundingTool)
        self.segmentation = _tool(options.get("segmentation"), SegmentationTool)

    def share_parts(self, tools: Iterable[Tool]) -> None:
        """Use, for a part not loaded yet, a tool of ``tools`` of the same class and options: a process
        running the parts beside the composite then loads their weights once."""
        for attr in ("grounding", "segmentation"):
            mine = getattr(self, attr)
            same = next((t for t in tools if type(t) is type(mine) and t.options == mine.options), None)
            if same is not None and not mine.loaded:
                setattr(self, attr, same)

    def load(self) -> None:
        self.grounding.ensure_loaded()
        self.segmentation.ensure_loaded()
        self.weights_note = f"{self.grounding.weights_note} + {self.segmentation.weights_note}"

    def __call__(self, image: Any, params: GroundingParams) -> GroundingSegmentationResult:
        found = self.grounding.detect(image, params.prompts, params.box_threshold, params.text_threshold)
        masks = self.segmentation.segment(image, boxes=found.boxes) if found.boxes else None
        return GroundingSegmentationResult(
            boxes=found.boxes,
            logits=found.logits,
            phrases=found.phrases,
            areas=masks.areas if masks else [],
            masks=masks.masks if masks else [],
        )


def share_composite_parts(tools: list[Tool]) -> None:
    """Give each composite among ``tools`` the tools of the list with its parts' class and options, so a
    process running the parts beside the composite loads their weights once."""
    for tool in tools:
        if isinstance(tool, GroundingSegmentationTool):
            tool.share_parts(tools)
