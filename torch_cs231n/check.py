"""``python -m torch_cs231n check [--device cpu|cuda]``: prove a build right on this machine.

For every layer: float64 gradcheck of our autograd (forward and backward kernels), and comparison of the
forward and the gradients with torch.nn.functional in float32. Prints a PASS/FAIL table and the build's
facts, and exits non-zero if anything failed.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from . import functional as ours

CHECKS: list = []  # (layer, what, function(device))


def check(layer: str, what: str):
    def register(fn):
        CHECKS.append((layer, what, fn))
        return fn
    return register


def _rand(*shape, device, dtype=torch.float64, gen=None):
    return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()


def _compare(fn_ours, fn_ref, inputs, **tol):
    """Outputs and gradients (for a random upstream gradient) of both functions must agree."""
    a = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    b = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out_a, out_b = fn_ours(*a), fn_ref(*b)
    torch.testing.assert_close(out_a, out_b, **tol)
    g = torch.randn_like(out_b)
    wrt_a = [t for t in a if t.requires_grad]
    wrt_b = [t for t in b if t.requires_grad]
    for ga, gb in zip(torch.autograd.grad(out_a, wrt_a, g), torch.autograd.grad(out_b, wrt_b, g)):
        torch.testing.assert_close(ga, gb, **tol)


# --------------------------------------------------------------------------------------------------- ReLU
@check("relu", "gradcheck (float64)")
def _relu_grad(device):
    x = _rand(2, 3, 5, 5, device=device)
    x = (x + 0.2 * torch.sign(x)).detach().requires_grad_()  # keep finite differences away from the kink
    assert gradcheck(lambda t: ours.relu(t), (x,))


@check("relu", "vs F.relu (float32, channels_last)")
def _relu_cmp(device):
    x = torch.randn(4, 8, 9, 7, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    _compare(lambda t: ours.relu(t), F.relu, [x], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- Conv2d
@check("conv2d", "gradcheck (float64; stride, padding, dilation, groups)")
def _conv_grad(device):
    for stride, padding, dilation, groups in [(1, 1, 1, 1), (2, 0, 1, 1), (2, 1, 2, 2), (1, 1, 1, 4)]:
        x = _rand(2, 4, 7, 6, device=device)
        w = _rand(4, 4 // groups, 3, 3, device=device)
        b = _rand(4, device=device)
        args = (stride, padding, dilation, groups)
        assert gradcheck(lambda x, w, b, args=args: ours.conv2d(x, w, b, *args), (x, w, b))


@check("conv2d", "vs F.conv2d (float32; dense, strided, 1x1, depthwise)")
def _conv_cmp(device):
    for shape, wshape, kw in [((4, 8, 13, 11), (16, 8, 3, 3), dict(padding=1)),
                              ((4, 8, 13, 11), (6, 8, 5, 3), dict(stride=2, padding=(2, 1), dilation=(1, 2))),
                              ((4, 8, 13, 11), (16, 8, 1, 1), {}),
                              ((4, 8, 13, 11), (8, 1, 3, 3), dict(padding=1, groups=8))]:
        x = torch.randn(shape, device=device, requires_grad=True)
        w = torch.randn(wshape, device=device, requires_grad=True)
        b = torch.randn(wshape[0], device=device, requires_grad=True)
        _compare(lambda x, w, b, kw=kw: ours.conv2d(x, w, b, **kw), lambda x, w, b, kw=kw: F.conv2d(x, w, b, **kw),
                 [x, w, b], rtol=1e-4, atol=1e-4)


@check("conv2d", "vs F.conv2d (complex64; int8 and int64 bit for bit on the CPU)")
def _conv_dtypes(device):
    kw = dict(padding=1, groups=2)
    x, w, b = (torch.randn(s, dtype=torch.complex64, device=device, requires_grad=True)
               for s in ((2, 4, 9, 8), (6, 2, 3, 3), (6,)))
    _compare(lambda x, w, b: ours.conv2d(x, w, b, **kw), lambda x, w, b: F.conv2d(x, w, b, **kw), [x, w, b],
             rtol=1e-4, atol=1e-4)
    if device == "cpu":  # torch's CUDA convolution takes no integers
        for dtype in (torch.int8, torch.int64):  # sums that wrap around in int8
            x, w, b = (torch.randint(-100, 100, s, dtype=dtype) for s in ((2, 4, 9, 8), (6, 2, 3, 3), (6,)))
            assert torch.equal(ours.conv2d(x, w, b, **kw), F.conv2d(x, w, b, **kw)), f"{dtype} sums differ from torch's"


# ---------------------------------------------------------------------------------------------- MaxPool2d
@check("max_pool2d", "gradcheck (float64)")
def _pool_grad(device):
    x = torch.randperm(2 * 3 * 9 * 9, dtype=torch.float64).reshape(2, 3, 9, 9).to(device)  # no ties
    x = (x / x.numel()).requires_grad_()
    assert gradcheck(lambda t: ours.max_pool2d(t, 3, 2, 1), (x,))


@check("max_pool2d", "vs F.max_pool2d (float32; outputs, indices, gradients)")
def _pool_cmp(device):
    for kw in [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
               dict(kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2), ceil_mode=True)]:
        x = torch.randn(3, 5, 12, 11, device=device, requires_grad=True)
        _compare(lambda t, kw=kw: ours.max_pool2d(t, **kw), lambda t, kw=kw: F.max_pool2d(t, **kw), [x], rtol=0,
                 atol=0)
        _, i_ours = ours.max_pool2d(x, return_indices=True, **kw)
        _, i_ref = F.max_pool2d(x, return_indices=True, **kw)
        assert torch.equal(i_ours, i_ref), "indices differ from torch's"


# -------------------------------------------------------------------------------------------- BatchNorm2d
@check("batch_norm", "gradcheck (float64; training and eval)")
def _bn_grad(device):
    x = _rand(3, 4, 5, 5, device=device)
    w, b = _rand(4, device=device), _rand(4, device=device)
    assert gradcheck(lambda x, w, b: ours.batch_norm(x, None, None, w, b, training=True), (x, w, b))
    rm, rv = torch.randn(4, dtype=torch.float64, device=device), torch.rand(4, dtype=torch.float64, device=device) + 0.5
    assert gradcheck(lambda x, w, b: ours.batch_norm(x, rm, rv, w, b, training=False), (x, w, b))


@check("batch_norm", "vs F.batch_norm (float32; outputs, gradients, running stats)")
def _bn_cmp(device):
    x = (3 * torch.randn(8, 6, 7, 9, device=device) + 2).requires_grad_()
    w, b = torch.randn(6, device=device, requires_grad=True), torch.randn(6, device=device, requires_grad=True)
    stats = {k: (torch.zeros(6, device=device), torch.ones(6, device=device)) for k in ("ours", "torch")}
    _compare(lambda x, w, b: ours.batch_norm(x, *stats["ours"], w, b, training=True, momentum=0.1),
             lambda x, w, b: F.batch_norm(x, *stats["torch"], w, b, training=True, momentum=0.1), [x, w, b])
    for a, r in zip(stats["ours"], stats["torch"]):
        torch.testing.assert_close(a, r)
    _compare(lambda x, w, b: ours.batch_norm(x, *stats["ours"], w, b, training=False),
             lambda x, w, b: F.batch_norm(x, *stats["torch"], w, b, training=False), [x, w, b])


# A bad call must raise a RuntimeError carrying its whole message. A build that links a second copy of
# libstdc++ cuts the message at its first number, or crashes the process (docs/building.md), so the call
# runs in a child process: a crash there is a FAIL here, not the end of this check.
_BAD_CALL = """
import sys, torch, torch_cs231n
x = torch.zeros(1, 1, 3, 3, device=sys.argv[1]); w = torch.zeros(1, 1, 5, 5, device=sys.argv[1])
try:
    torch.ops.torch_cs231n.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1)
except RuntimeError as err:
    print(str(err).splitlines()[0])
"""
_BAD_CALL_MESSAGE = ("conv2d_forward: the padded input (3 x 3 from input 3 x 3 and padding [0, 0]) is smaller "
                     "than the dilated kernel (5 x 5 from kernel 5 x 5 and dilation [1, 1]); the kernel can't be "
                     "larger than the padded input")


@check("errors", "a bad call raises its whole message (child process)")
def _error_message(device):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", _BAD_CALL, device], capture_output=True, text=True, env=env,
                           timeout=600)
    assert child.returncode == 0, (f"the child process died (exit code {child.returncode}) on a bad call: "
                                   f"{child.stderr.strip()[-200:]}")
    got = child.stdout.strip()
    assert got == _BAD_CALL_MESSAGE, f"expected the RuntimeError {_BAD_CALL_MESSAGE!r}, but got {got!r}"


# ------------------------------------------------------------------------------------------ references
@contextlib.contextmanager
def full_float32_references():
    """torch's references in full float32: TF32 off for cuDNN's convolutions (torch's default turns it
    on) and for cuBLAS's matmuls, the user's flags restored afterwards. On a GPU, a TF32 F.conv2d is
    off by about 1e-3 relative, more than ours (float32 accumulation) is off from float64."""
    cudnn = torch.backends.cudnn
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        # cuDNN's flags through its own context manager (every other flag passed as it is): torch's test
        # utilities forbid setting them directly once imported (torch.backends.disable_global_flags).
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


# ----------------------------------------------------------------------------------------------------- run
def run(device: str = "cpu", out=sys.stdout) -> int:
    with full_float32_references():
        return _run(device, out)


def _run(device: str, out) -> int:
    import torch_cs231n

    info = torch_cs231n.build_info()
    gpu = torch.cuda.get_device_name(device) if device == "cuda" else platform.machine()
    kernels = f"yes, archs {info['cuda_archs']}" if info["cuda"] else "no"
    print(f"torch_cs231n {info['version']} ({info['backend']} build), torch {info['torch']} "
          f"(CUDA {info['torch_cuda'] or 'none'}); CUDA kernels: {kernels};"
          f" OpenMP: {'yes' if info['openmp'] else 'no'}; device: {device} ({gpu})", file=out)
    failures = 0
    width = max(len(layer) + len(what) for layer, what, _ in CHECKS) + 3
    for layer, what, fn in CHECKS:
        start = time.perf_counter()
        torch.manual_seed(0)
        try:
            fn(device)
            status, detail = "PASS", ""
        except Exception as err:  # a failing kernel may raise anything; report it, keep going
            failures += 1
            status = "FAIL"
            detail = "  " + (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            if not isinstance(err, AssertionError):
                detail += f" ({type(err).__name__})"
            if "-v" in sys.argv:
                traceback.print_exc()
        print(f"{status}  {(layer + ': ' + what):<{width}} {time.perf_counter() - start:6.2f} s{detail}", file=out)
    print(f"{len(CHECKS) - failures}/{len(CHECKS)} checks passed on {device}", file=out)
    return 1 if failures else 0
