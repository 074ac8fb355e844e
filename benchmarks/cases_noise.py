"""The harness's noise floor: torch's ReLU timed against itself ("A/A"), on the ReLU shapes.

Both sides run the same kernels (clamp_min, threshold_backward) and the same autograd node; only the
Python call differs (``torch.ops.aten.relu.default``, the path our ops take, against ``F.relu``). Any
ratio away from 1.0 is what this machine and this method add on their own, and it is the margin within
which a memory-bound op like our ReLU cannot be told apart from torch's. No target.
"""
from dataclasses import replace

import torch

from . import cases_relu


def cases():
    for case in cases_relu.cases():  # the same shapes and inputs, torch on both sides
        yield replace(case, op="noise", describe=f"{case.describe} torch vs torch (ReLU)",
                      ours=torch.ops.aten.relu.default, target=None, quick=False)
