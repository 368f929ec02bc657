"""Phrasing banks for the instruction-data builders.

Each task has question phrasings split into ``train`` and ``heldout`` (never used for training
data, so evaluation can measure generalisation to unseen wordings), plus thoughts, "please wait"
values and final-answer templates. Placeholders: ``{target}`` (what to find), ``{box}``,
``{label}``, ``{labels}``, ``{report}``, ``{answer}``, ``{question}``, ``{area}``.
"""

from __future__ import annotations

import random
from typing import Literal

Phrasings = Literal["train", "heldout", "all"]

QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "grounding": {
        "train": (
            "Can you locate the {target} in this image?",
            "Where is the {target}?",
            "Find the {target} in the image.",
            "Please detect the {target} and give its position.",
            "Could you point out where the {target} is?",
            "Show me the location of the {target}.",
            "Is there a {target}? Where is it located?",
            "Identify the region containing the {target}.",
            "Draw a box around the {target}.",
            "Which part of the image shows the {target}?",
            "Mark where the {target} is on this image.",
            "Pinpoint the {target}.",
            "Give me the bounding box coordinates of the {target}.",
            "Put a bounding box on the {target}, please.",
            "Whereabouts is the {target}?",
            "In which area of the scan is the {target} visible?",
            "Highlight the position of the {target} with a box.",
            "Detect the {target} for me.",
            "Tell me where the {target} appears in this scan.",
            "Localize the {target}, please.",
        ),
        "heldout": (
            "Mark the {target} for me, please.",
            "I need the bounding box of the {target}.",
            "Whereabouts in this scan does the {target} appear?",
            "Could you spot the {target} and tell me its coordinates?",
        ),
    },
    "segmentation": {
        "train": (
            "Segment the {target} inside the box {box}.",
            "Can you outline the {target} in the region {box}?",
            "Please produce a mask of the {target} within {box}.",
            "Delineate the {target} located at {box}.",
            "Give me the segmentation of the region {box}, which contains the {target}.",
            "Create a mask for the {target} in box {box}.",
            "Trace the boundary of the {target} at {box}.",
            "Cut the {target} out of the region {box}.",
            "Segment what is inside {box}; it is the {target}.",
            "Give me a pixel mask of the {target} in {box}.",
            "Highlight the exact shape of the {target} within the box {box}.",
            "How far does the {target} in {box} extend? Outline it.",
            "Mask the {target} found at {box}, please.",
            "I want the contour of the {target} in the area {box}.",
            "In {box} there is a {target}; segment it.",
            "The box {box} contains a {target}. Please outline it.",
            "Within {box}, delineate the {target}.",
            "For the region {box}, give me the mask of the {target}.",
            "Box {box}: segment the {target} there.",
            "Given the box {box}, produce a mask of the {target}.",
        ),
        "heldout": (
            "Cut out the {target} found in {box}.",
            "What is the exact extent of the {target} in {box}? Segment it.",
            "Using the box {box}, draw the precise boundary of the {target}.",
        ),
    },
    "grounding_segmentation": {
        "train": (
            "Segment the {target} in this image.",
            "Can you find and segment the {target}?",
            "Please outline the {target}.",
            "Locate the {target} and give me its mask.",
            "Produce a segmentation mask of the {target}.",
            "Where is the {target}? Please segment it.",
            "Delineate the {target} in this scan.",
            "Outline the {target} for me.",
            "I want the exact shape of the {target}.",
            "Highlight the {target} with a pixel mask.",
            "Find the {target} and cut it out with a mask.",
            "Please give me the contour of the {target}.",
            "Segment the {target}, please; I need its precise extent.",
            "Show the exact boundary of the {target}.",
        ),
        "heldout": (
            "Highlight the exact outline of the {target}.",
            "I want a pixel mask of the {target}.",
            "Could you mask out the {target} in this scan?",
        ),
    },
    "classification": {
        "train": (
            "What type of image is this?",
            "Classify this image.",
            "Which modality does this image belong to?",
            "What kind of medical image is shown here?",
            "Can you tell me the category of this image?",
            "Identify the imaging modality.",
            "What is this image an example of?",
            "Which class does this picture belong to?",
            "What sort of image is this?",
            "Tell me the modality of this scan.",
            "Is this an X-ray, a CT, an MRI or something else?",
            "What category best fits this picture?",
            "Name the type of this medical picture.",
            "Which imaging technique produced this scan?",
        ),
        "heldout": (
            "Which class best describes this picture?",
            "Tell me what sort of scan this is.",
            "What kind of scan am I looking at?",
        ),
    },
    "report_generation": {
        "train": (
            "Write a radiology report for this image.",
            "Generate a medical report for this scan.",
            "Can you describe the findings in a report?",
            "Please write the findings and impression for this image.",
            "Draft a report of this examination.",
            "What would the report for this image say?",
            "Summarise the findings of this study in a report.",
            "Compose a radiology report for this scan.",
            "Write the diagnostic report of this examination.",
            "Report on this image as a radiologist would.",
            "Give me a structured report with findings and impression.",
            "Prepare the report for this picture.",
        ),
        "heldout": (
            "Summarise this study as a radiologist would.",
            "Compose the diagnostic report for this picture.",
            "Could you produce the radiologist's report for this scan?",
        ),
    },
    "retrieval": {
        "train": ("{question}",),
        "heldout": ("{question}",),
    },
    "direct": {
        "train": ("{question}",),
        "heldout": ("{question}",),
    },
}

# Composed training phrasings: request frames x task cores. A planner trained from scratch (the demo
# model) learns the words that signal a task from these, not whole sentences; ``heldout`` sentences
# are never produced (checked below).
_FRAMES = ("{core}.", "Please {core}.", "Could you {core}?", "Can you {core}?", "I would like you to {core}.",
           "{core}, please.", "Kindly {core} in this scan.", "{core} in this image.")
_CORES = {
    "grounding": ("locate the {target}", "find the {target}", "detect the {target}", "spot the {target}",
                  "mark the position of the {target}", "give the bounding box of the {target}",
                  "tell me where the {target} is", "point to the {target}", "box the {target}",
                  "give the coordinates of the {target}", "mark the {target} with a box",
                  "show me where the {target} lies"),
    "grounding_segmentation": ("segment the {target}", "outline the {target}", "mask the {target}",
                               "give a mask of the {target}", "trace the contour of the {target}",
                               "delineate the {target}", "cut out the {target} with a mask",
                               "draw the exact boundary of the {target}", "highlight the exact shape of the {target}",
                               "produce a pixel mask of the {target}"),
    "segmentation": ("segment the {target} in {box}", "outline the {target} inside the box {box}",
                     "mask the {target} within {box}", "give a mask of the {target} at {box}",
                     "trace the contour of the {target} in the region {box}", "delineate the {target} in box {box}",
                     "cut out the {target} located in {box}", "draw the boundary of the {target} within {box}",
                     "show the exact extent of the {target} in {box}"),
    "classification": ("classify this image", "tell me the modality of this image", "say what kind of scan this is",
                       "identify the type of this image", "name the category of this picture",
                       "tell me what sort of image this is", "determine the imaging modality",
                       "say which class this scan belongs to"),
    "report_generation": ("write a report for this image", "summarise the findings of this study",
                          "draft the radiology report", "describe the findings and impression in a report",
                          "compose a diagnostic report", "report on this scan like a radiologist",
                          "prepare the radiologist's report", "write up this examination"),
}


def _composed(task: str) -> tuple[str, ...]:
    heldout = {h.casefold() for h in QUESTIONS[task]["heldout"]}
    out = []
    for core in _CORES[task]:
        for frame in _FRAMES:
            text = frame.format(core=core)
            text = text[0].upper() + text[1:]
            if text.casefold() not in heldout:
                out.append(text)
    return tuple(out)


for _task in _CORES:
    QUESTIONS[_task]["train"] = tuple(dict.fromkeys(QUESTIONS[_task]["train"] + _composed(_task)))


THOUGHTS: dict[str, tuple[str, ...]] = {
    "grounding": (
        "To locate the {target}, I should run the grounding model.",
        "The user wants the position of the {target}; a grounding tool can find it.",
        "I need to detect the {target} in the image, so I will call the grounding model.",
    ),
    "segmentation": (
        "The user gave a box; a segmentation model can outline the {target} inside it.",
        "To segment the {target} in the given region, I will use the segmentation model.",
    ),
    "grounding_segmentation": (
        "To segment the {target} without a box, I will first ground it and then segment it.",
        "The {target} must be found and outlined; grounding plus segmentation does both.",
    ),
    "classification": (
        "To know what kind of image this is, I will use the image classifier.",
        "A classification model can tell the image category.",
    ),
    "report_generation": (
        "The user wants a report; the report generation model can write one from the image.",
        "I will generate a report with the report generation tool.",
    ),
    "retrieval": (
        "This needs medical knowledge; I will retrieve relevant passages first.",
        "To answer reliably, I should look up the knowledge base.",
    ),
    "direct": (
        "I can answer this directly without any tool.",
        "No tool is needed for this question.",
    ),
}

WAIT = (
    "I will use {tool} to help answer your question. Please wait.",
    "Let me run {tool} first. Please wait.",
    "I am calling {tool}. Please wait.",
)

ANSWERS: dict[str, tuple[str, ...]] = {
    "grounding": (
        "The {target} is located at {box}.",
        "I found the {target} at {box} (normalised x1, y1, x2, y2).",
        "The {target} appears in the region {box}.",
    ),
    "grounding_none": (
        "I could not find any {target} in this image.",
        "No {target} was detected.",
    ),
    "segmentation": (
        "The {target} has been segmented; the mask lies within {box} and covers {area} pixels.",
        "Here is the segmentation of the {target}: a mask of {area} pixels inside {box}.",
    ),
    "grounding_segmentation": (
        "The {target} was found at {box} and segmented; the mask covers {area} pixels.",
        "I located the {target} at {box} and outlined it ({area} pixels).",
    ),
    "classification": (
        "This image is classified as {label}.",
        "The image is most likely {label}.",
        "It is {label}.",
    ),
    "report_generation": (
        "{report}",
        "Here is the report: {report}",
    ),
    "retrieval": (
        "{answer}",
    ),
    "direct": (
        "{answer}",
    ),
}


def bank(task: str, phrasings: Phrasings) -> tuple[str, ...]:
    """Question phrasings of ``task`` for the chosen subset."""
    entry = QUESTIONS[task]
    if phrasings == "all":
        return entry["train"] + entry["heldout"]
    if phrasings not in entry:
        raise ValueError(f"phrasings must be train, heldout or all, not {phrasings!r}")
    return entry[phrasings]


def pick(rng: random.Random, options: tuple[str, ...], **values: object) -> str:
    return rng.choice(options).format(**values)
