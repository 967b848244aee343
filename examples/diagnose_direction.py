"""How SENG's direction relates to the gradient, per layer, along training.

    python examples/diagnose_direction.py --damping 1 0.03 --uc factored \
        --out examples/results/converge

Trains the CNN at batch 128 with SENG (the benchmark's settings: momentum 0.9, weight decay
5e-4, curvature every 50 steps, ``lr/λ`` = 0.05) and, every ``--every`` steps, compares each
layer's direction ``d`` with its (L2-augmented) gradient ``z``: the cosine of ``-d`` and ``z``,
and the step kept, ``‖d‖ / (‖z‖/λ)`` — 1 where the curvature sees nothing of ``z`` (SENG's step
is then SGD's at lr/λ), smaller where the curvature damps it. ``d`` is read from the momentum
buffer (``d = v_t - μ·v_{t-1}``). Writes ``direction.md`` (means over each part of training)
and ``direction.jsonl`` (every measurement) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from data import load_fashion_mnist  # noqa: E402
from models import SmallCNN  # noqa: E402

from seng_dist import SENG, SENGConfig  # noqa: E402
from seng_dist.config import UC_MODES  # noqa: E402
from seng_dist.update import MOMENTUM  # noqa: E402

MOMENTUM_COEF, WEIGHT_DECAY, STEP = 0.9, 5e-4, 0.05


def measure(damping: float, args: argparse.Namespace) -> list[dict]:
    """One SENG run at ``damping`` (lr = STEP·damping); the measurements."""
    torch.manual_seed(args.seed)
    x, y = load_fashion_mnist(True)
    x, y = x[: args.train_limit], y[: args.train_limit]
    model = SmallCNN()
    opt = SENG(
        model,
        lr=STEP * damping,
        damping=damping,
        momentum=MOMENTUM_COEF,
        weight_decay=WEIGHT_DECAY,
        curvature_update_interval=args.interval,
        uc=args.uc,
        explicit_threshold=args.explicit_threshold,
    )
    names = {b.weight: f"{b.name} ({b.path})" for b in opt.blocks}
    steps_per_epoch = len(x) // args.batch
    out = []
    for step in range(int(args.epochs * steps_per_epoch)):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x))
        idx = order[(step % steps_per_epoch) * args.batch :][: args.batch]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        watch = step % args.every == 0
        if watch:
            z = {w: (w.grad + WEIGHT_DECAY * w).detach().clone() for w in names}
            before = {w: opt.state[w].get(MOMENTUM) for w in names}
            before = {w: None if b is None else b.clone() for w, b in before.items()}
        opt.step()
        if watch:
            for w, name in names.items():
                v, prev = opt.state[w][MOMENTUM], before[w]
                d = v if prev is None else v - MOMENTUM_COEF * prev
                out.append(
                    {
                        "damping": damping,
                        "epoch": step / steps_per_epoch,
                        "layer": name,
                        "cosine": float(F.cosine_similarity(-d.flatten(), z[w].flatten(), dim=0)),
                        "step_kept": float(d.norm() * damping / z[w].norm()),
                    }
                )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--damping", type=float, nargs="+", default=[1.0, 0.03])
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--interval", type=int, default=50)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--train-limit", type=int, default=30_000)
    ap.add_argument("--uc", default=SENGConfig().sketch.uc, choices=UC_MODES)
    ap.add_argument(
        "--explicit-threshold", type=int, default=SENGConfig().sketch.explicit_threshold
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("diagnose-direction"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = [r for d in args.damping for r in measure(d, args)]
    parts = [(0.0, 0.25), (0.25, 1.0), (1.0, float("inf"))]
    lines = [
        f"SENG's direction against the gradient per layer: cnn, batch {args.batch}, "
        f"curvature every {args.interval} steps, uc {args.uc}, explicit threshold "
        f"{args.explicit_threshold}, lr/λ = {STEP}, measured every "
        f"{args.every} steps; mean (min-max) over each part of training.",
        "",
        "| λ | layer | epochs | cosine(-d, g) | step kept ‖d‖λ/‖g‖ |",
        "|---|---|---|---|---|",
    ]
    for d in args.damping:
        for layer in dict.fromkeys(r["layer"] for r in rows):
            for lo, hi in parts:
                sel = [
                    r
                    for r in rows
                    if r["damping"] == d and r["layer"] == layer and lo <= r["epoch"] < hi
                ]
                if not sel:
                    continue
                cells = [
                    f"{statistics.fmean(r[k] for r in sel):.3f} "
                    f"({min(r[k] for r in sel):.3f}-{max(r[k] for r in sel):.3f})"
                    for k in ("cosine", "step_kept")
                ]
                lines.append(
                    f"| {d:g} | {layer} | {lo:g}-{min(hi, args.epochs):g} | "
                    + " | ".join(cells)
                    + " |"
                )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "direction.md").write_text(text + "\n")
    with open(args.out / "direction.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
