"""MaxPool2d: our kernels against torch.nn.functional.max_pool2d: values, indices and gradients, in every
layout, with ties, NaN, padding, dilation and ceil_mode; the module; opcheck and torch.compile; bad input."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import torch_cs231n
from torch_cs231n import functional as ours

from helpers import LAYOUTS, assert_compiled_matches_eager, assert_same_layout, dtypes_for, forced_isa, with_layout

ops = torch.ops.torch_cs231n
NAN, INF = float("nan"), float("inf")


def distinct(shape, device, dtype=torch.float64, seed=0):
    """Values without ties, at least 1/numel apart: finite differences cannot move a window's argmax."""
    gen = torch.Generator().manual_seed(seed)
    n = max(1, torch.Size(shape).numel())
    return (torch.randperm(n, generator=gen).to(dtype) / n - 0.5).reshape(shape).to(device)


def has_empty_window(size, k, s, p, d, ceil_mode):
    """Does some window along one dimension step over the whole input, all its taps in the padding?"""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return any(all(not 0 <= o * s - p + t * d < size for t in range(k)) for o in range(out))


def both(x, *args, **kwargs):
    """(output, indices) from ours and from torch."""
    return (ours.max_pool2d(x, *args, return_indices=True, **kwargs),
            F.max_pool2d(x, *args, return_indices=True, **kwargs))


def grads(x, grad_output, *args, **kwargs):
    """d(sum(y * grad_output))/dx from ours and from torch, through torch.autograd.grad (not .grad, which
    autograd re-lays out to match the input)."""
    out = []
    for fn in (ours.max_pool2d, F.max_pool2d):
        xi = x.detach().requires_grad_()
        out.append(torch.autograd.grad(fn(xi, *args, **kwargs), xi, grad_output)[0])
    return out


# ------------------------------------------------------------------------------------ gradients, float64
@pytest.mark.parametrize("args", [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),                        # overlapping windows
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), ceil_mode=True),
])
def test_gradcheck(device, args):
    x = distinct((2, 3, 7, 6), device).requires_grad_()
    assert gradcheck(lambda t: ours.max_pool2d(t, **args), (x,))
    x_cl = distinct((2, 3, 7, 6), device).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert gradcheck(lambda t: ours.max_pool2d(t, **args), (x_cl,))


def test_gradgradcheck(device):
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = distinct((2, 2, 6, 5), device).contiguous(memory_format=memory_format).requires_grad_()
        assert gradgradcheck(lambda t: ours.max_pool2d(t, 3, 2, 1), (x,))


def test_double_backward_matches_torch(device):
    x = distinct((2, 3, 7, 7), device)
    g0 = torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64)
    results = []
    for fn in (ours.max_pool2d, F.max_pool2d):
        xi, g = x.clone().requires_grad_(), g0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xi, 3, 2), xi, g, create_graph=True)
        results.append(torch.autograd.grad((gx * gx).sum(), g))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ against torch
@st.composite
def pool_problems(draw):
    """A max-pool problem that torch accepts: kernel, stride, dilation, padding <= half the kernel (torch's
    binding check), ceil_mode, and an input at least as large as the padded window."""
    k = [draw(st.integers(1, 4)) for _ in range(2)]
    s = [draw(st.integers(1, 4)) for _ in range(2)]
    d = [draw(st.integers(1, 3)) for _ in range(2)]
    p = [draw(st.integers(0, k[i] // 2)) for i in range(2)]
    hw = [draw(st.integers(max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]), d[i] * (k[i] - 1) + 8)) for i in range(2)]
    return dict(kernel_size=tuple(k), stride=tuple(s), padding=tuple(p), dilation=tuple(d),
                ceil_mode=draw(st.booleans())), hw


@given(
    problem=pool_problems(), n=st.integers(0, 2), c=st.integers(1, 4), unbatched=st.booleans(),
    layout=st.sampled_from(LAYOUTS), dtype_index=st.integers(0, 3), ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_torch(device, problem, n, c, unbatched, layout, dtype_index, ties, seed):
    args, (h, w) = problem
    dtypes = dtypes_for(device)
    dtype = dtypes[dtype_index % len(dtypes)]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(max(n, 1) if unbatched else n, c, h, w, generator=gen)
    if ties:  # few distinct values: many windows hold their maximum more than once
        base = base.mul(2).round()
    x = with_layout(base, layout).to(device=device, dtype=dtype)
    if unbatched:
        x = x[0]
    if any(has_empty_window(size, *(args[a][j] for a in ("kernel_size", "stride", "padding", "dilation")),
                            args["ceil_mode"]) for j, size in enumerate((h, w))):
        # torch returns -inf and an index outside the plane there; we refuse the geometry.
        with pytest.raises(RuntimeError, match="expected every pooling window to hold at least one input"):
            ours.max_pool2d(x, **args)
        return
    (y, i), (y_ref, i_ref) = both(x, **args)
    # Max-pool only copies values: output and indices must be identical, and laid out as torch's.
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert torch.equal(i, i_ref)
    assert i.dtype == torch.int64
    assert_same_layout(y, y_ref)
    assert_same_layout(i, i_ref)

    grad_output = torch.randn(y_ref.shape, generator=gen).to(device=device, dtype=dtype)
    g, g_ref = grads(x, grad_output, **args)
    assert_same_layout(g, g_ref)
    if dtype in (torch.float16, torch.bfloat16):
        # Overlapping windows sum up to kh*kw gradients into one input. Ours adds them in float32 and rounds
        # once: the float64 sum rounded, to 1 ulp (plus float32's error on a cancelling sum). torch's adds
        # in the narrow dtype, rounding at every add: up to kh*kw - 1 ulps from it.
        eps, terms = torch.finfo(dtype).eps, args["kernel_size"][0] * args["kernel_size"][1]
        xd = x.detach().double().requires_grad_()
        g64 = torch.autograd.grad(F.max_pool2d(xd, **args), xd, grad_output.double())[0]
        torch.testing.assert_close(g.double(), g64, rtol=eps, atol=terms * 2**-24 * 4)
        torch.testing.assert_close(g, g_ref, rtol=terms * eps, atol=terms * eps)
        return
    # Overlapping windows sum several gradients into one input; on the CPU we sum in torch's order.
    exact = device == "cpu"
    torch.testing.assert_close(g, g_ref, **({"rtol": 0, "atol": 0} if exact else {}))


# ------------------------------------------------------------------------------------ ties, NaN, -inf
def test_the_backward_node_is_the_cpp_one(device):
    """Eager autograd records max_pool2d_forward's C++ node (csrc/autograd/max_pool2d_autograd.cpp), not a
    Python Function; the indices are not differentiable; with create_graph=True the backward records the
    differentiable max_pool2d_backward; no graph without grad. Values: the gradchecks above."""
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    y, indices = ours.max_pool2d(x, 2, return_indices=True)
    assert "MaxPool2dFn" in y.grad_fn.name()
    assert not isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)
    assert not indices.requires_grad
    (gx,) = torch.autograd.grad(ours.max_pool2d(x, 2).square().sum(), x, create_graph=True)
    assert gx.grad_fn is not None
    with torch.no_grad():
        assert ours.max_pool2d(x, 2).grad_fn is None
    assert ours.max_pool2d(x.detach(), 2).grad_fn is None


def test_ties_go_to_first_maximum_in_scan_order(device):
    x = torch.tensor([[[[1.0, 5.0, 5.0],
                        [5.0, 2.0, 5.0],
                        [0.0, 5.0, 1.0]]]], device=device)
    (y, i), (y_ref, i_ref) = both(x, 2, 1)
    assert torch.equal(i, i_ref)
    # windows at (0,0): 5 first at (0,1) = 1; (0,1): (0,1) = 1; (1,0): (1,0) = 3; (1,1): (1,2) = 5
    assert i.flatten().tolist() == [1, 1, 3, 5]
    x_cl = x.expand(1, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    (_, i_cl), _ = both(x_cl, 2, 1)
    assert i_cl[0, 2].flatten().tolist() == [1, 1, 3, 5]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_nan_propagates_like_torch(device, memory_format):
    x = torch.tensor([[1.0, NAN, 3.0, -INF],
                      [NAN, 2.0, INF, 0.0],
                      [-INF, -INF, 1.0, NAN],
                      [-INF, -INF, 2.0, 2.0]], device=device)
    x = x.expand(2, 2, 4, 4).contiguous(memory_format=memory_format)
    # torch's CUDA channels_last kernel starts each window's argmax at 0, so its all -inf window (rows 2-3,
    # columns 0-1 with kernel 2) reports index 0, which is not in the window, and would send that
    # window's gradient there. Ours keeps the window's first tap, as torch's CPU kernels and its NCHW CUDA
    # kernel do (docs/max_pool2d.md): there, the reference is torch on the CPU.
    reference_device = "cpu" if device == "cuda" and memory_format == torch.channels_last else device
    for args in [dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1)]:
        (y, i), _ = both(x, **args)
        (y_ref, i_ref) = F.max_pool2d(x.to(reference_device), return_indices=True, **args)
        torch.testing.assert_close(y.cpu(), y_ref.cpu(), equal_nan=True, rtol=0, atol=0)
        assert torch.equal(i.cpu(), i_ref.cpu())
        assert torch.isnan(y[0, 0, 0, 0])  # the NaN wins over 1 and 2
        g = torch.ones_like(y)
        g_ours, _ = grads(x, g, **args)
        _, g_ref = grads(x.to(reference_device), g.to(reference_device), **args)
        torch.testing.assert_close(g_ours.cpu(), g_ref.cpu(), rtol=0, atol=0)


def test_all_minus_inf_window_takes_first_existing_tap(device):
    # Padding is -inf too and must never win: the index is that of the first real element.
    x = torch.full((1, 1, 3, 3), -INF, device=device)
    (y, i), (y_ref, i_ref) = both(x, 2, 2, 1)
    assert torch.equal(i, i_ref)
    assert i.flatten().tolist() == [0, 1, 3, 4]
    assert torch.equal(y, y_ref)


# ------------------------------------------------------------------------------------ overlapping windows
def test_overlapping_windows_sum_their_gradients(device):
    # One large value at (2, 2) is the maximum of all four 3x3 stride-2 windows of a 5x5 input.
    x = torch.zeros(1, 1, 5, 5, device=device, dtype=torch.float64)
    x[0, 0, 2, 2] = 10.0
    x = x - torch.arange(25, device=device, dtype=torch.float64).view(1, 1, 5, 5) * 1e-3  # no ties
    x[0, 0, 2, 2] = 10.0
    (y, i), _ = both(x, 3, 2)
    assert i.flatten().tolist() == [12, 12, 12, 12]
    dy = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]], device=device, dtype=torch.float64)
    g, g_ref = grads(x, dy, 3, 2)
    expected = torch.zeros_like(x)
    expected[0, 0, 2, 2] = 15.0
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("shape,args", [
    ((4, 8, 56, 56), dict(kernel_size=3, stride=2, padding=1)),  # the ResNet stem pool, overlapping
    ((3, 5, 17, 33), dict(kernel_size=2, stride=2)),
    ((2, 4, 20, 21), dict(kernel_size=(2, 3), stride=(3, 1), dilation=(1, 2), ceil_mode=True)),
])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_larger_shapes_match_torch(device, shape, args, memory_format):
    # Larger than hypothesis draws, so that the loops run in parallel and vectorised.
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    (y, i), (y_ref, i_ref) = both(x, **args)
    assert torch.equal(y, y_ref) and torch.equal(i, i_ref)
    assert_same_layout(y, y_ref)
    g, g_ref = grads(x, torch.randn_like(y_ref), **args)
    torch.testing.assert_close(g, g_ref, **({"rtol": 0, "atol": 0} if device == "cpu" else {}))
    assert_same_layout(g, g_ref)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_channels_last_paths_equal_torch(isa):
    """The channels_last forward holds each pixel's maxima and indices in vector registers: channels in blocks
    of 64 or 32, then 16 or 8, then a masked or scalar tail. Every channel count below reaches a different mix
    of them; with ties, NaN and -inf windows, values and indices equal torch's bit for bit in each ISA. float16
    and bfloat16 run the float32 loops: their maxima are torch's, and their gradients the float32 sums
    rounded once. The backward's batch of 1 splits its channels between the threads."""
    gen = torch.Generator().manual_seed(3)
    with forced_isa(isa):
        for c, n, dtype in itertools.product((1, 7, 8, 16, 17, 33, 64, 71, 100), (1, 2),
                                             (torch.float32, torch.bfloat16, torch.float16)):
            base = torch.randn(n, c, 9, 10, generator=gen).mul(2).round()  # few values: many ties
            base[0, ::2, 1, 1] = NAN
            base[-1, 1::3, 4:8, 5:9] = -INF  # 2x2 windows of -inf only
            x = base.to(dtype).contiguous(memory_format=torch.channels_last)
            for args in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2)):
                (y, i), (y_ref, i_ref) = both(x, **args)
                torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
                assert torch.equal(i, i_ref), (c, n, dtype, args)
                assert_same_layout(y, y_ref)
                dy = torch.randn(y.shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
                xf = x.float().requires_grad_()
                g_f32 = torch.autograd.grad(F.max_pool2d(xf, **args), xf, dy.float())[0]
                g = torch.autograd.grad(ours.max_pool2d(x.requires_grad_(), **args), x, dy)[0]
                assert torch.equal(g, g_f32.to(dtype)), (c, n, dtype, args)
                assert_same_layout(g, g_f32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flat backward kernels are CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cuda_flat_backward_equals_the_line_kernel(monkeypatch, dtype, memory_format):
    """TORCH_CS231N_CUDA_POOL_BACKWARD=flat (the default) gives the very bits of the line kernel (=lines, the
    default before): the scatter for disjoint windows, the gather for overlapping ones, with the forward's
    indices and with arbitrary ones (rule (3): an index outside its window's span counts for nothing)."""
    gen = torch.Generator().manual_seed(9)
    for shape, args in [((4, 8, 56, 56), dict(kernel_size=3, stride=2, padding=1)),
                        ((3, 5, 17, 33), dict(kernel_size=2, stride=2)),
                        ((2, 3, 19, 21), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
                        ((2, 4, 20, 21), dict(kernel_size=(2, 3), stride=(3, 1), dilation=(1, 2), ceil_mode=True))]:
        x = torch.randn(shape, generator=gen).to("cuda", dtype).contiguous(memory_format=memory_format)
        y, indices = ours.max_pool2d(x, return_indices=True, **args)
        dy = torch.randn(y.shape, generator=gen).to("cuda", dtype).contiguous(memory_format=memory_format)
        arbitrary = torch.randint(-2, shape[2] * shape[3] + 2, y.shape, generator=gen).to("cuda")
        pairs = [args["kernel_size"], args["stride"], args.get("padding", 0), args.get("dilation", 1)]
        pool = [list(v) if isinstance(v, tuple) else [v, v] for v in pairs] + [args.get("ceil_mode", False)]
        for ind in (indices, arbitrary.contiguous(memory_format=memory_format)):
            monkeypatch.setenv("TORCH_CS231N_CUDA_POOL_BACKWARD", "lines")
            lines = torch.ops.torch_cs231n.max_pool2d_backward(dy, x, ind, *pool)
            monkeypatch.setenv("TORCH_CS231N_CUDA_POOL_BACKWARD", "flat")
            flat = torch.ops.torch_cs231n.max_pool2d_backward(dy, x, ind, *pool)
            assert torch.equal(flat, lines), (shape, args, dtype, memory_format)
            assert_same_layout(flat, lines)
    monkeypatch.setenv("TORCH_CS231N_CUDA_POOL_BACKWARD", "fastest")
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_POOL_BACKWARD: expected 'flat' or 'lines' .*, but got"):
        torch.ops.torch_cs231n.max_pool2d_backward(dy, x, indices, *pool)


# ------------------------------------------------------------------------------------ the CS231n case
def naive_max_pool(x, hp, wp, s, dout):
    """The note's forward, and its backward corrected: dx[n,c,p_m,q_m] += dout[n,c,k,l] at the argmax
    (p_m, q_m) of window (k, l) (not dout at the input's index, not a slice of dout)."""
    n_, c_, h, w = x.shape
    h1, w1 = (h - hp) // s + 1, (w - wp) // s + 1
    out = torch.zeros(n_, c_, h1, w1, dtype=x.dtype)
    dx = torch.zeros_like(x)
    for n, c, i, j in itertools.product(range(n_), range(c_), range(h1), range(w1)):
        window = x[n, c, i * s:i * s + hp, j * s:j * s + wp]
        out[n, c, i, j] = window.max()
        pm, qm = divmod(int(window.argmax()), wp)
        dx[n, c, i * s + pm, j * s + qm] += dout[n, c, i, j]
    return out, dx


def test_cs231n_case(device):
    x = distinct((2, 3, 4, 4), "cpu")
    dout = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    out_ref, dx_ref = naive_max_pool(x, 2, 2, 2, dout)
    xd = x.to(device).requires_grad_()
    out = ours.max_pool2d(xd, 2, 2)
    (dx,) = torch.autograd.grad(out, xd, dout.to(device))
    torch.testing.assert_close(out.cpu(), out_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx.cpu(), dx_ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ shapes and defaults
def test_empty_batch_and_unbatched(device):
    x = torch.randn(0, 3, 6, 6, device=device, requires_grad=True)
    y, i = ours.max_pool2d(x, 2, return_indices=True)
    assert y.shape == (0, 3, 3, 3) and i.shape == (0, 3, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    x3 = torch.randn(3, 7, 5, device=device)
    (y, i), (y_ref, i_ref) = both(x3, (3, 2), (2, 1), (1, 0))
    assert torch.equal(y, y_ref) and torch.equal(i, i_ref)


def test_stride_defaults_to_kernel_size(device):
    x = torch.randn(2, 3, 9, 8, device=device)
    for stride in (None, [], ()):
        assert torch.equal(ours.max_pool2d(x, (3, 2), stride), F.max_pool2d(x, (3, 2)))
    assert not torch.equal(ours.max_pool2d(x, 2, 1), ours.max_pool2d(x, 2))


def test_ceil_mode_last_window_must_start_inside(device):
    # H=5, k=2, s=2, p=1: floor gives 3, ceil would give 4, but the 4th window would start at
    # 3*2-1 = 5 = H, in the right padding only: torch's rule drops it, so the output is 3.
    x = torch.randn(1, 1, 5, 5, device=device)
    y = ours.max_pool2d(x, 2, 2, 1, ceil_mode=True)
    assert y.shape[-2:] == (3, 3)
    assert torch.equal(y, F.max_pool2d(x, 2, 2, 1, ceil_mode=True))
    # H=6, k=3, s=2, p=0: floor 2, ceil 3 (the last window starts at 4 < 6 and is cut short).
    x = torch.randn(1, 1, 6, 6, device=device)
    assert ours.max_pool2d(x, 3, 2, ceil_mode=True).shape[-2:] == (3, 3)
    assert ours.max_pool2d(x, 3, 2).shape[-2:] == (2, 2)


# ------------------------------------------------------------------------------------ module
def test_module_matches_torch(device):
    x = torch.randn(2, 3, 9, 9, device=device)
    for kwargs in [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                   dict(kernel_size=(2, 3), stride=1, dilation=2, return_indices=True)]:
        mod, ref = torch_cs231n.MaxPool2d(**kwargs), torch.nn.MaxPool2d(**kwargs)
        assert isinstance(mod, torch.nn.MaxPool2d) and repr(mod) == repr(ref)
        assert mod.state_dict() == ref.state_dict() == {}
        mod.load_state_dict(ref.state_dict())
        out, out_ref = mod(x), ref(x)
        if kwargs.get("return_indices"):
            assert torch.equal(out[0], out_ref[0]) and torch.equal(out[1], out_ref[1])
        else:
            assert torch.equal(out, out_ref)


def test_indices_work_with_max_unpool(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    pool = torch_cs231n.MaxPool2d(2, return_indices=True)
    unpool = torch.nn.MaxUnpool2d(2)
    y, i = pool(x)
    y_ref, i_ref = torch.nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(unpool(y, i), unpool(y_ref, i_ref))
    # Unpooling puts each maximum back where it came from.
    restored = unpool(y, i)
    assert torch.equal(restored[restored != 0], x[restored != 0])


# ------------------------------------------------------------------------------------ bad input
BAD = [
    (dict(kernel_size=0), r"max_pool2d_forward: expected kernel_size to be positive, but got kernel_size=\[0, 0\]"),
    (dict(kernel_size=2, stride=(1, 0)), r"expected stride to be positive, but got stride=\[1, 0\]"),
    (dict(kernel_size=2, dilation=(0, 1)), r"expected dilation to be positive, but got dilation=\[0, 1\]"),
    (dict(kernel_size=2, padding=-1), r"expected padding to be non-negative, but got padding=\[-1, -1\]"),
    (dict(kernel_size=2, padding=(0, 2)),
     r"expected padding to be at most half the kernel size, but got padding=\[0, 2\] with kernel_size=\[2, 2\]"),
    # within half the dilated extent (5 // 2 = 2) but not half the kernel (3 // 2 = 1): torch refuses it
    (dict(kernel_size=3, dilation=2, padding=2), r"expected padding to be at most half the kernel size"),
    (dict(kernel_size=7), r"output size is too small: input of height 4 and width 4 .* gives an output of 0x0"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_arguments(device, args, message):
    x = torch.randn(1, 1, 4, 4, device=device)
    with pytest.raises(RuntimeError, match=message):
        ours.max_pool2d(x, **args)
    with pytest.raises(RuntimeError):  # torch refuses them too
        F.max_pool2d(x, **args)


def test_window_entirely_in_padding_is_refused(device):
    # kernel 2, dilation 3, padding 1 on a width of 2: the only window's taps are at -1 and 2.
    x = torch.randn(1, 1, 2, 2, device=device)
    with pytest.raises(RuntimeError, match=r"expected every pooling window to hold at least one input element, "
                                           r"but window 0 along the width falls entirely in the padding"):
        ours.max_pool2d(x, (1, 2), 1, (0, 1), (1, 3))
    assert has_empty_window(2, 2, 1, 1, 3, False) and not has_empty_window(3, 2, 1, 1, 3, False)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_integer_dtypes_equal_torch_bit_for_bit(device, dtype, memory_format):
    """Values and indices equal torch's for every integer dtype, the dtype's extremes included (the scan
    starts below them: integers have no -inf); an all-minimum window keeps its first tap's index. torch's
    CUDA max-pool has no integer kernels (seen on an H200), so on CUDA the reference is torch on the CPU."""
    info = torch.iinfo(dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(info.min, info.max, (2, 3, 9, 10), generator=gen, dtype=torch.int64).to(dtype)
    x[0, 0] = info.min
    x[1, 1, :3, :3] = info.max
    x = x.to(device).contiguous(memory_format=memory_format)
    for args in [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                 dict(kernel_size=3, stride=1, padding=1, dilation=2, ceil_mode=True)]:
        y, i = ours.max_pool2d(x, return_indices=True, **args)
        y_ref, i_ref = F.max_pool2d(x.cpu(), return_indices=True, **args)
        assert y.dtype == dtype and torch.equal(y.cpu(), y_ref), args
        assert torch.equal(i.cpu(), i_ref), args
        assert_same_layout(y, y_ref)


def test_bad_input_tensors(device):
    with pytest.raises(RuntimeError, match=r"expected input to be 3-D \(C, H, W\) or 4-D \(N, C, H, W\), but got a "
                                           r"2-D tensor of shape \[4, 4\]"):
        ours.max_pool2d(torch.randn(4, 4, device=device), 2)
    with pytest.raises(RuntimeError, match=r"but got a 5-D tensor"):
        ours.max_pool2d(torch.randn(1, 1, 1, 4, 4, device=device), 2)
    with pytest.raises(RuntimeError, match=r"non-zero channels, height and width .* got shape \[1, 0, 4, 4\]"):
        ours.max_pool2d(torch.randn(1, 0, 4, 4, device=device), 2)
    with pytest.raises(TypeError, match="must be Tensor, not list"):
        ours.max_pool2d([[1.0]], 2)
    with pytest.raises(RuntimeError, match=r"kernel_size must be an int or a pair of ints, but got \(2, 2, 2\)"):
        ours.max_pool2d(torch.randn(1, 1, 4, 4, device=device), (2, 2, 2))
    with pytest.raises(RuntimeError, match=r"expected kernel_size to have 2 values \(height, width\), but got 3"):
        ops.max_pool2d_forward(torch.randn(1, 1, 4, 4, device=device), [2, 2, 2], [2, 2], [0, 0], [1, 1], False)


@pytest.mark.parametrize("dtype,name", [(torch.bool, "Bool"), (torch.complex64, "ComplexFloat"),
                                        (torch.uint16, "UInt16")])
def test_dtypes_torch_refuses_are_refused(device, dtype, name):
    with pytest.raises(RuntimeError, match=rf"max_pool2d_forward: expected input to have an integer dtype \(uint8, "
                                           rf"int8, int16, int32, int64\) or dtype float32, float64, float16 or "
                                           rf"bfloat16, but got {name}"):
        ours.max_pool2d(torch.ones(1, 1, 4, 4, dtype=dtype).to(device), 2)


def test_backward_argument_checks(device):
    x = torch.randn(1, 2, 4, 4, device=device)
    y, i = ops.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    geometry = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"max_pool2d_backward: expected grad_output to have the output's shape "
                                           r"\[1, 2, 2, 2\], but got \[1, 2, 2, 3\]"):
        ops.max_pool2d_backward(torch.randn(1, 2, 2, 3, device=device), x, i, *geometry)
    with pytest.raises(RuntimeError, match=r"expected indices to have the output's shape"):
        ops.max_pool2d_backward(y, x, i[..., :1], *geometry)
    with pytest.raises(RuntimeError, match=r"expected indices to have dtype int64, but got Int"):
        ops.max_pool2d_backward(y, x, i.int(), *geometry)
    with pytest.raises(RuntimeError, match=r"expected grad_output to have the dtype of input \(Float\), but got Double"):
        ops.max_pool2d_backward(y.double(), x, i, *geometry)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("made_up", [1000, 16, -1])
def test_made_up_indices_never_write_outside(device, memory_format, dtype, made_up):
    x = torch.randn(1, 2, 4, 4, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    y, i = ops.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    bad = i.clone()
    bad[0, 1, 1, 0] = made_up
    if device == "cpu":  # the CPU scatters, in both layouts: it refuses an index outside the plane
        with pytest.raises(RuntimeError, match=r"expected indices in \[0, H\*W\) = \[0, 16\)"):
            ops.max_pool2d_backward(y, x, bad, [2, 2], [2, 2], [0, 0], [1, 1], False)
    else:  # the GPU gathers: an index that names no input in the window is simply never matched
        g = ops.max_pool2d_backward(y, x, bad, [2, 2], [2, 2], [0, 0], [1, 1], False)
        assert g[0, 1].abs().sum() <= y[0, 1].abs().sum()


# ------------------------------------------------------------------------------------ opcheck and compile
def _samples(device):
    geometry = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    yield torch.randn(2, 3, 7, 6, device=device), geometry
    yield torch.randn(2, 3, 7, 6, device=device).contiguous(memory_format=torch.channels_last), geometry
    yield torch.randn(2, 3, 7, 6, device=device, dtype=torch.float64).transpose(2, 3), geometry
    yield torch.randn(3, 7, 6, device=device), ([2, 3], [1, 2], [1, 0], [2, 1], True)
    yield torch.randn(0, 3, 7, 6, device=device), geometry
    yield torch.randn(2, 3, 4, 4, device=device).contiguous(memory_format=torch.channels_last), \
        ([4, 4], [4, 4], [0, 0], [1, 1], False)  # a 1x1 output, where layouts are ambiguous


def test_opcheck(device):
    for x, geometry in _samples(device):
        torch.library.opcheck(ops.max_pool2d_forward.default, (x, *geometry))
        y, i = ops.max_pool2d_forward(x, *geometry)
        torch.library.opcheck(ops.max_pool2d_backward.default, (torch.randn_like(y), x, i, *geometry))


def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch_cs231n.ReLU(), torch_cs231n.MaxPool2d(3, 2, 1),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch_cs231n.MaxPool2d(2, ceil_mode=True), torch.nn.Flatten(),
        torch.nn.Linear(8 * 3 * 3, 4),
    ).to(device)
    assert_compiled_matches_eager(model, torch.randn(2, 3, 11, 11, device=device))
