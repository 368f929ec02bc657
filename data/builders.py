"""Turn standard annotations into MMedAgent-style tool-use dialogues.

Readers (``read_coco``, ``read_mask_pngs``, ``read_nifti_labels``, ``read_classification``,
``read_reports``, ``read_rag``, ``read_vqa``) validate their inputs and produce :class:`Example`
objects; :class:`DialogueBuilder` renders each example as a :class:`mmedagent.protocol.Record`
(question → planning turn with tool call → tool output → final answer, or a direct answer with
``actions: []``) through the protocol module only. Tool outputs come from the ground truth, or
from the real tools (``ToolRunner``: registry + :class:`mmedagent.dispatcher.Dispatcher`).
Every input problem is a :class:`~mmedagent.data.formats.DataError` naming file and record.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
import random
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmedagent.data import templates
from mmedagent.data.formats import (
    CAPTION_QUESTIONS,
    ID_FIELDS,
    IMAGE_COLUMNS,
    DataError,
    export_images,
    is_tabular,
    iter_raw,
    lies_outside,
    open_hf_dataset,
    write_new,
)
from mmedagent.protocol import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN,
    AssistantTurn,
    Message,
    Record,
    ToolCall,
    ToolOutcome,
    assistant_message,
    strip_image_token,
    tool_result_message,
)

log = logging.getLogger(__name__)

TASKS = ("grounding", "segmentation", "grounding_segmentation", "classification", "report_generation", "retrieval")
"""Tool tasks; ``direct`` (no tool) is the seventh kind of dialogue."""

API_NAMES: dict[str, dict[str, str]] = {
    "canonical": {t: t for t in TASKS},
    "mmedagent": {
        "grounding": "grounding dino",
        "segmentation": "MedSAM",
        "grounding_segmentation": "grounding dino + MedSAM",
        "classification": "BiomedClip",
        "report_generation": "ChatCAD-G",
        "retrieval": "ChatCAD-R",
    },
}

_FINAL_THOUGHTS = (
    "Based on the {tool} output, I can answer the question.",
    "The {tool} output answers the question.",
    "I have the {tool} result; now I summarise it for the user.",
)


@dataclass
class Target:
    """One object: label and box (normalised x1, y1, x2, y2, 2 decimals); area in pixels if known."""

    label: str
    box: list[float]
    area: int | None = None


@dataclass
class Example:
    """What one dialogue is about, before phrasing."""

    task: str
    source: str
    image: str | None = None
    targets: list[Target] = field(default_factory=list)
    label: str | None = None
    labels: list[str] | None = None
    report: str | None = None
    question: str | None = None
    answer: str | None = None
    passages: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    top_k: int | None = None  # retrieval: passages asked of the tool when it runs (--run-tools)
    extra: dict[str, Any] = field(default_factory=dict)  # fields the record keeps (a VQA row's answer_type)
    record_id: str | None = None  # the source's own id (a VQA row's qid)


# --------------------------------------------------------------------------- geometry


def norm_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> list[float]:
    """Pixel corners → normalised xyxy rounded to 2 decimals (MMedAgent's box form)."""
    return [round(min(max(float(v), 0.0), 1.0), 2) for v in (x1 / width, y1 / height, x2 / width, y2 / height)]


def box_from_mask(mask: np.ndarray) -> tuple[list[float], int] | None:
    """Normalised box around the non-zero pixels and their count; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    h, w = mask.shape[:2]
    return norm_box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, w, h), int(ys.size)


def fmt_box(box: Sequence[float]) -> str:
    """A box as the tool calls write it (JSON numbers, two decimals at most), so text and calls agree."""
    return "[" + ", ".join(repr(round(float(v), 2)) for v in box) + "]"


# --------------------------------------------------------------------------- small input helpers


def parse_label_names(spec: str | Path | dict | None) -> dict[int, str]:
    """``"1=liver,2=tumor"``, a JSON file ``{"1": "liver"}`` / list ``["background", "liver"]``, or a dict;
    each name non-empty text (it becomes the tool's prompt and the question's words)."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return {_label_value(k, "label names"): _label_name(v, k, "label names") for k, v in spec.items()}
    text = str(spec)
    if Path(text).is_file():
        try:
            data = json.loads(Path(text).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{text}: cannot read label names: {e}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{text}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if isinstance(data, list):
            return {i: _label_name(n, i, text) for i, n in enumerate(data) if i > 0}
        if not isinstance(data, dict):
            raise DataError(f"{text}: label names must be a JSON object {{\"1\": \"liver\"}} or a list of names")
        return {_label_value(k, text): _label_name(v, k, text) for k, v in data.items()}
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, name = part.partition("=")
        if not sep or not key.strip().isdigit() or not name.strip():
            raise DataError(f"label names: expected value=name pairs like 1=liver, got {part!r}")
        out[int(key)] = name.strip()
    return out


def _label_value(key: Any, where: str) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label key {key!r} is not an integer mask value") from None


def _label_name(name: Any, key: Any, where: str) -> str:
    if isinstance(name, str) and name.strip():
        return name.strip()
    raise DataError(f"{where}: the name of label {key} must be non-empty text, found {name!r:.60}")


def read_table(path: str | Path, image_root: str | Path | None = None,
               split: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(1-based record number, row) of a CSV, JSON or JSONL file, or of Hugging Face / parquet data (the
    ``split`` picked, see :func:`~mmedagent.data.formats.open_hf_dataset`), whose stored images are exported
    to ``<image_root>/<name>_images/`` (``image_root``: default the data's folder) and named relative to
    ``image_root``, as table rows name theirs."""
    path = Path(path)
    if is_tabular(path):
        root = Path(image_root) if image_root is not None else path.parent
        export = root / f"{path.name.split('.')[0]}_images"
        ds = open_hf_dataset(path, split)
        classes = _class_label_columns(ds)
        rows = []
        for i, row in enumerate(ds, 1):
            try:
                row = {**row, **{k: f.int2str(row[k]) if row[k] not in (None, -1) else None  # -1: no label
                                 for k, f in classes.items()}}
                rows.append((i, export_images(row, i, export, relative_to=root, split=split)))
            except (DataError, ValueError) as e:
                raise DataError(f"{path}: record {i}: {e}") from None
        return rows
    if split:
        raise DataError(f"{path}: --data-split {split!r} applies to Hugging Face datasets and parquet data only")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() in (".csv", ".tsv"):
        text = _decode_table(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        rows = []
        try:
            for i, row in enumerate(reader, 1):
                if any(str(v).strip() for v in row.get(None) or ()):  # cells beyond the header's: text cut at a comma
                    raise DataError(f"{path}: record {i} (line {reader.line_num}) has "
                                    f"{len(reader.fieldnames or ()) + len(row[None])} cells for the header's "
                                    f"{len(reader.fieldnames or ())}; quote text that holds the delimiter")
                rows.append((i, {k.strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()
                                 if isinstance(k, str) and k.strip()}))
        except csv.Error as e:
            raise DataError(f"{path}: record {len(rows) + 1}: {e}") from None
        return rows
    rows = list(iter_raw(path))
    for i, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i}: expected an object, found {type(row).__name__}")
    return rows


def _class_label_columns(ds: Any) -> dict[str, Any]:
    """The ``ClassLabel`` columns of a Hugging Face dataset: they store class indices, and a table row
    takes their names (``int2str``), as the data set's card shows them."""
    import datasets

    return {k: f for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}


def _decode_table(path: Path) -> str:
    """A CSV's text: UTF-8, a leading byte-order mark (Excel's "CSV UTF-8") dropped; other encodings are a
    DataError naming the record."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        prefix = data[:e.start].decode("utf-8-sig")
        rows = list(csv.reader(io.StringIO(prefix, newline="")))
        record = len(rows) if not prefix or prefix.endswith(("\n", "\r")) else len(rows) - 1
        line = prefix.count("\n") + 1
        at = "the header" if record <= 0 else f"record {record}"
        raise DataError(f"{path}: {at} (line {line}): not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save the table as UTF-8 (\"CSV UTF-8\" in Excel)") from None


def _require(row: dict[str, Any], keys: Sequence[str], where: str) -> list[str]:
    """The cells ``keys`` of ``row`` as text: a number or boolean (a JSON table's ``"answer": 2``,
    ``"label": 0``) is written out; a missing or empty cell, a list or an object is a DataError."""
    out = []
    for k in keys:
        v = row.get(k)
        if isinstance(v, (list, dict)):
            kind = "array" if isinstance(v, list) else "object"
            raise DataError(f"{where}: {k!r} must be text or a number, found a JSON {kind}")
        text = "" if v is None else str(v).strip()
        if not text:
            raise DataError(f"{where}: missing or empty {k!r}")
        out.append(text)
    return out




def _image_of(row: dict[str, Any], where: str, required: bool = True) -> str | None:
    """The image a table row names (see :data:`IMAGE_COLUMNS`); None when it names none and none is required."""
    key = next((k for k in IMAGE_COLUMNS if row.get(k) not in (None, "")), None)
    if key is None and not required:
        return None
    return _require(row, (key or "image",), where)[0]


def _file_format(path: Path) -> str | None:
    """The image format of ``path``'s content (:func:`mmedagent.imaging.detect_format`), None for another file."""
    from mmedagent.imaging import detect_format

    try:
        with open(path, "rb") as f:
            return detect_format(f.read(1024))
    except OSError:
        return None


_NOT_PIL = (None, "dicom", "nifti")
"""Formats Pillow does not open (a NIfTI pair's ``.img`` has no signature): :func:`load_image` reads them."""


def _image_size(root: Path, rel: str, where: str) -> tuple[int, int]:
    """The size of the image as shown (and as the model sees it): boxes are of that."""
    from mmedagent.imaging import ImageLoadError, image_size

    path = root / rel
    if not path.is_file():
        raise DataError(f"{where}: image not found: {rel}")
    try:
        return image_size(path)
    except (ImageLoadError, OSError) as e:
        raise DataError(f"{where}: cannot read image {rel}: {e}") from None


def _exif_turn(path: Path) -> Any:
    """The transpose that turns ``path``'s stored pixels upright (its EXIF orientation); None when they are
    upright or the file is no Pillow image (DICOM, NIfTI)."""
    from PIL import Image

    from mmedagent.imaging import EXIF_ORIENTATION, EXIF_TURNS

    if _file_format(path) in _NOT_PIL:
        return None
    try:
        with Image.open(path) as im:
            return EXIF_TURNS.get(im.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, Image.DecompressionBombError):  # unreadable here: reading the image says why
        return None


def _quarter_turns() -> dict[Any, Callable[[float, float, float, float], tuple[float, float]]]:
    """Where a point (x, y) of a ``w`` x ``h`` stored image lies once the image is turned upright, for the
    EXIF turns that swap width and height (as ``Image.transpose`` moves pixels)."""
    from PIL.Image import Transpose

    return {Transpose.TRANSPOSE: lambda x, y, w, h: (y, x), Transpose.ROTATE_270: lambda x, y, w, h: (h - y, x),
            Transpose.TRANSVERSE: lambda x, y, w, h: (h - y, w - x), Transpose.ROTATE_90: lambda x, y, w, h: (y, w - x)}


def _stored_pixels_turn(root: Path, rel: str, width: int, height: int, where: str) -> Any:
    """The turn of a photo whose EXIF orientation swaps width and height when ``width`` x ``height`` is the size
    of its stored pixels, not the size shown (annotations drawn on the stored pixels); else None."""
    turn = _exif_turn(root / rel)
    if turn not in _quarter_turns() or width == height or (width, height) != _image_size(root, rel, where)[::-1]:
        return None
    return turn


def _is_image_file(path: Path) -> bool:
    """A visible file whose content is an image format :func:`mmedagent.imaging.load_image` reads."""
    return not path.name.startswith(".") and path.is_file() and _file_format(path) is not None


# --------------------------------------------------------------------------- readers


def read_coco(annotations: str | Path, image_root: str | Path) -> list[Example]:
    """COCO detection json → one grounding example per image and category."""
    path, root = Path(annotations), Path(image_root)
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read COCO json: {e}") from None
    if not isinstance(coco, dict):
        raise DataError(f"{path}: not a COCO detection file (a JSON object with images, annotations and "
                        f"categories), found a JSON {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{path}: not a COCO detection file (missing list {key!r})")
    cats = {}
    for i, c in enumerate(coco["categories"], 1):
        if not isinstance(c, dict) or not isinstance(c.get("id"), (int, str)) or not isinstance(c.get("name"), str) or not c["name"].strip():
            raise DataError(f"{path}: categories[{i}]: needs id and name")
        cats[c["id"]] = c["name"]
    images = {}
    quarter = _quarter_turns()
    for i, im in enumerate(coco["images"], 1):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), (int, str)) or not isinstance(im.get("file_name"), str):
            raise DataError(f"{where}: needs id and file_name")
        if lies_outside(root, im["file_name"]):
            log.warning("%s: image %s lies outside the image root %s", where, im["file_name"], root)
        w, h = (im.get("width"), im.get("height"))
        turn = None
        if not (w and h):
            w, h = _image_size(root, im["file_name"], where)
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < math.inf for v in (w, h)):
            raise DataError(f"{where}: width and height must be positive numbers")
        elif not (root / im["file_name"]).is_file():
            raise DataError(f"{where}: image not found: {im['file_name']}")
        else:
            turn = _stored_pixels_turn(root, im["file_name"], int(w), int(h), where)
        images[im["id"]] = (im["file_name"], int(w), int(h), turn)
    groups: dict[tuple[Any, str], list[Target]] = defaultdict(list)
    within_unit = True  # every box inside [0, 1]: written normalised, not in pixels as COCO has them
    crowds = 0
    turned: set[str] = set()
    for i, ann in enumerate(coco["annotations"], 1):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: expected an object, found {type(ann).__name__}")
        if ann.get("iscrowd"):  # a region of many objects (RLE mask): not one object's box, as detectors treat it
            crowds += 1
            continue
        if not isinstance(ann.get("image_id"), (int, str)) or ann["image_id"] not in images:
            raise DataError(f"{where}: unknown image_id {ann.get('image_id')!r}")
        if not isinstance(ann.get("category_id"), (int, str)) or ann["category_id"] not in cats:
            raise DataError(f"{where}: unknown category_id {ann.get('category_id')!r}")
        name, w, h, turn = images[ann["image_id"]]
        try:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: bbox must be [x, y, width, height]") from None
        if not all(map(math.isfinite, (x, y, bw, bh))) or bw <= 0 or bh <= 0 or x < -1 or y < -1 \
                or x + bw > w + 1 or y + bh > h + 1:
            raise DataError(f"{where}: box {[x, y, bw, bh]} is empty or outside the {w}x{h} image {name}")
        within_unit &= x + bw <= 1 and y + bh <= 1 and max(w, h) > 2
        area = ann.get("area")
        if area is not None and not (isinstance(area, (int, float)) and math.isfinite(area)):
            raise DataError(f"{where}: area must be a number")
        x1, y1, x2, y2 = x, y, x + bw, y + bh
        if turn is not None:  # drawn on a photo's stored pixels (the size given is theirs): turned as the photo is
            (x1, y1), (x2, y2) = (quarter[turn](px, py, w, h) for px, py in ((x1, y1), (x2, y2)))
            x1, y1, x2, y2 = min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)
            turned.add(name)
        size = (h, w) if turn is not None else (w, h)
        groups[(ann["image_id"], cats[ann["category_id"]])].append(
            Target(cats[ann["category_id"]], norm_box(x1, y1, x2, y2, *size), int(area) if area else None))
    if crowds:
        log.warning("%s: %d crowd annotation(s) (iscrowd 1: a region of many objects) skipped; a grounding box "
                    "stands for one object", path, crowds)
    if turned:
        log.warning("%s: %d image(s) with an EXIF orientation whose width and height are those of the stored pixels: "
                    "their boxes were turned with the image, to where the model sees them upright", path, len(turned))
    if groups and within_unit:
        raise DataError(f"{path}: every bbox lies within [0, 1]: they look normalised, but COCO bboxes are "
                        "[x, y, width, height] in pixels; write them in pixels")
    return [Example("grounding", f"{path}: image {images[iid][0]}", image=images[iid][0], targets=targets)
            for (iid, _), targets in groups.items()]


def _mask_examples(mask: np.ndarray, names: dict[int, str], image: str, where: str, tasks: Sequence[str]) -> list[Example]:
    out = []
    for value in sorted(int(v) for v in np.unique(mask) if v != 0):
        if value not in names:
            raise DataError(f"{where}: mask value {value} has no label name (known: {names or 'none'})")
        found = box_from_mask(mask == value)
        assert found is not None
        box, area = found
        for task in tasks:
            out.append(Example(task, where, image=image, targets=[Target(names[value], box, area)]))
    return out


def read_mask_pngs(images: str | Path, masks: str | Path, label_names: dict[int, str],
                   tasks: Sequence[str] = ("segmentation", "grounding_segmentation")) -> list[Example]:
    """PNG label masks (pixel value = label, same stem as the image) → segmentation examples."""
    from PIL import Image

    img_dir, mask_dir = Path(images), Path(masks)
    if not label_names:
        raise DataError("label names are required for masks (e.g. --labels 1=liver,2=tumor)")
    # image files only: a sidecar c1.json must not stand for the image c1.png
    by_stem = {p.stem: p for p in sorted(img_dir.iterdir()) if _is_image_file(p)} if img_dir.is_dir() else {}
    if not by_stem:
        raise DataError(f"{img_dir}: no images")
    out = []
    mask_files = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file()  # C1.PNG too
                        and not p.name.startswith(".")) if mask_dir.is_dir() else []
    if not mask_files:
        raise DataError(f"{mask_dir}: no PNG masks")
    for i, mp in enumerate(mask_files, 1):
        where = f"{mp}: record {i}"
        stem = mp.stem.removesuffix("_mask")
        if stem not in by_stem:
            raise DataError(f"{where}: no image named {stem}.* in {img_dir}")
        try:
            with Image.open(mp) as im:
                mask = np.asarray(im)
        except OSError as e:
            raise DataError(f"{where}: cannot read the mask: {e}") from None
        if mask.ndim == 3:
            colours = mask[..., :3] if mask.shape[-1] >= 3 else mask[..., :1]  # RGB(A); LA: the grey
            if (colours != colours[..., :1]).any():  # one label value a pixel, or labels would be lost
                raise DataError(f"{where}: a colour mask (its channels differ); save the label values in a "
                                "single-channel (greyscale or palette) PNG")
            mask = mask[..., 0]
        size = _image_size(img_dir, by_stem[stem].name, where)
        if (mask.shape[0], mask.shape[1]) == size != size[::-1]:  # drawn on a photo's stored pixels, not upright
            mask = _turned_like(mask, img_dir / by_stem[stem].name)
        if (mask.shape[1], mask.shape[0]) != size:
            raise DataError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}; "
                            "save the mask at the image's size (nearest-neighbour resampling keeps its label values)")
        out += _mask_examples(mask, label_names, by_stem[stem].name, where, tasks)
    return out


def _turned_like(mask: np.ndarray, image: Path) -> np.ndarray:
    """``mask`` turned as ``image``'s EXIF orientation turns its stored pixels upright (as the model sees it)."""
    from PIL import Image

    turn = _exif_turn(image)
    return mask if turn is None else np.asarray(Image.fromarray(mask).transpose(turn))


def _save_slice(image: Any, path: Path) -> None:
    """Write a slice PNG; an existing file with other pixels (a slice of another volume of the same file name,
    ``case_00001/imaging.nii.gz`` after ``case_00000/imaging.nii.gz``) is an error, not overwritten."""
    data = io.BytesIO()
    image.save(data, format="PNG")
    write_new(path, data.getvalue(), "a slice of another volume with the same file name? Give each volume its "
              "own --image-out, or remove the old slices")


VOLUME_FORMATS = ("nifti", "analyze")
"""The volume formats a label-volume data set is read from (SPM's Analyze 7.5 pairs read as NIfTI)."""


def _nifti_in_memory(path: Path) -> bytes | Path:
    """A NIfTI file as :func:`mmedagent.imaging.load_image` reads it slice after slice without going back to
    the file: a single file (``.nii``, ``.nii.gz``) as its bytes, read and inflated once (each slice read of a
    ``.nii.gz`` by path would inflate it again); a ``.hdr``/``.img`` pair (read only by path) as the path."""
    from mmedagent.imaging import MAX_PIXELS

    if not path.is_file() or path.name.lower().endswith((".hdr", ".img", ".hdr.gz", ".img.gz")):
        return path  # load_image names the problem, or reads the pair
    limit = MAX_PIXELS * 8 + (1 << 20)  # as load_image bounds an inflated NIfTI
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as z:
                data = z.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read NIfTI file: {e}") from None
    if len(data) > limit:
        raise DataError(f"{path}: inflates to more than {limit:,} bytes (possible decompression bomb)")
    return data


def read_nifti_labels(volume: str | Path, labels: str | Path, label_names: dict[int, str], image_out: str | Path,
                      window: Any = None, plane: str = "axial", step: int = 1,
                      tasks: Sequence[str] = ("segmentation", "grounding_segmentation")) -> list[Example]:
    """A NIfTI image + label volume → slice PNGs in ``image_out`` and segmentation examples per slice."""
    from mmedagent.imaging import ImageLoadError, load_image

    if not label_names:
        raise DataError("label names are required for a label volume (e.g. --labels 1=liver,2=tumor)")
    if step < 1:
        raise DataError(f"--step {step}: give 1 (every slice) or more")
    out_dir = Path(image_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_src, label_src = _nifti_in_memory(Path(volume)), _nifti_in_memory(Path(labels))
    try:
        first = load_image(image_src, window=window, plane=plane)
        lab0 = load_image(label_src, plane=plane)
    except ImageLoadError as e:
        raise DataError(f"{volume}: {e}") from None
    if first.metadata.get("format") not in VOLUME_FORMATS or lab0.metadata.get("format") not in VOLUME_FORMATS:
        raise DataError(f"{volume}: image and labels must both be NIfTI (or Analyze .hdr/.img) volumes")
    if first.metadata["shape"][:3] != lab0.metadata["shape"][:3]:
        raise DataError(f"{labels}: label volume shape {lab0.metadata['shape']} differs from image {first.metadata['shape']}")
    stem = Path(volume).name.split(".")[0]
    out = []
    for k in range(0, first.metadata["n_slices"], step):
        lab = load_image(label_src, slice_index=k, plane=plane).array
        mask = np.rint(lab).astype(np.int64)
        if not mask.any():
            continue
        name = f"{stem}_{plane}{k:04d}.png"
        _save_slice(load_image(image_src, window=window, slice_index=k, plane=plane).image, out_dir / name)
        out += _mask_examples(mask, label_names, name, f"{labels}: slice {k}", tasks)
    return out


def _class_images(folder: Path) -> list[Path]:
    """The images of one class folder, its subfolders included (``tumor/case01/slice3.png``, as
    torchvision's ``ImageFolder`` takes them); hidden files and folders and non-images are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if _is_image_file(Path(dirpath) / f)]
    return found


def _class_name(label: str, known: Sequence[str] | None, where: str) -> str:
    """``label`` as one of the ``known`` labels (``--labels``): itself, or — when no known label is a number —
    a class index counted from 0 in their order (as torchvision's ``ImageFolder`` and ``ClassLabel`` number
    classes); any other label is a DataError."""
    if not known or label in known:
        return label
    if label.isdigit() and not any(k.isdigit() for k in known):
        if int(label) < len(known):
            return known[int(label)]
        raise DataError(f"{where}: class index {label} is out of range for the {len(known)} labels given "
                        f"({', '.join(known)}); indices count from 0")
    raise DataError(f"{where}: unknown label {label!r}; known labels: {', '.join(known)}")


def read_classification(folder: str | Path | None = None, table: str | Path | None = None,
                        labels: Sequence[str] | None = None, **table_options: Any) -> list[Example]:
    """Folder-per-class (``root/<class>/<image>``) or a table with ``image`` and ``label`` (``table_options``:
    see :func:`read_table`)."""
    known = list(labels) if labels else None
    out = []
    if folder is not None:
        root = Path(folder)
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
        if not classes:
            raise DataError(f"{root}: no class folders")
        for cdir in classes:
            label = _class_name(cdir.name.replace("_", " "), known, str(cdir))
            images = _class_images(cdir)
            if not images:
                raise DataError(f"{cdir}: class folder {label!r} holds no images")
            for i, img in enumerate(images, 1):
                out.append(Example("classification", f"{cdir}: record {i}", image=img.relative_to(root).as_posix(),
                                   label=label))
        cands = known or sorted({e.label for e in out if e.label})
    elif table is not None:
        for i, row in read_table(table, **table_options):
            where = f"{table}: record {i}"
            image, (label,) = _image_of(row, where), _require(row, ("label",), where)
            out.append(Example("classification", where, image=image, label=_class_name(label, known, where)))
        cands = known or sorted({e.label for e in out if e.label})
    else:
        raise DataError("classification needs a class folder or a label table")
    if not known and cands and all(c.isdigit() for c in cands):
        log.warning("%s: every label is a number (%s): class indices? The classification tool matches label text "
                    "to the image and the model would answer with the number; give the class names in index order "
                    "with --labels NAME0,NAME1,...", folder or table, ", ".join(cands[:5]) + (", ..." if len(cands) > 5 else ""))
    for e in out:
        e.labels = cands
    return out


REPORT_SECTIONS = ("findings", "impression")
"""Report sections a table may give in columns of their own (MIMIC-CXR's ``findings`` and ``impression``)."""


def _report_of(row: dict[str, Any], where: str) -> str:
    """A row's report: its ``report`` (or ``text``) cell; else its sections — one section column: its text,
    both: the filled ones under ``FINDINGS:`` / ``IMPRESSION:`` headings (the headings the report tool's
    ``parse_sections`` splits a full report at), so a row without findings keeps its impression."""
    key = next((k for k in ("report", "text") if k in row), None)
    sections = [k for k in REPORT_SECTIONS if k in row]
    if key is not None or not sections:
        return _require(row, (key or "report",), where)[0]
    if len(sections) == 1:
        return _require(row, sections, where)[0]
    filled = [k for k in sections if row[k] is not None and str(row[k]).strip()]
    if not filled:
        raise DataError(f"{where}: empty 'findings' and 'impression': no report for this image; fill one or "
                        "drop the row")
    return "\n".join(f"{k.upper()}: {_require(row, (k,), where)[0]}" for k in filled)


def read_reports(table: str | Path, **table_options: Any) -> list[Example]:
    """A table with ``image`` and ``report`` (or ``text``, or ``findings`` and/or ``impression``: see
    :func:`_report_of`) → report-generation examples."""
    out = []
    for i, row in read_table(table, **table_options):
        where = f"{table}: record {i}"
        image, report = _image_of(row, where), _report_of(row, where)
        out.append(Example("report_generation", where, image=image, report=report))
    return out


_WORD = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2}


RAG_MAX_K = 50
"""The retrieval tool's limit on ``k`` (``Retrieval.Params.k``): ``--top-k`` must lie in 1..RAG_MAX_K."""

INDEXED_SUFFIXES = (".md", ".markdown", ".pdf")
"""Corpus files read as the retrieval index reads them (chunked), as folders are."""


def read_corpus(path: str | Path) -> list[tuple[str, str]]:
    """(id, text) passages: JSON/JSONL/CSV rows (``id``, ``text``), a text file (one passage a line), or —
    a folder, Markdown or PDF — the passages the retrieval index makes of it
    (:func:`mmedagent.tools._rag_index.load_corpus`: chunked, the id its ``source``, ``#N`` added for the
    N-th chunk of a source with several)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: corpus not found")
    if path.is_dir() or path.suffix.lower() in INDEXED_SUFFIXES:
        passages = _indexed_corpus(path)
    elif path.suffix.lower() == ".txt":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read: {e}") from None
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        passages = [(str(i), t) for i, t in enumerate(lines, 1)]
    else:
        passages = []
        for i, row in read_table(path):
            pid, text = _require(row, ("id", "text"), f"{path}: record {i}") if "id" in row else (str(i), _require(row, ("text",), f"{path}: record {i}")[0])
            passages.append((str(pid), text))
    if not passages:
        raise DataError(f"{path}: corpus is empty")
    seen: set[str] = set()
    for pid, _ in passages:
        if pid in seen:
            raise DataError(f"{path}: passage id {pid!r} appears twice")
        seen.add(pid)
    return passages


def _indexed_corpus(path: Path) -> list[tuple[str, str]]:
    from mmedagent.tools._rag_index import load_corpus

    try:
        corpus = load_corpus(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: cannot read the corpus: {e}") from None
    sources = [str(p.get("source", "")) for p in corpus.passages]
    counts: dict[str, int] = defaultdict(int)
    for src in sources:
        counts[src] += 1
    out = []
    for p, src in zip(corpus.passages, sources):
        pid = src if counts[src] == 1 else f"{src}#{int(p.get('chunk', 0)) + 1}"
        out.append((pid, " ".join(str(p["text"]).split())))
    return out


def build_retrieval_index(passages: Sequence[tuple[str, str]], out: str | Path) -> Path:
    """A retrieval index (:class:`mmedagent.tools._rag_index.HybridIndex`) of exactly these ``(id, text)``
    passages, each id its ``source``: ``--run-tools`` searches the given corpus with the real tool and the
    sources it returns are the ids the ground truth uses."""
    from mmedagent.tools._rag_index import Corpus, HybridIndex

    corpus = Corpus()
    for pid, text in passages:
        corpus.add({"text": text, "source": pid, "title": pid, "chunk": 0})
    try:
        return Path(HybridIndex.build(corpus, out).path)
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot index the corpus for the retrieval tool: {e}") from None


def read_rag(qa: str | Path, corpus: str | Path, top_k: int = 3, **table_options: Any) -> list[Example]:
    """Question/answer pairs + a corpus → retrieval examples; passages named in the QA row
    (``passages``/``sources`` ids) come first, then the others sharing words with the question,
    ranked by word overlap, up to ``top_k`` (1..RAG_MAX_K, the tool's own limit); a passage with no
    word in common is never returned (nor padded in at score 0)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= RAG_MAX_K:
        raise DataError(f"--top-k must be an integer from 1 to {RAG_MAX_K} (the retrieval tool's limit), got {top_k!r}")
    docs = read_corpus(corpus)
    by_id = dict(docs)
    toks = {pid: _tokens(t) for pid, t in docs}
    out = []
    for i, row in read_table(qa, **table_options):
        where = f"{qa}: record {i}"
        question, answer = _require(row, ("question", "answer"), where)
        wanted = row.get("passages") or row.get("sources") or []
        if isinstance(wanted, str):
            wanted = [w.strip() for w in wanted.split(";") if w.strip()]
        if not isinstance(wanted, list):
            raise DataError(f"{where}: passages must be a list of passage ids")
        wanted = list(dict.fromkeys(str(w) for w in wanted))
        for pid in wanted:
            if pid not in by_id:
                raise DataError(f"{where}: passage {pid!r} is not in the corpus")
        q = _tokens(question)
        ranked = sorted((pid for pid in by_id if q & toks[pid]), key=lambda pid: (-len(q & toks[pid]), pid))
        chosen = wanted + [p for p in ranked if p not in wanted]
        chosen = chosen[:top_k]
        scores, last = [], 1.0
        for pid in chosen:  # word-overlap similarity, kept non-increasing down the ranking
            last = min(last, 1.0 if pid in wanted else round(len(q & toks[pid]) / max(len(q), 1), 2))
            scores.append(last)
        out.append(Example("retrieval", where, image=_image_of(row, where, required=False), question=question,
                           answer=answer, passages=[by_id[p] for p in chosen], sources=chosen, scores=scores,
                           top_k=top_k))
    return out


def read_vqa(table: str | Path, caption: bool = False, **table_options: Any) -> list[Example]:
    """Plain VQA (``question``, ``answer``, optional ``image``) or captions (``image``, ``caption``) →
    direct-answer examples."""
    out = []
    for i, row in read_table(table, **table_options):
        where = f"{table}: record {i}"
        if caption:
            image, (cap,) = _image_of(row, where), _require(row, ("caption",), where)
            out.append(Example("direct", where, image=image, question=None, answer=cap))
        else:
            question, answer = _require(row, ("question", "answer"), where)
            qid = next((row[k] for k in ID_FIELDS if row.get(k) not in (None, "")), None)
            kept = {k: row[k] for k in ("answer_type",) if row.get(k) not in (None, "")}  # evaluation splits by it
            out.append(Example("direct", where, image=_image_of(row, where, required=False), question=question,
                               answer=answer, extra=kept, record_id=None if qid is None else str(qid)))
    return out


# --------------------------------------------------------------------------- tools


class ToolRunner:
    """Runs the real tools for ``--run-tools``: registry classes, one Dispatcher, images via load_image."""

    def __init__(self, image_root: str | Path, timeout_s: float = 300.0, **tool_options: Any):
        from mmedagent.dispatcher import Dispatcher
        from mmedagent.serve.launcher import in_process_tools
        from mmedagent.tools.registry import list_tools

        self.image_root = Path(image_root)
        self.dispatcher = Dispatcher(in_process_tools(list_tools(), tool_options, "default"), timeout_s=timeout_s)

    def __call__(self, call: ToolCall, image: str | None, where: str) -> ToolOutcome:
        from mmedagent.imaging import ImageLoadError, load_image

        pil = None
        if image is not None:
            try:
                pil = load_image(self.image_root / image).image
            except ImageLoadError as e:
                raise DataError(f"{where}: cannot load image {image}: {e}") from None
        outcome = self.dispatcher.dispatch(call, pil)
        if not outcome.ok:
            raise DataError(f"{where}: tool {call.API_name} failed: {outcome.error}")
        return outcome


class OpenAIRewriter:
    """Paraphrases questions through any OpenAI-compatible ``/chat/completions`` endpoint.

    Optional: on any failure the template phrasing is kept (and a warning without content logged).
    The key comes from the ``api_key_env`` variable and is never logged.
    """

    PROMPT = ("Rewrite this question from a user of a medical imaging assistant with different wording and the same "
              "meaning. Keep every medical term, number and bracketed box unchanged. Reply with the question only.")

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 30.0):
        import os

        import httpx

        key = os.environ.get(api_key_env, "")
        self.model = model
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                   headers={"Authorization": f"Bearer {key}"} if key else {})

    def __call__(self, question: str) -> str:
        try:
            r = self.client.post("/chat/completions", json={
                "model": self.model, "temperature": 0.7,
                "messages": [{"role": "system", "content": self.PROMPT}, {"role": "user", "content": question}]})
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"].strip()
        except Exception as e:  # optional step: never fatal
            log.warning("question rewriting failed (%s); keeping the template phrasing", type(e).__name__)
            return question
        return text if text and len(text) < 4 * len(question) + 200 else question


# --------------------------------------------------------------------------- dialogues


class DialogueBuilder:
    """Renders examples as tool-use records.

    ``api_names``: ``canonical`` or ``mmedagent`` tool names; ``phrasings``: ``train``, ``heldout``
    or ``all`` question templates; ``runner``: a :class:`ToolRunner` (else ground-truth outputs);
    ``rewriter``: a callable paraphrasing the first question.
    """

    def __init__(self, api_names: str = "canonical", phrasings: templates.Phrasings = "train", seed: int = 0,
                 runner: Callable[[ToolCall, str | None, str], ToolOutcome] | None = None,
                 rewriter: Callable[[str], str] | None = None):
        if api_names not in API_NAMES:
            raise ValueError(f"api_names must be one of {', '.join(API_NAMES)}, not {api_names!r}")
        self.names = API_NAMES[api_names]
        self.phrasings = phrasings
        templates.bank("grounding", phrasings)  # validates the choice
        self.rng = random.Random(seed)
        self.runner = runner
        self.rewriter = rewriter

    def build_all(self, examples: Iterable[Example], id_prefix: str = "") -> list[Record]:
        return [self.build(e, f"{id_prefix}{e.record_id or f'{e.task}-{i}'}") for i, e in enumerate(examples, 1)]

    def build(self, ex: Example, record_id: str) -> Record:
        if ex.question:  # only the builder places the image: a table's "<image>\nIs there ...?" would mark it twice
            ex = replace(ex, question=strip_image_token(ex.question))
            if not ex.question:
                raise DataError(f"{ex.source}: the question is empty without its {IMAGE_TOKEN} marker")
        if ex.task == "direct":
            return self._direct(ex, record_id)
        if ex.task not in TASKS:
            raise DataError(f"{ex.source}: unknown task {ex.task!r}")
        rng = self.rng
        tool = self.names[ex.task]
        target = ", ".join(dict.fromkeys(t.label for t in ex.targets)) if ex.targets else ""
        box = fmt_box(ex.targets[0].box) if ex.targets else ""
        question = templates.pick(rng, templates.bank(ex.task, self.phrasings), target=target, box=box,
                                  question=ex.question or "")
        if self.rewriter is not None and ex.task not in ("retrieval",):
            question = self.rewriter(question)
        params, output = self._call(ex)
        call = ToolCall(API_name=tool, API_params=params)
        plan = AssistantTurn(thoughts=templates.pick(rng, templates.THOUGHTS[ex.task], target=target),
                             actions=[call], value=templates.pick(rng, templates.WAIT, tool=tool))
        if self.runner is not None:
            run = call
            if ex.task == "retrieval" and ex.top_k:  # as many passages as --top-k gives without the tool
                run = ToolCall(API_name=tool, API_params={**params, "k": ex.top_k})
            outcome = self.runner(run, ex.image, ex.source)
        else:
            outcome = ToolOutcome(tool=tool, output=output)
        answer = self._answer(ex, target, outcome.output or {})
        final = AssistantTurn(thoughts=templates.pick(rng, _FINAL_THOUGHTS, tool=tool), actions=[], value=answer)
        first = Message(role="human", value=(f"{IMAGE_TOKEN}\n" if ex.image else "") + question)
        convo = [first, assistant_message(plan), tool_result_message([outcome], question), assistant_message(final)]
        return Record(id=record_id, image=ex.image, conversations=convo)

    def _direct(self, ex: Example, record_id: str) -> Record:
        if ex.question is None:  # a caption
            question = self.rng.choice(CAPTION_QUESTIONS)
        else:
            question = templates.pick(self.rng, templates.bank("direct", self.phrasings), question=ex.question)
        if self.rewriter is not None:
            question = self.rewriter(question)
        turn = AssistantTurn(thoughts=self.rng.choice(templates.THOUGHTS["direct"]), actions=[], value=ex.answer or "")
        first = Message(role="human", value=(f"{IMAGE_TOKEN}\n" if ex.image else "") + question)
        return Record(id=record_id, image=ex.image, conversations=[first, assistant_message(turn)], **ex.extra)

    def _call(self, ex: Example) -> tuple[dict[str, Any], dict[str, Any]]:
        """Tool params and the ground-truth output the tool would return, as the model sees it: built as the
        tool's own ``Result`` and shown through its ``for_model()``, so training reads what serving feeds back."""
        from mmedagent.tools.classification import ClassificationResult
        from mmedagent.tools.grounding import GroundingResult
        from mmedagent.tools.grounding_segmentation import GroundingSegmentationResult
        from mmedagent.tools.rag import Passage, Retrieval
        from mmedagent.tools.report import ReportGeneration
        from mmedagent.tools.segmentation import SegmentationResult

        rng = self.rng
        img = {"image": IMAGE_PLACEHOLDER}
        prompts = list(dict.fromkeys(t.label for t in ex.targets))
        boxes, areas = [t.box for t in ex.targets], [t.area or 0 for t in ex.targets]
        phrases = [t.label for t in ex.targets]
        if ex.task == "grounding":
            scores = [rng.uniform(0.8, 0.99) for _ in ex.targets]
            return {**img, "prompts": prompts}, GroundingResult(boxes=boxes, logits=scores, phrases=phrases).for_model()
        if ex.task == "segmentation":
            return {**img, "boxes": boxes}, SegmentationResult(boxes=boxes, areas=areas, masks=[]).for_model()
        if ex.task == "grounding_segmentation":
            scores = [rng.uniform(0.8, 0.99) for _ in ex.targets]
            return {**img, "prompts": prompts}, GroundingSegmentationResult(
                boxes=boxes, logits=scores, phrases=phrases, areas=areas, masks=[]).for_model()
        if ex.task == "classification":
            others = [c for c in (ex.labels or []) if c != ex.label]
            rng.shuffle(others)
            ranked = [ex.label, *others[:2]]
            raw = sorted((rng.uniform(0.0, 1.0) for _ in ranked[1:]), reverse=True)
            top = rng.uniform(0.6, 0.95)
            rest = [(1 - top) * r / (sum(raw) or 1) for r in raw]
            params = {**img, "labels": list(ex.labels)} if ex.labels and len(ex.labels) >= 2 else img
            return params, ClassificationResult(labels=ranked, probabilities=[top, *rest]).for_model()
        if ex.task == "report_generation":
            return dict(img), ReportGeneration.Result(report=ex.report or "").for_model()
        if ex.task == "retrieval":  # the passages as the tool feeds them to the model (cut to its limits)
            passages = [Passage(source=src, text=text, score=score)
                        for src, text, score in zip(ex.sources, ex.passages, ex.scores)]
            return {"query": ex.question}, Retrieval.Result(query=ex.question or "", passages=passages,
                                                            index="").for_model()
        raise DataError(f"{ex.source}: unknown task {ex.task!r}")

    def _answer(self, ex: Example, target: str, out: dict[str, Any]) -> str:
        rng = self.rng
        if ex.task in ("grounding", "grounding_segmentation", "segmentation"):
            boxes = out.get("boxes") or []
            if not boxes:
                return templates.pick(rng, templates.ANSWERS["grounding_none"], target=target)
            box = " and ".join(fmt_box(b) for b in boxes)
            area = sum(int(a) for a in out.get("areas") or [0])
            return templates.pick(rng, templates.ANSWERS[ex.task], target=target, box=box, area=area)
        if ex.task == "classification":
            label = (out.get("labels") or [ex.label])[0]
            return templates.pick(rng, templates.ANSWERS["classification"], label=label)
        if ex.task == "report_generation":
            return templates.pick(rng, templates.ANSWERS["report_generation"], report=ex.report)
        return templates.pick(rng, templates.ANSWERS["retrieval"], answer=ex.answer)


# --------------------------------------------------------------------------- splitting


def split_by_image(records: Sequence[Record], ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                   names: Sequence[str] = ("train", "val", "test")) -> dict[str, list[Record]]:
    """Split so that all records of one image land in the same split (text-only records by id): records
    sharing any image (``./a.png`` is ``a.png``), a multi-image record's included, form one group."""
    if len(ratios) != len(names) or any(r < 0 for r in ratios) or not sum(ratios):
        raise ValueError(f"need {len(names)} non-negative ratios, got {list(ratios)}")
    parent: dict[str, str] = {}

    def find(key: str) -> str:  # a group is named by its smallest key
        while parent.setdefault(key, key) != key:
            parent[key] = key = parent[parent[key]]
        return key

    firsts = []
    for r in records:
        keys = [os.path.normpath(i) for i in r.images] or [f"id:{r.id}"]
        for k in keys[1:]:
            a, b = find(keys[0]), find(k)
            parent[max(a, b)] = min(a, b)
        firsts.append(keys[0])
    groups: dict[str, list[Record]] = defaultdict(list)
    for r, k in zip(records, firsts):
        groups[find(k)].append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    total = sum(ratios)
    bounds, acc = [], 0.0
    for r in ratios:
        acc += r / total
        bounds.append(round(acc * len(keys)))
    out: dict[str, list[Record]] = {n: [] for n in names}
    start = 0
    for name, end in zip(names, bounds):
        for k in keys[start:end]:
            out[name] += groups[k]
        start = end
    return out
