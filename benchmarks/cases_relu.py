"""ReLU cases: every shape of the suite. Target: no slower than torch (ratio <= 1.0) anywhere."""
import torch
import torch.nn.functional as F

import torch_cs231n.functional as ours

from .suite import SHAPES, Case


def cases():
    for name, shape in SHAPES.items():
        yield Case(
            op="relu",
            name=name,
            describe=f"{tuple(shape)}",
            make_inputs=lambda device, dtype, shape=shape: (
                torch.randn(shape, device=device, dtype=dtype, requires_grad=True),
            ),
            ours=ours.relu,
            reference=F.relu,
            target=1.0,
            quick=name in ("cs231n", "resnet"),
        )
