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

    return "data:application/dicom;base64," + base64.b64encode(Path(dicom_path()).read_bytes()).decode()


def dicom_path() -> str:
    from pydicom.data import get_testdata_file

    return str(get_testdata_file("CT_small.dcm"))


def start_controller(model_path: Path, logs: Path) -> tuple[Any, str]:
    """``python serve/controller.py --model-path MODEL`` (no tools, no web UI, short answers); (process, URL)."""
    from _serve_fixtures import ServeProcess, serve_env

    config = logs / "serve.yaml"
    config.write_text("max_new_tokens: 8\nmax_steps: 1\n")
    proc = ServeProcess(
        "controller.py",
        ["--model-path", str(model_path), "--no-web", "--port", "0", "--tools", "", "--config", str(config)],
        logs / "controller.log",
        serve_env(XDG_CACHE_HOME=str(logs / "cache")),
    )
    try:
        url = proc.wait_for(r"controller: (http://\S+)", 120).group(1)
        proc.wait_for(r"^ready: models: ", 180)
    except AssertionError:
        proc.kill()
        raise
    return proc, url
