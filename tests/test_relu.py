"""ReLU: our kernels against torch.nn.functional.relu, forward and backward, in every layout."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import torch_cs231n
from torch_cs231n import functional as ours

from helpers import LAYOUTS, assert_compiled_matches_eager, assert_same_layout, dtypes_for, with_layout

ops = torch.ops.torch_cs231n


def away_from_zero(shape, device, dtype=torch.float64):
    """Random values with none near 0, where ReLU's derivative jumps and finite differences mislead."""
    x = torch.randn(shape, device=device, dtype=dtype)
    return torch.where(x.abs() < 0.1, torch.full_like(x, 0.5), x)


def test_gradcheck(device):
    x = away_from_zero((2, 3, 4, 5), device).requires_grad_()
    assert gradcheck(ours.relu, (x,))


def test_gradgradcheck(device):
    x = away_from_zero((2, 3, 4, 5), device).requires_grad_()
    assert gradgradcheck(ours.relu, (x,))


def test_inplace_gradgradcheck(device):
    x = away_from_zero((2, 3, 4, 5), device).requires_grad_()
    assert gradcheck(lambda t: ours.relu(t * 1.0, inplace=True), (x,))
    assert gradgradcheck(lambda t: ours.relu(t * 1.0, inplace=True), (x,))


def test_the_backward_node_is_the_cpp_one(device):
    """The out-of-place ReLU records a C++ node (csrc/autograd/relu_autograd.cpp), not a Python
    Function."""
    x = torch.randn(3, device=device, requires_grad=True)
    node = ours.relu(x).grad_fn
    assert "ReLUForward" in node.name()
    assert not isinstance(node, torch.autograd.function.BackwardCFunction)
    (gx,) = torch.autograd.grad(ours.relu(x).sum(), x, create_graph=True)
    assert "ReLUBackward" in gx.grad_fn.name()


def test_no_graph_without_grad(device):
    x = torch.randn(3, device=device, requires_grad=True)
    with torch.no_grad():
        assert ours.relu(x).grad_fn is None
    assert ours.relu(x.detach()).grad_fn is None


def test_forward_mode_ad_carries_the_tangent(device):
    """Forward-mode AD (torch.autograd.forward_ad) takes the Python Function, whose jvp masks the
    tangent as the backward masks the gradient: torch's tangent, also under no_grad."""
    import torch.autograd.forward_ad as fwAD

    x = away_from_zero((4, 5), device)
    t = torch.randn_like(x)
    for grad_mode in (torch.enable_grad, torch.no_grad):
        tangents = []
        for fn in (ours.relu, F.relu):
            with fwAD.dual_level(), grad_mode():
                tangents.append(fwAD.unpack_dual(fn(fwAD.make_dual(x, t))).tangent)
        assert torch.equal(*tangents)


def test_double_backward_matches_torch(device):
    x = away_from_zero((2, 3, 4, 5), device)
    g0 = torch.randn_like(x)
    results = []
    for fn in (ours.relu, F.relu):
        xi = x.clone().requires_grad_()
        g = g0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xi), xi, g, create_graph=True)
        assert gx.requires_grad
        # To g through the mask; to x through y, whose derivative is zero: zeros, not None, as torch.
        results.append(torch.autograd.grad((gx * gx).sum(), (g, xi)))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@given(
    n=st.integers(0, 3), c=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
    layout=st.sampled_from(LAYOUTS), dtype_index=st.integers(0, 3), seed=st.integers(0, 2**31 - 1),
)
def test_matches_torch(device, n, c, h, w, layout, dtype_index, seed):
    dtypes = dtypes_for(device)
    dtype = dtypes[dtype_index % len(dtypes)]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, h, w, generator=gen).to(device=device, dtype=dtype)
    x = with_layout(base, layout)
    grad = torch.randn(n, c, h, w, generator=gen).to(device=device, dtype=dtype)

    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours.relu(x_ours), F.relu(x_ref)
    # ReLU is exact: no rounding anywhere, so the results must be identical.
    torch.testing.assert_close(y_ours, y_ref, rtol=0, atol=0)
    assert_same_layout(y_ours, y_ref)
    y_ours.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=0)


def packed_mask(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[x > 0] (NaN counted as passing), one bit per element in the memory order of `like`, 32 to an
    int32 word: what relu_forward_with_mask returns, computed here with plain tensor ops."""
    keep = torch.empty_like(like, dtype=torch.int64).copy_((x > 0) | x.isnan())
    flat = keep.as_strided((keep.numel(),), (1,))  # memory order (empty_like is dense)
    words = (flat.numel() + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64, device=x.device)
    bits[: flat.numel()] = flat
    value = (bits.view(words, 32) << torch.arange(32, device=x.device)).sum(1)
    return (value - (value >= 2**31).long() * 2**32).to(torch.int32)  # as a signed int32


@given(
    n=st.integers(0, 3), c=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
    layout=st.sampled_from(LAYOUTS), grad_layout=st.sampled_from(LAYOUTS), dtype_index=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_mask_ops_match_torch(device, n, c, h, w, layout, grad_layout, dtype_index, seed):
    """relu_forward_with_mask and relu_backward_with_mask, the ops autograd runs, on their own: the output,
    the bits (sizes that leave a partial last word, any layout), and a gradient in another layout."""
    dtypes = dtypes_for(device)
    dtype = dtypes[dtype_index % len(dtypes)]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, h, w, generator=gen)
    base.view(-1)[:3] = torch.tensor([0.0, float("nan"), -0.0])[: base.numel()]
    x = with_layout(base.to(device=device, dtype=dtype), layout)
    y, mask = ops.relu_forward_with_mask(x)
    torch.testing.assert_close(y, F.relu(x), rtol=0, atol=0, equal_nan=True)
    assert_same_layout(y, F.relu(x))
    assert torch.equal(mask, packed_mask(x, y))
    g = with_layout(torch.randn(n, c, h, w, generator=gen).to(device=device, dtype=dtype), grad_layout)
    dx = ops.relu_backward_with_mask(g, y, mask)
    torch.testing.assert_close(dx, torch.ops.aten.threshold_backward(g, F.relu(x), 0), rtol=0, atol=0)
    assert_same_layout(dx, y)


def test_no_gradient_for_y_gives_none_like_torch(device):
    """When the layer after ReLU sends back no gradient (None), x gets none either, as with torch's own
    node, rather than an error from the backward op."""

    class DropGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    for fn in (ours.relu, F.relu):
        x = torch.randn(5, device=device, requires_grad=True)
        assert torch.autograd.grad(DropGrad.apply(fn(x)).sum(), x, allow_unused=True) == (None,)


def test_inplace_change_of_the_output_raises_like_torch(device):
    """y is saved (though only its shape and strides are read): changing it in place before backward
    raises torch's error, as it does for F.relu."""
    for fn in (ours.relu, F.relu):
        x = torch.randn(4, device=device, requires_grad=True)
        y = fn(x)
        y.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_nan_and_inf(device):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 2.0], device=device)
    torch.testing.assert_close(ours.relu(x), F.relu(x), equal_nan=True, rtol=0, atol=0)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours.relu(xo).sum().backward()
    F.relu(xr).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, equal_nan=True, rtol=0, atol=0)


def test_gradient_at_zero_is_zero(device):
    x = torch.zeros(5, device=device, requires_grad=True)
    ours.relu(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, device=device))


def test_empty_batch(device):
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    y = ours.relu(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


# ----------------------------------------------------------------------------------------------- in place
def test_inplace_writes_input(device):
    x = torch.randn(2, 3, 4, 5, device=device)
    expected = F.relu(x)
    ptr = x.data_ptr()
    y = ours.relu(x, inplace=True)
    assert y is x and x.data_ptr() == ptr
    assert torch.equal(x, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_any_layout(device, layout):
    x = with_layout(torch.randn(2, 3, 4, 5, device=device), layout)
    expected = F.relu(x)
    ours.relu(x, inplace=True)
    assert torch.equal(x, expected)


def test_inplace_under_autograd(device):
    leaf_ours = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    leaf_ref = leaf_ours.detach().clone().requires_grad_()
    y_ours = ours.relu(leaf_ours * 2, inplace=True)
    y_ref = F.relu(leaf_ref * 2, inplace=True)
    torch.testing.assert_close(y_ours, y_ref, rtol=0, atol=0)
    g = torch.randn_like(y_ref)
    y_ours.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(leaf_ours.grad, leaf_ref.grad, rtol=0, atol=0)


def test_inplace_on_leaf_requiring_grad_raises_like_torch(device):
    x = torch.randn(3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        F.relu(x, inplace=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        ours.relu(x, inplace=True)


def test_module_matches_torch(device):
    for inplace in (False, True):
        mod, ref = torch_cs231n.ReLU(inplace=inplace), torch.nn.ReLU(inplace=inplace)
        assert isinstance(mod, torch.nn.ReLU) and repr(mod) == repr(ref)
        x = torch.randn(2, 3, 4, 5, device=device)
        assert torch.equal(mod(x.clone()), ref(x.clone()))


# ---------------------------------------------------------------------------------------------- bad input
INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_integer_dtypes_equal_torch_bit_for_bit(device, dtype, layout):
    """torch's ReLU takes integer tensors (uint8 passes unchanged: it has no negatives), out of place and
    in place; ours gives the same values, dtype and layout."""
    info = torch.iinfo(dtype)
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(info.min, info.max, (2, 3, 5, 6), generator=gen, dtype=torch.int64).to(dtype)
    base[0, 0, 0, :2] = torch.tensor([info.min, info.max], dtype=dtype)  # the extremes
    x = with_layout(base.to(device), layout)
    y, y_ref = ours.relu(x), F.relu(x)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    assert_same_layout(y, y_ref)
    z, z_ref = x.clone(), x.clone()
    assert ours.relu(z, inplace=True) is z
    F.relu(z_ref, inplace=True)
    assert torch.equal(z, z_ref)


def test_integer_input_needs_no_gradient(device):
    """Integer tensors cannot require grad (torch's own error says so), so no graph is built."""
    x = torch.arange(-3, 3, device=device)
    with torch.enable_grad():
        assert not ours.relu(x).requires_grad
    with pytest.raises(RuntimeError, match="floating point"):
        x.requires_grad_()


@pytest.mark.parametrize("dtype,bits", [(torch.float32, torch.int32), (torch.float64, torch.int64),
                                        (torch.float16, torch.int16), (torch.bfloat16, torch.int16)])
def test_special_values_bit_for_bit(device, dtype, bits):
    """NaN of either sign, ±0, ±inf, subnormals: the same bits as torch's relu, and the same gradient."""
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([float("nan"), -float("nan"), -0.0, 0.0, float("inf"), -float("inf"), tiny / 4, -tiny / 4,
                      1.0, -1.0, 3.5, -2.25], dtype=dtype, device=device)
    assert torch.equal(ours.relu(x).view(bits), torch.relu(x).view(bits))
    assert torch.equal(ours.relu(x.clone(), inplace=True).view(bits), torch.relu(x).view(bits))
    leaf, leaf_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.arange(1, 13, dtype=dtype, device=device)
    (g,) = torch.autograd.grad(ours.relu(leaf), leaf, dy)
    (g_ref,) = torch.autograd.grad(torch.relu(leaf_ref), leaf_ref, dy)
    assert torch.equal(g.view(bits), g_ref.view(bits))


@pytest.mark.parametrize("dtype,name", [(torch.bool, "Bool"), (torch.complex64, "ComplexFloat"),
                                        (torch.uint16, "UInt16")])
def test_dtypes_torch_refuses_are_refused(device, dtype, name):
    x = torch.ones(4, dtype=dtype).to(device)  # made on the CPU: CUDA may have no fill for uint16
    with pytest.raises(RuntimeError, match=rf"relu_forward: expected input to have an integer dtype \(uint8, int8, "
                                           rf"int16, int32, int64\) or dtype float32, float64, float16 or bfloat16, "
                                           rf"but got {name}"):
        ours.relu(x)
    with pytest.raises(RuntimeError, match=f"relu_forward_: expected self to have an integer dtype .*{name}"):
        ours.relu(x, inplace=True)


def test_inplace_on_overlapping_memory_is_refused(device):
    x = torch.randn(1, 4, device=device).expand(3, 4)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        ours.relu(x, inplace=True)


def test_backward_argument_checks(device):
    y = torch.rand(2, 3, device=device)
    with pytest.raises(RuntimeError, match=r"relu_backward: expected grad_output to have the shape of output \[2, 3\], but got \[3, 2\]"):
        ops.relu_backward(torch.rand(3, 2, device=device), y)
    with pytest.raises(RuntimeError, match=r"relu_backward: expected grad_output to have the dtype of output \(Float\), but got Double"):
        ops.relu_backward(y.double(), y)


def test_mask_backward_argument_checks(device):
    x = torch.randn(2, 3, 5, device=device)
    y, mask = ops.relu_forward_with_mask(x)
    g = torch.randn_like(y)
    with pytest.raises(RuntimeError, match=r"relu_backward_with_mask: expected mask to have dtype int32 .*but got Long"):
        ops.relu_backward_with_mask(g, y, mask.long())
    with pytest.raises(RuntimeError, match=r"expected mask to be a contiguous 1-D tensor of 1 words .*but got shape \[2\]"):
        ops.relu_backward_with_mask(g, y, torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match=r"relu_backward_with_mask: expected grad_output to have the shape of output \[2, 3, 5\], but got \[3, 2, 5\]"):
        ops.relu_backward_with_mask(g.view(3, 2, 5), y, mask)
    with pytest.raises(RuntimeError, match=r"relu_backward_with_mask: expected grad_output to have the dtype of output \(Float\), but got Double"):
        ops.relu_backward_with_mask(g.double(), y, mask)
    gapped = torch.randn(2, 3, 10, device=device)[..., ::2]
    with pytest.raises(RuntimeError, match=r"expected output to be the output of relu_forward_with_mask, which is dense"):
        ops.relu_backward_with_mask(torch.randn(2, 3, 5, device=device), gapped, mask)
    with pytest.raises(RuntimeError, match=r"relu_forward_with_mask: expected input to have dtype float32, float64, float16 or bfloat16, but got Long"):
        ops.relu_forward_with_mask(torch.arange(6, device=device))


def test_not_a_tensor_is_refused():
    with pytest.raises(TypeError, match="must be Tensor, not list"):
        ours.relu([1.0, -1.0])


# ---------------------------------------------------------------------------------- opcheck and compile
def _samples(device):
    yield torch.randn(2, 3, 4, 5, device=device)
    yield torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    yield torch.randn(2, 3, 4, 5, device=device, dtype=torch.float64).transpose(1, 3)
    yield torch.randn(0, 3, 4, 5, device=device)


def test_opcheck(device):
    for x in _samples(device):
        torch.library.opcheck(ops.relu_forward.default, (x,))
        torch.library.opcheck(ops.relu_forward_.default, (x.clone(),))
        y = ops.relu_forward(x)
        torch.library.opcheck(ops.relu_backward.default, (torch.randn_like(y), y))
        # With inputs that require grad, opcheck also checks the C++ autograd registration.
        xg = x.clone().requires_grad_()
        torch.library.opcheck(ops.relu_forward.default, (xg,))
        yg = ops.relu_forward(xg)
        torch.library.opcheck(ops.relu_backward.default, (torch.randn_like(y).requires_grad_(), yg))
        # The masked pair, which autograd runs.
        torch.library.opcheck(ops.relu_forward_with_mask.default, (x,))
        torch.library.opcheck(ops.relu_forward_with_mask.default, (xg,))
        y, mask = ops.relu_forward_with_mask(x)
        torch.library.opcheck(ops.relu_backward_with_mask.default, (torch.randn_like(y), y, mask))
        yg, mask = ops.relu_forward_with_mask(xg)
        torch.library.opcheck(ops.relu_backward_with_mask.default, (torch.randn_like(y).requires_grad_(), yg, mask))


def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch_cs231n.ReLU(), torch.nn.Linear(16, 16), torch_cs231n.ReLU(inplace=True),
        torch.nn.Linear(16, 4),
    ).to(device)
    assert_compiled_matches_eager(model, torch.randn(5, 8, device=device))


def test_tensors_larger_than_the_cache(device):
    """Outputs beyond the last-level cache (32 MiB on CI's machine) take the streaming-store path on the
    CPU; its unaligned head (a view starting one element in) and its tail must be right too."""
    n = 10 * 1024 * 1024 + 3  # 40 MiB of float32
    storage = torch.randn(n + 1, device=device)
    x = storage[1:]  # data pointer 4 bytes past an aligned address
    torch.testing.assert_close(ours.relu(x), F.relu(x), rtol=0, atol=0)
    y = F.relu(x)
    g = torch.randn_like(x)
    torch.testing.assert_close(ops.relu_backward(g, y), torch.where(y > 0, g, 0), rtol=0, atol=0)
    # Under autograd: the masked forward and backward, streamed word by word.
    xg = x.detach().requires_grad_()
    yg = ours.relu(xg)
    torch.testing.assert_close(yg, y, rtol=0, atol=0)
    (dx,) = torch.autograd.grad(yg, xg, g)
    torch.testing.assert_close(dx, torch.where(y > 0, g, 0), rtol=0, atol=0)
    expected = F.relu(x)
    ours.relu(x, inplace=True)  # streams into the unaligned view itself
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
