"""Communication benchmark: distributed SENG's variants against data-parallel SGD, one run.

Runs on 2 Gloo ranks (CPU) by default; started as a plain script it launches itself with
torchrun. For each setup it trains a CIFAR-style ResNet18 on Fashion-MNIST (padded to 32×32,
3 channels) for a few steps and prints, per step after warm-up, the collectives, the bytes each
rank sends into them, and the wall time (slowest rank, median over steps). SGD runs as
``DistributedDataParallel`` with a communication hook that counts its buckets; SENG runs with a
:class:`seng_dist.comm.CountingCommunicator`. Step 0 is a curvature step and is part of the
warm-up; the table is about plain steps (the curvature is rebuilt every T=200 steps).

    python examples/bench_comm.py                      # 2 ranks, batch 32 per rank
    python examples/bench_comm.py --nproc 3 --batch-size 64 --steps 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import load_fashion_mnist  # noqa: E402
from models import resnet18  # noqa: E402

from seng_dist import SENG  # noqa: E402
from seng_dist.comm import CountingCommunicator  # noqa: E402
from seng_dist.comm.torch_dist import TorchCommunicator  # noqa: E402

SETUPS = {
    "SGD (DDP)": None,
    "SENG blockdiag, uc=factored": dict(variant="blockdiag", uc="factored"),
    "SENG lagged, uc=factored": dict(variant="lagged", uc="factored"),
    "SENG lagged, uc=factored, bf16 buffer": dict(variant="lagged", uc="factored",
                                                  comm_dtype="bfloat16"),
    "SENG lagged, uc=exact": dict(variant="lagged", uc="exact"),
}


def _counting_hook(calls: list):
    def hook(process_group, bucket):
        buf = bucket.buffer()
        calls.append(buf.numel() * buf.element_size())
        return default_hooks.allreduce_hook(process_group, bucket)
    return hook


def run(name: str, settings: dict | None, data: tuple, args: argparse.Namespace) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=args.width)
    calls: list = []
    if settings is None:
        model = DistributedDataParallel(model)
        model.register_comm_hook(None, _counting_hook(calls))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        comm = None
    else:
        comm = CountingCommunicator(TorchCommunicator())
        opt = SENG(model, lr=0.05, damping=1.0, weight_decay=5e-4, comm=comm,
                   curvature_update_interval=args.curvature_interval, **settings)
    x, y = data
    times, counts, sent, in_comm = [], [], [], []
    for k in range(args.warmup + args.steps):
        lo = ((k * world + rank) * args.batch_size) % (len(x) - args.batch_size)
        xb, yb = x[lo:lo + args.batch_size], y[lo:lo + args.batch_size]
        calls.clear()
        if comm is not None:
            comm.reset()
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        elapsed = time.perf_counter() - t0
        if k >= args.warmup:
            times.append(elapsed)
            counts.append(len(calls) if comm is None else comm.collectives)
            sent.append(sum(calls) if comm is None else comm.bytes)
            in_comm.append(float("nan") if comm is None else comm.seconds)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {"setup": name, "collectives": statistics.median(counts),
            "bytes": statistics.median(sent), "ms": 1000 * statistics.median(slowest.tolist()),
            "comm_ms": 1000 * statistics.median(in_comm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks to launch (plain start)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per setup")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps (incl. step 0)")
    ap.add_argument("--width", type=int, default=64, help="ResNet18 base width")
    ap.add_argument("--curvature-interval", type=int, default=200)
    args = ap.parse_args()
    if "RANK" not in os.environ:  # plain start: become the torchrun launcher
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", os.path.abspath(__file__)] + sys.argv[1:]
        sys.exit(subprocess.call(cmd))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    dist.init_process_group("gloo")
    x, y = load_fashion_mnist(True, cifar_style=True)
    n = args.batch_size * int(os.environ["WORLD_SIZE"]) * (args.warmup + args.steps)
    data = (x[:n].clone(), y[:n].clone())
    del x
    rows = [run(name, settings, data, args) for name, settings in SETUPS.items()]
    if dist.get_rank() == 0:
        sgd = rows[0]
        print(f"\nResNet18 (width {args.width}), {dist.get_world_size()} Gloo ranks, batch "
              f"{args.batch_size} per rank, plain steps (median of {args.steps}), "
              f"torch {torch.__version__}\n")
        print("| setup | collectives/step | MiB/step per rank | × SGD bytes | ms/step | "
              "× SGD time | ms in SENG's collectives (rank 0) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            waited = "overlapped with backward" if r["comm_ms"] != r["comm_ms"] else \
                f"{r['comm_ms']:.0f}"
            print(f"| {r['setup']} | {r['collectives']:g} | {r['bytes'] / 2**20:.2f} | "
                  f"{r['bytes'] / sgd['bytes']:.3f} | {r['ms']:.0f} | "
                  f"{r['ms'] / sgd['ms']:.2f} | {waited} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
