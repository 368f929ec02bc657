"""Make the CUDA-only torchvision wheel importable next to a CPU-only torch.

Why this exists: on machines where only a CPU build of torch 2.13 can be installed, the only
torchvision that accepts it (0.28.0 from PyPI) is a CUDA build. Its compiled extension cannot load
(it needs CUDA libraries), and then ``import torchvision`` dies with ``RuntimeError: operator
torchvision::nms does not exist`` while registering its Python-side meta kernels — which in turn
breaks transformers' image processors, sentence-transformers, open_clip and segment-anything.

Before torchvision is first imported we try to load its real extension; only if that fails do we
declare the ``nms``/``qnms`` operator schemas and give ``nms`` a plain-torch kernel, which is all
torchvision needs to import (other compiled ops, e.g. ``deform_conv2d`` and ``io.decode_jpeg``,
stay unavailable). With a working torchvision this is a no-op.

It is armed by ``import mmedagent`` (a meta-path hook that fires on the first torchvision import),
so every process that imports mmedagent first — scripts, pytest, ranks started by the deepspeed
launcher — gets it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

_done = False


def _nms(boxes, scores, iou_threshold: float):
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        if order.numel() == 1:
            break
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter).clamp(min=1e-12)
        order = rest[iou <= iou_threshold]
    return torch.stack(keep).to(torch.int64)


def _real_extension_loads(package_dir: Path) -> bool:
    import torch

    for so in package_dir.glob("_C*.so"):
        try:
            torch.ops.load_library(str(so))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def prepare_torchvision() -> None:
    """Register fallback operators if torchvision's compiled extension cannot load."""
    global _done
    if _done or "torchvision" in sys.modules:
        return
    _done = True
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    if _real_extension_loads(Path(next(iter(spec.submodule_search_locations)))):
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already defined by someone else
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms, "CPU")
    _LIBS.append(lib)  # keep the registration alive


_LIBS: list = []


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            prepare_torchvision()
        return None  # the normal finders do the import


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())
