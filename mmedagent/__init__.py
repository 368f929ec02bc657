"""mmedagent: tool-using medical multimodal agents."""

from mmedagent import _torchvision_compat

_torchvision_compat.install()

__version__ = "0.1.0"
