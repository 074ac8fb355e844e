"""The cost of synchronising batch norm: SyncBatchNorm's training forward+backward on P processes (gloo on
this machine), against our BatchNorm2d on the same per-process batch: in the same processes at the same
time (the same contention for memory, no collectives), and on rank 0 alone while the others wait.

    python -m benchmarks.sync_batch_norm [--shape resnet] [--processes 2] [--rounds 7] [--iters 5]

Each process runs one thread (the processes share the machine's cores). The collectives need every rank
to run the same number of calls, so the timing is fixed-count loops started together after a barrier
(not torch.utils.benchmark's adaptive one); the medians over rounds are printed by rank 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .suite import SHAPES


def _time_loop(layer, x, grad, iters: int) -> float:
    """Seconds per forward+backward, over `iters` calls started together on every rank."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], grad)
    return (time.perf_counter() - start) / iters


def _worker(rank: int, world: int, rendezvous: str, shape, rounds: int, iters: int, results: str) -> None:
    import torch_cs231n

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        torch.manual_seed(rank)
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        layers = {"sync": torch_cs231n.SyncBatchNorm(shape[1]), "local": torch_cs231n.BatchNorm2d(shape[1])}
        for layer in layers.values():  # warm-up: the heap grows, the caches fill
            _time_loop(layer, x, grad, 2)
        samples = {k: [] for k in layers}
        for r in range(rounds):
            for name in (("sync", "local") if r % 2 == 0 else ("local", "sync")):  # ABBA, as the harness
                samples[name].append(_time_loop(layers[name], x, grad, iters))
        alone = []
        for _ in range(rounds):  # rank 0 by itself; the others wait in the barrier after the loop
            if rank == 0:
                start = time.perf_counter()
                for _ in range(iters):
                    torch.autograd.grad(layers["local"](x), [x, layers["local"].weight, layers["local"].bias], grad)
                alone.append((time.perf_counter() - start) / iters)
            dist.barrier()
        medians = torch.tensor([statistics.median(samples["sync"]), statistics.median(samples["local"]),
                                statistics.median(alone) if alone else 0.0])
        gathered = [torch.empty_like(medians) for _ in range(world)]
        dist.all_gather(gathered, medians)
        if rank == 0:
            torch.save(torch.stack(gathered), results)
        dist.barrier()  # tear the group down together (demo.run_ddp says why)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="resnet", choices=sorted(SHAPES), help="the per-process batch")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "results.pt")
        mp.start_processes(_worker, args=(args.processes, os.path.join(folder, "rendezvous"), shape, args.rounds,
                                          args.iters, results), nprocs=args.processes, start_method="spawn")
        per_rank = torch.load(results)
    print(f"SyncBatchNorm training forward+backward, per-process batch {tuple(shape)} float32, "
          f"{args.processes} processes over gloo, 1 thread each; medians of {args.rounds} rounds of {args.iters}")
    print(f"{'rank':>4} {'SyncBatchNorm ms':>17} {'BatchNorm2d ms':>15} {'sync / local':>13}")
    for rank, (sync, local, _) in enumerate(per_rank.tolist()):
        print(f"{rank:>4} {sync * 1e3:>17.2f} {local * 1e3:>15.2f} {sync / local:>13.2f}")
    # A synchronised step goes at the pace of its slowest rank.
    sync, local = per_rank[:, 0].max().item(), per_rank[:, 1].max().item()
    alone = per_rank[0, 2].item()
    print(f" max {sync * 1e3:>17.2f} {local * 1e3:>15.2f} {sync / local:>13.2f}")
    print(f"BatchNorm2d on rank 0 alone: {alone * 1e3:.2f} ms; SyncBatchNorm (slowest rank) / that: "
          f"{sync / alone:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
