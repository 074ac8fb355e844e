"""Drop-in replacements for torch.nn layers.

Each subclasses torch's module, so it keeps its constructor arguments, parameter initialisation,
``state_dict`` keys, ``repr`` and every ``isinstance`` check; only the computation is ours.
"""
from torch import nn

from . import functional as F

__all__ = ["ReLU"]


class ReLU(nn.ReLU):
    """``torch.nn.ReLU`` computed by torch_cs231n's kernels."""

    def forward(self, input):
        return F.relu(input, inplace=self.inplace)


# -------------------------------------------------------------------------------------------- MaxPool2d
__all__ += ["MaxPool2d"]


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` computed by torch_cs231n's kernels (all its arguments, return_indices too)."""

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)
