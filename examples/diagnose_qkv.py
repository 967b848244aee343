"""Q, K and V as one block or three: which direction does the language model better?

    python examples/diagnose_qkv.py --out examples/results/lm

SENG keeps an attention module's packed ``in_proj_weight`` (and ``in_proj_bias``) as ONE
block ``[W_q; W_k; W_v | b]``: its ``U`` has the per-sample gradients of all three, so the
curvature keeps the products between Q's, K's and V's gradients; three blocks would keep only
each one's own (block-diagonal). This trains ``examples/lm.py``'s model with SENG damped by
Adam's diagonal (λ 1, ``--lr``, no weight decay, the benchmark's schedule over ``--steps``)
and, at each step of ``--at``, takes a batch of 32 training windows and computes in float64,
from ``torch.func`` per-sample gradients (every sample's: ϱ = 32), each layer's ``in_proj``
direction ``-(UUᵀ + λD)⁻¹g`` both ways, for ``D = I`` at each λ of ``--dampings`` and for
Adam's ``D`` (this batch's ``|g| + ε``) at each of ``--adam-dampings``. It reports their
relative difference, and the held-out loss (``--eval-windows`` validation windows) after
moving every layer's ``in_proj`` along each direction — and along the plain ``-g/(λD)`` —
with the best step ``η·λ·d`` of a grid of ``η`` (at one ``η`` the directions have the same
scale where the curvature sees nothing). Writes ``qkv.md`` and ``qkv.jsonl`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lm import ByteLM, load_corpus, windows  # noqa: E402

from seng_dist import SENG, schedules  # noqa: E402
from seng_dist.reference import block_matrix, exact_direction, per_sample_gradients  # noqa: E402


def lm_loss(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over every position."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def in_projs(model: ByteLM) -> dict[str, nn.MultiheadAttention]:
    """Every attention module's block name (``<attn>.in_proj``) and the module."""
    return {
        f"{name}.in_proj": m
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


def directions(u: Tensor, damping: float, adam: bool) -> dict[str, Tensor]:
    """The in_proj block's direction ``-(UUᵀ + λD)⁻¹g`` as one block and as three (Q, K, V
    rows; the bias column with its rows), and the plain ``-g/(λD)``; ``D`` is ``I``, or with
    ``adam`` this batch's ``|g| + 1e-8`` (Adam's ``√v̂ + ε`` from one batch)."""
    g = u.mean(0)
    d = g.abs() + 1e-8 if adam else torch.ones_like(g)
    thirds, parts = u.chunk(3, dim=1), d.chunk(3, dim=0)
    return {
        "one block": exact_direction(u, damping, diagonal=d),
        "three blocks": torch.cat(
            [exact_direction(t, damping, diagonal=p) for t, p in zip(thirds, parts, strict=True)],
            dim=0,
        ),
        "gradient": -g / (damping * d),
    }


@torch.no_grad()
def loss_after(
    model: ByteLM, moves: dict[str, Tensor], scale: float, x: Tensor, y: Tensor
) -> float:
    """The loss on ``(x, y)`` with each attention's ``[W | b]`` moved by ``scale·move``."""
    attns = in_projs(model)
    saved = {k: (m.in_proj_weight.clone(), m.in_proj_bias.clone()) for k, m in attns.items()}
    for k, m in attns.items():
        step = (scale * moves[k]).to(m.in_proj_weight.dtype)
        m.in_proj_weight.add_(step[:, :-1])
        m.in_proj_bias.add_(step[:, -1])
    loss = float(lm_loss(model(x), y))
    for k, m in attns.items():
        m.in_proj_weight.copy_(saved[k][0])
        m.in_proj_bias.copy_(saved[k][1])
    return loss


def measure(
    model: ByteLM, step: int, train: np.ndarray, val: np.ndarray, args: argparse.Namespace
) -> list[dict]:
    """The measurements at one point of training."""
    rng = np.random.default_rng([args.seed, step, 7])
    x, y = windows(train, rng.integers(0, len(train) - args.context - 1, 32), args.context)
    vx, vy = windows(
        val, rng.integers(0, len(val) - args.context - 1, args.eval_windows), args.context
    )
    model.eval()
    grads = per_sample_gradients(model, x, y, lm_loss)
    us = {k: block_matrix(grads, k) for k in in_projs(model)}
    base = loss_after(model, {k: torch.zeros_like(u[0]) for k, u in us.items()}, 0.0, vx, vy)
    out = []
    for adam, damping in [(False, lam) for lam in args.dampings] + [
        (True, lam) for lam in args.adam_dampings
    ]:
        per_layer = {k: directions(u, damping, adam) for k, u in us.items()}
        row: dict = {"step": step, "D": "Adam's" if adam else "I", "damping": damping, "loss": base}
        one = torch.cat([d["one block"].flatten() for d in per_layer.values()])
        three = torch.cat([d["three blocks"].flatten() for d in per_layer.values()])
        row["relative difference"] = float((one - three).norm() / one.norm())
        for way in ("one block", "three blocks", "gradient"):
            moves = {k: d[way] for k, d in per_layer.items()}
            losses = {
                eta: loss_after(model, moves, eta * damping, vx, vy)
                for eta in (args.adam_steps_grid if adam else args.steps_grid)
            }
            best = min(losses, key=losses.__getitem__)
            row[way] = {"best eta": best, "loss": losses[best]}
        out.append(row)
        print(json.dumps(row), flush=True)
    model.train()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--at", type=int, nargs="+", default=[0, 300])
    ap.add_argument("--steps", type=int, default=600, help="the schedule's length")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--dampings", type=float, nargs="+", default=[1.0, 0.01], help="λ with D = I")
    ap.add_argument("--adam-dampings", type=float, nargs="+", default=[1.0], help="λ with Adam's D")
    ap.add_argument(
        "--steps-grid", type=float, nargs="+", default=[0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]
    )
    ap.add_argument(
        "--adam-steps-grid",
        type=float,
        nargs="+",
        default=[1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0],
    )
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train, val, _ = load_corpus()
    torch.manual_seed(args.seed)
    model = ByteLM(context=args.context)
    lr = args.lr
    warmup = max(1, round(0.05 * args.steps))
    opt = SENG(
        model,
        lr=schedules.linear_warmup(
            schedules.cosine(lr, 1, args.steps, final=lr * 0.01), warmup, lr * 0.01
        ),
        damping=1.0,
        momentum=0.9,
        weight_decay=0.0,
        curvature_update_interval=50,
        damping_diagonal="adam",
        damping_beta2=0.95,
        comm="local",
    )
    rng = np.random.default_rng(args.seed)
    rows: list[dict] = []
    for step in range(max(args.at) + 1):
        if step in args.at:
            rows += measure(model, step, train, val, args)
        x, y = windows(train, rng.integers(0, len(train) - args.context - 1, 32), args.context)
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        opt.step()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qkv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = [
        f"Q, K, V as one block or three ({Path(__file__).name}; the model trained by "
        f"SENG with Adam's diagonal, λ 1, lr {lr}; ϱ = 32; held-out loss on "
        f"{args.eval_windows} validation windows after moving every in_proj along each "
        f"direction with the best step η·λ of η in {args.steps_grid} (D = I) or "
        f"{args.adam_steps_grid} (Adam's D))",
        "",
        "| step | D | λ | loss before | ‖one − three‖/‖one‖ | one block | three blocks | "
        "gradient |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[w]['loss']:.4f} (η {r[w]['best eta']:g})"
            for w in ("one block", "three blocks", "gradient")
        ]
        lines.append(
            f"| {r['step']} | {r['D']} | {r['damping']:g} | {r['loss']:.4f} | "
            f"{r['relative difference']:.3f} | " + " | ".join(cells) + " |"
        )
    (args.out / "qkv.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
