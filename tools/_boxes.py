"""Helpers shared by the vision tools: images in, normalised boxes, IoU/NMS, masks as COCO RLE,
device choice and missing-weights errors.

Conventions (MMedAgent's): boxes are ``[x1, y1, x2, y2]`` normalised to [0, 1] by the image width
and height; masks travel as COCO RLE dicts ``{"size": [h, w], "counts": str}`` whose counts are
run lengths over the mask in column-major (Fortran) order, starting with a run of zeros, packed
with the COCO string codec — byte-compatible with ``pycocotools.mask.encode``, which is not needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image
from pydantic import AfterValidator, Field

from mmedagent.hub import is_hub_id

MAX_PROMPTS = 100
"""Most prompts (boxes, points, things to find) one call may give: a longer list (a planner looping) is
refused as a param, not run prompt by prompt."""

COORDS_MARK = "x-mmedagent-coords"
"""JSON-schema key on a normalised coordinate list: ``"xyxy"`` (a box: every number in [0, 1], x1 <= x2,
y1 <= y2) or ``"xy"`` (a point). Constrained decoding (:mod:`mmedagent.model.constrain`) keeps the
numbers a planner writes there valid, which a JSON schema alone cannot say."""


def _ordered(box: list[float]) -> list[float]:
    check_boxes([box])
    return box


Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Box = Annotated[list[Unit], Field(min_length=4, max_length=4, json_schema_extra={COORDS_MARK: "xyxy"}),
                AfterValidator(_ordered)]
"""A tool parameter holding one normalised ``[x1, y1, x2, y2]`` box (``list[Box]`` for several)."""
Point = Annotated[list[Unit], Field(min_length=2, max_length=2, json_schema_extra={COORDS_MARK: "xy"})]
"""A tool parameter holding one normalised ``[x, y]`` point."""


def as_pil_rgb(image: Any) -> Image.Image:
    """The dispatcher's decoded image (PIL image or HxW / HxWxC array) as a PIL RGB image.

    8-bit images keep their values; wider ones (16-bit, 32-bit or float arrays and PIL ``I;16`` /
    ``I`` / ``F`` images) are min-max scaled to 0..255 (PIL's own conversion would clip them to white),
    over their finite values: NaN and -inf show as the minimum, +inf as the maximum. An alpha channel
    is dropped (as PIL's RGBA -> RGB does), so it never enters the scaling.
    """
    if isinstance(image, Image.Image):
        if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
            return image if image.mode == "RGB" else image.convert("RGB")
        image = np.asarray(image)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise ValueError(f"expected an HxW or HxWx3 image, got an array of shape {arr.shape}")
    if arr.ndim == 3:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        arr = arr.round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def weights_error(tool: str, ref: str, how: str, err: Exception) -> RuntimeError:
    """A missing-weights error, on one line, that names the path or hub id and how to get the weights
    (a hub-id-shaped ref inside a local folder, ``weights/gdino`` where ``weights/`` exists, is likely a
    mistyped folder: it says none has that name)."""
    hub = is_hub_id(ref)
    folder = Path(str(ref)).parent
    aside = "no local folder has that name; " if hub and folder != Path(".") and folder.is_dir() else ""
    why = " ".join(str(err).split())  # the hub's messages run over several lines
    return RuntimeError(f"{tool}: could not load weights from {'hub id' if hub else 'local path'} {ref!r} "
                        f"({aside}{type(err).__name__}: {why}). {how}")


def missing_local_folder(ref: str) -> Exception | None:
    """Why ``ref``, when it names a local folder (not a hub id or a ``scheme:`` reference), cannot be one; None
    when it can or is no local path. Checked before loading: the loaders would read a missing path as a
    malformed hub id (or a model name) and say so instead."""
    if is_hub_id(ref) or ":" in ref:
        return None
    path = Path(ref).expanduser()
    if not path.exists():
        return FileNotFoundError("no such folder")
    return None if path.is_dir() else NotADirectoryError("a file, not a model folder")


def pick_device(requested: str | None) -> str:
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def normalize_boxes(boxes: Any, width: int, height: int) -> np.ndarray:
    """Pixel xyxy boxes -> xyxy in [0, 1] (clipped), shape (N, 4)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.clip(b / scale, 0.0, 1.0)


def denormalize_boxes(boxes: Any, width: int, height: int) -> np.ndarray:
    """Normalised xyxy boxes -> pixel xyxy, shape (N, 4)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return b * np.array([width, height, width, height], dtype=np.float64)


def _normalised(values: Any, size: int, noun: str, plural: str, form: str) -> np.ndarray:
    """``values`` as an (N, ``size``) float array of coordinates inside [0, 1]; a ValueError naming them."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != size:
        raise ValueError(f"{plural} must be a list of {form}, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any() or (a > 1).any():
        raise ValueError(f"{noun} coordinates must be normalised to [0, 1] (MMedAgent's convention)")
    return a


def check_boxes(boxes: Any) -> np.ndarray:
    """Validate normalised xyxy boxes: four numbers each, inside [0, 1], x1 <= x2 and y1 <= y2."""
    b = _normalised(boxes, 4, "box", "boxes", "[x1, y1, x2, y2]")
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError("each box must satisfy x1 <= x2 and y1 <= y2")
    return b


def check_points(points: Any) -> np.ndarray:
    """Validate normalised ``[x, y]`` points: two numbers each, inside [0, 1]."""
    return _normalised(points, 2, "point", "points", "[x, y]")


def box_iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, shape (len(a), len(b)); 0 where both boxes are empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: Any, scores: Any, iou_threshold: float) -> list[int]:
    """Indices of the boxes kept by non-maximum suppression, highest score first.

    A box is dropped when its IoU with a higher-scoring kept box is above ``iou_threshold``.
    Runs ``torch.ops.torchvision.nms`` (the real kernel, or mmedagent's plain-torch one where the
    torchvision wheel's extension cannot load).
    """
    import torch
    import torchvision  # noqa: F401  - registers the torchvision::nms operator

    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32).reshape(-1))
    if len(b) != len(s):
        raise ValueError(f"nms: {len(b)} boxes but {len(s)} scores")
    if len(b) == 0:
        return []
    return torch.ops.torchvision.nms(b, s, float(iou_threshold)).tolist()


def mask_to_box(mask: np.ndarray) -> list[float] | None:
    """Normalised xyxy box enclosing the True pixels (pixel edges, so a full mask gives [0, 0, 1, 1])."""
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


# --- COCO RLE -------------------------------------------------------------------------------


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO run lengths of a binary HxW mask (column-major, first run is zeros)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(edges).tolist()
    return [0, *runs] if flat[0] else runs


def counts_to_string(counts: list[int]) -> str:
    """Pack run lengths with the COCO codec (maskApi.c ``rleToString``): delta from the run two
    back for runs after the third, then 5 bits per char with a continuation bit, offset by 48."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift, as in C for the signed deltas
            more = x != -1 if ch & 0x10 else x != 0
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def string_to_counts(s: str) -> list[int]:
    """Inverse of :func:`counts_to_string` (maskApi.c ``rleFrString``)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated COCO RLE string")
            ch = ord(s[p]) - 48
            x |= (ch & 0x1F) << (5 * k)
            more = bool(ch & 0x20)
            p += 1
            k += 1
            if not more and ch & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary HxW mask -> COCO RLE ``{"size": [h, w], "counts": str}`` (compressed string form)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts_to_string(rle_counts(mask))}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string/bytes or uncompressed list counts) -> bool HxW mask."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError("RLE must be a dict with 'size': [h, w] and 'counts'") from e
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise ValueError(f"RLE counts cover {sum(runs)} pixels, expected {h}x{w}={h * w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((h, w), order="F")


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of a COCO RLE mask."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = string_to_counts(counts) if isinstance(counts, str) else list(counts)
    return int(sum(runs[1::2]))
