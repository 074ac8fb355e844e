"""torch.autocast: every layer of a converted net gives the dtype torch's layer gives, with its values, forward
and backward (bfloat16 and float16 on the CPU and on CUDA).

Each layer is fed the same input on both sides (torch's output of the layer before), so that a value one
ulp apart cannot move a max-pool's choice and compound. Tolerances: both sides compute in float32 from the
same narrow inputs and round once, so outputs agree to about one ulp of the narrow dtype (bfloat16: 2^-8
relative, float16: 2^-11); sums over a layer's values (convolution, batch norm statistics, d_weight)
add float32 rounding in another order. Hence rtol = atol = 2e-2 (bfloat16) and 4e-3 (float16).
"""
import copy

import pytest
import torch
from torch import nn

import torch_cs231n

from conftest import DEVICES

ops = torch.ops.torch_cs231n
TOLERANCES = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=4e-3, atol=4e-3)}
CASES = [(device, dtype) for device in DEVICES for dtype in (torch.bfloat16, torch.float16)]


def net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
    )


def layer_results(layer, x, seed):
    """A layer's output, and the gradients of (output * g).sum() for its input and parameters, g random
    (the same for the same seed and shape)."""
    x = x.detach().clone().requires_grad_()
    y = layer(x * 1)  # `* 1`: an in-place ReLU must not write into the leaf
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, [x] + list(layer.parameters()), grad)
    return y.detach(), grads


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_each_layer_gives_torch_dtype_and_values(device, dtype, training):
    torch.manual_seed(0)
    reference = net().to(device).train(training)
    ours = torch_cs231n.convert(copy.deepcopy(reference))
    h = torch.randn(4, 3, 12, 12, device=device)
    with torch.autocast(device, dtype=dtype):
        for index, (mine, theirs) in enumerate(zip(ours, reference)):
            (y, grads), (y_ref, grads_ref) = layer_results(mine, h, index), layer_results(theirs, h, index)
            where = f"layer {index} ({type(theirs).__name__}) on {h.dtype} input"
            assert y.dtype == y_ref.dtype, where
            torch.testing.assert_close(y.float(), y_ref.float(), **TOLERANCES[dtype], msg=where)
            for g, g_ref in zip(grads, grads_ref):
                assert g.dtype == g_ref.dtype, where
                scale = g_ref.abs().max().clamp_min(1).item()  # d_weight sums a whole layer's values
                torch.testing.assert_close(g.float() / scale, g_ref.float() / scale, **TOLERANCES[dtype], msg=where)
            h = y_ref
    assert h.dtype == dtype  # the float32 input came out narrow, as torch's conv made it
    for (name, b), b_ref in zip(ours.named_buffers(), reference.buffers()):  # running statistics alike
        assert b.dtype == b_ref.dtype
        torch.testing.assert_close(b.float(), b_ref.float(), **TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("device,dtype", CASES)
def test_the_op_itself_follows_autocast(device, dtype):
    """conv2d_forward casts under autocast (csrc/autocast/autocast.cpp); float64 stays float64, as torch's."""
    x, w = torch.randn(2, 3, 5, 5, device=device), torch.randn(4, 3, 3, 3, device=device)
    with torch.autocast(device, dtype=dtype):
        assert ops.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1).dtype == dtype
        assert ops.conv2d_forward(x.double(), w.double(), None, [1, 1], [0, 0], [1, 1], 1).dtype == torch.float64
        assert ops.relu_forward(x).dtype == torch.float32  # ReLU runs in its input's dtype, as torch's
    assert ops.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1).dtype == torch.float32


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("grad", [False, True])
def test_a_weight_is_cast_once_an_autocast_region_as_torch_casts_it(device, dtype, grad):
    """torch's conv2d keeps the cast of a weight (a leaf that requires grad) for the whole autocast region;
    so does ours (its Autocast kernel's cached cast): over three calls, the one cast of the float32 weight
    is the first call's, with grad mode on or off (inference). (A kernel's own conversions of the narrow
    weight to float32, where it computes in float32, are not casts of the weight.)"""
    from torch.profiler import profile

    def weight_casts(layer, x):
        with torch.set_grad_enabled(grad), torch.autocast(device, dtype=dtype):
            with profile(record_shapes=True) as prof:
                for _ in range(3):
                    layer(x)
        return sum(1 for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes
                   and tuple(e.input_shapes[0]) == tuple(layer.weight.shape) and e.input_dtypes[0] == "float")

    reference = nn.Conv2d(16, 24, 3, padding=1).to(device)
    ours = torch_cs231n.convert(copy.deepcopy(reference))
    x = torch.randn(2, 16, 8, 8, device=device)
    assert weight_casts(reference, x) == 1
    assert weight_casts(ours, x) == 1


@pytest.mark.parametrize("device,dtype", CASES)
def test_a_converted_model_cast_to_the_narrow_dtype_runs(device, dtype):
    """model.to(dtype) without autocast: parameters, buffers and activations all narrow, as torch's."""
    torch.manual_seed(1)
    reference = net().to(device, dtype)
    ours = torch_cs231n.convert(copy.deepcopy(reference))
    x = torch.randn(2, 3, 12, 12, device=device, dtype=dtype)
    y, y_ref = ours(x), reference(x)
    assert y.dtype == dtype
    # A whole net: the rounding of each layer compounds, and a max-pool may choose another of two values
    # one ulp apart; the bulk must still agree.
    close = torch.isclose(y.float(), y_ref.float(), rtol=5e-2, atol=5e-2)
    assert close.float().mean() > 0.95
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in ours.parameters())
