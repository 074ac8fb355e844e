"""PyTorch's own ModuleInfo samples (torch.testing._internal.common_modules.module_db) for the layers we
compute, in every floating dtype: each sample's module converted to ours gives torch's outputs, and its
backward runs and gives gradients of torch's dtypes (and values, in float32 and float64).

Tolerances: float64 tight; float32 a few ulps of sums in another order; float16/bfloat16 one or two
roundings of the narrow result (both sides compute in float32), see test_batch_norm.tolerances.
"""
import copy

import pytest
import torch
from hypothesis import settings
from torch import nn

# torch.testing._internal imports expecttest, which `make` installs; a GPU machine's torch may lack it.
pytest.importorskip("expecttest", reason="torch's ModuleInfo database (torch.testing._internal) needs expecttest")
from torch.testing._internal.common_modules import module_db  # noqa: E402

import torch_cs231n

# Importing torch's test utilities loads their own hypothesis profile (and freezes cuDNN's global flags,
# which the TF32 fixture of conftest.py respects): the suite's profile comes back for the other files.
settings.load_profile("default")

LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU)
INFOS = [info for info in module_db if info.module_cls in LAYERS]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}


def first(out):
    return out[0] if isinstance(out, tuple) else out  # MaxPool2d(return_indices=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", INFOS, ids=lambda info: info.name)
def test_module_db_samples_match_torch(info, dtype):
    samples = list(info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True))
    assert samples, f"{info.name} has no samples in {dtype}"
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        torch.manual_seed(0)
        reference = info.module_cls(*args, **kwargs).to(dtype)
        ours = torch_cs231n.convert(copy.deepcopy(reference))
        assert type(ours).__module__.startswith("torch_cs231n")
        results = []
        for module in (ours, reference):
            inputs = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                      for a in sample.forward_input.args]
            out = first(module(*inputs, **sample.forward_input.kwargs))
            leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            leaves += [p for p in module.parameters() if p.requires_grad]
            grads = torch.autograd.grad(out.float().square().sum(), leaves) if leaves and out.requires_grad else ()
            results.append((out.detach(), grads))
        (out, grads), (out_ref, grads_ref) = results
        where = f"{info.name}{args}{kwargs} in {dtype}"
        assert out.dtype == out_ref.dtype and out.shape == out_ref.shape, where
        torch.testing.assert_close(out, out_ref, **TOLERANCES[dtype], msg=where)
        assert [g.dtype for g in grads] == [g.dtype for g in grads_ref], where
        if dtype in (torch.float64, torch.float32):
            for g, g_ref in zip(grads, grads_ref):
                torch.testing.assert_close(g, g_ref, **TOLERANCES[dtype], msg=where)
