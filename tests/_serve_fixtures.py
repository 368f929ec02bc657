"""Helpers for the serving tests: test tools a worker can load by plug-in, and real subprocesses.

The tools here are real :class:`~mmedagent.tools.Tool` classes (registered when this module is
imported, as ``--plugin _serve_fixtures``); the servers are the real scripts started with
``python serve/...py`` on loopback.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from mmedagent.tools import Overlay, Tool, ToolParams, ToolResult, register

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class BrightParams(ToolParams):
    prompts: list[str] = Field(default_factory=lambda: ["region"], min_length=1)


class BrightResult(ToolResult):
    boxes: list[list[float]]
    phrases: list[str]
    mean: float

    def overlay(self):
        return Overlay(boxes=self.boxes, labels=self.phrases)


class BrightRegion(Tool):
    """Box around the pixels brighter than the image mean (a real, deterministic computation)."""

    name = "bright_region"
    aliases = ("bright finder",)
    description = "Box around the bright part of the image."
    Params = BrightParams
    Result = BrightResult
    weights_note = "no weights (threshold at the mean)"

    def __call__(self, image, params):
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        ys, xs = np.nonzero(grey > grey.mean())
        h, w = grey.shape
        box = [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h] if len(xs) else [0.0, 0.0, 1.0, 1.0]
        return BrightResult(boxes=[box] * len(params.prompts), phrases=params.prompts, mean=float(grey.mean()))


class NapParams(ToolParams):
    seconds: float = Field(default=0.0, ge=0, le=60)


class NapResult(ToolResult):
    slept: float


class Nap(Tool):
    """Sleeps, then reports how long: a stand-in for a slow model, to kill mid-call."""

    name = "nap"
    description = "Sleep for a while."
    Params = NapParams
    Result = NapResult
    needs_image = False

    def __call__(self, image, params):
        time.sleep(params.seconds)
        return NapResult(slept=params.seconds)


class StatsResult(ToolResult):
    mean: float
    std: float


class PixelStats(Tool):
    """Grey-value mean and spread (served in-process by the test stack)."""

    name = "pixel_stats"
    description = "Mean and standard deviation of the grey values."
    Result = StatsResult

    def __call__(self, image, params):
        grey = np.asarray(image.convert("L"), dtype=np.float32)
        return StatsResult(mean=float(grey.mean()), std=float(grey.std()))


register(BrightRegion)
register(Nap)
register(PixelStats)


def sample_png(size=(48, 40), fmt="PNG") -> bytes:
    """A grey image with a bright square in the lower right."""
    from PIL import Image

    arr = np.full((size[1], size[0], 3), 40, dtype=np.uint8)
    arr[size[1] // 2 :, size[0] // 2 :] = 220
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def serve_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("MMEDAGENT_API_KEY", None)
    env.update(extra)
    return env


class ServeProcess:
    """``python serve/<script> ...`` with stdout+stderr captured to ``log_path``; waits for lines."""

    def __init__(self, script: str, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "serve" / script), *args],
            cwd=ROOT, env=env or serve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.lines: list[str] = []
        self.ended = False  # the output's end: every process holding it (children too) has closed it
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._log.write(raw)
            self._log.flush()
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace"))
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """The first output line matching ``pattern``; fails with the log tail on timeout or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.ended and seen == len(self.lines)):  # (a dead launcher's children still write)
                    tail = "".join(self.lines[-40:])
                    raise AssertionError(f"{pattern!r} not seen (exit code {self.proc.poll()}); output:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT (Ctrl-C) to the whole group, then SIGKILL if it lingers; returns the exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._drain()
        return self.proc.returncode

    def _drain(self, timeout: float = 5.0) -> None:
        """Once the process has exited, wait (bounded) for the reader to reach the output's end, so that the
        last lines it wrote are in :attr:`lines` (a child still holding the output may keep it open)."""
        if self.proc.poll() is None:
            return
        with self._cond:
            self._cond.wait_for(lambda: self.ended, timeout)

    def output(self) -> str:
        """Everything read so far; after the process has exited, everything it wrote."""
        self._drain()
        with self._cond:
            return "".join(self.lines)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
