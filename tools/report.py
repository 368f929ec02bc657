"""Report generation tool: a vision-language model writes a radiology report for the image.

Any checkpoint the model layer loads works (``mmedagent.model.load_planner``: LLaVA, original
LLaVA / LLaVA-Med layout, Qwen2-VL / Qwen2.5-VL, Mllama), from a hub id or a local folder; no
closed API. MMedAgent's ChatCAD-G is called with empty params, so every param has a default.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field

from mmedagent.protocol import IMAGE_TOKEN
from mmedagent.tools._boxes import as_pil_rgb, weights_error
from mmedagent.tools.base import Tool, ToolParams, ToolResult

# LLaVA-Med 1.0 fine-tuned on MIMIC-CXR findings (BioNLP 2024 RRG shared task); original LLaVA
# layout, which the model layer converts on load. Trained prompt: FINDINGS_PROMPT below.
DEFAULT_MODEL = "dcampanini/llavamed1.0-BioNLP-RRG-ACL2024"
DEFAULT_TEMPLATE = "vicuna_v1"
FINDINGS_PROMPT = "Write the finding section of a {modality} radiology report."
IMPRESSION_PROMPT = "Write the impression section of a {modality} radiology report."
FULL_PROMPT = "Write a {modality} radiology report with a FINDINGS section and an IMPRESSION section."

MAX_MODALITY_CHARS = 100
"""A modality is a few words; a longer one (a planner pasting the question or looping) is refused as a
param instead of filling the report model's context."""

# load_planner options a report model may need (a 4-bit model on a small GPU, an original LLaVA checkpoint's
# local CLIP tower); passed through to the model layer.
LOAD_OPTIONS = ("adapter", "dtype", "load_in_4bit", "load_in_8bit", "attn_implementation", "vision_tower")

_SECTION = re.compile(
    r"^[ \t>*#_]*(findings?|impressions?|conclusions?)[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE
)


def parse_sections(text: str) -> dict[str, str | None]:
    """Split a report at its FINDINGS / IMPRESSION (or CONCLUSION) headings; None where absent."""
    found: dict[str, str | None] = {"findings": None, "impression": None}
    marks = list(_SECTION.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end() : end].strip()
        key = "findings" if m.group(1).lower().startswith("finding") else "impression"
        if body and found[key] is None:
            found[key] = body
    return found


class ReportGeneration(Tool):
    """Radiology report for the conversation's image (MMedAgent's ChatCAD-G, on a local model)."""

    name = "report_generation"
    aliases = ("ChatCAD-G", "report")
    description = (
        "Write a radiology report for the image with a medical vision-language model; "
        "style 'findings', 'impression' or 'full'."
    )

    class Params(ToolParams):
        modality: str | None = Field(default=None, max_length=MAX_MODALITY_CHARS,
                                     description="e.g. 'chest X-ray', 'brain MRI' (default: chest X-ray)")
        style: Literal["findings", "impression", "full"] = Field(default="full", description="which part to write")

    class Result(ToolResult):
        report: str
        findings: str | None = None
        impression: str | None = None
        style: str = "full"
        model: str = ""

        hidden_from_model: ClassVar[frozenset[str]] = frozenset({"model", "style", "findings", "impression"})

    def __init__(self, model: str = DEFAULT_MODEL, conv_template: str | None = DEFAULT_TEMPLATE,
                 max_new_tokens: int = 256, device: str | None = None, prompts: dict[str, str] | None = None,
                 **options: Any):
        """``model``: hub id or local folder of any checkpoint ``load_planner`` accepts;
        ``conv_template``: its conversation template (None: the processor's chat template);
        ``prompts``: per-style instructions with a ``{modality}`` slot, replacing the defaults; other options
        (:data:`LOAD_OPTIONS`) go to ``load_planner``."""
        unknown = sorted(set(options) - set(LOAD_OPTIONS))
        if unknown:
            raise TypeError(f"report_generation: unknown options {unknown}; known: model, conv_template, "
                            f"max_new_tokens, device, prompts, {', '.join(LOAD_OPTIONS)}")
        super().__init__(model=model, conv_template=conv_template, max_new_tokens=max_new_tokens, device=device,
                         **options)
        self.prompts = {"findings": FINDINGS_PROMPT, "impression": IMPRESSION_PROMPT, "full": FULL_PROMPT}
        for style, text in (prompts or {}).items():
            if style not in self.prompts:
                raise ValueError(f"report_generation: prompts has unknown style {style!r}; styles: "
                                 f"{', '.join(self.prompts)}")
            try:
                text.format(modality="chest X-ray")
            except (AttributeError, IndexError, KeyError, ValueError) as e:
                raise ValueError(f"report_generation: prompts[{style!r}] must be text whose only slot is {{modality}} "
                                 f"(write other braces doubled, {{{{ }}}}): {type(e).__name__}: {e}") from e
            self.prompts[style] = text
        self._planner = None

    def load(self) -> None:
        from pathlib import Path

        from mmedagent.hub import is_hub_id
        from mmedagent.model import load_planner

        model = str(self.options["model"])
        local = Path(model).expanduser()
        hub_id = model if is_hub_id(model) and not local.exists() else DEFAULT_MODEL
        how = (f"Download a report model (e.g. `hf download {hub_id} --local-dir DIR`) and pass model=DIR, "
               "or allow hub access.")
        if (local.is_absolute() or model.startswith(".")) and not local.is_dir():
            raise weights_error(self.name, model, how, FileNotFoundError("report model folder not found"))
        try:
            self._planner = load_planner(
                model, conv_template=self.options["conv_template"], device=self.options["device"],
                **{k: v for k, v in self.options.items() if k in LOAD_OPTIONS},
            )
        except OSError as e:
            raise weights_error(self.name, model, how, e) from e
        self.weights_note = f"report model: {model}"

    def prompt(self, params: Params) -> str:
        modality = " ".join((params.modality or "").split()) or "chest X-ray"
        return self.prompts[params.style].format(modality=modality)

    def __call__(self, image: Any, params: Params) -> Result:
        if image is None:
            raise ValueError("report_generation needs an image")
        messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{self.prompt(params)}"}]
        # the planner serialises generations on the shared model itself
        text = self._planner.generate(messages, as_pil_rgb(image), max_new_tokens=self.options["max_new_tokens"],
                                      temperature=0.0)
        text = text.strip()
        sections = parse_sections(text)
        if params.style == "findings":
            report = sections["findings"] or text
        elif params.style == "impression":
            report = sections["impression"] or text
        else:
            report = text
        return self.Result(report=report, findings=sections["findings"], impression=sections["impression"],
                           style=params.style, model=str(self.options["model"]))
