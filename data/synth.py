"""A small synthetic medical set covering every tool, deterministic per seed.

Images are drawn with numpy: organ-like backgrounds of four modalities (brain MRI, chest X-ray,
abdomen CT, H&E histopathology) with one "lesion" each, whose mask, box, class and a short report
are known. The raw annotations are written in the standard layouts (COCO json, PNG masks, label
CSV, report JSON, corpus + QA, VQA/caption tables) and the dialogues are then produced by the
ordinary builders from those files — so the synthetic set also exercises the builders. Training
dialogues use the ``train`` phrasings; the evaluation split uses other images and the ``heldout``
phrasings.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmedagent.data import builders
from mmedagent.data.formats import DataError, write_records
from mmedagent.protocol import Record

MODALITIES = ("brain MRI", "chest X-ray", "abdomen CT", "hematoxylin and eosin histopathology")
LESIONS = {"brain MRI": "tumor", "chest X-ray": "nodule", "abdomen CT": "cyst",
           "hematoxylin and eosin histopathology": "tumor cells"}
LABEL_VALUES = {"tumor": 1, "nodule": 2, "cyst": 3, "tumor cells": 4}

CORPUS = [
    ("tumor-1", "A brain tumor on MRI appears as a mass that is often bright on T2-weighted images and may enhance "
                "after contrast; surrounding oedema and mass effect are common."),
    ("tumor-2", "Primary brain tumors include gliomas and meningiomas; metastases are the most common brain tumors "
                "in adults."),
    ("nodule-1", "A pulmonary nodule on a chest X-ray is a rounded opacity up to 3 cm in diameter surrounded by lung; "
                 "larger opacities are called masses."),
    ("nodule-2", "Solitary pulmonary nodules are followed with CT; growth, spiculation and size above 8 mm raise "
                 "concern for malignancy."),
    ("cyst-1", "A simple hepatic cyst on CT is a well-defined, round, water-density lesion (0-20 HU) that does not "
               "enhance after contrast."),
    ("cyst-2", "Liver cysts are usually benign and found incidentally; complex features such as septa or nodularity "
               "need further imaging."),
    ("tumor cells-1", "On hematoxylin and eosin staining, tumor cells show enlarged, hyperchromatic nuclei, a high "
                      "nuclear-to-cytoplasmic ratio and crowding."),
    ("tumor cells-2", "Hematoxylin stains nuclei blue-purple and eosin stains cytoplasm and stroma pink."),
    ("general-1", "Windowing maps CT numbers to grey levels: a lung window is wide and low, a brain window narrow."),
    ("general-2", "On T1-weighted MRI fluid is dark and fat is bright; on T2-weighted MRI fluid is bright."),
    ("general-3", "On radiographs dense structures such as bone absorb more X-rays and look white; air looks black "
                  "and fat dark grey."),
    ("general-4", "Hounsfield units put water at 0 and air at -1000; fat measures about -100 and cortical bone "
                  "several hundred or more."),
]

QA = [
    ("What does a brain tumor look like on MRI?", "A brain tumor usually appears as a mass that is bright on "
     "T2-weighted images, may enhance after contrast, and often has surrounding oedema.", ["tumor-1"]),
    ("Do brain tumors enhance after contrast?", "Many do; a brain tumor may enhance after contrast, often with "
     "oedema and mass effect around it.", ["tumor-1"]),
    ("What are the main kinds of primary brain tumor?", "Gliomas and meningiomas.", ["tumor-2"]),
    ("Which brain tumors are most common in adults?", "Metastases are the most common brain tumors in adults.",
     ["tumor-2"]),
    ("What is a pulmonary nodule?", "A pulmonary nodule is a rounded opacity up to 3 cm in diameter surrounded by "
     "lung; larger ones are called masses.", ["nodule-1"]),
    ("How big can a lung nodule be before it is called a mass?", "Up to 3 cm; larger opacities are called masses.",
     ["nodule-1"]),
    ("When is a lung nodule concerning for malignancy?", "Growth, spiculation and a size above 8 mm raise concern "
     "for malignancy.", ["nodule-2"]),
    ("How are solitary pulmonary nodules followed up?", "They are followed with CT.", ["nodule-2"]),
    ("Which features of a nodule suggest cancer?", "Growth, spiculation and a size above 8 mm.", ["nodule-2"]),
    ("How does a simple liver cyst appear on CT?", "It is a well-defined, round, water-density lesion of 0-20 HU "
     "that does not enhance.", ["cyst-1"]),
    ("What density does a simple hepatic cyst have?", "Water density, 0-20 HU, with no enhancement.", ["cyst-1"]),
    ("Are liver cysts usually benign?", "Yes; they are usually benign and found incidentally.", ["cyst-2"]),
    ("Which features of a liver cyst call for more imaging?", "Complex features such as septa or nodularity.",
     ["cyst-2"]),
    ("What do tumor cells look like on H&E staining?", "They have enlarged, hyperchromatic nuclei, a high "
     "nuclear-to-cytoplasmic ratio and crowding.", ["tumor cells-1"]),
    ("How do malignant nuclei appear in histology?", "Enlarged and hyperchromatic, with a high "
     "nuclear-to-cytoplasmic ratio.", ["tumor cells-1"]),
    ("What colour does hematoxylin stain nuclei?", "Hematoxylin stains nuclei blue-purple.", ["tumor cells-2"]),
    ("What does eosin stain?", "Eosin stains cytoplasm and stroma pink.", ["tumor cells-2"]),
    ("What is CT windowing?", "Windowing maps CT numbers to grey levels.", ["general-1"]),
    ("How does a lung window differ from a brain window?", "A lung window is wide and low; a brain window is "
     "narrow.", ["general-1"]),
    ("How does fluid appear on T1-weighted MRI?", "Fluid is dark on T1-weighted images.", ["general-2"]),
    ("What is bright on T2-weighted MRI?", "Fluid is bright on T2-weighted images.", ["general-2"]),
    ("Why does bone look white on an X-ray?", "Bone is dense and absorbs more X-rays, so it looks white.",
     ["general-3"]),
    ("What colour is air on a radiograph?", "Air looks black.", ["general-3"]),
    ("What is the Hounsfield unit value of water?", "Water measures 0 HU.", ["general-4"]),
    ("How many Hounsfield units does fat measure?", "About -100 HU.", ["general-4"]),
]
"""Knowledge questions for retrieval; every fourth one is held out for evaluation."""


@dataclass
class SynthImage:
    name: str
    modality: str
    lesion: str
    mask: np.ndarray
    report: str


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0


def _lesion(rng: np.random.Generator, size: int, region: np.ndarray, scale: float) -> np.ndarray:
    """A random ellipse or rectangle inside ``region`` (never empty)."""
    ys, xs = np.nonzero(region)
    for _ in range(50):
        k = rng.integers(ys.size)
        cy, cx = float(ys[k]), float(xs[k])
        ry, rx = (rng.uniform(0.05, 0.12) * size * scale for _ in range(2))
        if rng.random() < 0.7:
            m = _ellipse(size, size, cy, cx, ry, rx)
        else:
            m = np.zeros((size, size), bool)
            m[int(max(cy - ry, 0)):int(cy + ry) + 1, int(max(cx - rx, 0)):int(cx + rx) + 1] = True
        m &= region
        if m.sum() >= 4:
            return m
    raise RuntimeError("could not place a lesion")  # pragma: no cover - regions are large


def draw(rng: np.random.Generator, modality: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 H×W or H×W×3, lesion mask bool)."""
    s = size
    c = s / 2
    noise = rng.normal(0, 6, (s, s))
    if modality == "brain MRI":
        img = np.full((s, s), 10.0)
        head = _ellipse(s, s, c, c, 0.45 * s, 0.38 * s)
        brain = _ellipse(s, s, c, c, 0.40 * s, 0.33 * s)
        img[head] = 200
        img[brain] = 120
        img[_ellipse(s, s, c, c - 0.06 * s, 0.1 * s, 0.03 * s) | _ellipse(s, s, c, c + 0.06 * s, 0.1 * s, 0.03 * s)] = 40
        mask = _lesion(rng, s, brain & (img == 120), 1.0)
        img[mask] = 235
    elif modality == "chest X-ray":
        img = np.full((s, s), 150.0)
        lungs = _ellipse(s, s, c, 0.3 * s, 0.33 * s, 0.15 * s) | _ellipse(s, s, c, 0.7 * s, 0.33 * s, 0.15 * s)
        img[lungs] = 50
        img[:, int(0.47 * s):int(0.53 * s) + 1] = 220
        mask = _lesion(rng, s, lungs, 0.6)
        img[mask] = 190
    elif modality == "abdomen CT":
        img = np.zeros((s, s))
        body = _ellipse(s, s, c, c, 0.38 * s, 0.46 * s)
        liver = _ellipse(s, s, 0.45 * s, 0.32 * s, 0.2 * s, 0.17 * s) & body
        img[body] = 110
        img[liver] = 150
        img[_ellipse(s, s, 0.62 * s, c, 0.05 * s, 0.05 * s)] = 230  # vertebra
        mask = _lesion(rng, s, liver, 0.8)
        img[mask] = 60
    else:  # H&E
        rgb = np.empty((s, s, 3))
        rgb[...] = (235, 170, 200)
        for _ in range(s // 2):
            y, x = rng.integers(0, s, 2)
            rgb[_ellipse(s, s, y, x, 1.2, 1.2)] = (120, 60, 160)
        mask = _lesion(rng, s, np.ones((s, s), bool), 1.6)
        rgb[mask] = (80, 30, 130)
        rgb += noise[..., None]
        return np.clip(rgb, 0, 255).astype(np.uint8), mask
    return np.clip(img + noise, 0, 255).astype(np.uint8), mask


def _report(modality: str, lesion: str, mask: np.ndarray) -> str:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    vert = "upper" if ys.mean() < h / 2 else "lower"
    side = "left" if xs.mean() < w / 2 else "right"
    frac = mask.mean()
    size = "small" if frac < 0.02 else "moderate" if frac < 0.06 else "large"
    body = {"brain MRI": "Brain MRI", "chest X-ray": "Chest X-ray", "abdomen CT": "Abdominal CT",
            "hematoxylin and eosin histopathology": "H&E stained section"}[modality]
    return (f"{body}. A {size} {lesion} is seen in the {vert} {side} part of the image. "
            f"No other abnormality is identified.")


def make_images(out: Path, n: int, seed: int, size: int) -> list[SynthImage]:
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        modality = MODALITIES[i % len(MODALITIES)]
        lesion = LESIONS[modality]
        img, mask = draw(rng, modality, size)
        name = f"img_{i:04d}.png"
        Image.fromarray(img).save(out / "images" / name)
        Image.fromarray((mask * LABEL_VALUES[lesion]).astype(np.uint8)).save(out / "masks" / name)
        items.append(SynthImage(name, modality, lesion, mask, _report(modality, lesion, mask)))
    return items


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_annotations(out: Path, items: list[SynthImage], tag: str) -> dict[str, Path]:
    """The standard annotation files for ``items`` (tag: train/eval)."""
    ann = out / "annotations" / tag
    ann.mkdir(parents=True, exist_ok=True)
    cats = [{"id": v, "name": k} for k, v in LABEL_VALUES.items()]
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": cats}
    for k, it in enumerate(items, 1):
        h, w = it.mask.shape
        ys, xs = np.nonzero(it.mask)
        coco["images"].append({"id": k, "file_name": it.name, "width": w, "height": h})
        coco["annotations"].append({"id": k, "image_id": k, "category_id": LABEL_VALUES[it.lesion],
                                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                             int(ys.max() - ys.min() + 1)], "area": int(ys.size), "iscrowd": 0})
    paths = {"coco": _write_json(ann / "coco.json", coco)}
    mask_dir = ann / "masks"
    mask_dir.mkdir(exist_ok=True)
    for it in items:
        (mask_dir / it.name).write_bytes((out / "masks" / it.name).read_bytes())
    paths["masks"] = mask_dir
    with open(ann / "labels.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "label"])
        wr.writerows([it.name, it.modality] for it in items)
    paths["labels"] = ann / "labels.csv"
    paths["reports"] = _write_json(ann / "reports.json", [{"image": it.name, "report": it.report} for it in items])
    vqa = []
    for k, it in enumerate(items):
        side = "left" if np.nonzero(it.mask)[1].mean() < it.mask.shape[1] / 2 else "right"
        colour = "Yes." if it.modality.startswith("hematoxylin") else "No, it is greyscale."
        asked = [("What kind of abnormality is visible?", f"A {it.lesion}."),
                 ("Is this a colour image?", colour),
                 ("Is there an abnormality in this image?", f"Yes, a {it.lesion}."),
                 ("On which side of the image is the lesion?", f"On the {side} side.")]
        vqa += [{"image": it.name, "question": q, "answer": a} for q, a in (asked[k % 2], asked[2 + k % 2])]
    paths["vqa"] = _write_json(ann / "vqa.json", vqa)
    paths["captions"] = _write_json(ann / "captions.json", [{"image": it.name, "caption": it.report} for it in items])
    return paths


def variants_of(examples: list[builders.Example], variants: int, seed: int,
                box_variants: int | None = None) -> list[builders.Example]:
    """Each tool-use example ``variants`` times (each copy gets its own phrasing when rendered) and each
    box-prompted segmentation example ``box_variants`` times (default ``variants``), its copies with a
    box drawn loosely around the lesion (each side widened by 0–0.05): more boxes to copy from the question."""
    rng = np.random.default_rng(seed)
    extra = []
    for ex in examples:
        if ex.task not in builders.TASKS:
            continue
        copies = (box_variants or variants) if ex.task == "segmentation" else variants
        for _ in range(copies - 1):
            if ex.task != "segmentation":
                extra.append(ex)
                continue
            targets = []
            for t in ex.targets:
                x1, y1, x2, y2 = t.box
                dx1, dy1, dx2, dy2 = (float(d) for d in rng.uniform(0.0, 0.05, 4))
                box = [round(max(0.0, x1 - dx1), 2), round(max(0.0, y1 - dy1), 2),
                       round(min(1.0, x2 + dx2), 2), round(min(1.0, y2 + dy2), 2)]
                targets.append(builders.Target(t.label, box, t.area))
            extra.append(replace(ex, targets=targets))
    return examples + extra


def box_drills_of(examples: list[builders.Example], drills: int, seed: int,
                  builder: builders.DialogueBuilder, id_prefix: str = "train-drill-") -> list[Record]:
    """``drills`` planning-only records per box-prompted segmentation example, each asking to segment a
    random box: the question and the planning turn alone, so the copying of boxes from the question into
    the call is practised at about half the cost of a whole dialogue."""
    rng = np.random.default_rng(seed + 1)
    records = []
    for ex in (e for e in examples if e.task == "segmentation" and e.targets):
        for _ in range(drills):
            x1, y1 = (round(float(v), 2) for v in rng.uniform(0.0, 0.8, 2))
            x2, y2 = (round(min(1.0, v + float(rng.uniform(0.05, 0.4))), 2) for v in (x1, y1))
            drill = replace(ex, targets=[builders.Target(ex.targets[0].label, [x1, y1, x2, y2], None)])
            full = builder.build(drill, f"{id_prefix}{len(records) + 1}")
            records.append(full.model_copy(update={"conversations": full.conversations[:2]}))
    return records


def drill_records(out: str | Path, drills: int, seed: int, id_prefix: str = "train-drill-",
                  phrasings: str = "train") -> list[Record]:
    """Fresh box drills (see :func:`box_drills_of`) for the training split of the set written to ``out``:
    a new ``seed`` draws new boxes and phrasings, so a trainer that takes a new set every epoch sees every
    box once and can only lower its loss by copying, not by remembering. ``phrasings="heldout"`` asks
    with the wordings kept out of training (for measuring the copying)."""
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    labels = {v: k for k, v in manifest["label_values"].items()}
    examples = builders.read_mask_pngs(out / manifest["image_folder"], out / "annotations" / "train" / "masks", labels)
    builder = builders.DialogueBuilder(api_names=manifest["api_names"], phrasings=phrasings, seed=seed)
    return box_drills_of(examples, drills, seed, builder, id_prefix)


def synth(out: str | Path, n: int = 40, seed: int = 0, size: int = 64, api_names: str = "canonical",
          variants: int = 1, box_variants: int | None = None, box_drills: int = 0) -> dict[str, Any]:
    """Write the synthetic set to ``out``; returns the manifest (also saved as ``manifest.json``).

    ``variants`` / ``box_variants``: training records per tool-use / box-prompted segmentation example
    (see :func:`variants_of`); ``box_drills``: planning-only box-copying records per box-prompted
    segmentation example (see :func:`box_drills_of`).
    """
    if variants < 1 or (box_variants is not None and box_variants < 1):
        raise DataError("variants and box_variants must be at least 1")
    if box_drills < 0:
        raise DataError("box_drills must not be negative")
    if n < 2:
        raise DataError("n must be at least 2 (one training and one evaluation image)")
    if size < 32:
        raise DataError("size must be at least 32 pixels")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):  # an earlier set's images and masks would stay beside this one's
        raise DataError(f"{out} is not empty: synth writes a whole data set into a folder of its own; give a new --out "
                        "or delete that folder first")
    out.mkdir(parents=True, exist_ok=True)
    items = make_images(out, n, seed, size)
    n_eval = max(1, n // 5)
    splits = {"train": items[:-n_eval], "eval": items[-n_eval:]}
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in CORPUS), encoding="utf-8")
    qa = {"train": [q for i, q in enumerate(QA) if i % 4 != 3], "eval": QA[3::4]}
    labels = {v: k for k, v in LABEL_VALUES.items()}
    manifest: dict[str, Any] = {"seed": seed, "size": size, "images": n, "api_names": api_names,
                                "variants": variants, "box_variants": box_variants or variants,
                                "box_drills": box_drills, "modalities": list(MODALITIES), "label_values": LABEL_VALUES, "files": {}}
    for k, (tag, its) in enumerate(splits.items()):
        paths = write_annotations(out, its, tag)
        passages = dict(CORPUS)
        per_image = [{"image": it.name, "question": f"What is known about the {it.lesion} in this {it.modality}?",
                      "answer": passages[f"{it.lesion}-1"], "passages": [f"{it.lesion}-1"]} for it in its]
        qa_path = _write_json(out / "annotations" / tag / "qa.json",
                              [{"question": q, "answer": a, "passages": p} for q, a, p in qa[tag]] + per_image)
        examples = (
            builders.read_coco(paths["coco"], out / "images")
            + builders.read_mask_pngs(out / "images", paths["masks"], labels)
            + builders.read_classification(table=paths["labels"], labels=list(MODALITIES))
            + builders.read_reports(paths["reports"])
            + builders.read_rag(qa_path, corpus)
            + builders.read_vqa(paths["vqa"])
            + builders.read_vqa(paths["captions"], caption=True)
        )
        base = examples
        if tag == "train" and max(variants, box_variants or 1) > 1:
            examples = variants_of(examples, variants, seed, box_variants)
        b = builders.DialogueBuilder(api_names=api_names, phrasings="train" if tag == "train" else "heldout",
                                     seed=seed * 1000 + k)
        records = b.build_all(examples, id_prefix=f"{tag}-")
        tasks = Counter(e.task for e in examples)
        if tag == "train" and box_drills:
            drills = box_drills_of(base, box_drills, seed, b)
            records += drills
            tasks["box_drill"] = len(drills)
        write_records(records, out / f"{tag}.json")
        manifest["files"][tag] = {"data": f"{tag}.json", "records": len(records), "tasks": dict(sorted(tasks.items()))}
    manifest["image_folder"] = "images"
    _write_json(out / "manifest.json", manifest)
    return manifest

