"""Fixtures for the data-builder tests: a session-scoped synthetic set and small annotation files."""

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic set (10 images, 48 px), built once per session."""
    from mmedagent.data.synth import synth

    out = tmp_path_factory.mktemp("synth")
    synth(out, n=10, seed=3, size=48)
    return out


def save_grey(path, size=(32, 32), value=60, box=None, box_value=220):
    """A grey PNG, optionally with a bright rectangle (x1, y1, x2, y2) in pixels (end exclusive)."""
    arr = np.full((size[1], size[0]), value, np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        arr[y1:y2, x1:x2] = box_value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def records_of(path):
    from mmedagent.data.formats import read_records

    return read_records(path)
