"""Soak: SENG for many steps with frequent curvature updates; resident memory must stay flat.

    python ci/soak.py                 # 1000 steps, curvature every 10, both variants

Trains a small CNN (explicit and implicit layers) with SENG on random data in one process and
prints the resident set size (RSS, from /proc/self/statm) every 100 steps. After a warm-up of
``--warmup`` steps (allocator pools, the first curvature), RSS must not grow by more than
``--tolerance`` percent; the script exits 1 if it does, so a leak of curvature state, capture
records or cached inverses fails CI.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from seng_dist import SENG


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(variant: str, steps: int, interval: int, warmup: int) -> tuple[float, float]:
    """RSS after ``warmup`` steps and at the end, printing it every 100 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    # explicit_threshold 4096: the 784x128 layer takes the implicit (low-rank) path.
    opt = SENG(
        model,
        lr=0.02,
        curvature_update_interval=interval,
        variant=variant,
        explicit_threshold=4096,
        sketch_size=1024,
        curvature_batch_size=16,
    )
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    start = 0.0
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.cross_entropy(model(x + 0.1 * torch.randn_like(x)), y).backward()
        opt.step()
        if step == warmup:
            start = rss_mib()
        if step % 100 == 0:
            print(
                f"{variant:>9} step {step:5d}: RSS {rss_mib():7.1f} MiB, curvature updates "
                f"{opt.curvature_updates}",
                flush=True,
            )
    return start, rss_mib()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--interval", type=int, default=10, help="curvature update interval")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tolerance", type=float, default=5.0, help="allowed growth, percent")
    args = ap.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        ap.error("--warmup must be between 0 and --steps")
    torch.set_num_threads(1)
    failed = False
    for variant in ("blockdiag", "lagged"):
        start, end = soak(variant, args.steps, args.interval, args.warmup)
        growth = 100.0 * (end - start) / start
        print(
            f"{variant}: resident memory after warm-up: {start:.1f} MiB -> {end:.1f} MiB "
            f"({growth:+.2f}%, limit +{args.tolerance:g}%)"
        )
        failed |= growth > args.tolerance
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
