"""Batch norm: our kernels against torch.nn.functional.batch_norm and nn.BatchNorm2d, forward, backward and
running statistics, in every layout; the module as a drop-in; opcheck and torch.compile; bad input."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import torch_cs231n
from torch_cs231n import functional as ours

from helpers import LAYOUTS, assert_same_layout, assert_same_output_and_grads, dtypes_for, forced_isa, with_layout

ops = torch.ops.torch_cs231n


def tolerances(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    if dtype == torch.float32:
        # Per-channel sums in a different order than torch's: a few ulps of the largest term.
        return dict(rtol=1e-5, atol=1e-5)
    # float16/bfloat16: both sides compute in float32 from the same narrow values and round once, so
    # they differ by about one rounding of the result: 2^-11 (float16) or 2^-8 (bfloat16) relative, at
    # most twice that where the float32 results straddle a rounding boundary; 2e-2 covers bfloat16's.
    return dict(rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------- gradients
def gradcheck_problem(device, training, affine, shape):
    """(fn, inputs) for gradcheck and gradgradcheck: batch norm of float64 leaves, with fixed running
    statistics (momentum 0: gradcheck calls forward many times, and they must stay put in eval)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_() if affine else None
    b = torch.randn(2, generator=gen, dtype=torch.float64).to(device).requires_grad_() if affine else None
    rm = torch.randn(2, generator=gen, dtype=torch.float64).to(device)
    rv = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(device)
    fn = lambda *a: ours.batch_norm(a[0], rm, rv, *a[1:], training=training, momentum=0.0)  # noqa: E731
    return fn, (x,) + ((w, b) if affine else ())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(device, training, affine):
    assert gradcheck(*gradcheck_problem(device, training, affine, (3, 2, 3, 4)))


def test_gradcheck_channels_last(device):
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(3, dtype=torch.float64, device=device).add(0.5).requires_grad_()
    assert gradcheck(lambda x, w: ours.batch_norm(x, None, None, w, None, training=True), (x, w))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradgradcheck(device, training, affine):
    """Double backward is exact, in training (the statistics depend on x) and in eval."""
    assert gradgradcheck(*gradcheck_problem(device, training, affine, (3, 2, 3, 2)))


def test_gradient_penalty_matches_torch(device):
    """A WGAN-GP style penalty, ||d out / d x||^2 differentiated for the parameters: torch's numbers."""
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, device=device)
    results = []
    for layer in (torch_cs231n.BatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        layer = layer.double().to(device)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 3))
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(layer(xi).sin().sum(), xi, create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), [xi, layer.weight]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ against F.batch_norm
def run_both(x, weight, bias, running, training, momentum, eps, grad):
    """Forward and backward through ours and torch's; each with its own copies of everything.

    On CUDA torch's side runs on the CPU: its CUDA batch norm (cuDNN's) fails with a weight of None and a
    bias ("tensor does not have a device"), returned a wrong gradient in such a case, and keeps the strides
    of a transposed input where its CPU kernel, and ours, return it contiguous (all seen on an H200)."""
    results = []
    for fn, device in ((ours.batch_norm, x.device), (F.batch_norm, torch.device("cpu"))):
        def copy(t, grad=False, device=device):
            return None if t is None else t.detach().to(device, copy=True).requires_grad_(grad)

        xi, wi, bi = copy(x, True), copy(weight, True), copy(bias, True)
        rm, rv = (copy(running[0]), copy(running[1])) if running is not None else (None, None)
        y = fn(xi, rm, rv, wi, bi, training=training, momentum=momentum, eps=eps)
        leaves = [t for t in (xi, wi, bi) if t is not None]
        grads = torch.autograd.grad(y, leaves, grad.to(device))
        back = lambda t: None if t is None else t.to(x.device)  # noqa: E731
        results.append((back(y), tuple(back(g) for g in grads), back(rm), back(rv)))
    return results


@given(
    n=st.integers(1, 4), c=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6),
    layout=st.sampled_from(LAYOUTS), dtype_index=st.integers(0, 3), affine=st.sampled_from(["both", "weight", "bias", "none"]),
    with_running=st.booleans(), training=st.booleans(), momentum=st.sampled_from([0.1, 0.0, 1.0, 0.37]),
    eps=st.sampled_from([1e-5, 1e-3]), seed=st.integers(0, 2**31 - 1),
)
def test_matches_torch(device, n, c, h, w, layout, dtype_index, affine, with_running, training, momentum, eps, seed):
    dtype = dtypes_for(device)[dtype_index]
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).to(device)  # noqa: E731
    x = with_layout(mk(n, c, h, w) * 2 + 3, layout)
    weight = mk(c) if affine in ("both", "weight") else None
    bias = mk(c) if affine in ("both", "bias") else None
    running = (mk(c), mk(c).abs() + 0.5) if with_running else None
    grad = mk(n, c, h, w)
    if training and n * h * w == 1:
        for fn in (ours.batch_norm, F.batch_norm):
            with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
                fn(x, None, None, training=True)
        return
    if not training and not with_running:
        for fn in (ours.batch_norm, F.batch_norm):
            with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
                fn(x, None, None, training=False)
        return
    (y, g, rm, rv), (y_ref, g_ref, rm_ref, rv_ref) = run_both(x, weight, bias, running, training, momentum, eps, grad)
    assert y.dtype == y_ref.dtype and [a.dtype for a in g] == [b.dtype for b in g_ref]
    assert_same_layout(y, y_ref)
    tol = tolerances(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        # torch's float16/bfloat16 batch norm on the CPU loses more than a rounding on small batches (a
        # d_input of 0.0029 came out as -0.048 in float16); the reference is float64 on the same narrow
        # values, and ours must be within one rounding of it (plus float32's error on cancelling sums).
        as64 = (lambda t: None if t is None else t.double())  # noqa: E731
        running64 = tuple(as64(t) for t in running) if running else None
        _, (y_ref, g_ref, rm_ref, rv_ref) = run_both(as64(x), as64(weight), as64(bias), running64, training, momentum,
                                                     eps, as64(grad))
        narrow_eps = torch.finfo(dtype).eps
        for a, b in zip((y, *g, rm, rv), (y_ref, *g_ref, rm_ref, rv_ref)):
            if b is not None:
                scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
                torch.testing.assert_close(a.double(), b, rtol=narrow_eps, atol=narrow_eps * scale)
        return
    torch.testing.assert_close(y, y_ref, **tol)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **tol)
    if with_running:
        torch.testing.assert_close(rm, rm_ref, **tol)
        torch.testing.assert_close(rv, rv_ref, **tol)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_other_ranks_match_torch(device, shape, training):
    """2-D and 3-D (BatchNorm1d's shapes) and 5-D input, as F.batch_norm accepts them."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=torch.float64)
    c = shape[1]
    running = (torch.randn(c, device=device, dtype=torch.float64), torch.rand(c, device=device, dtype=torch.float64) + 0.5)
    w, b = torch.randn(c, device=device, dtype=torch.float64), torch.randn(c, device=device, dtype=torch.float64)
    (y, g, rm, rv), (y_ref, g_ref, rm_ref, rv_ref) = run_both(x, w, b, running, training, 0.1, 1e-5, torch.randn_like(x))
    torch.testing.assert_close(y, y_ref, **tolerances(torch.float64))
    for a, b_ in zip(g + (rm, rv), g_ref + (rm_ref, rv_ref)):
        torch.testing.assert_close(a, b_, **tolerances(torch.float64))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("isa", ["auto", "avx512", "avx2", "baseline"])
def test_larger_shapes_float32(device, layout, isa):
    """Shapes where the CPU kernel blocks planes (S <= 4096), splits them (S > 4096), or has C < threads; on
    the CPU in each instruction set its loops are built for (cpu::with_best_isa)."""
    if device == "cuda" and isa != "auto":
        pytest.skip("the instruction sets are the CPU's")
    torch.manual_seed(1)
    for shape in [(6, 5, 20, 30), (2, 3, 70, 70), (3, 40, 7, 7), (2, 1, 50, 50), (4, 70, 9, 9)]:
        x = with_layout(torch.randn(shape, device=device) * 3 + 1, layout)
        c = shape[1]
        w, b = torch.randn(c, device=device), torch.randn(c, device=device)
        running = (torch.zeros(c, device=device), torch.ones(c, device=device))
        with contextlib.nullcontext() if isa == "auto" else forced_isa(isa):
            (y, g, rm, rv), (y_ref, g_ref, rm_ref, rv_ref) = run_both(x, w, b, running, True, 0.1, 1e-5,
                                                                      torch.randn_like(x))
        torch.testing.assert_close(y, y_ref)
        assert_same_layout(y, y_ref)
        torch.testing.assert_close(g[0], g_ref[0], rtol=1e-4, atol=1e-5)
        # dgamma, dbeta: sums of up to 10^4 float32 terms of size ~1 in another order than torch's.
        torch.testing.assert_close(g[1], g_ref[1], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(g[2], g_ref[2], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(rm, rm_ref)
        torch.testing.assert_close(rv, rv_ref)


def test_results_do_not_depend_on_thread_count():
    """The CPU reduction combines its partial results in a fixed order: same bits on 1 or 2 threads, both
    for C >= threads (per channel) and C < threads (split over planes)."""
    threads = torch.get_num_threads()
    torch.manual_seed(2)
    try:
        for shape in [(4, 1, 30, 30), (4, 6, 30, 30)]:
            x = torch.randn(shape)
            g = torch.randn(shape)
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                y, mean, invstd, var = ops.batch_norm_forward_train(x, None, None, 1e-5)
                dx, dw, db = ops.batch_norm_backward(g, x, None, mean, invstd, True, [True, True, True])
                outs.append((y, mean, invstd, var, dx, dw, db))
            for a, b in zip(*outs):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the maths
def test_cs231n_check(device):
    """The assignment's check: x = 4 randn + 10 normalises to mean 0 and std 1 per channel; then gamma, beta."""
    torch.manual_seed(231)
    x = 4 * torch.randn(2, 3, 4, 5, device=device, dtype=torch.float64) + 10
    y = ours.batch_norm(x, None, None, training=True)
    mean, std = y.mean(dim=(0, 2, 3)), y.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3, device=device, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(std, torch.ones(3, device=device, dtype=torch.float64), rtol=0, atol=1e-5)  # eps
    gamma = torch.tensor([1.0, 2.0, 3.0], device=device, dtype=torch.float64)
    beta = torch.tensor([11.0, 12.0, 13.0], device=device, dtype=torch.float64)
    y = ours.batch_norm(x, None, None, gamma, beta, training=True)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), beta, rtol=0, atol=1e-12)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), gamma, rtol=0, atol=1e-4)


def test_large_mean_is_stable(device):
    """float32 values of mean 1e4 and std 1: E[x^2] - E[x]^2 would lose all of the variance."""
    torch.manual_seed(3)
    for layout in ("contiguous", "channels_last"):
        x = with_layout(torch.randn(8, 4, 16, 16, device=device) + 1e4, layout)
        y, mean, invstd, var = ops.batch_norm_forward_train(x, None, None, 1e-5)
        x64 = x.double()
        mean64 = x64.mean(dim=(0, 2, 3))
        var64 = (x64 - mean64[None, :, None, None]).pow(2).mean(dim=(0, 2, 3))
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)
        torch.testing.assert_close(var.double(), var64, rtol=1e-5 if device == "cpu" else 1e-4, atol=0)
        y64 = (x64 - mean64[None, :, None, None]) / (var64[None, :, None, None] + 1e-5).sqrt()
        # float32 tolerance for outputs of size ~1: (x - mean_hi) - mean_lo keeps them exact. CUDA
        # accumulates in float, relative to a shift (cuda/batch_norm.cu): ~1e-6 where torch's is ~4e-4.
        tol = 1e-5 if device == "cpu" else 1e-4
        torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
        # torch's CPU kernel folds x * scale + shift, which rounds at the size of 1e4 (ulp 9.8e-4): it is off
        # by a few such ulps. Agree with it within 5 ulps, and be at least as close to float64 as it is.
        y_ref = F.batch_norm(x, None, None, training=True)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=5 * 9.8e-4)
        assert (y.double() - y64).abs().max() <= (y_ref.double() - y64).abs().max() + 1e-6
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        rm_ref, rv_ref = rm.clone(), rv.clone()
        ours.batch_norm(x, rm, rv, training=True)
        F.batch_norm(x, rm_ref, rv_ref, training=True)
        torch.testing.assert_close(rm, rm_ref)
        torch.testing.assert_close(rv, rv_ref, rtol=1e-4, atol=1e-5)


def test_zero_variance_channel_is_finite(device):
    x = torch.randn(3, 2, 4, 4, device=device)
    x[:, 1] = 7.0
    x.requires_grad_()
    y = ours.batch_norm(x, None, None, training=True)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all()
    # torch's folded x * scale + shift leaves ~3e-5 where the exact answer (ours) is 0.
    torch.testing.assert_close(y, F.batch_norm(x.detach(), None, None, training=True), rtol=1e-5, atol=1e-4)


def test_empty_batch(device):
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    w = torch.ones(3, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = ours.batch_norm(x, rm, rv, w, None, training=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(3, device=device))
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    assert ours.batch_norm(x, rm, rv, training=False).shape == x.shape


def test_nan_propagates_within_its_channel(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 1, 2, 2] = float("nan")
    y, y_ref = ours.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    torch.testing.assert_close(y, y_ref, equal_nan=True)


# ------------------------------------------------------------------------------------------- the module
def make_pair(device, **kwargs):
    torch.manual_seed(4)
    ref = torch.nn.BatchNorm2d(3, device=device, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    mod = torch_cs231n.BatchNorm2d(3, device=device, **kwargs)
    mod.load_state_dict(ref.state_dict())
    return mod, ref


@pytest.mark.parametrize("kwargs", [
    dict(), dict(momentum=None), dict(momentum=0.0), dict(affine=False), dict(track_running_stats=False),
    dict(eps=1e-3, momentum=0.3),
])
def test_module_matches_torch_over_steps(device, kwargs):
    mod, ref = make_pair(device, **kwargs)
    assert isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and isinstance(mod, torch.nn.BatchNorm2d)
    assert repr(mod) == repr(ref)
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        x = (torch.randn(4, 3, 5, 5, generator=gen) * (step + 1) + step).to(device)
        if step % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = mod(xo), ref(xr)
        torch.testing.assert_close(yo, yr)
        assert_same_layout(yo, yr)
        g = torch.randn_like(yr)
        yo.backward(g)
        yr.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad)
        for (name, a), b in zip(mod.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), (_, b) in zip(mod.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    if ref.track_running_stats:
        assert int(mod.num_batches_tracked) == 4
    mod.eval()
    ref.eval()
    x = torch.randn(2, 3, 5, 5, generator=gen).to(device)
    torch.testing.assert_close(mod(x), ref(x))


def test_momentum_none_is_the_cumulative_average(device):
    mod, _ = make_pair(device, momentum=None)
    xs = [torch.randn(4, 3, 3, 3, device=device) * (i + 1) for i in range(3)]
    for x in xs:
        mod(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs])
    torch.testing.assert_close(mod.running_mean, means.mean(0))
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs])
    torch.testing.assert_close(mod.running_var, variances.mean(0))


def test_momentum_zero_keeps_running_stats(device):
    mod, _ = make_pair(device, momentum=0.0)
    before = copy.deepcopy(mod.state_dict())
    mod(torch.randn(4, 3, 3, 3, device=device))
    assert torch.equal(mod.running_mean, before["running_mean"]) and torch.equal(mod.running_var, before["running_var"])
    assert int(mod.num_batches_tracked) == 1


def test_state_dict_round_trip_both_ways(device):
    ref = torch.nn.BatchNorm2d(3, device=device)
    ref(torch.randn(4, 3, 3, 3, device=device))  # non-trivial running statistics
    mod = torch_cs231n.BatchNorm2d(3, device=device)
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict())
    back = torch.nn.BatchNorm2d(3, device=device)
    back.load_state_dict(mod.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and torch.equal(mod.state_dict()[k], v)


def test_module_dtype_argument(device):
    mod = torch_cs231n.BatchNorm2d(3, device=device, dtype=torch.float64)
    assert mod.weight.dtype == torch.float64 and mod.running_var.dtype == torch.float64
    assert mod(torch.randn(2, 3, 2, 2, device=device, dtype=torch.float64)).dtype == torch.float64


def test_module_eval_without_buffers_uses_batch_statistics(device):
    mod, ref = make_pair(device, track_running_stats=False)
    mod.eval()
    ref.eval()
    x = torch.randn(4, 3, 3, 3, device=device)
    torch.testing.assert_close(mod(x), ref(x))


# ------------------------------------------------------------------------------------ float16, bfloat16
# tails; a plane > 4096 values; channels_last rows of 16 values and a tail (the vector loops' rows)
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 5, 7, 9), (2, 3, 70, 70), (2, 20, 9, 11)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", "float"])
@pytest.mark.parametrize("isa", ["auto", "avx2", "baseline"])  # the CPU's loops (AVX-512's), AVX2's, the portable
def test_half_inputs(device, dtype, param_dtype, layout, shape, isa):
    """float16/bfloat16 input, with parameters of its dtype or float32 (mixed, as autocast leaves them).
    Statistics and arithmetic in float32, one rounding at the end: the output is the float64 result on
    the same narrow values within one rounding (eps of the dtype, relative); torch's agrees as well."""
    if isa != "auto" and device != "cpu":
        pytest.skip("the ISA cap is the CPU's")
    torch.manual_seed(6)
    c = shape[1]
    pd = dtype if param_dtype == "same" else torch.float32
    x = with_layout(torch.randn(shape, device=device, dtype=dtype) * 2 + 1, layout)
    w, b = torch.rand(c, device=device, dtype=pd) + 0.5, torch.randn(c, device=device, dtype=pd)
    running = (torch.zeros(c, device=device, dtype=pd), torch.ones(c, device=device, dtype=pd))
    dy = torch.randn_like(x)
    eps = torch.finfo(dtype).eps
    for training in (True, False):
        with contextlib.nullcontext() if isa == "auto" else forced_isa(isa):
            (y, g, rm, rv), (y_ref, g_ref, rm_ref, rv_ref) = run_both(x, w, b, running, training, 0.1, 1e-5, dy)
        assert y.dtype == dtype
        # float64 on the same narrow values (and the running statistics' values before the update)
        y64 = F.batch_norm(x.double(), running[0].double(), running[1].double(), w.double(), b.double(),
                           training=training, momentum=0.0, eps=1e-5)
        torch.testing.assert_close(y.double(), y64, rtol=eps, atol=eps)
        tol = tolerances(dtype)
        torch.testing.assert_close(y, y_ref, **tol)
        for a, b_ in zip(g, g_ref):
            torch.testing.assert_close(a.float(), b_.float(), rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(rm, rm_ref, **tol)
        torch.testing.assert_close(rv, rv_ref, **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("isa", ["auto", "avx2", "baseline"])
def test_bfloat16_results_are_rounded_as_torch_rounds(layout, isa):
    """The narrow loops round each float32 result once, to nearest with ties to even, bit for bit as torch
    rounds: eval with a running mean of 0, a running variance of 1, eps 0, weight 1 and bias 1 makes y =
    x + 1, exact in float32 for x in [-4, 4] and rounded once (half of such sums are ties; 254 + 1.5 rounds
    up to 2^8). 20 channels: rows of 16 and a tail of 4 in channels_last. A NaN becomes c10's 0x7fc0."""
    gen = torch.Generator().manual_seed(9)
    x = (torch.rand(2, 20, 9, 11, generator=gen) * 8 - 4).bfloat16()
    x[1, 0, 0, 0], x[0, 5, 3, 3] = 254.0, float("nan")
    x = with_layout(x, layout)
    bias = torch.ones(20)
    bias[0] = 1.5
    with contextlib.nullcontext() if isa == "auto" else forced_isa(isa):
        y = ours.batch_norm(x, torch.zeros(20), torch.ones(20), torch.ones(20), bias, training=False, eps=0.0)
    want = (x.double() + bias.double().view(1, -1, 1, 1)).float().bfloat16()
    nan = want.isnan()
    assert want[1, 0, 0, 0] == 256 and nan.sum() == 1 and (y.isnan() == nan).all()
    assert (y.view(torch.int16)[nan] == 0x7FC0).all() and (y.view(torch.int16) == want.view(torch.int16))[~nan].all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_devices_are_refused():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected all tensors to be on the same device, but input is on cuda:0 and weight is on cpu"):
        ops.batch_norm_forward_train(x, torch.ones(3), None, 1e-5)


@pytest.mark.parametrize("dtype,name", [(torch.int32, "Int"), (torch.complex64, "ComplexFloat")])
def test_dtypes_torch_refuses_are_refused(device, dtype, name):
    with pytest.raises(RuntimeError, match=f"batch_norm_forward_train: expected input to have dtype float32, float64, "
                                           f"float16 or bfloat16, but got {name}"):
        ours.batch_norm(torch.ones(2, 3, 2, 2, device=device, dtype=dtype), None, None, training=True)


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        torch_cs231n.BatchNorm2d(3).to(device)(x[0])
    with pytest.raises(RuntimeError, match=r"expected input to have 2 or more dimensions \(N, C, \.\.\.\), but got a 1-D tensor"):
        ops.batch_norm_forward_train(torch.randn(5, device=device), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"batch_norm_forward_train: expected weight to have shape \[3\] \(the channels of input, dim 1 of \[2, 3, 4, 4\]\), but got shape \[4\]"):
        ours.batch_norm(x, None, None, torch.ones(4, device=device), training=True)
    with pytest.raises(RuntimeError, match=r"batch_norm_forward_eval: expected running_mean to have shape \[3\].*but got shape \[2\]"):
        ours.batch_norm(x, torch.zeros(2, device=device), torch.ones(3, device=device))
    with pytest.raises(RuntimeError, match=r"expected running_mean to have shape \[3\]"):
        torch_cs231n.BatchNorm2d(4).to(device).eval()(x)
    with pytest.raises(RuntimeError, match=r"expected bias to have the dtype of input \(Float\), but got Double"):
        ours.batch_norm(x, None, None, None, torch.zeros(3, device=device, dtype=torch.float64), training=True)
    with pytest.raises(RuntimeError, match=r"batch_norm_backward: expected grad_output to have the dtype of input"):
        ops.batch_norm_backward(x.double(), x, None, torch.zeros(3, device=device), torch.ones(3, device=device), True,
                                [True, True, True])


def test_one_value_per_channel_when_training(device):
    x = torch.randn(1, 3, 1, 1, device=device)
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3, 1, 1\]\)$"):
        ours.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size \[1, 3, 1, 1\]"):
        ops.batch_norm_forward_train(x, None, None, 1e-5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch_cs231n.BatchNorm2d(3).to(device)(x)
    torch_cs231n.BatchNorm2d(3).to(device).eval()(x)  # eval is fine, as in torch


def test_negative_eps(device):
    x = torch.randn(2, 3, 2, 2, device=device)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training, but got -1"):
        ours.batch_norm(x, None, None, training=True, eps=-1.0)
    with pytest.raises(ValueError, match="batch_norm eps must be non-negative, but got -0.5"):
        ours.batch_norm(x, torch.zeros(3, device=device), torch.ones(3, device=device), eps=-0.5)
    with pytest.raises(RuntimeError, match="batch_norm_forward_train: expected eps to be positive in training, but got -1"):
        ops.batch_norm_forward_train(x, None, None, -1.0)
    with pytest.raises(RuntimeError, match="batch_norm_forward_eval: expected eps to be non-negative, but got -1"):
        ops.batch_norm_forward_eval(x, torch.zeros(3, device=device), torch.ones(3, device=device), None, None, -1.0)


def test_ops_do_not_write_their_inputs(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    saved = [t.clone() for t in (x, rm, rv)]
    ops.batch_norm_forward_train(x, None, None, 1e-5)
    ops.batch_norm_forward_eval(x, rm, rv, None, None, 1e-5)
    for a, b in zip((x, rm, rv), saved):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- opcheck and compile
def _samples(device):
    yield torch.randn(2, 3, 4, 5, device=device), True
    yield torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last), True
    yield torch.randn(2, 3, 5, 4, device=device, dtype=torch.float64).transpose(2, 3), False
    yield torch.randn(6, 3, device=device), True
    yield torch.randn(0, 3, 4, 5, device=device), False


def test_opcheck(device):
    for x, affine in _samples(device):
        c = x.shape[1]
        w = torch.rand(c, device=device, dtype=x.dtype) + 0.5 if affine else None
        b = torch.randn(c, device=device, dtype=x.dtype) if affine else None
        torch.library.opcheck(ops.batch_norm_forward_train.default, (x, w, b, 1e-5))
        rm, rv = torch.randn(c, device=device, dtype=x.dtype), torch.rand(c, device=device, dtype=x.dtype) + 0.5
        torch.library.opcheck(ops.batch_norm_forward_eval.default, (x, rm, rv, w, b, 1e-5))
        _, mean, invstd, _ = ops.batch_norm_forward_train(x, w, b, 1e-5)
        g = torch.randn_like(x)
        for training in (True, False):
            for mask in ([True, True, True], [True, False, False], [False, True, True]):
                torch.library.opcheck(ops.batch_norm_backward.default, (g, x, w, mean, invstd, training, mask))


def test_opcheck_update_stats(device):
    for dtype in (torch.float32, torch.float64):
        mean, var = torch.randn(3, device=device, dtype=dtype), torch.rand(3, device=device, dtype=dtype)
        for running in ((torch.randn(3, device=device, dtype=dtype), torch.rand(3, device=device, dtype=dtype)),
                        (torch.randn(3, device=device, dtype=dtype), None)):
            torch.library.opcheck(ops.batch_norm_update_stats_.default, (*running, mean, var, 0.1, 7))


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_update_stats_follows_the_formula(device, running_dtype):
    """running <- (1 - m) running + m batch; the variance's batch value unbiased by count / (count - 1).
    Computed in the running dtype's accumulation type from a float32 batch, in place, through a strided view."""
    gen = torch.Generator().manual_seed(10)
    mean, var = torch.randn(5, generator=gen).to(device), torch.rand(5, generator=gen).to(device)
    store = torch.randn(5, 2, generator=gen).to(device, running_dtype)
    rm, rv = store[:, 0].clone(), store[:, 1]  # rv: a column, stride 2
    want_m = 0.7 * rm.double() + 0.3 * mean.double()
    want_v = 0.7 * rv.double() + 0.3 * var.double() * 12 / 11
    ops.batch_norm_update_stats_(rm, rv, mean, var, 0.3, 12)
    torch.testing.assert_close(rm, want_m.to(running_dtype))  # to a rounding of the running dtype
    torch.testing.assert_close(store[:, 1], want_v.to(running_dtype))
    before = rm.clone()
    ops.batch_norm_update_stats_(rm, None, mean, var, 0.3, 0)  # an empty batch: nothing moves
    assert torch.equal(rm, before)


def test_update_stats_refuses_bad_arguments(device):
    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="batch_norm_update_stats_: expected more than 1 value per channel to "
                                           "update running_var"):
        ops.batch_norm_update_stats_(rm, rv, mean, var, 0.1, 1)
    with pytest.raises(RuntimeError, match=r"batch_norm_update_stats_: expected running_mean to have shape \[3\]"):
        ops.batch_norm_update_stats_(torch.zeros(4, device=device), rv, mean, var, 0.1, 5)
    with pytest.raises(RuntimeError, match="batch_norm_update_stats_: expected count .* to be >= 0, but got -2"):
        ops.batch_norm_update_stats_(rm, rv, mean, var, 0.1, -2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused update is a CUDA kernel")
def test_cuda_running_updates_match_the_exact_one(monkeypatch):
    """TORCH_CS231N_CUDA_BN_UPDATE=fused (the default) and =aten (torch's in-place ops, the default before)
    against the exact update, through strided views, in every running dtype, with one statistic absent,
    and with the two of different dtypes (a launch each). The fused kernel rounds once, as torch's own CUDA
    batch norm does, so it is held to the exact value rounded; torch's ops round after each op (three
    times in float16: the H200 run saw 2.5e-3 between the two), so they get a few ulps."""
    mean, var = torch.randn(300, device="cuda"), torch.rand(300, device="cuda")
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for dm, dv in [(d, d) for d in dtypes] + [(torch.float32, torch.float64), (torch.float32, None)]:
        start_m = torch.randn(300, 2, device="cuda").to(dm)
        start_v = torch.rand(300, 2, device="cuda").to(dv) if dv is not None else None
        exact_m = start_m[:, 1].double() * 0.9 + mean.double() * 0.1
        exact_v = start_v[:, 0].double() * 0.9 + var.double() * 0.1 * 50 / 49 if dv is not None else None
        for choice in ("aten", "fused"):
            monkeypatch.setenv("TORCH_CS231N_CUDA_BN_UPDATE", choice)
            rm = start_m.clone()
            rv = start_v.clone() if start_v is not None else None
            ops.batch_norm_update_stats_(rm[:, 1], rv[:, 0] if rv is not None else None, mean, var, 0.1, 50)
            assert torch.equal(rm[:, 0], start_m[:, 0])  # the other column of the view's base is untouched
            for got, exact in ((rm[:, 1], exact_m), (rv[:, 0] if rv is not None else None, exact_v)):
                if got is None:
                    continue
                eps = torch.finfo(got.dtype).eps
                rtol, atol = (eps, 1e-6) if choice == "fused" else (4 * eps, 4 * eps)
                torch.testing.assert_close(got.double(), exact, rtol=max(rtol, 2e-7), atol=atol)
    monkeypatch.setenv("TORCH_CS231N_CUDA_BN_UPDATE", "fastest")
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_BN_UPDATE: expected 'fused' or 'aten' .*, but got"):
        ops.batch_norm_update_stats_(start_m[:, 0].clone(), None, mean, var, 0.1, 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the block-per-channel kernels are CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(4, 300, 7, 7), (2, 3, 150, 150), (2, 5, 1, 3)])
def test_cuda_channel_blocks_match_torch(monkeypatch, dtype, shape):
    """TORCH_CS231N_CUDA_BN=channels: one block per channel does the training forward and backward (by
    default only where there are as many channels as multiprocessors), for channel-first layouts of up to
    65536 values a channel: many channels of a block's width, channels of many values a thread, channels of
    fewer values than threads; outputs, gradients and running statistics against torch's, with and without
    affine parameters."""
    monkeypatch.setenv("TORCH_CS231N_CUDA_BN", "channels")
    gen = torch.Generator().manual_seed(12)
    for affine in (True, False):
        x = (torch.randn(shape, generator=gen) * 3 + 5).to("cuda", dtype)
        weight = torch.randn(shape[1], generator=gen).to("cuda", dtype) if affine else None
        bias = torch.randn(shape[1], generator=gen).to("cuda", dtype) if affine else None
        running = (torch.zeros(shape[1], device="cuda", dtype=dtype), torch.ones(shape[1], device="cuda", dtype=dtype))
        grad = torch.randn(shape, generator=gen).to("cuda", dtype)
        mine, ref = run_both(x, weight, bias, running, True, 0.1, 1e-5, grad)
        for a, b in zip([mine[0], *mine[1], mine[2], mine[3]], [ref[0], *ref[1], ref[2], ref[3]]):
            torch.testing.assert_close(a, b, **tolerances(dtype))
    monkeypatch.setenv("TORCH_CS231N_CUDA_BN", "fastest")
    with pytest.raises(RuntimeError, match="TORCH_CS231N_CUDA_BN: expected 'stages' or 'channels' .*, but got"):
        ours.batch_norm(x, None, None, training=True)


def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch_cs231n.BatchNorm2d(4), torch_cs231n.ReLU(),
        torch.nn.Conv2d(4, 4, 3), torch_cs231n.BatchNorm2d(4, momentum=None),
    ).to(device)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(3, 3, 6, 6, device=device)
        assert_same_output_and_grads(compiled(x), twin, model(x), model)
    for (k, a), b in zip(twin.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    model.eval()
    twin.eval()
    x = torch.randn(2, 3, 6, 6, device=device)
    torch.testing.assert_close(compiled(x), model(x))
