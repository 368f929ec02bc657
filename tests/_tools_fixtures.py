"""Test helpers for the vision tools: the tiny weight builders (one copy, in
:mod:`mmedagent.tools._tiny`) and a synthetic scan."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mmedagent.tools._tiny import TINY_SAM, save_tiny_grounding_dino, save_tiny_open_clip, save_tiny_sam

__all__ = ["TINY_SAM", "save_tiny_grounding_dino", "save_tiny_open_clip", "save_tiny_sam", "scan_16bit", "scan_image"]


def scan_image(width: int = 48, height: int = 40) -> Image.Image:
    """A smooth synthetic 'scan' with a bright blob (deterministic)."""
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((xx - width * 0.6) / (width * 0.15)) ** 2 + ((yy - height * 0.4) / (height * 0.2)) ** 2))
    grey = 40 + 180 * blob + 20 * xx / width
    return Image.fromarray(np.stack([grey, grey * 0.9, grey * 0.8], axis=-1).astype(np.uint8))


def scan_16bit(width: int = 48, height: int = 40) -> Image.Image:
    """:func:`scan_image`'s blob as a 16-bit greyscale PIL image (mode ``I;16``): 16 x its 8-bit grey."""
    grey = np.asarray(scan_image(width, height).convert("L"), dtype=np.uint16) * 16
    return Image.frombytes("I;16", (width, height), grey.astype("<u2").tobytes())
