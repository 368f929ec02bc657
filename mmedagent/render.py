"""Draw tool overlays (boxes, masks, labels) onto an image, for the chat UI and for files.

>>> from mmedagent.render import render
>>> render(image, [result.overlay() for result in results if result]).save("answer.png")
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmedagent.tools._boxes import as_pil_rgb, decode_rle, denormalize_boxes
from mmedagent.tools.base import Overlay

# Distinct, colour-blind friendly (Okabe-Ito without black), as RGB.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)


def _overlays(overlays: Overlay | Iterable[Overlay | None] | None) -> list[Overlay]:
    if overlays is None:
        return []
    if isinstance(overlays, Overlay):
        return [overlays]
    return [o for o in overlays if o is not None]


def render(
    image: Any,
    overlays: Overlay | Iterable[Overlay | None] | None,
    *,
    mask_alpha: float = 0.45,
    line_width: int | None = None,
) -> Image.Image:
    """A copy of ``image`` (PIL or array) with every overlay's masks, boxes and labels drawn.

    Masks are alpha-blended in their colour; the i-th box and the i-th mask of an overlay share a
    colour and the i-th label; masks whose RLE size differs from the image are resized (nearest).
    Boxes with a non-finite coordinate are skipped.
    """
    base = as_pil_rgb(image).copy()
    w, h = base.size
    width = line_width or max(1, round(min(w, h) / 150))
    font = ImageFont.load_default()
    pixels = np.asarray(base, dtype=np.float32).copy()
    texts: list[tuple[tuple[float, float], str, tuple[int, int, int]]] = []
    boxes_to_draw: list[tuple[list[float], tuple[int, int, int]]] = []
    colour_index = 0
    for overlay in _overlays(overlays):
        n = max(len(overlay.boxes), len(overlay.masks))
        for i in range(n):
            colour = PALETTE[(colour_index + i) % len(PALETTE)]
            label = overlay.labels[i] if i < len(overlay.labels) else ""
            if i < len(overlay.masks):
                mask = decode_rle(overlay.masks[i])
                if mask.shape != (h, w):
                    mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
                pixels[mask] = pixels[mask] * (1 - mask_alpha) + np.array(colour, dtype=np.float32) * mask_alpha
            box = overlay.boxes[i] if i < len(overlay.boxes) else []
            if len(box) == 4 and all(math.isfinite(v) for v in box):  # a NaN box (a detector in fp16) is not drawn
                # off the image nothing shows anyway; clipping keeps PIL's integer coordinates in range
                x1, y1, x2, y2 = denormalize_boxes(np.clip(box, -1.0, 2.0), w, h)[0].tolist()
                boxes_to_draw.append(([x1, y1, x2, y2], colour))
                if label:
                    texts.append(((x1, y1), label, colour))
            elif label and i < len(overlay.masks):
                ys, xs = np.nonzero(mask)
                if len(xs):
                    texts.append(((float(xs.min()), float(ys.min())), label, colour))
        colour_index += n
    out = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for (x1, y1, x2, y2), colour in boxes_to_draw:
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=width)
    for (x, y), label, colour in texts:
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top
        ty = y - th - 2 if y - th - 2 >= 0 else y + width
        draw.rectangle([x, ty, x + tw + 2, ty + th + 2], fill=colour)
        draw.text((x + 1 - left, ty + 1 - top), label, fill=(0, 0, 0), font=font)
    return out
