"""Helpers for the recipe tests: run a recipe end to end with ``--tiny``, in this process, once per session."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mmedagent.recipes.__main__ import main


def run_recipe(name: str, out: Path, *flags: str) -> dict[str, Any]:
    """``python -m mmedagent.recipes NAME --tiny --out OUT FLAGS`` in-process; the run's summary plus its wall time."""
    t0 = time.monotonic()
    rc = main([name, "--tiny", "--out", str(out), *flags])
    assert rc == 0, f"recipe {name} exited with {rc}"
    summary = json.loads((out / "summary.json").read_text())
    summary["test_wall_s"] = time.monotonic() - t0
    return summary


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def state_dict(folder: Path) -> dict[str, Any]:
    """All tensors of the ``*.safetensors`` files in ``folder``, in float32."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    assert out, f"no safetensors in {folder}"
    return out


def dicom_data_url() -> str:
    """pydicom's sample CT slice as the data URL a browser upload would send."""
    import base64

    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    return "data:application/dicom;base64," + base64.b64encode(data).decode()
