"""The harness's noise floor: torch's ReLU timed against itself ("A/A"), on the ReLU shapes.

Both sides run the same kernels (clamp_min, threshold_backward) and the same autograd node; only the
Python call differs (``torch.ops.aten.relu.default`` against ``F.relu``). Any ratio away from 1.0 is
what this machine and this method add on their own, and it is the margin within which a memory-bound
op like our ReLU cannot be told apart from torch's. No target.
"""
import torch
import torch.nn.functional as F

from .suite import SHAPES, Case


def cases():
    for name, shape in SHAPES.items():
        yield Case(
            op="noise",
            name=name,
            describe=f"{tuple(shape)} torch vs torch (ReLU)",
            make_inputs=lambda device, dtype, shape=shape: (
                torch.randn(shape, device=device, dtype=dtype, requires_grad=True),
            ),
            ours=torch.ops.aten.relu.default,
            reference=F.relu,
            quick=False,
        )
