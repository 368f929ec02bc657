"""mmedagent: tool-using medical multimodal agents."""

import glob
import os
import sys
import warnings

from mmedagent import _torchvision_compat

_torchvision_compat.install()

__version__ = "0.1.0"

ACCELERATOR_DEVICES = ("/dev/nvidia*", "/dev/kfd", "/dev/dri/renderD*", "/dev/accel*", "/dev/davinci*")
"""Device files of the accelerators DeepSpeed looks for (CUDA, ROCm, Intel XPU, Gaudi, Ascend NPU)."""


def cpu_only_deepspeed(environ=os.environ, platform: str = sys.platform) -> None:
    """On a Linux machine without any accelerator device, tell DeepSpeed so (``DS_ACCELERATOR=cpu``), which it
    otherwise finds out by printing a warning to stdout, where the serving scripts print only their addresses
    and the ready line. A value already set wins."""
    if platform.startswith("linux") and "DS_ACCELERATOR" not in environ \
            and not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES):
        environ["DS_ACCELERATOR"] = "cpu"


cpu_only_deepspeed()

# peft reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model: the
# warning reached every merge, recipe and adapter load, where the user can do nothing about it
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
