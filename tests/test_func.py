"""torch.func through our layers: grad, vmap, jvp (and eager forward-mode AD), jacrev, hessian and
per-sample gradients of a converted net, each equal to the same transform of torch's layer, in float64.

vmap must batch through the ops' batching rules (torch_cs231n/_vmap.py), not torch's per-sample fallback
loop, which announces itself with a "performance drop" warning: the tests turn that warning into an error.
"""
import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import torch_cs231n
from torch_cs231n import functional as ours

torch.manual_seed(0)
X = torch.randn(3, 2, 6, 6, dtype=torch.float64)
W = torch.randn(4, 2, 3, 3, dtype=torch.float64)
B = torch.randn(4, dtype=torch.float64)
GAMMA, BETA = torch.rand(2, dtype=torch.float64) + 0.5, torch.randn(2, dtype=torch.float64)
RUNNING = (torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5)


def layers(m):
    """Each layer as a function of its differentiable inputs, from the namespace m (ours or F)."""
    return {
        "relu": (lambda x: m.relu(x), (X,)),
        "conv2d": (lambda x, w, b: m.conv2d(x, w, b, stride=1, padding=1), (X, W, B)),
        "conv2d_strided_groups": (lambda x, w: m.conv2d(x, w, None, stride=2, groups=2), (X, W[:, :1])),
        "max_pool2d": (lambda x: m.max_pool2d(x, 3, 2, 1), (X,)),
        "batch_norm_train": (lambda x, g, b: m.batch_norm(x, None, None, g, b, training=True), (X, GAMMA, BETA)),
        "batch_norm_eval": (lambda x, g, b: m.batch_norm(x, *RUNNING, g, b, training=False), (X, GAMMA, BETA)),
    }


NAMES = list(layers(ours))


@pytest.fixture(autouse=True)
def no_fallback_loops():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        yield


def both(name, transform):
    """transform(fn, inputs) for our layer and torch's; the results compared."""
    (f_ours, inputs), (f_torch, _) = layers(ours)[name], layers(F)[name]
    got, want = transform(f_ours, inputs), transform(f_torch, inputs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_grad(name):
    both(name, lambda f, inputs: grad(lambda *a: f(*a).sin().sum(), argnums=tuple(range(len(inputs))))(*inputs))


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_samples(name):
    """Each sample of X is one call (a batch of one); vmap runs them as one batch through our ops."""
    both(name, lambda f, inputs: vmap(lambda x: f(x.unsqueeze(0), *inputs[1:]))(inputs[0]))


@pytest.mark.parametrize("name", NAMES)
def test_jvp(name):
    def transform(f, inputs):
        tangents = tuple(torch.cos(t) for t in inputs)
        return jvp(f, inputs, tangents)
    both(name, transform)


@pytest.mark.parametrize("name", NAMES)
def test_forward_ad(name):
    def transform(f, inputs):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, torch.cos(t)) for t in inputs]
            return fwAD.unpack_dual(f(*duals)).tangent
    both(name, transform)


@pytest.mark.parametrize("name", NAMES)
def test_jacrev(name):
    """The Jacobian for every input, of a small input (a few hundred outputs)."""
    def transform(f, inputs):
        small = (inputs[0][:2, :, :4, :4],) + tuple(inputs[1:])
        return jacrev(f, argnums=tuple(range(len(inputs))))(*small)
    both(name, transform)


@pytest.mark.parametrize("name", ["relu", "conv2d", "max_pool2d"])
def test_hessian(name):
    """Second order by forward over reverse (jacfwd of jacrev): the backward Functions' own jvp, batched.
    Not batch norm yet: its backward's backward differentiates a formula with torch.autograd.grad, which
    a transform cannot see into."""
    both(name, lambda f, inputs: hessian(lambda x: f(x, *inputs[1:]).pow(3).sum())(inputs[0][:1, :, :3, :3]))


@pytest.mark.parametrize("name", NAMES)
def test_jacfwd(name):
    """The Jacobian by forward mode: vmap over jvp."""
    both(name, lambda f, inputs: jacfwd(lambda x: f(x, *inputs[1:]))(inputs[0][:1, :, :4, :4]))


def small_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double()


@pytest.mark.parametrize("training", [False, True])
def test_per_sample_gradients_of_a_converted_net(training):
    """vmap(grad(loss)) with functional_call, as differential-privacy training computes it. In training,
    batch norm without running statistics (torch refuses to update them from inside vmap, and so do we)."""
    torch.manual_seed(1)
    reference = small_net().train(training)
    if training:
        reference[1].track_running_stats = False
        reference[1].running_mean = reference[1].running_var = None
    model = torch_cs231n.convert(copy.deepcopy(reference))
    x, target = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (5,))

    def per_sample(net):
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = {k: v.detach() for k, v in net.named_buffers()}

        def loss(p, xi, ti):
            out = functional_call(net, (p, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(out, ti.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    got, want = per_sample(model), per_sample(reference)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-10, msg=k)


def test_vmap_refuses_to_update_running_statistics():
    """Training batch norm with running statistics under vmap: each sample would update the same buffer,
    so it is an error, as for torch's."""
    bn = torch_cs231n.BatchNorm2d(2).double()
    before = bn.running_mean.clone()
    with pytest.raises(RuntimeError, match=r"batched input \(torch.func.vmap\) in training while running_mean"):
        vmap(lambda x: bn(x.unsqueeze(0)))(X)
    assert torch.equal(bn.running_mean, before)  # refused before anything was written


# --------------------------------------------------------------------------------- the ops by themselves
def op_cases():
    """(name, op, args, differentiable positions) for each op that is differentiable by itself."""
    ops = torch.ops.torch_cs231n
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w, dy = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    _, indices = ops.max_pool2d_forward(x, *pool)
    g, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    yield "conv2d_forward", ops.conv2d_forward.default, (x, w, torch.randn(4, dtype=torch.float64), *conv), (0, 1, 2)
    yield "conv2d_backward", ops.conv2d_backward.default, (dy, x, w, *conv, [True, True, True]), (0, 1, 2)
    yield "max_pool2d_forward", ops.max_pool2d_forward.default, (x, *pool), (0,)
    yield "max_pool2d_backward", ops.max_pool2d_backward.default, (torch.randn(2, 3, 3, 3, dtype=torch.float64), x,
                                                                   indices, *pool), (0,)
    yield "batch_norm_forward_train", ops.batch_norm_forward_train.default, (x, g, b, 1e-5), (0, 1, 2)
    yield "batch_norm_forward_eval", ops.batch_norm_forward_eval.default, (x, rm, rv, g, b, 1e-5), (0, 3, 4)
    yield "relu_forward", ops.relu_forward.default, (x,), (0,)
    yield "relu_backward", ops.relu_backward.default, (dy, torch.relu(torch.randn_like(dy))), (0,)
    _, mean, invstd, _ = ops.batch_norm_forward_train(x, g, b, 1e-5)
    for training in (True, False):
        yield (f"batch_norm_backward_{'train' if training else 'eval'}", ops.batch_norm_backward.default,
               (torch.randn_like(x), x, g, mean, invstd, training, [True, True, True]), (0, 1, 2, 3, 4))
    # synchronised batch norm's ops
    yield "batch_norm_stats", ops.batch_norm_stats.default, (x,), (0,)
    counts = torch.tensor([3.0, 0.0, 5.0], dtype=torch.float64)
    means, variances = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.5
    yield "batch_norm_merge_stats", ops.batch_norm_merge_stats.default, (counts, means, variances, 1e-5), (1, 2)
    yield "batch_norm_backward_reduce", ops.batch_norm_backward_reduce.default, (torch.randn_like(x), x, mean), (0, 1, 2)
    sums = (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    yield ("batch_norm_backward_elemt", ops.batch_norm_backward_elemt.default,
           (torch.randn_like(x), x, g, mean, invstd, *sums, 2 * 36 * 2), (0, 1, 2, 3, 4, 5, 6))
    yield "gemm", ops.gemm.default, (torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)), (0, 1)


OP_CASES = {name: (op, args, diff) for name, op, args, diff in op_cases()}


def with_grad(args, diff):
    return tuple(a.detach().clone().requires_grad_() if i in diff else a for i, a in enumerate(args))


@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_is_differentiable_by_itself(name):
    """torch.ops.torch_cs231n.<op> called directly: gradcheck, and opcheck with inputs that require grad
    (its autograd-registration test included)."""
    op, args, diff = OP_CASES[name]
    args = with_grad(args, diff)

    def first(*leaves):
        full = list(args)
        for i, leaf in zip(diff, leaves):
            full[i] = leaf
        out = op(*full)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(first, tuple(args[i] for i in diff))
    torch.library.opcheck(op, tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                    for a in with_grad(args, diff)))


# ------------------------------------------------------------------------------ one rule for bad arguments
X4, W4 = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3)
BAD_CALLS = {
    "max_pool2d kernel_size of 3": lambda m: m.max_pool2d(X4, (2, 2, 2)),
    "max_pool2d stride of 3": lambda m: m.max_pool2d(X4, 2, (1, 1, 1)),
    "max_pool2d padding over half the kernel": lambda m: m.max_pool2d(X4, 2, 2, 2),
    "max_pool2d negative stride": lambda m: m.max_pool2d(X4, 2, -1),
    "conv2d stride of 3": lambda m: m.conv2d(X4, W4, stride=(1, 1, 1)),
    "conv2d padding 'full'": lambda m: m.conv2d(X4, W4, padding="full"),
    "conv2d stride 0": lambda m: m.conv2d(X4, W4, stride=0),
    "conv2d 'same' with stride 2": lambda m: m.conv2d(X4, W4, stride=2, padding="same"),
    "batch_norm eps 0 in training": lambda m: m.batch_norm(X4, None, None, training=True, eps=0.0),
    "batch_norm one value per channel": lambda m: m.batch_norm(X4[:, :, :1, :1], None, None, training=True),
    "relu of a list": lambda m: m.relu([1.0]),
    "conv2d of a list": lambda m: m.conv2d([1.0], W4),
    "max_pool2d of a list": lambda m: m.max_pool2d([1.0], 2),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_torch_exception_type(name):
    """The rule: a bad argument raises the exception type torch's own function raises for it."""
    raised = []
    for m in (F, ours):
        with pytest.raises(Exception) as info:
            BAD_CALLS[name](m)
        raised.append(type(info.value))
    assert raised[1] is raised[0], f"torch raises {raised[0].__name__}, ours {raised[1].__name__}"
