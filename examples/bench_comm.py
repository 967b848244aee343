"""Communication benchmark: distributed SENG's variants, overlapped or not, against DDP SGD.

Runs on Gloo ranks (CPU); started as a plain script it launches itself with torchrun, once per
world size in ``--worlds``. Every setup trains a CIFAR-style ResNet18 on Fashion-MNIST (padded
to 32×32, 3 channels): SGD as ``DistributedDataParallel`` (its buckets overlap backward; a
communication hook counts them), SENG with a :class:`seng_dist.comm.CountingCommunicator`,
with ``overlap`` off (every round in ``step()``) and on (buckets started during backward).
All setups are built first and then measured in ``--reps`` interleaved repetitions of
``--steps`` plain steps each (the curvature is rebuilt every T=200 steps; step 0, a curvature
step, is part of the warm-up), so a slow phase of the machine touches every setup alike. A
step's time is the slowest rank's; the table gives the median over repetitions of each
repetition's median, and the spread (max - min of the repetitions' medians, over the median).

    python examples/bench_comm.py --out examples/results/comm        # 2 and 3 ranks
    python examples/bench_comm.py --worlds 2 --reps 3 --steps 2      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import load_fashion_mnist  # noqa: E402
from models import resnet18  # noqa: E402

from seng_dist import SENG  # noqa: E402
from seng_dist.comm import CountingCommunicator  # noqa: E402
from seng_dist.comm.torch_dist import TorchCommunicator  # noqa: E402

FACTORED = dict(uc="factored")
SETUPS: dict[str, dict[str, Any] | None] = {
    "SGD (DDP)": None,
    "SENG blockdiag": dict(FACTORED, variant="blockdiag", overlap=False),
    "SENG blockdiag, overlap": dict(FACTORED, variant="blockdiag", overlap=True),
    "SENG lagged": dict(FACTORED, variant="lagged", overlap=False),
    "SENG lagged, overlap": dict(FACTORED, variant="lagged", overlap=True),
    "SENG lagged, overlap, bf16 buffer": dict(
        FACTORED, variant="lagged", overlap=True, comm_dtype="bfloat16"
    ),
    "SENG lagged, uc=exact": dict(variant="lagged", overlap=False, uc="exact"),
    "SENG lagged, uc=exact, overlap": dict(variant="lagged", overlap=True, uc="exact"),
}


@dataclass
class Setup:
    """One setup's model, optimizer and measurements on this rank."""

    name: str
    settings: dict[str, Any] | None
    model: nn.Module
    opt: torch.optim.Optimizer
    comm: CountingCommunicator | None
    ddp_bytes: list[int] = field(default_factory=list)
    times: list[list[float]] = field(default_factory=list)  # per repetition, per step
    calls: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    waited: list[float] = field(default_factory=list)


def counting_hook(sizes: list[int]):
    """A DDP communication hook that allreduces as DDP does and records each bucket's bytes."""

    def hook(process_group, bucket):
        buf = bucket.buffer()
        sizes.append(buf.numel() * buf.element_size())
        return default_hooks.allreduce_hook(process_group, bucket)

    return hook


def build(name: str, settings: dict[str, Any] | None, args: argparse.Namespace) -> Setup:
    torch.manual_seed(0)
    model: nn.Module = resnet18(num_classes=10, width=args.width)
    if settings is None:
        model = DistributedDataParallel(model)
        setup = Setup(
            name,
            None,
            model,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4),
            None,
        )
        model.register_comm_hook(None, counting_hook(setup.ddp_bytes))
        return setup
    comm = CountingCommunicator(TorchCommunicator())
    opt = SENG(
        model,
        lr=0.05,
        damping=1.0,
        weight_decay=5e-4,
        comm=comm,
        curvature_update_interval=args.curvature_interval,
        bucket_size_mb=args.bucket_size_mb,
        **settings,
    )
    return Setup(name, settings, model, opt, comm)


def step(setup: Setup, xb: torch.Tensor, yb: torch.Tensor) -> float:
    """One timed step (from a barrier, so every rank starts together)."""
    setup.ddp_bytes.clear()
    if setup.comm is not None:
        setup.comm.reset()
    dist.barrier()
    t0 = time.perf_counter()
    setup.opt.zero_grad()
    F.cross_entropy(setup.model(xb), yb).backward()
    setup.opt.step()
    return time.perf_counter() - t0


def measure(
    setups: list[Setup], data: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace
) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data
    k = 0

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        lo = ((k * world + rank) * args.batch_size) % (len(x) - args.batch_size)
        return x[lo : lo + args.batch_size], y[lo : lo + args.batch_size]

    for s in setups:  # warm-up, step 0 (a curvature step) included
        for w in range(args.warmup):
            k = w
            step(s, *batch())
    for _ in range(args.reps):
        for s in setups:
            rep = []
            for j in range(args.steps):
                k = args.warmup + j
                rep.append(step(s, *batch()))
                if s.comm is None:
                    s.calls.append(len(s.ddp_bytes))
                    s.rounds.append(1)
                    s.sent.append(sum(s.ddp_bytes))
                else:
                    s.calls.append(s.comm.collectives)
                    s.rounds.append(s.comm.rounds)
                    s.sent.append(s.comm.bytes)
                    s.waited.append(s.comm.seconds)
            s.times.append(rep)


def rep_medians(times: list[list[float]]) -> list[float]:
    """Per repetition, the median step time (ms) of the slowest rank, from this rank's
    ``times`` (seconds, per repetition, per step; a collective)."""
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return [1000 * statistics.median(rep) for rep in slowest.tolist()]


def summarise(s: Setup, medians: list[float], sgd: list[float]) -> dict[str, Any]:
    """This setup's row, from its and SGD's per-repetition medians."""
    ratios = [a / b for a, b in zip(medians, sgd, strict=True)]
    settings = s.settings or {}
    return {
        "setup": s.name,
        "variant": settings.get("variant", "sgd"),
        "overlap": settings.get("overlap", True),
        "comm_dtype": settings.get("comm_dtype"),
        "uc": settings.get("uc"),
        "ms_median": statistics.median(medians),
        "ms_reps": medians,
        "spread": (max(medians) - min(medians)) / statistics.median(medians),
        "ratio": statistics.median(ratios),
        "ratio_low": min(ratios),
        "ratio_high": max(ratios),
        "collectives": statistics.median(s.calls),
        "rounds": statistics.median(s.rounds),
        "bytes": statistics.median(s.sent),
        "waited_ms": 1000 * statistics.median(s.waited) if s.waited else None,
    }


def table(rows: list[dict[str, Any]], world: int, args: argparse.Namespace) -> str:
    lines = [
        f"ResNet18 (width {args.width}), {world} Gloo ranks on {os.cpu_count()} cores, "
        f"batch {args.batch_size} per rank, plain steps; {args.reps} interleaved "
        f"repetitions of {args.steps} steps, torch {torch.__version__}",
        "",
        "| setup | rounds/step | collectives/step | MiB/step per rank | ms/step (median) "
        "| spread | × DDP SGD (low-high) | ms waited in SENG's collectives (rank 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        waited = "—" if r["waited_ms"] is None else f"{r['waited_ms']:.0f}"
        lines.append(
            f"| {r['setup']} | {r['rounds']:g} | {r['collectives']:g} | "
            f"{r['bytes'] / 2**20:.2f} | {r['ms_median']:.0f} | "
            f"±{100 * r['spread'] / 2:.0f}% | {r['ratio']:.3f} "
            f"({r['ratio_low']:.2f}-{r['ratio_high']:.2f}) | {waited} |"
        )
    return "\n".join(lines)


def rank_main(args: argparse.Namespace) -> None:
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo")
    x, y = load_fashion_mnist(True, cifar_style=True)
    n = args.batch_size * world * (args.warmup + args.steps)
    data = (x[:n].clone(), y[:n].clone())
    del x
    setups = [build(name, settings, args) for name, settings in SETUPS.items()]
    measure(setups, data, args)
    medians = [rep_medians(s.times) for s in setups]
    rows = [summarise(s, m, medians[0]) for s, m in zip(setups, medians, strict=True)]
    if dist.get_rank() == 0:
        text = table(rows, world, args)
        print("\n" + text, flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"bench_comm_{world}ranks.md").write_text(text + "\n")
            (out / f"bench_comm_{world}ranks.json").write_text(
                json.dumps({"world": world, "args": vars(args), "rows": rows}, indent=1) + "\n"
            )
    dist.barrier()  # no rank tears its group down while rank 0 still writes
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="2,3", help="world sizes to launch (plain start)")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per repetition")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps (incl. step 0)")
    ap.add_argument("--width", type=int, default=64, help="ResNet18 base width")
    ap.add_argument("--curvature-interval", type=int, default=200)
    ap.add_argument(
        "--bucket-size-mb",
        type=float,
        default=25.0,
        help="SENG's bucket_size_mb (DDP keeps its default, 25)",
    )
    ap.add_argument("--out", default="", help="folder for the tables and JSON (optional)")
    args = ap.parse_args()
    on_ranks(lambda: rank_main(args), __file__, args.worlds)


def on_ranks(rank_main: Callable[[], None], script: str, worlds: str) -> None:
    """Run ``rank_main`` where torchrun started this process (``RANK`` is set); started plainly,
    launch ``script`` with the same arguments under torchrun, once per world size in
    ``worlds`` (comma-separated)."""
    if "RANK" in os.environ:
        rank_main()
        # The tables are written: leave without the interpreter's C++ teardown, where Gloo's
        # threads sometimes abort the process ("terminate called without an active
        # exception", once in a CI run) and would fail a run that succeeded.
        sys.stdout.flush()
        os._exit(0)
    for world in (int(w) for w in worlds.split(",")):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            os.path.abspath(script),
        ] + sys.argv[1:]
        code = subprocess.call(cmd)
        if code:
            sys.exit(code)


if __name__ == "__main__":
    main()
