"""Plug-in tool packages written the way ``pip install`` lays them out (the ``plugin_dir`` fixture, in
conftest.py, puts the folder on sys.path and restores the registry)."""

from __future__ import annotations

import textwrap
from pathlib import Path


def install(root: Path, package: str, files: dict[str, str], entry_points: str) -> None:
    """``package`` with ``files`` under ``root``, and its dist-info declaring ``entry_points`` in the
    ``mmedagent.tools`` group."""
    (root / package).mkdir()
    for name, text in files.items():
        (root / package / name).write_text(textwrap.dedent(text))
    dist = root / f"{package}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mmedagent.tools]\n" + entry_points)
