"""Convergence benchmark: epochs and training time to a target test accuracy on Fashion-MNIST.

    python examples/bench_converge.py                      # the README table (about 75 min
                                                           # on 2 CPU cores)
    python examples/bench_converge.py --epochs 1 --grid first   # a quick look

Every method trains the same model on the same data for the same epoch budget and global
batch, with the same cosine learning-rate schedule, over a small grid of learning rates (and
dampings for the second-order methods), each grid point a ``train.py`` run writing a metrics
file to ``--out``. The best grid point of a method is the one that reaches ``--target`` in the
fewest epochs (then the least time), or the most accurate one if none does. The driver prints a
Markdown table (also written to ``--out``/results.md) with each method's epochs and training
time (evaluation excluded) to the target as ratios to SGD's, and plots the best runs
(``--out``/results.png). SENG runs as one process and on 2 Gloo ranks (``torchrun``) in both
variants; SGD also on 2 ranks (DDP, its best learning rate). Finished runs are reused: delete
``--out`` (or pass ``--fresh``) to measure again.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from plot import plot_runs, read_metrics  # noqa: E402

# (name, ranks, train.py arguments, grid of (lr, damping)); damping None: not used.
SECOND_ORDER_GRID = [(0.05, 1.0), (0.1, 1.0), (0.1, 0.5)]
METHODS = [
    ("SGD", 1, ["--optimizer", "sgd"], [(0.05, None), (0.1, None)]),
    ("Adam", 1, ["--optimizer", "adam"], [(1e-3, None), (2e-3, None)]),
    ("ASDL K-FAC", 1, ["--optimizer", "kfac"], SECOND_ORDER_GRID),
    ("ASDL SENG", 1, ["--optimizer", "asdl-seng"], SECOND_ORDER_GRID),
    ("SENG", 1, ["--optimizer", "seng"], SECOND_ORDER_GRID),
    ("SENG blockdiag", 2, ["--optimizer", "seng", "--variant", "blockdiag"], SECOND_ORDER_GRID),
    ("SENG lagged", 2, ["--optimizer", "seng", "--variant", "lagged"], SECOND_ORDER_GRID),
]


def _tag(name: str, ranks: int, lr: float, damping: float | None) -> str:
    tag = f"{name.lower().replace(' ', '-')}_r{ranks}_lr{lr:g}"
    return tag + (f"_d{damping:g}" if damping is not None else "")


def run(name: str, ranks: int, extra: list[str], lr: float, damping: float | None,
        args: argparse.Namespace) -> list[dict]:
    """One training run (reused if its metrics file is complete); its per-epoch rows."""
    metrics = args.out / f"{_tag(name, ranks, lr, damping)}.jsonl"
    failed = metrics.with_suffix(".failed")
    if not args.fresh and failed.exists():
        return read_metrics(metrics) if metrics.exists() else []
    if metrics.exists() and not args.fresh and len(read_metrics(metrics)) >= args.epochs:
        return read_metrics(metrics)[:args.epochs]
    cmd = [sys.executable, str(HERE / "train.py")]
    if ranks > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(ranks)]
    cmd += extra + ["--model", args.model, "--epochs", str(args.epochs), "--batch-size",
                    str(args.batch_size // ranks), "--lr", str(lr), "--schedule", "cosine",
                    "--curvature-interval", str(args.curvature_interval), "--seed",
                    str(args.seed), "--metrics", str(metrics), "--label", name,
                    "--no-progress"]
    if damping is not None:
        cmd += ["--damping", str(damping)]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    print("$", " ".join(cmd[1:]), flush=True)
    failed.unlink(missing_ok=True)
    if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
        # A grid point that diverges (K-FAC at a large step, say) is a result, not a crash
        # of the benchmark: it keeps the epochs it finished and is marked in the table.
        failed.touch()
        print(f"run failed (diverged?): {metrics.stem}", flush=True)
    return read_metrics(metrics) if metrics.exists() else []


def to_target(rows: list[dict], target: float) -> tuple[int, float] | None:
    """(epochs, training seconds) at the first epoch whose test accuracy reaches ``target``."""
    for r in rows:
        if r["test_acc"] >= target:
            return int(r["epoch"]), float(r["train_time_s"])
    return None


def best(results: dict, target: float) -> tuple:
    """The grid point reaching the target first (epochs, then time), else the most accurate."""
    def key(item):
        hit = to_target(item[1], target)
        return (0, hit[0], hit[1]) if hit else (1, -max([r["test_acc"] for r in item[1]] or [0]),
                                                 0)
    return min(results.items(), key=key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch")
    ap.add_argument("--curvature-interval", type=int, default=50)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="all", choices=["all", "first"],
                    help="first: only the first grid point of each method")
    ap.add_argument("--only", default=None, help="comma-separated method names to run")
    ap.add_argument("--out", type=Path, default=Path("bench-converge"))
    ap.add_argument("--fresh", action="store_true", help="rerun finished runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if args.only is None or m[0] in args.only.split(",")]

    chosen: dict[str, tuple] = {}  # method label -> (lr, damping, rows, grid size)
    for name, ranks, extra, grid in methods:
        grid = grid[:1] if args.grid == "first" else grid
        results = {(lr, d): run(name, ranks, extra, lr, d, args) for lr, d in grid}
        (lr, d), rows = best(results, args.target)
        failed = sum(len(r) < args.epochs for r in results.values())
        chosen[f"{name} ({ranks} rank{'s' if ranks > 1 else ''})"] = (
            lr, d, rows, f"{len(grid)}" + (f" ({failed} diverged)" if failed else ""))
        if name == "SGD":  # the data-parallel baseline for the 2-rank SENG rows
            chosen["SGD (2 ranks, DDP)"] = (lr, d, run("SGD", 2, extra, lr, d, args), "1")

    sgd = chosen.get("SGD (1 rank)")
    sgd_hit = to_target(sgd[2], args.target) if sgd else None
    lines = [f"Target test accuracy {args.target:.0%}, {args.model}, {args.epochs} epochs, "
             f"global batch {args.batch_size}, cosine schedule; times exclude evaluation.",
             "", "| method | grid points | chosen lr / damping | final test acc | epochs to "
             "target | time to target (s) | epochs vs SGD | time vs SGD | s/epoch vs SGD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, (lr, d, rows, n) in chosen.items():
        if not rows:
            lines.append(f"| {label} | {n} | — | diverged | — | — | — | — | — |")
            continue
        hit = to_target(rows, args.target)
        per_epoch = rows[-1]["train_time_s"] / len(rows)
        sgd_per_epoch = sgd[2][-1]["train_time_s"] / len(sgd[2]) if sgd else None
        cells = [label, n, f"{lr:g}" + (f" / {d:g}" if d is not None else ""),
                 f"{rows[-1]['test_acc']:.4f}"]
        if hit:
            cells += [str(hit[0]), f"{hit[1]:.0f}"]
        else:
            cells += [f"not reached (best {max(r['test_acc'] for r in rows):.4f})", "—"]
        if hit and sgd_hit:
            cells += [f"{hit[0] / sgd_hit[0]:.2f}×", f"{hit[1] / sgd_hit[1]:.2f}×"]
        else:
            cells += ["—", "—"]
        cells.append(f"{per_epoch / sgd_per_epoch:.2f}×" if sgd_per_epoch else "—")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    plot_runs({label: v[2] for label, v in chosen.items()}, args.out / "results.png",
              target=args.target)
    print(f"plot: {args.out / 'results.png'}")


if __name__ == "__main__":
    main()
