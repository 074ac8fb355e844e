"""The shape suite: what is timed, for every op, and the target ratio ours/torch for forward+backward.

One file per op (cases_<op>.py) defines its cases; this file collects them. Shapes are (N, C, H, W),
float32 (cases_bf16.py: bfloat16), NCHW.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# The shared shapes of the suite, as the issues name them.
SHAPES = {
    "cs231n": (50, 32, 32, 32),
    "resnet": (32, 64, 56, 56),
    "deep": (32, 256, 14, 14),
    "stem": (32, 3, 224, 224),
    "pool": (32, 64, 112, 112),
}


@dataclass
class Case:
    op: str  # the layer: "relu", "conv2d", ...
    name: str  # the shape's name in the suite
    describe: str  # shape and arguments, for the table
    make_inputs: Callable  # (device, dtype) -> tuple of tensors; the float ones require grad
    ours: Callable  # (*inputs) -> Tensor
    reference: Callable  # (*inputs) -> Tensor, torch's own
    target: float | None = None  # ratio ours/torch that forward+backward should reach
    quick: bool = True  # part of `bench --quick`
    extra: dict = field(default_factory=dict)
    # What forward+backward differentiates, for each side ("ours", "torch"): by default the inputs that
    # require grad; a model case gives its own model's parameters (one training step).
    grad_targets: Callable[[str], list] | None = None
    # "cpu": the suite above, for any device; "gpu": GPU-sized shapes (cases_gpu.py), for --suite gpu.
    suite: str = "cpu"
    # The inputs' dtype (a torch.dtype); None: float32. cases_bf16.py times bfloat16.
    dtype: object = None


def all_cases() -> list[Case]:
    from . import cases_relu

    cases = list(cases_relu.cases())
    for module_name in ("cases_conv2d", "cases_max_pool2d", "cases_batch_norm", "cases_bf16", "cases_noise",
                        "cases_model", "cases_gpu"):
        try:
            module = __import__(f"{__package__}.{module_name}", fromlist=["cases"])
        except ModuleNotFoundError:
            continue  # that layer's benchmark has not been written yet
        cases += list(module.cases())
    return cases
