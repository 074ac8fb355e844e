"""Drop-in replacements for torch.nn layers.

Each subclasses torch's module, so it keeps its constructor arguments, parameter initialisation,
``state_dict`` keys, ``repr`` and every ``isinstance`` check; only the computation is ours.
"""
from torch import nn
from torch.nn import functional as _torch_F  # F.pad, for Conv2d's non-zero padding modes

from . import functional as F

__all__ = ["ReLU", "Conv2d", "MaxPool2d", "BatchNorm2d"]


class ReLU(nn.ReLU):
    """``torch.nn.ReLU`` computed by torch_cs231n's kernels."""

    def forward(self, input):
        return F.relu(input, inplace=self.inplace)


# ------------------------------------------------------------------------------------------------- Conv2d

class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` computed by torch_cs231n's kernels; every constructor argument is torch's.

    A channels_last input (or weight) gives a channels_last output and gradients, as torch's does.
    """

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # As torch's: pad explicitly ('reflect', 'replicate', 'circular'), then convolve unpadded.
            padded = _torch_F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


# -------------------------------------------------------------------------------------------- MaxPool2d

class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` computed by torch_cs231n's kernels (all its arguments, return_indices too)."""

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


# --------------------------------------------------------------------------------------------- batch norm

class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by torch_cs231n's kernels.

    Everything but the computation is torch's: arguments, parameters and buffers (``running_mean``,
    ``running_var``, ``num_batches_tracked``), ``state_dict`` keys, ``_check_input_dim`` (4-D input).
    ``forward`` follows ``nn.modules.batchnorm._BatchNorm.forward`` line for line: momentum None is the
    cumulative average 1 / num_batches_tracked, and without tracked buffers eval uses the batch statistics.
    """

    def forward(self, input):
        self._check_input_dim(input)
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:  # exponential moving average
                exponential_average_factor = self.momentum
        # Batch statistics in training, and in eval when there are no buffers to use.
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        # Buffers are passed only when they are to be updated (training and tracked) or used (eval).
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
