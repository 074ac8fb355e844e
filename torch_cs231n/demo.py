"""The main job: train a CS231n-style conv-net built from our layers, beside the same net built from
torch.nn, from the same initial weights on the same batches, and show that they learn the same thing.

    python -m torch_cs231n demo [--epochs 8] [--batch-size 32] [--lr 0.05] [--seed 0]
                                [--device cpu|cuda] [--out demo-output] [--threads N]
                                [--dataset digits|cifar10 --data-dir PATH] [--subset N] [--amp]
    torchrun --standalone --nproc-per-node 2 -m torch_cs231n demo --ddp [the same options]

With --ddp, each process that torchrun starts trains our net under DistributedDataParallel with
SyncBatchNorm, on its share of every batch (a DistributedSampler): --batch-size is the global batch.
The epoch's order is the one-process run's (the sampler's seed + epoch), both drop the epoch's last
incomplete batch, and batch norm sees the whole global batch: the DDP run takes the one-process run's
steps, up to rounding. Rank 0 prints the progress and writes the summary.

The default data set is scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no
download), split 75/25 with a fixed seed. CIFAR-10 is read from its standard Python-pickle batches
(data_batch_1 ... data_batch_5, test_batch), the format CS231n students already have.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import time

import numpy as np
import torch
from torch import nn

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# ---------------------------------------------------------------------------------------------------- data
def load_digits(seed: int):
    """sklearn's digits as (N, 1, 8, 8) float tensors in [0, 1], with a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def load_cifar10(data_dir: str):
    """CIFAR-10 from its Python-pickle batches, as (N, 3, 32, 32) float tensors in [0, 1]."""
    missing = [f for f in CIFAR_FILES if not os.path.isfile(os.path.join(data_dir or "", f))]
    if not data_dir or missing:
        raise FileNotFoundError(
            f"CIFAR-10: expected the Python-pickle batches {', '.join(CIFAR_FILES)} in --data-dir "
            f"{data_dir!r}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
            "(download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it)"
        )

    def read(name):
        with open(os.path.join(data_dir, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        return torch.from_numpy(x), torch.tensor(batch[b"labels"], dtype=torch.int64)

    train = [read(f) for f in CIFAR_FILES[:-1]]
    x_te, y_te = read(CIFAR_FILES[-1])
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_te, y_te


# ----------------------------------------------------------------------------------------------------- net
def build_net(layers, in_channels: int, image_size: int, num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """[conv3x3 - batch norm - ReLU - max-pool 2x2] x 2, then a linear classifier.

    ``layers`` is the namespace the four layers come from: ``torch_cs231n`` or ``torch.nn``.
    """
    c1, c2 = width, 2 * width
    side = image_size // 4
    return nn.Sequential(
        layers.Conv2d(in_channels, c1, 3, padding=1, bias=False), layers.BatchNorm2d(c1), layers.ReLU(inplace=True),
        layers.MaxPool2d(2),
        layers.Conv2d(c1, c2, 3, padding=1, bias=False), layers.BatchNorm2d(c2), layers.ReLU(inplace=True),
        layers.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * side * side, num_classes),
    )


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    net.eval()
    correct = sum((net(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    net.train()
    return correct / max(1, len(x))


# ---------------------------------------------------------------------------------------------- training
def run(args) -> dict:
    """Train both nets; write demo.png and summary.json into args.out; return the summary."""
    device = torch.device(args.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.dataset == "digits" else threads_before))
    try:
        return _train(args, device)
    finally:
        torch.set_num_threads(threads_before)


def load_data(args, device):
    """(x_tr, y_tr, x_te, y_te) on `device`, normalised with the training set's mean and std."""
    if args.dataset == "cifar10":
        x_tr, y_tr, x_te, y_te = load_cifar10(args.data_dir)
    else:
        x_tr, y_tr, x_te, y_te = load_digits(args.seed)
    if args.subset:
        x_tr, y_tr = x_tr[:args.subset], y_tr[:args.subset]
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = ((x_tr - mean) / std).to(device), ((x_te - mean) / std).to(device)
    return x_tr, y_tr.to(device), x_te, y_te.to(device)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of the n training images: DistributedSampler's (seed + epoch), so that
    the one-process and the DDP runs see the same global batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def full_batches(n: int, batch_size: int) -> int:
    """Steps per epoch: the full batches only (as DataLoader's drop_last; a subset smaller than one batch is
    one step). Every step's batch norm then sees a whole batch, and the DDP run, whose sampler drops the
    same tail, takes the same steps."""
    return max(1, n // batch_size)


def amp_dtype(device: torch.device) -> torch.dtype:
    """--amp's autocast dtype: bfloat16 on the CPU (what its autocast supports best), float16 on CUDA."""
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def amp_context(args, device: torch.device):
    """torch.autocast for the forward and the loss when --amp is given; nothing otherwise."""
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=args.amp)


def grad_scaler(args, device: torch.device):
    """float16 gradients underflow without loss scaling: a GradScaler on CUDA under --amp. bfloat16 has
    float32's range and needs none (a disabled scaler passes everything through)."""
    return torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype(device) == torch.float16)


def make_optimizer(net: nn.Module, args) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)


def _train(args, device) -> dict:
    from tqdm import tqdm

    import torch_cs231n

    x_tr, y_tr, x_te, y_te = load_data(args, device)
    torch.manual_seed(args.seed)
    reference = build_net(nn, x_tr.shape[1], x_tr.shape[-1]).to(device)
    ours = build_net(torch_cs231n, x_tr.shape[1], x_tr.shape[-1]).to(device)
    ours.load_state_dict(reference.state_dict())  # the same initial weights: a torch checkpoint loads as is
    nets = {"torch_cs231n": ours, "torch": reference}
    optims = {k: make_optimizer(n, args) for k, n in nets.items()}
    scalers = {k: grad_scaler(args, device) for k in nets}
    losses = {k: [] for k in nets}
    accs = {k: [] for k in nets}
    steps_per_epoch = full_batches(len(x_tr), args.batch_size)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = epoch_order(len(x_tr), args.seed, epoch).to(device)  # the same batches for both nets
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", leave=True, dynamic_ncols=True)
        for step in bar:
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            for key, net in nets.items():
                with amp_context(args, device):
                    loss = nn.functional.cross_entropy(net(x_tr[idx]), y_tr[idx])
                optims[key].zero_grad(set_to_none=True)
                scalers[key].scale(loss).backward()
                scalers[key].step(optims[key])
                scalers[key].update()
                losses[key].append(loss.item())
            bar.set_postfix(loss=f"{losses['torch_cs231n'][-1]:.4f}",
                            torch=f"{losses['torch'][-1]:.4f}")
        for key, net in nets.items():
            accs[key].append(accuracy(net, x_te, y_te))
        bar.write(f"epoch {epoch}: test accuracy {accs['torch_cs231n'][-1]:.2%} (torch.nn: {accs['torch'][-1]:.2%})")
    seconds = time.perf_counter() - start

    diffs = np.abs(np.array(losses["torch_cs231n"]) - np.array(losses["torch"]))
    summary = {
        "test_accuracy": {k: accs[k][-1] for k in nets},
        "loss_max_abs_diff_first_epoch": float(diffs[:steps_per_epoch].max()),
        "loss_max_abs_diff_all_steps": float(diffs.max()),
        "seconds": seconds,
        "device": str(device),
        "world_size": 1,
        "amp": str(amp_dtype(device)) if args.amp else None,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "train_size": len(x_tr),
        "test_size": len(x_te),
        "losses": losses["torch_cs231n"],  # our net's loss at every step (the DDP run's to compare with)
    }
    return write_summary(summary, losses, accs, steps_per_epoch, args.out)


def write_summary(summary: dict, losses: dict, accs: dict, steps_per_epoch: int, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    summary["plot"] = plot(losses, accs, steps_per_epoch, os.path.join(out, "demo.png"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# ------------------------------------------------------------------------------ DistributedDataParallel
def run_ddp(args) -> dict | None:
    """Train our net on every process torchrun started (its environment: RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); rank 0 writes and returns the summary, the other ranks return None."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("demo --ddp: start it with torchrun, e.g. "
                         "torchrun --standalone --nproc-per-node 2 -m torch_cs231n demo --ddp")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if args.batch_size % dist.get_world_size():
            raise SystemExit(f"demo --ddp: --batch-size {args.batch_size} (the global batch) must be a multiple "
                             f"of the {dist.get_world_size()} processes")
        torch.set_num_threads(args.threads or 1)
        summary = _train_ddp(args, device, dist.get_rank(), dist.get_world_size())
        # Rank 0 was still evaluating: every rank tears the group down together (one tearing it down
        # while another still used it was seen to abort the process).
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()


def _train_ddp(args, device, rank: int, world_size: int) -> dict | None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler
    from tqdm import tqdm

    import torch_cs231n
    from torch_cs231n.distributed import DistributedDataParallel

    x_tr, y_tr, x_te, y_te = load_data(args, device)
    torch.manual_seed(args.seed)
    net = build_net(torch_cs231n, x_tr.shape[1], x_tr.shape[-1])
    net = torch_cs231n.SyncBatchNorm.convert_sync_batchnorm(net).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optim = make_optimizer(model, args)
    scaler = grad_scaler(args, device)
    sampler = DistributedSampler(range(len(x_tr)), num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    local_batch = args.batch_size // world_size
    steps_per_epoch = full_batches(len(sampler), local_batch)
    losses, accs = {"torch_cs231n": []}, {"torch_cs231n": []}
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)  # seed + epoch: the one-process run's order (epoch_order)
        mine = torch.tensor(list(sampler), device=device)  # this rank's every world_size-th image
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}", disable=rank != 0,
                   dynamic_ncols=True)
        for step in bar:
            idx = mine[step * local_batch:(step + 1) * local_batch]
            with amp_context(args, device):
                loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            optim.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # DDP averages the gradients; SyncBatchNorm saw the global batch
            scaler.step(optim)
            scaler.update()
            global_loss = loss.detach().clone()  # the mean over the global batch (equal shares per rank)
            dist.all_reduce(global_loss)
            losses["torch_cs231n"].append(global_loss.item() / world_size)
            bar.set_postfix(loss=f"{losses['torch_cs231n'][-1]:.4f}")
        if rank == 0:  # the bare net in eval mode: no collectives, so the other ranks need not join
            accs["torch_cs231n"].append(accuracy(net, x_te, y_te))
            bar.write(f"epoch {epoch}: test accuracy {accs['torch_cs231n'][-1]:.2%}")
    if rank != 0:
        return None
    summary = {
        "test_accuracy": {"torch_cs231n": accs["torch_cs231n"][-1]},
        "seconds": time.perf_counter() - start,
        "device": str(device),
        "world_size": world_size,
        "amp": str(amp_dtype(device)) if args.amp else None,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "train_size": len(x_tr),
        "test_size": len(x_te),
        "losses": losses["torch_cs231n"],
    }
    return write_summary(summary, losses, accs, steps_per_epoch, args.out)


def plot(losses: dict, accs: dict, steps_per_epoch: int, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("torch", "-"), ("torch_cs231n", "--")):
        if key not in losses:  # the DDP run trains ours alone
            continue
        left.plot(np.arange(1, len(losses[key]) + 1) / steps_per_epoch, losses[key], style, label=key, lw=1)
        right.plot(range(1, len(accs[key]) + 1), [100 * a for a in accs[key]], style + "o", label=key)
    left.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log", title="loss at every step")
    right.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy after each epoch")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="demo-output", help="folder for demo.png and summary.json")
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--data-dir", default=None, help="CIFAR-10's Python-pickle batches (with --dataset cifar10)")
    parser.add_argument("--subset", type=int, default=0, help="train on only the first N training images")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: torch.autocast with bfloat16 on the CPU, float16 (and a GradScaler) on "
                             "CUDA, for both nets")
    parser.add_argument("--ddp", action="store_true",
                        help="train our net with DistributedDataParallel and SyncBatchNorm on the processes torchrun "
                             "starts (gloo on the CPU, NCCL with --device cuda); --batch-size is the global batch")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for the 8x8 digits, whose tiny tensors gain nothing from "
                             "more and lose much when the cores are busy; all cores for CIFAR-10)")


def main(args) -> int:
    import torch_cs231n

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("demo --device cuda: no CUDA device is available")
    info = torch_cs231n.build_info()
    if os.environ.get("RANK", "0") == "0":
        print(f"torch_cs231n {info['version']} ({info['backend']} build, CUDA kernels: "
              f"{'yes' if info['cuda'] else 'no'}) on torch {info['torch']}, device {args.device}")
    try:
        summary = run_ddp(args) if args.ddp else run(args)
    except FileNotFoundError as err:
        raise SystemExit(f"demo: {err}") from None
    if summary is None:  # a DDP rank other than 0
        return 0
    acc = summary["test_accuracy"]
    if args.ddp:
        print(f"\ntest accuracy: torch_cs231n {acc['torch_cs231n']:.2%} with DistributedDataParallel over "
              f"{summary['world_size']} processes; {summary['seconds']:.1f} s; plot: {summary['plot']}; "
              f"summary: {os.path.join(args.out, 'summary.json')}")
        return 0
    print(f"\ntest accuracy: torch_cs231n {acc['torch_cs231n']:.2%}, torch.nn {acc['torch']:.2%}")
    print(f"loss curves: max |difference| {summary['loss_max_abs_diff_first_epoch']:.2e} over the first epoch, "
          f"{summary['loss_max_abs_diff_all_steps']:.2e} over all steps")
    print(f"{summary['seconds']:.1f} s for both nets; plot: {summary['plot']}; "
          f"summary: {os.path.join(args.out, 'summary.json')}")
    return 0
