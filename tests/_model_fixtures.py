"""Session-scoped tiny checkpoints for the model-layer tests (and anyone else who needs a real tiny model).

Use: ``from _model_fixtures import tiny_models`` in a test module, then ``tiny_models("llava")``
returns the directory of a tiny random LLaVA checkpoint, built once per session.
"""

from __future__ import annotations


from PIL import Image


def test_image(size: int = 40) -> Image.Image:
    """A small deterministic RGB image with some structure (not a flat colour)."""
    img = Image.new("RGB", (size, size - 8), (30, 30, 30))
    for x in range(size // 4, size // 2):
        for y in range(size // 4, size // 2):
            img.putpixel((x, y), (220, 180, 40))
    return img


test_image.__test__ = False  # not a pytest test
