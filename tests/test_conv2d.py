"""Conv2d: our kernels against torch.nn.functional.conv2d, forward and every gradient, in every layout."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import torch_cs231n
from torch_cs231n import functional as ours

from helpers import LAYOUTS, assert_compiled_matches_eager, assert_same_layout, dtypes_for, forced_isa, with_layout

ops = torch.ops.torch_cs231n


def tolerances(dtype):
    """float64: tight. float32: sums of up to a few hundred products in another order than torch's.
    float16/bfloat16: both sides sum in float32 and round once (one ulp: 2^-10, 2^-7 of the value), but
    torch's reference for the narrow dtypes rounds more often on some paths (its float16 CPU
    convolution accumulates blocks in float16), so a few ulps are allowed; against float64, the
    bfloat16 route is held to one rounding (test_gemm.py)."""
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    }[dtype]


def run_both(x, w, b, grad, **kwargs):
    """Output and (d_x, d_W, d_b) from ours and from torch, for the same leaves. In float16 and bfloat16,
    torch's values are those of its float64 convolution of the same inputs, rounded to the dtype, in the
    layout of its own convolution in that dtype: on an Intel CPU with AMX, torch's own bfloat16 convolution
    (oneDNN's AMX kernel) returned an output 6.8 away from the exact one for a one-channel dilated strided
    layer (n=3, c=f=1, 3x3 image, 3x2 kernel, stride (1, 2), padding (2, 0), dilation (1, 2):
    test_matches_torch found it), while ours was within a rounding. The exact result, rounded, is what
    either side should be near; the layout must still be torch's in the dtype (float64 on CUDA comes back
    NCHW, float16 channels_last: the H200 run found it)."""

    def run(fn, dtype):
        leaves = [None if t is None else t.detach().to(dtype).clone().requires_grad_() for t in (x, w, b)]
        y = fn(leaves[0], leaves[1], leaves[2], **kwargs)
        y.backward(grad.to(dtype))
        return (y, *[t.grad if t is not None else None for t in leaves])

    mine, ref = run(ours.conv2d, x.dtype), run(F.conv2d, x.dtype)
    if x.dtype in (torch.float16, torch.bfloat16):
        exact = run(F.conv2d, torch.float64)
        ref = tuple(None if r is None else torch.empty_like(r).copy_(e) for r, e in zip(ref, exact))
    return [mine, ref]


def assert_all_close(a, b, dtype):
    for u, v in zip(a, b):
        if v is None:
            assert u is None
        else:
            torch.testing.assert_close(u, v, **tolerances(dtype))


def assert_same_memory_format(mine, ref):
    """Output, d_x and d_W in torch's layout: channels_last when the input (or weight) is."""
    for u, v in zip(mine[:3], ref[:3]):
        assert_same_layout(u, v)


# ------------------------------------------------------------------------------------------- gradcheck
GRID = [
    # (x shape, w shape, stride, padding, dilation, groups)
    ((1, 1, 5, 5), (1, 1, 3, 3), 2, 0, 1, 1),  # the note's example: 5x5 input, 3x3 filter, stride 2, pad 0
    ((2, 3, 4, 4), (3, 3, 4, 4), 2, 1, 1, 1),  # CS231n's conv_forward_naive check
    ((2, 4, 6, 5), (6, 2, 3, 2), 1, 1, 1, 2),  # groups, non-square kernel and input
    ((1, 2, 7, 6), (3, 2, 3, 3), (2, 1), (0, 2), (2, 1), 1),  # mixed stride, padding, dilation
    ((2, 3, 5, 5), (6, 1, 3, 3), 1, 1, 1, 3),  # depthwise with 2 filters per channel
    ((2, 3, 7, 7), (3, 1, 3, 2), 2, (1, 2), 2, 3),  # depthwise, strided and dilated
    ((2, 4, 3, 5), (5, 4, 1, 1), 1, 0, 1, 1),  # pointwise fast path
    ((2, 4, 5, 5), (4, 2, 1, 1), 2, 1, 1, 2),  # 1x1 but strided and padded: the im2col path
    ((1, 2, 3, 3), (2, 2, 3, 3), 3, 2, 2, 1),  # stride larger than the kernel's step
    # whole groups in the lanes of a vector of 8 doubles (conv2d_grouped.h): 4 groups of 2 (a broadcast of
    # 4 lanes), strided (d_x by phases); 4 groups of 4 over two vectors (a broadcast of 2 lanes)
    ((2, 8, 5, 6), (8, 2, 3, 3), 2, 1, 1, 4),
    ((2, 16, 5, 5), (16, 4, 3, 3), 1, 1, 1, 4),
]


def float64_leaves(device, seed, xs, ws):
    """Input, weight and bias of the given shapes, float64, requiring grad, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
                 for shape in (xs, ws, ws[0]))


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", GRID)
def test_gradcheck(device, xs, ws, stride, padding, dilation, groups):
    x, w, b = float64_leaves(device, 0, xs, ws)
    fn = lambda x, w, b: ours.conv2d(x, w, b, stride, padding, dilation, groups)  # noqa: E731
    assert gradcheck(fn, (x, w, b))
    # and the values against torch, tight
    expected = F.conv2d(x, w, b, stride, padding, dilation, groups)
    torch.testing.assert_close(fn(x, w, b), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", [GRID[1], GRID[2], GRID[4], GRID[6]])
def test_gradgradcheck(device, xs, ws, stride, padding, dilation, groups):
    x, w, b = float64_leaves(device, 1, xs, ws)
    fn = lambda x, w, b: ours.conv2d(x, w, b, stride, padding, dilation, groups)  # noqa: E731
    assert gradgradcheck(fn, (x, w, b))


def test_double_backward_matches_torch(device):
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64).to(device)
    w0 = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64).to(device)
    results = []
    for fn in (ours.conv2d, F.conv2d):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w, None, 1, 1, 1, 2)
        gx, gw = torch.autograd.grad((y * y).sum(), (x, w), create_graph=True)
        results.append(torch.autograd.grad((gx.sin().sum() + (gw * gw).sum()), (x, w)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_backward_node_is_the_cpp_one(device):
    """Eager autograd records conv2d_forward's C++ node (csrc/autograd/conv2d_autograd.cpp), not a Python
    Function; its backward, with create_graph=True, records the differentiable conv2d_backward; no graph
    without grad. Values: the gradcheck and torch comparisons above."""
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    node = ours.conv2d(x, w, padding=1).grad_fn
    assert "Conv2dFn" in node.name()
    assert not isinstance(node, torch.autograd.function.BackwardCFunction)
    gx, gw = torch.autograd.grad(ours.conv2d(x, w, padding=1).square().sum(), (x, w), create_graph=True)
    assert gx.grad_fn is not None and gw.grad_fn is not None
    with torch.no_grad():
        assert ours.conv2d(x, w).grad_fn is None
    assert ours.conv2d(x.detach(), w.detach()).grad_fn is None


def test_note_example_by_hand():
    """The note's 5x5/3x3/stride 2 example: y[k, l] = Σ_{p,q} x[p + 2k, q + 2l] w[p, q] + b."""
    x = torch.arange(25, dtype=torch.float64).view(1, 1, 5, 5)
    w = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3) - 4
    b = torch.tensor([0.5], dtype=torch.float64)
    y = ours.conv2d(x, w, b, stride=2)
    expected = torch.empty(2, 2, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            expected[i, j] = (x[0, 0, 2 * i:2 * i + 3, 2 * j:2 * j + 3] * w[0, 0]).sum() + b
    assert torch.equal(y[0, 0], expected)


# ------------------------------------------------------------------------------- hypothesis vs torch
@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    cg = 1 if depthwise else draw(st.integers(1, 3))
    fg = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    # the input at least as large as the dilated kernel once padded
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 9))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 9))
    n = draw(st.integers(0, 5))
    return dict(n=n, c=cg * groups, f=fg * groups, h=h, w=w, kh=kh, kw=kw, stride=(sh, sw), padding=(ph, pw),
                dilation=(dh, dw), groups=groups)


@settings(max_examples=30)
@given(case=conv_cases(), layout=st.sampled_from(LAYOUTS), dtype_index=st.integers(0, 3), bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matches_torch(device, case, layout, dtype_index, bias, seed):
    dtypes = dtypes_for(device)
    dtype = dtypes[dtype_index % len(dtypes)]
    gen = torch.Generator().manual_seed(seed)
    c = case
    x = with_layout(torch.randn(c["n"], c["c"], c["h"], c["w"], generator=gen).to(device, dtype), layout)
    w = torch.randn(c["f"], c["c"] // c["groups"], c["kh"], c["kw"], generator=gen).to(device, dtype)
    b = torch.randn(c["f"], generator=gen).to(device, dtype) if bias else None
    kwargs = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    with torch.no_grad():
        shape = F.conv2d(x, w, b, **kwargs).shape
    grad = with_layout(torch.randn(shape, generator=gen).to(device, dtype), layout)
    mine, ref = run_both(x, w, b, grad, **kwargs)
    assert mine[0].shape == ref[0].shape
    assert_same_memory_format(mine, ref)
    assert_all_close(mine, ref, dtype)


@pytest.mark.parametrize("groups", [1, 4])
def test_memory_format_follows_torch_in_every_dtype(device, groups):
    """channels_last in, channels_last out, in every dtype, dense and depthwise; but on CUDA a float64
    layer comes out NCHW, as torch's does (cuDNN has no NHWC double kernels): the H200 run found it."""
    for dtype in dtypes_for(device):
        x = torch.randn(2, 4, 5, 6, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(4, 4 // groups, 3, 3, device=device, dtype=dtype)
        mine, ref = run_both(x, w, None, torch.randn(2, 4, 5, 6, device=device, dtype=dtype), padding=1,
                             groups=groups)
        assert_same_layout(mine[0], ref[0])
        expect_nchw = device == "cuda" and dtype == torch.float64
        assert mine[0].is_contiguous() == expect_nchw, (dtype, mine[0].stride())


@settings(max_examples=10)
@given(case=conv_cases(), seed=st.integers(0, 2**31 - 1),
       needs=st.sampled_from([(True, False, False), (False, True, False), (False, False, True), (True, True, False)]))
def test_only_asked_gradients(device, case, seed, needs):
    """The backward honours requires_grad: what is not asked is not computed, what is asked is right."""
    gen = torch.Generator().manual_seed(seed)
    c = case
    x = torch.randn(c["n"], c["c"], c["h"], c["w"], generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(c["f"], c["c"] // c["groups"], c["kh"], c["kw"], generator=gen, dtype=torch.float64).to(device)
    b = torch.randn(c["f"], generator=gen, dtype=torch.float64).to(device)
    kwargs = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    grads = []
    for fn in (ours.conv2d, F.conv2d):
        leaves = [t.clone().requires_grad_(r) for t, r in zip((x, w, b), needs)]
        fn(*leaves, **kwargs).sum().backward() if any(needs) else None
        grads.append([t.grad for t in leaves])
    for u, v, r in zip(*grads, needs):
        assert (u is None) == (not r)
        if r:
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
    y = ops.conv2d_forward(x, w, b, list(c["stride"]), list(c["padding"]), list(c["dilation"]), c["groups"])
    out = ops.conv2d_backward(torch.ones_like(y), x, w, list(c["stride"]), list(c["padding"]),
                              list(c["dilation"]), c["groups"], list(needs))
    for t, r, full in zip(out, needs, (x, w, b)):
        assert (t.shape == full.shape) if r else t is None  # what was not asked comes back as None


# ----------------------------------------------------------------------------- padding, shapes, values
@pytest.mark.parametrize("ks,dilation", [((3, 3), 1), ((4, 2), 1), ((2, 5), (2, 1)), ((3, 4), 2), ((1, 1), 3)])
def test_padding_same_and_valid(device, ks, dilation):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(4, 3, *ks, generator=gen, dtype=torch.float64).to(device)
    b = torch.randn(4, generator=gen, dtype=torch.float64).to(device)
    g = torch.randn(2, 4, 7, 8, generator=gen, dtype=torch.float64).to(device)
    mine, ref = run_both(x, w, b, g, padding="same", dilation=dilation)
    assert mine[0].shape == x.shape[:1] + (4,) + x.shape[2:]
    assert_all_close(mine, ref, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.conv2d(x, w, padding="valid", dilation=dilation),
                                   F.conv2d(x, w, padding="valid", dilation=dilation), rtol=1e-12, atol=1e-12)


def test_padding_same_gradcheck(device):
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 2, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(lambda x, w: ours.conv2d(x, w, padding="same"), (x, w))


def test_unbatched_and_empty_batch(device):
    x = torch.randn(3, 6, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = ours.conv2d(x, w, padding=1)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-12, atol=1e-12)
    assert y.shape == (4, 6, 5)
    assert gradcheck(lambda x, w: ours.conv2d(x, w, padding=1), (x, w))
    for groups, ws in ((1, (4, 3, 3, 3)), (3, (3, 1, 3, 3))):  # dense and depthwise
        x0 = torch.randn(0, 3, 6, 5, device=device, requires_grad=True)
        w0 = torch.randn(ws, device=device, requires_grad=True)
        b0 = torch.randn(ws[0], device=device, requires_grad=True)
        y0 = ours.conv2d(x0, w0, b0, padding=1, groups=groups)
        assert y0.shape == (0, ws[0], 6, 5)
        y0.sum().backward()
        assert torch.equal(w0.grad, torch.zeros_like(w0)) and torch.equal(b0.grad, torch.zeros_like(b0))
        assert x0.grad.shape == x0.shape


def test_nan_and_inf_propagate_like_torch(device):
    x = torch.randn(1, 2, 5, 5, device=device)
    x[0, 0, 2, 2] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    w = torch.rand(3, 2, 3, 3, device=device) + 0.1  # positive: inf stays inf, no inf - inf
    for groups, ws in ((1, w), (2, w[:2, :1])):
        torch.testing.assert_close(ours.conv2d(x, ws, padding=1, groups=groups),
                                   F.conv2d(x, ws, padding=1, groups=groups), equal_nan=True)


def test_backward_is_deterministic(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, 9, 9, generator=gen).to(device).requires_grad_()
    w = torch.randn(8, 4, 3, 3, generator=gen).to(device).requires_grad_()
    wd = torch.randn(4, 1, 3, 3, generator=gen).to(device).requires_grad_()
    runs = []
    for _ in range(2):
        y = ours.conv2d(x, w, padding=1, stride=2).sum() + ours.conv2d(x, wd, padding=1, groups=4).square().sum()
        runs.append(torch.autograd.grad(y, (x, w, wd)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_larger_shapes_match_torch(device):
    """Shapes big enough that the batch is split over threads and im2col/col2im run in parallel."""
    gen = torch.Generator().manual_seed(5)
    for xs, ws, kw in [((7, 16, 20, 18), (24, 16, 3, 3), dict(padding=1)),
                       ((7, 8, 30, 30), (12, 4, 3, 3), dict(padding=1, groups=2)),  # a last, partial block
                       ((1, 16, 40, 40), (8, 16, 3, 3), dict(padding=1)),  # one big sample: column tiles
                       ((1, 32, 30, 30), (16, 32, 3, 3), dict(padding=1, stride=2)),
                       ((5, 32, 17, 17), (32, 1, 3, 3), dict(padding=1, groups=32)),
                       ((5, 32, 12, 12), (48, 32, 1, 1), dict())]:
        x = torch.randn(xs, generator=gen).to(device)
        w = torch.randn(ws, generator=gen).to(device) * 0.1
        b = torch.randn(ws[0], generator=gen).to(device)
        with torch.no_grad():
            shape = F.conv2d(x, w, **kw).shape
        g = torch.randn(shape, generator=gen).to(device)
        mine, ref = run_both(x, w, b, g, **kw)
        assert_all_close(mine, ref, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA matter")
def test_cuda_tf32_follows_the_cudnn_flag():
    """torch.backends.cudnn.allow_tf32 decides, as for torch's convolutions; the matmul flag does not."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 64, 28, 28, generator=gen, dtype=torch.float64)
    w = torch.randn(64, 64, 3, 3, generator=gen, dtype=torch.float64) * 0.1
    g = torch.randn(8, 64, 28, 28, generator=gen, dtype=torch.float64)

    def run(dtype):
        xd, wd = (t.to("cuda", dtype).requires_grad_() for t in (x, w))
        y = ours.conv2d(xd, wd, padding=1)
        return (y, *torch.autograd.grad(y, (xd, wd), g.to("cuda", dtype)))

    exact = run(torch.float64)

    def error(results):  # the worst of y, d_x and d_W, relative to each one's largest value
        return max(((r.double() - e).abs().max() / e.abs().max()).item() for r, e in zip(results, exact))

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    flags = dict(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic)
    with cudnn.flags(**flags, allow_tf32=False):
        matmul.allow_tf32 = True  # restored by the autouse fixture
        full = error(run(torch.float32))
    with cudnn.flags(**flags, allow_tf32=True):
        matmul.allow_tf32 = False
        tf32 = error(run(torch.float32))
    assert full < 1e-5, f"float32 with TF32 off: {full}"
    assert 1e-4 < tf32 < 1e-2, f"TF32 (10-bit mantissa) should show ~1e-3 of relative error: {tf32}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the implicit-GEMM kernels are CUDA kernels")
@pytest.mark.parametrize("route,dtype,tf32", [("implicit", torch.float32, False), ("implicit", torch.float32, True),
                                              ("implicit", torch.float16, False), ("implicit", torch.bfloat16, False),
                                              ("cublas", torch.float32, False), ("cublas", torch.float32, True),
                                              ("winograd", torch.float32, False),
                                              pytest.param("winograd", torch.float32, True, id="winograd_tf32_candidate")])
def test_cuda_conv_routes_match_float64(monkeypatch, route, dtype, tf32):
    """TORCH_CS231N_CUDA_CONV=implicit: the implicit-GEMM kernels on every layer they can do (by default
    float32 layers but 1x1 ones); =cublas: im2col and cuBLAS, the default before; =winograd: as unset,
    Winograd's forward and d_input on the 3x3 stride-1 layers here (the first and the last) and the implicit
    GEMM on the others, but Winograd with TF32 on too, where there are 128 channels and filters or more (the
    last layer; its GEMMs in TF32, a candidate: its id says so).

    Shapes with several tiles along m, n and k, ragged edges, groups, strides (d_input's division) and a
    d_weight sum long enough to be split. The reference is float64 of the inputs rounded to the dtype;
    TF32 is held to TF32's error, float16 and bfloat16 (exact products, float sums) to their rounding.
    """
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV", route)
    gen = torch.Generator().manual_seed(7)
    cudnn = torch.backends.cudnn
    flags = dict(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-2 if tf32 else 1e-5)
    # Fg and Cg of 32 or more, so that forward and d_input take the implicit GEMM too (below, the stem's d_input
    # with 3 channels goes the cuBLAS way: cuda/conv2d.cu, kImplicitMinColumns).
    for xs, ws, kw in [((9, 40, 23, 21), (136, 40, 3, 3), dict(padding=1)),
                       ((4, 96, 30, 30), (96, 32, 3, 3), dict(padding=1, groups=3, stride=2)),
                       ((3, 150, 9, 9), (140, 150, 1, 1), dict()),
                       ((2, 3, 64, 64), (64, 3, 7, 7), dict(padding=3, stride=2)),
                       ((5, 36, 17, 19), (40, 36, 5, 3), dict(padding=(2, 1), dilation=(1, 2), stride=(3, 1))),
                       ((2, 128, 11, 12), (136, 128, 3, 3), dict(padding=1))]:
        x = torch.randn(xs, generator=gen, dtype=torch.float64).to(dtype)
        w = (torch.randn(ws, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
        b = torch.randn(ws[0], generator=gen, dtype=torch.float64).to(dtype)
        with torch.no_grad():
            g = torch.randn(F.conv2d(x.double(), w.double(), **kw).shape, generator=gen, dtype=torch.float64)
        g = g.to(dtype)
        exact = run_both(*(t.double() for t in (x, w, b, g)), **kw)[1]
        with cudnn.flags(**flags, allow_tf32=tf32):
            mine = run_both(*(t.to("cuda") for t in (x, w, b, g)), **kw)[0]
        errors = {}
        for name, m, e in zip(("y", "d_x", "d_W", "d_b"), mine, exact):
            assert m.dtype == dtype
            error = ((m.double().cpu() - e).abs().max() / e.abs().max()).item()
            assert error < tolerance, (name, xs, ws, kw, dtype, error)
            errors[name] = error
        # (the gather candidate, TORCH_CS231N_CUDA_CONV_DX=gather in gpu-check's candidates' round, does the stem's
        # d_x in float32 FMAs whatever TF32 says)
        gathered = os.environ.get("TORCH_CS231N_CUDA_CONV_DX") == "gather" and xs[1] <= 4 and "dilation" not in kw
        if tf32 and route == "implicit":  # our kernels: every product in TF32 (d_b is a plain sum)
            for name in ("y", "d_W") if gathered else ("y", "d_x", "d_W"):
                assert errors[name] > 1e-5, f"{name}: TF32 was asked for, so its error should show a 10-bit mantissa"
        elif tf32:  # cuBLAS is allowed TF32, not made to use it: on the H200 one case's d_x came back float32-exact
            assert max(errors.values()) > 1e-5, f"TF32 was asked for, yet no product shows it: {errors}"
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV", "fastest")
    with pytest.raises(RuntimeError,
                       match="TORCH_CS231N_CUDA_CONV: expected 'implicit', 'cublas' or 'winograd' .*, but got 'fastest'"):
        ours.conv2d(torch.randn(1, 2, 5, 5, device="cuda"), torch.randn(3, 2, 3, 3, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuBLAS route is the CUDA one")
@pytest.mark.parametrize("dtype,tf32", [(torch.float32, False), (torch.float32, True), (torch.float16, False)])
def test_cuda_pointwise_dw_by_samples_candidate_matches_float64(monkeypatch, dtype, tf32):
    """TORCH_CS231N_CUDA_POINTWISE_DW=samples, a candidate: a 1x1 layer's d_W as per-sample products of dY and
    x as they lie, summed, rather than one product of their transposes: the same d_W as float64's, in one
    chunk and in several (a large batch), with groups; d_x and y are untouched."""
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV", "cublas")
    gen = torch.Generator().manual_seed(9)
    cudnn = torch.backends.cudnn
    flags = dict(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic)
    tolerance = {torch.float16: 2e-3}.get(dtype, 1e-2 if tf32 else 1e-5)
    for xs, ws, groups in [((6, 48, 9, 7), (40, 48, 1, 1), 1), ((5, 64, 8, 8), (96, 32, 1, 1), 2),
                           ((8193, 16, 32, 32), (8, 16, 1, 1), 1)]:  # 2^27 column values a chunk: two chunks
        x = torch.randn(xs, generator=gen, dtype=torch.float64).to(dtype)
        w = torch.randn(ws, generator=gen, dtype=torch.float64).to(dtype)
        g = torch.randn(xs[0], ws[0], *xs[2:], generator=gen, dtype=torch.float64).to(dtype)
        exact = run_both(x.double(), w.double(), None, g.double(), groups=groups)[1]
        monkeypatch.setenv("TORCH_CS231N_CUDA_POINTWISE_DW", "samples")
        with cudnn.flags(**flags, allow_tf32=tf32):
            mine = run_both(x.cuda(), w.cuda(), None, g.cuda(), groups=groups)[0]
        for name, m, e in zip(("y", "d_x", "d_W"), mine, exact):
            error = ((m.double().cpu() - e).abs().max() / e.abs().max()).item()
            assert error < tolerance, (name, xs, ws, groups, dtype, error)
    monkeypatch.setenv("TORCH_CS231N_CUDA_POINTWISE_DW", "pairs")  # read where a d_W is wanted
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_POINTWISE_DW: expected 'samples' or 'transposed'"):
        ours.conv2d(torch.randn(2, 4, 3, 3, device="cuda"),
                    torch.randn(5, 4, 1, 1, device="cuda", requires_grad=True)).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the implicit-GEMM kernels are CUDA kernels")
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_conv_async_loads_candidate_gives_the_registers_bits(monkeypatch, tf32):
    """TORCH_CS231N_CUDA_CONV_LOADS=async, a candidate: the implicit GEMM whose operands are copied by cp.async
    four stages deep gives the same bits as the proven kernel, which stages them in registers: the same
    products summed in the same order, the TF32 rounding done at the fragment reads instead of the stores.
    Shapes with every tile shape, ragged edges, groups, a stride's division, dilation, and a split d_weight."""
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV", "implicit")
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_LAYOUT", "nchw")  # the kernels that read the variable
    gen = torch.Generator(device="cuda").manual_seed(5)
    cudnn = torch.backends.cudnn
    flags = dict(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic)
    for xs, ws, kw in [((9, 40, 23, 21), (136, 40, 3, 3), dict(padding=1)),
                       ((4, 64, 30, 30), (64, 64, 3, 3), dict(padding=1)),
                       ((4, 96, 30, 30), (96, 32, 3, 3), dict(padding=1, groups=3, stride=2)),
                       ((3, 150, 9, 9), (140, 150, 1, 1), dict()),
                       ((2, 3, 64, 64), (64, 3, 7, 7), dict(padding=3, stride=2)),
                       ((5, 36, 17, 19), (40, 36, 5, 3), dict(padding=(2, 1), dilation=(1, 2), stride=(3, 1)))]:
        x = torch.randn(xs, generator=gen, device="cuda")
        w = torch.randn(ws, generator=gen, device="cuda") * 0.1
        b = torch.randn(ws[0], generator=gen, device="cuda")
        with torch.no_grad():
            g = torch.randn(F.conv2d(x, w, **kw).shape, generator=gen, device="cuda")
        results = {}
        for loads in ("registers", "async"):
            monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_LOADS", loads)
            with cudnn.flags(**flags, allow_tf32=tf32):
                results[loads] = run_both(x, w, b, g, **kw)[0]
        for name, mine, proven in zip(("y", "d_x", "d_W", "d_b"), results["async"], results["registers"]):
            assert torch.equal(mine, proven), (name, xs, ws, kw, (mine - proven).abs().max().item())
    # (32 channels and filters, so that the implicit GEMM, which reads the variable, does this layer: a layer
    # of 3 filters goes to cuBLAS, which never reads it, and this test's first version called one)
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_LOADS", "cp.async")
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_CONV_LOADS: expected 'async' or 'registers' .*, but got"):
        ours.conv2d(torch.randn(1, 32, 5, 5, device="cuda"), torch.randn(32, 32, 3, 3, device="cuda"))


def float32_errors(xs, ws, gen, tf32=False, device="cuda", **kw):
    """Ours in float32 on `device` (TF32 as asked) against torch's float64 convolution of the same random
    layer (x, w, b and dY drawn from gen in that order): the largest error of y, d_x, d_W and d_b, each
    relative to its largest value."""
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in (xs, ws, ws[:1]))
    with torch.no_grad():
        g = torch.randn(F.conv2d(x, w, **kw).shape, generator=gen, dtype=torch.float64)
    exact = run_both(x, w, b, g, **kw)[1]
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=tf32):
        mine = run_both(*(t.float().to(device) for t in (x, w, b, g)), **kw)[0]
    return {name: ((m.double().cpu() - e).abs().max() / e.abs().max()).item()
            for name, m, e in zip(("y", "d_x", "d_W", "d_b"), mine, exact)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the implicit-GEMM kernels are CUDA kernels")
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_conv_nhwc_candidate_matches_float64(monkeypatch, tf32):
    """TORCH_CS231N_CUDA_CONV_LAYOUT=nhwc, a candidate: the implicit GEMM over channels-last copies of x and dY,
    4 channels a load, held to float64 as the NCHW kernels are (1e-5), or with TF32 on to TF32's error, which
    y, d_x and d_W must then show. Every tile shape (64 columns, 128 and more, 64 filters' d_W), groups, a
    stride (d_x's division), dilation, 1x1; a channels_last input gives the contiguous one's bits; a layer of
    6 channels (no multiple of 4) keeps the NCHW kernels."""
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV", "implicit")
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_LAYOUT", "nhwc")
    monkeypatch.delenv("TORCH_CS231N_CUDA_CONV_LOADS", raising=False)
    gen = torch.Generator().manual_seed(8)
    for xs, ws, kw in [((9, 40, 23, 21), (136, 40, 3, 3), dict(padding=1)),
                       ((4, 64, 30, 30), (64, 64, 3, 3), dict(padding=1)),
                       ((4, 96, 30, 30), (96, 32, 3, 3), dict(padding=1, groups=3, stride=2)),
                       ((3, 152, 9, 9), (140, 152, 1, 1), dict()),
                       ((5, 36, 17, 19), (40, 36, 5, 3), dict(padding=(2, 1), dilation=(1, 2), stride=(3, 1))),
                       ((2, 6, 12, 12), (40, 6, 3, 3), dict(padding=1))]:
        nhwc = xs[1] % 4 == 0  # (channels per group: 32 in the grouped layer)
        for name, error in float32_errors(xs, ws, gen, tf32=tf32, **kw).items():
            assert error < (1e-2 if tf32 and name != "d_b" else 1e-5), (name, xs, ws, kw, error)
            if tf32 and nhwc and name != "d_b":
                assert error > 1e-5, (name, xs, ws, kw, "TF32 was asked for: its error should show")
    x = torch.randn(4, 64, 30, 30, generator=gen).cuda()
    w = torch.randn(64, 64, 3, 3, generator=gen).cuda()
    assert torch.equal(ours.conv2d(x.to(memory_format=torch.channels_last), w, padding=1),
                       ours.conv2d(x, w, padding=1))
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_LAYOUT", "nchwc")
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_CONV_LAYOUT: expected 'nhwc' or 'nchw' .*, but got"):
        ours.conv2d(torch.randn(1, 32, 5, 5, device="cuda"), torch.randn(32, 32, 3, 3, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Winograd kernels are CUDA kernels")
def test_cuda_conv_winograd_matches_float64(monkeypatch):
    """By default (as with TORCH_CS231N_CUDA_CONV=winograd), F(2x2, 3x3) does the forward and d_input of
    float32 3x3 layers of stride 1 (TF32 off), here with paddings 0, 1 and 2 (d_input's 2, 1, 0) and odd
    sizes (blocks past the image's edge), as close to float64 as the implicit GEMM is (the transforms add and
    halve, which adds a few roundings to each product's sum); d_W and d_b take the implicit GEMM."""
    monkeypatch.delenv("TORCH_CS231N_CUDA_CONV", raising=False)
    gen = torch.Generator().manual_seed(3)
    for xs, ws, padding in [((3, 32, 13, 11), (40, 32, 3, 3), 1), ((2, 48, 6, 5), (32, 48, 3, 3), 0),
                            ((2, 32, 5, 8), (64, 32, 3, 3), 2), ((4, 64, 9, 9), (64, 64, 3, 3), (0, 2))]:
        for name, error in float32_errors(xs, ws, gen, padding=padding).items():
            assert error < 1e-5, (name, xs, ws, padding, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Winograd kernels are CUDA kernels")
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_conv_winograd_dw_candidate_matches_float64(monkeypatch, tf32):
    """TORCH_CS231N_CUDA_CONV_DW=winograd, a candidate: d_W of float32 3x3 stride-1 layers by F(2x2, 3x3), 16
    products of the transformed dY and x summed over blocks (in chunks, the last case in several), held to
    float64 as the implicit GEMM is (1e-5), or with TF32 on to TF32's error, which its d_W must show (with
    TF32, Winograd takes the layers of 128 channels and filters or more, the last two here); y, d_x and d_b
    are untouched. Paddings 0, 1 and 2, odd sizes (blocks past the output's edge)."""
    monkeypatch.delenv("TORCH_CS231N_CUDA_CONV", raising=False)
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_DW", "winograd")
    gen = torch.Generator().manual_seed(4)
    for xs, ws, padding in [((3, 32, 13, 11), (40, 32, 3, 3), 1), ((2, 48, 6, 5), (32, 48, 3, 3), 0),
                            ((2, 32, 5, 8), (64, 32, 3, 3), 2), ((4, 64, 9, 9), (64, 64, 3, 3), (0, 2)),
                            ((16, 32, 40, 40), (48, 32, 3, 3), 1),  # 6400 blocks: chunks of about 512
                            ((3, 128, 9, 10), (128, 128, 3, 3), 1), ((32, 144, 16, 16), (128, 144, 3, 3), 1)]:
        for name, error in float32_errors(xs, ws, gen, tf32=tf32, padding=padding).items():
            assert error < (1e-2 if tf32 else 1e-5), (name, xs, ws, padding, error)
            if tf32 and name == "d_W":
                assert error > 1e-5, "d_W: TF32 was asked for, so its error should show a 10-bit mantissa"
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_DW", "fft")  # read where a d_W is wanted
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_CONV_DW: expected 'winograd' or 'gemm' .*, but got 'fft'"):
        ours.conv2d(torch.randn(1, 32, 5, 5, device="cuda"),
                    torch.randn(32, 32, 3, 3, device="cuda", requires_grad=True)).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the few channels' gather is a CUDA kernel")
@pytest.mark.parametrize("tf32", [False, True])
def test_cuda_conv_few_channels_dx_candidate_matches_float64(monkeypatch, tf32):
    """TORCH_CS231N_CUDA_CONV_DX=gather, a candidate: d_x of layers of 1 to 4 channels (stems) gathered from dY
    with no column buffer, float32 FMAs even with TF32 on, so held to 1e-5 of float64 either way (y and d_W
    to TF32's error when it is on). Strides 1 to 4, kernels 3x3 to 11x11, sizes that are no multiple of the
    stride; a dilated layer, which it does not do, takes the cuBLAS route as before."""
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_DX", "gather")
    gen = torch.Generator().manual_seed(6)
    for xs, ws, kw in [((4, 3, 45, 47), (16, 3, 7, 7), dict(stride=2, padding=3)),
                       ((2, 1, 20, 21), (8, 1, 3, 3), dict(padding=1)),
                       ((3, 4, 33, 30), (24, 4, 5, 5), dict(stride=2, padding=2)),
                       ((2, 3, 32, 32), (32, 3, 7, 7), dict(padding=3)),
                       ((2, 2, 18, 16), (8, 2, 4, 4), dict(stride=4)),
                       ((2, 3, 64, 63), (48, 3, 11, 11), dict(stride=4, padding=2)),
                       ((2, 3, 17, 19), (8, 3, 3, 3), dict(padding=2, dilation=2))]:
        gathered = kw.get("dilation", 1) == 1  # (the dilated layer's d_x: cuBLAS, in TF32 when allowed)
        for name, error in float32_errors(xs, ws, gen, tf32=tf32, **kw).items():
            exact_float32 = not tf32 or name == "d_b" or (name == "d_x" and gathered)
            assert error < (1e-5 if exact_float32 else 1e-2), (name, xs, ws, kw, error)
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV_DX", "scatter")  # read where a d_x is wanted
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_CONV_DX: expected 'gather' or 'gemm' .*, but got 'scatter'"):
        ours.conv2d(torch.randn(1, 3, 8, 8, device="cuda", requires_grad=True),
                    torch.randn(4, 3, 3, 3, device="cuda")).sum().backward()


def check_past_int32(monkeypatch, route):
    """A convolution whose output has more than 2^31 elements, its first sample's offsets below 2^31 and the
    last one's above (16385 samples of 32 x 64 x 64): ours against cuDNN in float32 (TF32 off) on the last
    two samples of y and d_x, where 32-bit offsets would wrap, and on all of d_W and d_b, which sum over
    every sample. About 30 GB of GPU memory."""
    if torch.cuda.mem_get_info()[0] < 40 * 2**30:
        pytest.skip("needs about 30 GB of free GPU memory")
    monkeypatch.setenv("TORCH_CS231N_CUDA_CONV", route)
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(16385, 4, 64, 64, device="cuda", generator=gen)
    w = torch.randn(32, 4, 3, 3, device="cuda", generator=gen)
    b = torch.randn(32, device="cuda", generator=gen)
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = ours.conv2d(*leaves, padding=1)
        assert y.numel() > 2**31
        grad = torch.randn(y.shape, device="cuda", generator=gen)
        y.backward(grad)
        mine = (y[-2:].detach().clone(), leaves[0].grad[-2:].clone(), leaves[1].grad, leaves[2].grad)
        del y, leaves
        y = F.conv2d(x, w, b, padding=1)
        exact = (y[-2:].clone(), torch.nn.grad.conv2d_input(x.shape, w, grad, padding=1)[-2:],
                 torch.nn.grad.conv2d_weight(x, w.shape, grad, padding=1), grad.sum((0, 2, 3)))
        del y
    for name, m, e in zip(("y", "d_x", "d_W", "d_b"), mine, exact):
        error = ((m - e).abs().max() / e.abs().max()).item()
        assert error < 1e-4, (name, route, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offsets past 2^31 on CUDA")
def test_cuda_offsets_past_int32_match_cudnn(monkeypatch):
    """The im2col and cuBLAS route with int64 offsets."""
    check_past_int32(monkeypatch, "cublas")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the implicit-GEMM kernels are CUDA kernels")
def test_cuda_implicit_gemm_offsets_past_int32_match_cudnn(monkeypatch):
    """The implicit GEMM's 32-bit positions with a 64-bit offset per sample (cuda/conv2d_implicit_gemm.cuh)."""
    check_past_int32(monkeypatch, "implicit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the depthwise tile kernels are CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("route", ["tall", "tiles", "lines"])
def test_cuda_depthwise_routes_match_float64(monkeypatch, route, dtype):
    """TORCH_CS231N_CUDA_DEPTHWISE=tall: the tall tiles (the default where they fit); =tiles: the depthwise
    tile kernels, the default before; =lines: the line kernels, the default before those.

    Several tiles a plane with ragged edges, multipliers 1 to 3, 3x3 and 5x5, dilation, and a stride (whose
    d_input keeps the line kernel). The reference is float64, the tolerance each dtype's rounding.
    """
    monkeypatch.setenv("TORCH_CS231N_CUDA_DEPTHWISE", route)
    gen = torch.Generator().manual_seed(8)
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    for xs, ws, kw in [((8, 32, 30, 31), (32, 1, 3, 3), dict(padding=1, groups=32)),
                       ((4, 16, 21, 40), (32, 1, 5, 5), dict(padding=2, groups=16)),
                       ((3, 8, 37, 19), (24, 1, 3, 3), dict(padding=1, groups=8, stride=2)),
                       ((2, 8, 25, 70), (8, 1, 3, 3), dict(padding=2, dilation=2, groups=8))]:
        x = torch.randn(xs, generator=gen, dtype=torch.float64)
        w = torch.randn(ws, generator=gen, dtype=torch.float64)
        b = torch.randn(ws[0], generator=gen, dtype=torch.float64)
        with torch.no_grad():
            g = torch.randn(F.conv2d(x, w, **kw).shape, generator=gen, dtype=torch.float64)
        exact = run_both(*(t.to(dtype).double() for t in (x, w, b, g)), **kw)[1]
        mine = run_both(*(t.to("cuda", dtype) for t in (x, w, b, g)), **kw)[0]
        for name, m, e in zip(("y", "d_x", "d_W", "d_b"), mine, exact):
            error = ((m.double().cpu() - e).abs().max() / e.abs().max()).item()
            assert error < tolerance, (name, xs, ws, kw, dtype, error)
    monkeypatch.setenv("TORCH_CS231N_CUDA_DEPTHWISE", "fastest")
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_DEPTHWISE: expected 'tiles', 'lines' or 'tall' .*, but got"):
        ours.conv2d(torch.randn(1, 2, 5, 5, device="cuda"), torch.randn(2, 1, 3, 3, device="cuda"), groups=2)


# ------------------------------------------------------------------------------------------- modules
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_module_state_dict_round_trip(device, padding_mode):
    torch.manual_seed(6)
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), dilation=(1, 2),
                  groups=2, bias=True, padding_mode=padding_mode, device=device, dtype=torch.float64)
    ref = torch.nn.Conv2d(**kwargs)
    mine = torch_cs231n.Conv2d(**kwargs)
    assert isinstance(mine, torch.nn.Conv2d) and repr(mine) == repr(ref)
    mine.load_state_dict(ref.state_dict())  # torch -> ours
    x = torch.randn(2, 4, 7, 9, device=device, dtype=torch.float64)
    for a, b in zip(run_module(mine, x), run_module(ref, x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    back = torch.nn.Conv2d(**kwargs)
    with torch.no_grad():
        for p in mine.parameters():
            p.mul_(1.5)
    back.load_state_dict(mine.state_dict())  # ours -> torch
    for a, b in zip(run_module(mine, x), run_module(back, x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def run_module(module, x):
    module.zero_grad()
    xi = x.clone().requires_grad_()
    y = module(xi)
    y.backward(torch.ones_like(y))
    return y, xi.grad, module.weight.grad, module.bias.grad


def test_module_same_padding_and_no_bias(device):
    torch.manual_seed(7)
    ref = torch.nn.Conv2d(3, 4, (4, 3), padding="same", bias=False, device=device)
    mine = torch_cs231n.Conv2d(3, 4, (4, 3), padding="same", bias=False, device=device)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 6, 5, device=device)
    assert mine.bias is None
    torch.testing.assert_close(mine(x), ref(x), **tolerances(torch.float32))


# ---------------------------------------------------------------------------------------- bad input
def bad(device, **over):
    """Good arguments, some replaced; returns the keyword arguments of conv2d."""
    args = dict(input=torch.randn(2, 4, 5, 5, device=device), weight=torch.randn(6, 2, 3, 3, device=device),
                bias=None, stride=1, padding=0, dilation=1, groups=2)
    args.update(over)
    return args


BAD = [
    (dict(weight=torch.randn(6, 2, 3)), r"conv2d_forward: expected weight to be 4-D .* but got a 3-D tensor of shape \[6, 2, 3\]"),
    (dict(input=torch.randn(2, 2, 4, 5, 5)), r"conv2d_forward: expected input to be 4-D .* but got a 5-D tensor"),
    (dict(input=torch.randn(4, 5)), r"conv2d_forward: expected input to be 4-D .* but got a 2-D tensor"),
    (dict(groups=1), r"given groups=1 and weight of size \[6, 2, 3, 3\], expected input to have weight.size\(1\) \* groups = 2 channels, but got input of size \[2, 4, 5, 5\] with 4 channels"),
    (dict(groups=3), r"expected input to have weight.size\(1\) \* groups = 6 channels, but got .* with 4 channels"),
    (dict(weight=torch.randn(5, 2, 3, 3)), r"expected weight.size\(0\) \(out_channels\) to be divisible by groups=2, but got weight of size \[5, 2, 3, 3\]"),
    (dict(weight=torch.randn(6, 2, 7, 7)), r"the padded input \(5 x 5 .*\) is smaller than the dilated kernel \(7 x 7"),
    (dict(dilation=3), r"the padded input \(5 x 5 .*\) is smaller than the dilated kernel \(7 x 7 from kernel 3 x 3 and dilation \[3, 3\]"),
    (dict(stride=0), r"conv2d_forward: expected stride to be positive, but got stride=\[0, 0\]"),
    (dict(stride=(1, -1)), r"expected stride to be positive, but got stride=\[1, -1\]"),
    (dict(dilation=(0, 1)), r"expected dilation to be positive, but got dilation=\[0, 1\]"),
    (dict(padding=(-1, 0)), r"expected padding to be non-negative, but got padding=\[-1, 0\]"),
    (dict(groups=0), r"expected groups to be positive, but got groups=0"),
    (dict(bias=torch.randn(5)), r"given weight of size \[6, 2, 3, 3\], expected bias to be 1-D with 6 elements, but got bias of size \[5\]"),
    (dict(bias=torch.randn(6, 1)), r"expected bias to be 1-D with 6 elements, but got bias of size \[6, 1\]"),
    (dict(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), r"expected weight to have the dtype of input \(Float\), but got Double"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), r"expected bias to have the dtype of input \(Float\), but got Double"),
    (dict(input=torch.ones(2, 4, 5, 5, dtype=torch.bool), weight=torch.ones(6, 2, 3, 3, dtype=torch.bool)), r"expected input to have (an integer dtype .* or )?dtype float32, float64, float16 or bfloat16, but got Bool"),
]


@pytest.mark.parametrize("over,match", BAD)
def test_bad_input(device, over, match):
    over = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in over.items()}
    with pytest.raises(RuntimeError, match=match):
        ours.conv2d(**bad(device, **over))


def test_bad_input_devices():
    meta = torch.randn(6, 2, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match=r"expected all tensors to be on the same device, but input is on cpu and weight is on meta"):
        ops.conv2d_forward(torch.randn(2, 4, 5, 5), meta, None, [1, 1], [0, 0], [1, 1], 2)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"same device, but input is on cpu and weight is on cuda"):
            ours.conv2d(torch.randn(2, 4, 5, 5), torch.randn(6, 2, 3, 3, device="cuda"), groups=2)
        with pytest.raises(RuntimeError, match=r"same device, but input is on cuda:0 and bias is on cpu"):
            ours.conv2d(torch.randn(2, 4, 5, 5, device="cuda"), torch.randn(6, 2, 3, 3, device="cuda"),
                        torch.randn(6), groups=2)


@pytest.mark.parametrize("dtype,name", [(torch.bool, "Bool"), (torch.uint16, "UInt16"), (torch.int32, "Int")])
def test_dtypes_torch_refuses_are_refused(device, dtype, name):
    """Bool and uint16 everywhere; the integer dtypes on CUDA, whose convolution in torch takes none."""
    if dtype == torch.int32 and device == "cpu":
        pytest.skip("torch's CPU convolution takes integers (test_integer_dtypes_match_torch)")
    x, w = torch.ones(1, 2, 4, 4, dtype=dtype).to(device), torch.ones(3, 2, 3, 3, dtype=dtype).to(device)
    integers = r"an integer dtype \(uint8, int8, int16, int32, int64\) or " if device == "cpu" else ""
    with pytest.raises(RuntimeError, match=f"conv2d_forward: expected input to have {integers}dtype float32, float64, "
                                           f"float16 or bfloat16, but got {name}"):
        ours.conv2d(x, w)


# ----------------------------------------------------------------------- integer and complex dtypes
INTEGER_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def _full_range(shape, dtype, gen):
    """Values over the dtype's whole range, so that the sums wrap around (int64: all but the top bit)."""
    if dtype == torch.int64:
        return torch.randint(-2**62, 2**62, shape, generator=gen) * 2 + torch.randint(0, 2, shape, generator=gen)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max + 1, shape, generator=gen).to(dtype)


INTEGER_CASES = [
    dict(shape=(2, 4, 9, 11), f=6, k=(3, 3), stride=1, padding=1, groups=2),
    dict(shape=(3, 3, 12, 10), f=5, k=(5, 3), stride=(2, 3), padding=(2, 0), groups=1),
    dict(shape=(1, 6, 7, 7), f=6, k=(3, 3), stride=2, padding=3, groups=6),  # depthwise; padding past the taps
    dict(shape=(2, 5, 4, 6), f=7, k=(1, 1), stride=1, padding=0, groups=1),
    # 750 pixels a sample: chunks of 512 that end mid-row; 20 filters: blocks of 8, 8 and 4
    dict(shape=(2, 3, 30, 25), f=20, k=(3, 3), stride=1, padding=1, groups=1),
    # k = 4104: chunks of 48 pixels (the columns held under 2^18 values)
    dict(shape=(1, 456, 9, 10), f=4, k=(3, 3), stride=1, padding=1, groups=1),
]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
@pytest.mark.parametrize("case", INTEGER_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_integer_dtypes_match_torch(isa, dtype, case, layout):
    """torch's CPU convolution takes the integer dtypes and sums in the dtype, wrapping around: ours gives
    its bits (csrc/cpu/conv2d_integer.h, in each instruction set), with and without bias, batched or not,
    in its layout."""
    gen = torch.Generator().manual_seed(INTEGER_CASES.index(case))
    n, c, h, w = case["shape"]
    x = with_layout(_full_range(case["shape"], dtype, gen), layout)
    weight = _full_range((case["f"], c // case["groups"], *case["k"]), dtype, gen)
    bias = _full_range((case["f"],), dtype, gen)
    kwargs = dict(stride=case["stride"], padding=case["padding"], groups=case["groups"])
    with forced_isa(isa):
        for b in (bias, None):
            got, want = ours.conv2d(x, weight, b, **kwargs), F.conv2d(x, weight, b, **kwargs)
            assert got.dtype == dtype and torch.equal(got, want)
            assert_same_layout(got, want)
        assert torch.equal(ours.conv2d(x[0], weight, bias, **kwargs), F.conv2d(x[0], weight, bias, **kwargs))
        assert ours.conv2d(x[:0], weight, bias, **kwargs).shape == (0, case["f"], *want.shape[2:])


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_integer_dilated_matches_the_zero_filled_kernel(dtype):
    """torch refuses dilated integer convolutions ("slow_conv_dilated<>" not implemented); ours takes them,
    and equals torch's undilated convolution with the taps spread out by rows and columns of zeros."""
    gen = torch.Generator().manual_seed(5)
    x, weight = _full_range((2, 4, 11, 13), dtype, gen), _full_range((6, 2, 3, 2), dtype, gen)
    bias = _full_range((6,), dtype, gen)
    spread = torch.zeros(6, 2, 5, 4, dtype=dtype)
    spread[:, :, ::2, ::3] = weight  # dilation (2, 3)
    got = ours.conv2d(x, weight, bias, stride=(2, 1), padding=(1, 2), dilation=(2, 3), groups=2)
    assert torch.equal(got, F.conv2d(x, spread, bias, stride=(2, 1), padding=(1, 2), groups=2))


COMPLEX_TOLERANCES = {torch.complex128: dict(rtol=1e-10, atol=1e-10), torch.complex64: dict(rtol=1e-4, atol=1e-4),
                      torch.complex32: dict(rtol=1e-2, atol=3e-2)}


@pytest.mark.parametrize("dtype", list(COMPLEX_TOLERANCES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_complex_matches_torch(device, dtype, layout):
    """Complex convolutions, as torch's: three real ones (Gauss's trick), against torch's complex128 on the
    CPU, with a conjugated input, padding 'same', no bias, an unbatched input, and in the layout torch
    gives in the dtype."""
    gen = torch.Generator().manual_seed(3)
    x = with_layout(torch.randn(2, 4, 9, 8, dtype=torch.complex128, generator=gen), layout)
    weight = torch.randn(6, 2, 3, 3, dtype=torch.complex128, generator=gen)
    bias = torch.randn(6, dtype=torch.complex128, generator=gen)
    calls = [(lambda f, x, w, b: f(x, w, b, stride=(2, 1), padding=1, groups=2)),
             (lambda f, x, w, b: f(x.conj(), w, None, padding="same", dilation=2, groups=2)),
             (lambda f, x, w, b: f(x[1], w, b, groups=2))]
    for call in calls:
        want = call(F.conv2d, x, weight, bias)
        moved = [t.to(device, dtype) for t in (x, weight, bias)]
        got = call(ours.conv2d, *moved)
        assert got.dtype == dtype and got.device.type == device
        torch.testing.assert_close(got.to("cpu", torch.complex128), want, **COMPLEX_TOLERANCES[dtype])
        if dtype != torch.complex32:  # torch's own complex32 convolution is experimental
            assert_same_layout(got, call(F.conv2d, *moved))


def test_complex_gradients_gradcheck_and_vmap(device):
    """Complex gradients in torch's convention (gradcheck takes complex inputs as pairs of reals), both
    modes of AD, and vmap of the complex layer equal to a loop."""
    gen = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*s, dtype=torch.complex128, generator=gen).to(device).requires_grad_()
               for s in ((2, 4, 6, 5), (6, 2, 3, 3), (6,)))
    conv = lambda x, w, b: ours.conv2d(x, w, b, stride=(1, 2), padding=1, groups=2)  # noqa: E731
    assert gradcheck(conv, (x, w, b), check_forward_ad=True)
    assert gradgradcheck(conv, (x, w, b))
    batched = torch.func.vmap(conv, in_dims=(0, None, None))(x.detach(), w.detach(), b.detach())
    torch.testing.assert_close(batched, torch.stack([conv(s, w, b) for s in x.detach()]))


def test_complex_module_and_convert_match_torch(device):
    """A complex nn.Conv2d converted to ours keeps its state_dict and gives torch's output and gradients;
    under autocast both leave the complex layer in its dtype."""
    torch.manual_seed(6)
    theirs = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2, dtype=torch.complex64, device=device)
    mine = torch_cs231n.convert(torch.nn.Sequential(theirs))[0]
    assert isinstance(mine, torch_cs231n.Conv2d)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 4, 7, 7, dtype=torch.complex64, device=device, requires_grad=True)
    got, want = mine(x), theirs(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad(got, (x, mine.weight, mine.bias), dy),
                    torch.autograd.grad(want, (x, theirs.weight, theirs.bias), dy)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert mine(x).dtype == theirs(x).dtype == torch.complex64


def test_complex_with_a_real_argument_is_refused(device):
    x = torch.randn(1, 2, 5, 5, dtype=torch.complex64, device=device)
    with pytest.raises(RuntimeError, match=r"conv2d_forward: expected weight to have the dtype of input "
                                           r"\(torch.complex64\), but got torch.float32"):
        ours.conv2d(x, torch.randn(3, 2, 3, 3, device=device))
    with pytest.raises(RuntimeError, match=r"expected bias to have the dtype of input \(torch.complex64\), but got "
                                           r"torch.complex128"):
        ours.conv2d(x, x.new_ones(3, 2, 3, 3), torch.zeros(3, dtype=torch.complex128, device=device))


def test_same_padding_with_stride_is_refused(device):
    with pytest.raises(RuntimeError, match="padding='same' is not supported for strided convolutions"):
        ours.conv2d(torch.randn(1, 2, 5, 5, device=device), torch.randn(3, 2, 3, 3, device=device), stride=2,
                    padding="same")
    with pytest.raises(RuntimeError, match="invalid padding string 'full'"):
        ours.conv2d(torch.randn(1, 2, 5, 5, device=device), torch.randn(3, 2, 3, 3, device=device), padding="full")


def test_backward_argument_checks(device):
    x = torch.randn(2, 4, 5, 5, device=device)
    w = torch.randn(6, 2, 3, 3, device=device)
    args = ([1, 1], [0, 0], [1, 1], 2, [True, True, True])
    with pytest.raises(RuntimeError, match=r"conv2d_backward: expected grad_output to have the output's shape \[2, 6, 3, 3\], but got \[2, 6, 3, 4\]"):
        ops.conv2d_backward(torch.randn(2, 6, 3, 4, device=device), x, w, *args)
    with pytest.raises(RuntimeError, match=r"conv2d_backward: expected grad_output to have the dtype of input \(Float\), but got Double"):
        ops.conv2d_backward(torch.randn(2, 6, 3, 3, device=device, dtype=torch.float64), x, w, *args)
    with pytest.raises(RuntimeError, match=r"conv2d_backward: given groups=2 and weight of size \[6, 2, 3, 3\], expected input to have"):
        ops.conv2d_backward(torch.randn(2, 6, 3, 3, device=device), x[:, :3], w, *args)


# ------------------------------------------------------------------------------- opcheck and compile
def _op_samples(device):
    g = torch.Generator().manual_seed(8)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    yield r(2, 4, 6, 5), r(6, 2, 3, 3), r(6), [1, 1], [1, 1], [1, 1], 2
    yield r(2, 4, 6, 5).contiguous(memory_format=torch.channels_last), r(6, 4, 1, 1), None, [1, 1], [0, 0], [1, 1], 1
    yield r(1, 3, 7, 7, dtype=torch.float64).transpose(2, 3), r(3, 1, 3, 3, dtype=torch.float64), None, [2, 1], [1, 0], [1, 2], 3
    yield r(0, 3, 5, 5), r(4, 3, 3, 3), r(4), [1, 1], [0, 0], [1, 1], 1


def test_opcheck(device):
    for x, w, b, stride, padding, dilation, groups in _op_samples(device):
        torch.library.opcheck(ops.conv2d_forward.default, (x, w, b, stride, padding, dilation, groups))
        y = ops.conv2d_forward(x, w, b, stride, padding, dilation, groups)
        for mask in ([True, True, True], [False, True, False], [True, False, True]):
            torch.library.opcheck(ops.conv2d_backward.default,
                                  (torch.randn_like(y), x, w, stride, padding, dilation, groups, mask))
    if device == "cpu":  # integers: the forward only (the fake kernel's strides for a channels_last input)
        x = torch.randint(-50, 50, (2, 4, 6, 5), dtype=torch.int16).contiguous(memory_format=torch.channels_last)
        w, b = torch.randint(-5, 5, (6, 2, 3, 3), dtype=torch.int16), torch.randint(0, 5, (6,), dtype=torch.int16)
        torch.library.opcheck(ops.conv2d_forward.default, (x, w, b, [1, 1], [1, 1], [1, 1], 2))


def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(9)
    model = torch.nn.Sequential(
        torch_cs231n.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch_cs231n.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
        torch_cs231n.Conv2d(8, 16, 1), torch.nn.ReLU(),
        torch_cs231n.Conv2d(16, 4, (3, 2), stride=2, dilation=(1, 2), bias=False),
    ).to(device)
    assert_compiled_matches_eager(model, torch.randn(2, 3, 12, 12, device=device))
