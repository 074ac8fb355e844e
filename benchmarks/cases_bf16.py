"""bfloat16 on the CPU: each layer's resnet case of the float32 suite, with bfloat16 inputs and parameters,
against torch's own bfloat16 layer. Target: ratio <= 1.5 (the dtype issue), moonshot 1.0.

torch runs bfloat16 convolutions through oneDNN with AVX512-BF16 (vdpbf16ps, two products per float32
lane), so its bfloat16 convolution is about twice its float32 one where the CPU has that instruction.
"""
import dataclasses

import torch

from . import cases_batch_norm, cases_conv2d, cases_max_pool2d, cases_relu


def cases():
    for module in (cases_conv2d, cases_max_pool2d, cases_batch_norm, cases_relu):
        for case in module.cases():
            if case.name == "resnet" and case.suite == "cpu":
                yield dataclasses.replace(case, name="resnet_bf16", describe=case.describe + " bfloat16",
                                          dtype=torch.bfloat16, target=1.5, quick=False)
            # the strided layers, through the stride's phases (docs/conv2d.md)
            if module is cases_conv2d and case.name in ("strided", "stem", "strided_cl"):
                yield dataclasses.replace(case, name=case.name + "_bf16", describe=case.describe + " bfloat16",
                                          dtype=torch.bfloat16, target=1.5, quick=False)
