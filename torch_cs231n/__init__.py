"""torch_cs231n: the layers of a CS231n conv-net as PyTorch C++/CUDA custom ops.

    import torch_cs231n
    layer = torch_cs231n.ReLU()                   # a torch.nn.ReLU, computed by our kernels
    y = torch_cs231n.functional.relu(x)           # the functional form, torch.nn.functional's signature
"""
__version__ = "0.1.0"

from . import functional  # noqa: E402  (loads the kernels)
from ._extension import build_info  # noqa: E402
from .modules import ReLU  # noqa: E402

__all__ = ["functional", "build_info", "ReLU", "__version__"]

# Conv2d
from .modules import Conv2d  # noqa: E402

__all__ += ["Conv2d"]
# MaxPool2d
from .modules import MaxPool2d  # noqa: E402

__all__ += ["MaxPool2d"]
# Batch norm.
from .modules import BatchNorm2d  # noqa: E402

__all__.append("BatchNorm2d")
