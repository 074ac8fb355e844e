"""SyncBatchNorm: batch norm over the global batch of several processes, proven with real processes.

Two processes, spawned here, meet over gloo on the CPU (a file rendezvous in the test's folder; every
collective has a timeout, and the test kills the processes if they run past theirs). Each process writes
its results; the test compares them, in float64, with one torch BatchNorm2d over the whole batch.
One spawn runs every scenario in turn (starting a process costs seconds); the tests read its results.
"""
import copy
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_cs231n
from torch_cs231n import distributed

ops = torch.ops.torch_cs231n
WORLD = 2
TIMEOUT_S = 240  # the whole spawn: start-up (importing torch twice) and every scenario


# ------------------------------------------------------------------------------------------ the data
def global_batch(n=8, c=3, layout="contiguous", seed=0):
    """The whole batch (x, dy) and the layer's parameters, the same in every process (a fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 5, 4, generator=g, dtype=torch.float64) * 2 + 3
    dy = torch.randn(n, c, 5, 4, generator=g, dtype=torch.float64)
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    return x, dy, weight, bias


# Each case: (rows of the global batch of 8 that each rank holds, layout).
CASES = {
    "uneven": ([(0, 3), (3, 8)], "contiguous"),
    "empty_rank": ([(0, 0), (0, 8)], "contiguous"),
    "channels_last": ([(0, 5), (5, 8)], "channels_last"),
}


def small_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double()


def net_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)


def train_steps(model, batches, lr=0.1):
    """SGD steps, each on one (x, target) batch; the loss is the batch's mean cross-entropy."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, t in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    return model


# ------------------------------------------------------------------------------- in each process
def _layer_case(rank, name):
    rows, layout = CASES[name]
    x, dy, weight, bias = global_batch(layout=layout)
    a, b = rows[rank]
    layer = torch_cs231n.SyncBatchNorm(3, momentum=0.3).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    xr = x[a:b].clone().requires_grad_()
    y = layer(xr)
    y.backward(dy[a:b])
    return {"y": y.detach(), "dx": xr.grad, "dw": layer.weight.grad, "db": layer.bias.grad,
            "channels_last": y.is_contiguous(memory_format=torch.channels_last) and y.dim() == 4 and y.numel() > 0,
            "buffers": {k: v.clone() for k, v in layer.named_buffers()}}


def _ddp_case(rank):
    model = torch_cs231n.SyncBatchNorm.convert_sync_batchnorm(torch_cs231n.convert(small_net()))
    ddp = distributed.DistributedDataParallel(model)  # torch's, which refuses a SyncBatchNorm on the CPU
    x, t = net_batch()
    shard = slice(4 * rank, 4 * rank + 4)
    train_steps(ddp, [(x[shard], t[shard]), (x[shard].flip(0), t[shard].flip(0))])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _eval_case(rank):
    """Eval normalises with the running statistics and sends nothing: only rank 0 runs it (a collective
    would wait for rank 1 until the timeout)."""
    layer = torch_cs231n.SyncBatchNorm(3).double().eval()
    x, _, _, _ = global_batch()
    out = layer(x) if rank == 0 else None
    dist.barrier()
    return out


def _expect_error(fn):
    try:
        fn()
    except (ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _mismatched_channels(rank):
    layer = torch_cs231n.SyncBatchNorm(3 + rank, affine=False, track_running_stats=False).double()
    return _expect_error(lambda: layer(torch.randn(4, 3 + rank, 2, 2, dtype=torch.float64)))


def _integer_inputs(rank):
    """One rank's input of integers: the mismatch, on both ranks. Both ranks': the kernel's dtype error,
    on both ranks (never an error on one rank while the other waits in a collective)."""
    layer = torch_cs231n.SyncBatchNorm(3, affine=False, track_running_stats=False)
    one = _expect_error(lambda: layer(torch.ones(4, 3, 2, 2, dtype=torch.int64 if rank == 0 else torch.float32)))
    both = _expect_error(lambda: layer(torch.ones(4, 3, 2, 2, dtype=torch.int64)))
    return one, both


def _backend_without_cpu(rank):
    """A process group whose only backend is registered for CUDA: CPU tensors cannot travel on it."""
    def create(store, group_rank, group_size, timeout):
        return dist.ProcessGroupGloo(store, group_rank, group_size, timeout)

    if "cudaonly" not in dist.Backend.backend_list:
        dist.Backend.register_backend("cudaonly", create, devices=["cuda"])
    group = dist.new_group(backend="cudaonly")
    layer = torch_cs231n.SyncBatchNorm(3, process_group=group).double()
    return _expect_error(lambda: layer(torch.randn(4, 3, 2, 2, dtype=torch.float64)))


def _worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: _layer_case(rank, name) for name in CASES}
        results["ddp"] = _ddp_case(rank)
        results["eval"] = _eval_case(rank)
        results["mismatched_channels"] = _mismatched_channels(rank)
        results["integer_inputs"] = _integer_inputs(rank)
        dist.barrier()
        results["backend_without_cpu"] = _backend_without_cpu(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # tear the group down together (demo.run_ddp says why)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario's results, one dict per rank."""
    folder = tmp_path_factory.mktemp("sync_batch_norm")
    ctx = mp.start_processes(_worker, args=(str(folder / "rendezvous"), str(folder)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):  # raises, with the worker's traceback, if a worker failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {TIMEOUT_S} s")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------------- the comparisons
@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_matches_one_batch_norm_over_the_whole_batch(ranks, case):
    rows, layout = CASES[case]
    x, dy, weight, bias = global_batch(layout=layout)
    reference = nn.BatchNorm2d(3, momentum=0.3).double()
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    xr = x.clone().requires_grad_()
    y = reference(xr)
    y.backward(dy)
    # Each rank's share of d_weight and d_bias: the sums over its own values.
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    xhat = (x - mean) / torch.sqrt(var + reference.eps)
    for rank, (a, b) in enumerate(rows):
        got = ranks[rank][case]
        torch.testing.assert_close(got["y"], y.detach()[a:b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["dx"], xr.grad[a:b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["dw"], (dy * xhat)[a:b].sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["db"], dy[a:b].sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
        assert got["channels_last"] == (layout == "channels_last" and b > a)
        for name, buf in reference.named_buffers():  # the global batch's running statistics, on every rank
            torch.testing.assert_close(got["buffers"][name], buf, rtol=1e-12, atol=1e-12, msg=name)
    # The shares add up to torch's gradients (DistributedDataParallel sums them).
    torch.testing.assert_close(sum(r[case]["dw"] for r in ranks), reference.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(r[case]["db"] for r in ranks), reference.bias.grad, rtol=1e-12, atol=1e-12)


def test_ddp_training_equals_one_process_on_the_whole_batch(ranks):
    x, t = net_batch()
    reference = train_steps(small_net(), [(x, t), (torch.cat([x[:4].flip(0), x[4:].flip(0)]),
                                                    torch.cat([t[:4].flip(0), t[4:].flip(0)]))])
    for rank in range(WORLD):
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(ranks[rank]["ddp"][name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_eval_uses_running_statistics_without_communication(ranks):
    x, _, _, _ = global_batch()
    torch.testing.assert_close(ranks[0]["eval"], nn.BatchNorm2d(3).double().eval()(x), rtol=0, atol=1e-14)


def test_mismatched_channels_raise_on_every_rank(ranks):
    for rank in range(WORLD):
        message = ranks[rank]["mismatched_channels"]
        assert message.startswith("ValueError: SyncBatchNorm: expected every rank's input to have the same channels")
        assert "rank 0: 3 channels" in message and "rank 1: 4 channels" in message


def test_an_unsupported_dtype_raises_on_every_rank(ranks):
    for rank in range(WORLD):
        one, both = ranks[rank]["integer_inputs"]
        assert one.startswith("ValueError: SyncBatchNorm: expected every rank's input to have the same channels "
                              "and dtype"), one
        assert "rank 0: 3 channels, an unsupported dtype" in one and "rank 1: 3 channels, torch.float32" in one
        assert both.startswith("RuntimeError: batch_norm_stats: expected input to have dtype float32, float64, "
                               "float16 or bfloat16, but got Long"), both


def test_a_backend_that_cannot_carry_the_tensors_raises_on_every_rank(ranks):
    for rank in range(WORLD):
        message = ranks[rank]["backend_without_cpu"]
        assert message.startswith("RuntimeError: SyncBatchNorm: expected a process group whose backend can carry "
                                  "cpu tensors, but its backend is 'cudaonly'"), message


# ------------------------------------------------------------------------------- in one process
def test_without_a_process_group_it_is_our_batch_norm(device):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, device=device)
    sync = torch_cs231n.SyncBatchNorm(3).to(device)
    plain = nn.BatchNorm2d(3).to(device)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.randn(3, device=device))


def test_convert_sync_batchnorm_takes_torch_and_our_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), torch_cs231n.BatchNorm2d(4), nn.BatchNorm1d(4),
                          nn.SyncBatchNorm(4, momentum=None), nn.ReLU()).eval()
    params = [p for p in model.parameters()]
    buffers = [b for b in model.buffers()]
    converted = torch_cs231n.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    assert [type(m) for m in model] == [nn.Conv2d] + [torch_cs231n.SyncBatchNorm] * 4 + [nn.ReLU]
    assert [p for p in model.parameters()] == params and [b for b in model.buffers()] == buffers
    assert model[4].momentum is None and not model[1].training
    single = torch_cs231n.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(2, affine=False))
    assert type(single) is torch_cs231n.SyncBatchNorm and single.weight is None


def test_convert_and_revert_swap_torch_syncbatchnorm():
    model = nn.Sequential(nn.SyncBatchNorm(4))
    state = copy.deepcopy(model.state_dict())
    torch_cs231n.convert(model)
    assert type(model[0]) is torch_cs231n.SyncBatchNorm and isinstance(model[0], nn.SyncBatchNorm)
    assert not isinstance(model[0], nn.BatchNorm2d)  # as torch's: a SyncBatchNorm is not a BatchNorm2d
    torch_cs231n.revert(model)
    assert type(model[0]) is nn.SyncBatchNorm
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------- the ops
def test_ops_split_the_training_passes_exactly(device):
    """stats on pieces, merged, equal the whole batch's; the pieces' sums give torch's d_input."""
    x, dy, weight, _ = (t.to(device) for t in global_batch(n=9))
    pieces = [(0, 2), (2, 2), (2, 9)]
    stats = [ops.batch_norm_stats(x[a:b]) for a, b in pieces]
    counts = torch.tensor([(b - a) * 20.0 for a, b in pieces], dtype=torch.float64, device=device)
    mean, var, invstd = ops.batch_norm_merge_stats(counts, torch.stack([s[0] for s in stats]),
                                                   torch.stack([s[1] for s in stats]), 1e-5)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(invstd, torch.rsqrt(var + 1e-5), rtol=1e-14, atol=0)
    sums = [ops.batch_norm_backward_reduce(dy[a:b], x[a:b], mean) for a, b in pieces]
    sum_dy, sum_dy_xmu = sum(s[0] for s in sums), sum(s[1] for s in sums)
    dx = torch.cat([ops.batch_norm_backward_elemt(dy[a:b], x[a:b], weight, mean, invstd, sum_dy, sum_dy_xmu, 180)
                    for a, b in pieces])
    xr = x.clone().requires_grad_()
    nn.functional.batch_norm(xr, None, None, weight, training=True).backward(dy)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-12, atol=1e-12)


def test_opcheck(device):
    for layout in ("contiguous", "channels_last"):
        x, dy, weight, _ = (t.to(device) for t in global_batch(layout=layout))
        for xs, dys in ((x, dy), (x.float(), dy.float()), (x[:0], dy[:0])):
            torch.library.opcheck(ops.batch_norm_stats.default, (xs,))
            mean, var = ops.batch_norm_stats(xs)
            torch.library.opcheck(ops.batch_norm_backward_reduce.default, (dys, xs, mean))
            invstd = torch.rsqrt(var + 1e-5)
            w = weight.to(xs.dtype)
            torch.library.opcheck(ops.batch_norm_backward_elemt.default,
                                  (dys, xs, w, mean, invstd, mean, var, max(1, xs.numel() // 3)))
        counts = torch.tensor([3.0, 0.0, 5.0], device=device, dtype=torch.float64)
        torch.library.opcheck(ops.batch_norm_merge_stats.default,
                              (counts, torch.randn(3, 4, device=device, dtype=torch.float64),
                               torch.rand(3, 4, device=device, dtype=torch.float64), 1e-5))


def test_bad_input_raises_clear_errors(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    with pytest.raises(RuntimeError, match=r"batch_norm_merge_stats: expected means to have one row per count \(2\)"):
        ops.batch_norm_merge_stats(torch.ones(2, device=device), torch.zeros(3, 3, device=device),
                                   torch.zeros(3, 3, device=device), 1e-5)
    with pytest.raises(RuntimeError, match=r"batch_norm_merge_stats: expected vars to have the dtype of means"):
        ops.batch_norm_merge_stats(torch.ones(1, device=device), torch.zeros(1, 3, device=device),
                                   torch.zeros(1, 3, device=device, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match=r"batch_norm_backward_elemt: expected count .* at least this input's 16, "
                                           r"but got 8"):
        c = torch.zeros(3, device=device)
        ops.batch_norm_backward_elemt(x, x, None, c, c, c, c, 8)
    with pytest.raises(RuntimeError, match=r"batch_norm_backward_reduce: expected mean to have shape \[3\]"):
        ops.batch_norm_backward_reduce(x, x, torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="batch_norm eps must be positive"):
        distributed.sync_batch_norm(x, None, None, eps=0.0)
