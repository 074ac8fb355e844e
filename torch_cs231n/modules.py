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


# ------------------------------------------------------------------------------------------------- Conv2d
from torch.nn import functional as _torch_F  # noqa: E402  (F.pad for the non-zero padding modes)

__all__ += ["Conv2d"]


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` computed by torch_cs231n's kernels; every constructor argument is torch's.

    The output is contiguous (NCHW), also for a channels_last input.
    """

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # As torch's: pad explicitly ('reflect', 'replicate', 'circular'), then convolve unpadded.
            padded = _torch_F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
# -------------------------------------------------------------------------------------------- MaxPool2d
__all__ += ["MaxPool2d"]


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` computed by torch_cs231n's kernels (all its arguments, return_indices too)."""

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)
