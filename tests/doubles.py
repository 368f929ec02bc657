"""Test doubles for unit tests of the loop and dispatcher (end-to-end tests use real models)."""

import threading

import numpy as np
from pydantic import Field

from mmedagent.tools import Overlay, Tool, ToolParams, ToolResult


class ScriptedPlanner:
    """Replies with the given texts in order and records what it was sent."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def generate(self, messages, image, **gen):
        self.calls.append([dict(m) for m in messages])
        return self.replies.pop(0)


class BoxParams(ToolParams):
    prompts: list[str] = Field(min_length=1)


class BoxResult(ToolResult):
    boxes: list[list[float]]
    phrases: list[str]
    image_size: list[int]

    hidden_from_model = frozenset({"image_size"})

    def overlay(self):
        return Overlay(boxes=self.boxes, labels=self.phrases)


class FakeGrounding(Tool):
    """Returns a fixed box per prompt; remembers the image object it was given."""

    name = "grounding"
    aliases = ("grounding dino",)
    description = "Locate objects."
    Params = BoxParams
    Result = BoxResult

    def __init__(self, **options):
        super().__init__(**options)
        self.seen_images = []
        self.loads = 0

    def load(self):
        self.loads += 1

    def __call__(self, image, params):
        self.seen_images.append(image)
        return BoxResult(boxes=[[0.1234, 0.2, 0.3, 0.4]] * len(params.prompts), phrases=params.prompts, image_size=list(image.size))


class SleepParams(ToolParams):
    seconds: float = 5.0


class SlowTool(Tool):
    name = "slow"
    description = "Sleeps."
    Params = SleepParams
    needs_image = False

    def __init__(self, **options):
        super().__init__(**options)
        self.release = threading.Event()

    def __call__(self, image, params):
        self.release.wait(params.seconds)
        return ToolResult()


class CrashTool(Tool):
    name = "crash"
    description = "Always fails."
    needs_image = False

    def __call__(self, image, params):
        raise RuntimeError("weights corrupted")


def grey_image(size=(64, 48), value=100):
    from PIL import Image

    return Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8))


def dicom_quoting_a_name(name: bytes = b"Zzyzx^Quixote ") -> bytes:
    """A bare DICOM whose Rows element declares a length that swallows the next element, the
    patient's name: pydicom's error about it quotes the name's bytes."""
    import struct

    def element(group, elem, vr, value):
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    rows = struct.pack("<HH", 0x28, 0x10) + b"US" + struct.pack("<H", 11 + len(name))
    pixels = struct.pack("<HH", 0x7FE0, 0x10) + b"OW\0\0" + struct.pack("<I", 32) + b"\0" * 32
    return (element(0x8, 0x60, b"CS", b"CT") + rows + b"\x08\x00" + element(0x10, 0x10, b"PN", name) + b"\x00"
            + element(0x28, 0x11, b"US", struct.pack("<H", 4)) + pixels)
