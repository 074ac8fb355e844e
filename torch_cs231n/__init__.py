"""torch_cs231n: the layers of a CS231n conv-net as PyTorch C++/CUDA custom ops.

    import torch_cs231n
    conv = torch_cs231n.Conv2d(3, 16, 3, padding=1)   # an nn.Conv2d, computed by our kernels
    y = torch_cs231n.functional.relu(conv(x))         # the functional forms have torch.nn.functional's signatures
    model = torch_cs231n.convert(model)               # swap an existing model's layers for ours, in place
    model = torch_cs231n.SyncBatchNorm.convert_sync_batchnorm(model)  # batch norm over all processes (DDP)
"""
__version__ = "0.1.0"

from . import functional  # noqa: E402  (loads the kernels)
from ._extension import build_info  # noqa: E402
from .convert import convert, revert  # noqa: E402
from .modules import BatchNorm2d, Conv2d, MaxPool2d, ReLU, SyncBatchNorm  # noqa: E402

__all__ = ["functional", "build_info", "convert", "revert", "Conv2d", "MaxPool2d", "BatchNorm2d", "SyncBatchNorm",
           "ReLU", "__version__"]
