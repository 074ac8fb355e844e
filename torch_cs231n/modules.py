"""Drop-in replacements for torch.nn layers.

Each subclasses torch's module, so it keeps its constructor arguments, parameter initialisation,
``state_dict`` keys, ``repr`` and every ``isinstance`` check; only the computation is ours.
"""
import torch
from torch import nn
from torch.nn import functional as _torch_F  # F.pad, for Conv2d's non-zero padding modes

from . import distributed
from . import functional as F

__all__ = ["ReLU", "Conv2d", "MaxPool2d", "BatchNorm2d", "SyncBatchNorm"]


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

class _BatchNormForward:
    """The forward of our batch norm modules, after their input checks. It follows
    ``nn.modules.batchnorm._BatchNorm.forward`` line for line: momentum None is the cumulative average
    1 / num_batches_tracked, and without tracked buffers eval uses the batch statistics.
    """

    def _batch_norm(self, input):
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
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        group = self._sync_group() if bn_training and self.training else None
        if group is not None:
            return distributed.sync_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                               exponential_average_factor, self.eps, group)
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                            exponential_average_factor, self.eps)

    def _sync_group(self):
        """The process group whose batches are normalised together; None: this process's batch alone."""
        return None


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by torch_cs231n's kernels.

    Everything but the computation is torch's: arguments, parameters and buffers (``running_mean``,
    ``running_var``, ``num_batches_tracked``), ``state_dict`` keys, ``_check_input_dim`` (4-D input).
    """

    def forward(self, input):
        self._check_input_dim(input)
        return self._batch_norm(input)


class SyncBatchNorm(_BatchNormForward, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by torch_cs231n's kernels: in training, inside an initialised
    process group of more than one process, each process normalises with the statistics of the whole
    global batch (torch_cs231n/distributed.py); otherwise, and in eval, it is our BatchNorm2d.

    Unlike torch's, it runs on CPU tensors too (gloo), and ranks may hold batches of different sizes, an
    empty one included. Arguments, ``process_group``, ``state_dict`` and input checks (2-D or more, at least
    one channel) are torch's.
    """

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return self._batch_norm(input)

    def _sync_group(self):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        group = self.process_group or torch.distributed.group.WORLD
        return group if torch.distributed.get_world_size(group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: every batch norm layer in ``module`` (torch's
        or ours, any number of dims) becomes our SyncBatchNorm, sharing its parameters and buffers. Returns
        the converted module (a new object when ``module`` itself is a batch norm layer)."""
        result = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            result = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group, bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    result.weight = module.weight
                    result.bias = module.bias
            result.running_mean = module.running_mean
            result.running_var = module.running_var
            result.num_batches_tracked = module.num_batches_tracked
            result.training = module.training
            if hasattr(module, "qconfig"):
                result.qconfig = module.qconfig
        for name, child in module.named_children():
            result.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return result
