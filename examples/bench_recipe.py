"""SENG's recipe from measurements: one knob at a time against the same SGD sweep.

    python examples/bench_recipe.py --out examples/results/converge   # writes recipe.md there

Every point trains the CNN for a 3-epoch cosine budget at batch 128 on one process, seed 0, on
the same training subset and evaluation cadence as ``bench_converge.py`` (whose run machinery it
uses, so finished runs are reused and every run's metrics stay in ``--out``/runs/). The studies:

* **damping at a fixed step outside the curvature**: SENG's direction is ``-g/λ`` on every
  direction its curvature does not see, so ``lr/λ`` is the step that SGD's ``lr`` is; the sweep
  holds ``lr/λ`` at SGD's tuned values and lowers ``λ`` (more curvature) from 1 to 0.03;
* **curvature interval**, **curvature batch** and the large layer's **path** at the best
  damping;
* the same knobs again once the implicit path's ``U·b`` is exact (the default since), with the
  paper's damping schedule ``λ0·ρ^(epoch/10)`` (ρ = 0.1: λ falls to half over the 3 epochs),
  a half-epoch warm-up and the paper's exp lr schedule;
* **SGD's learning rate** over the same number of points as the damping sweep, so that the
  baseline gets the tuning budget SENG's defaults got.

The table (``--out``/recipe.md) gives per point the accuracy after each epoch, the time and
epochs to the target (interpolated) and the training seconds per epoch against SGD's best point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_converge import REGIMES, Method, parse_args, run, to_target  # noqa: E402

BATCH_128 = REGIMES[0]
SGD = ("--optimizer", "sgd")
# the studies before the exact-U·b one ran when eq. 23's factored U·b was the default
SENG = ("--optimizer", "seng", "--variant", "blockdiag", "--uc", "factored")
SENG_EXACT = ("--optimizer", "seng", "--variant", "blockdiag", "--uc", "exact")


def _point(**flags: object) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"--{k.replace('_', '-')}", f"{v:g}" if isinstance(v, float) else str(v))
        for k, v in flags.items()
    )


FIRST_STUDIES = ("SGD learning rate", "SENG damping (lr/λ fixed)")  # the later ones: at the best


def studies(best_damping: float, best_step: float) -> dict[str, tuple[Method, ...]]:
    """The studies, in order; the later ones at the damping and step the first one chose."""
    damping = [(0.05, d) for d in (1.0, 0.3, 0.1, 0.03)] + [(0.1, d) for d in (0.3, 0.1)]
    at_best = dict(lr=best_step * best_damping, epochs=3, damping=best_damping)
    return {
        "SGD learning rate": tuple(
            Method("SGD", SGD, (_point(lr=lr, epochs=3),))
            for lr in (0.02, 0.03, 0.05, 0.07, 0.1, 0.2)
        ),
        "SENG damping (lr/λ fixed)": tuple(
            Method("SENG", SENG, (_point(lr=step * d, epochs=3, damping=d),)) for step, d in damping
        ),
        "SENG curvature interval": tuple(
            Method("SENG", SENG, (_point(**at_best, curvature_interval=k),)) for k in (10, 200)
        ),
        "SENG curvature batch": tuple(
            Method("SENG", SENG, (_point(**at_best, curvature_batch_size=b),)) for b in (0,)
        ),
        # the CNN's 3136×128 Linear (401,536 parameters) on the explicit path
        "SENG large-layer path": (
            Method("SENG", SENG, (_point(**at_best, explicit_threshold=500_000),)),
        ),
        # the implicit path's U·b summed exactly instead of eq. 23's product of factor means,
        # over the damping sweep's points at lr/λ = 0.05
        "SENG exact U·b (lr/λ fixed)": tuple(
            Method("SENG", SENG_EXACT, (_point(lr=0.05 * d, epochs=3, damping=d),))
            for d in (1.0, 0.3, 0.1, 0.03)
        ),
        # the other knobs again with the exact U·b, at its sweep's most accurate point
        "SENG exact U·b: other knobs": tuple(
            Method("SENG", SENG_EXACT, (_point(lr=0.05, epochs=3, damping=1.0, **knob),))
            for knob in (
                {"curvature_interval": 10},
                {"curvature_interval": 200},
                {"curvature_batch_size": 0},
                {"damping_decay": 0.1},
                {"warmup_epochs": 0.5},
                {"schedule": "exp"},
            )
        ),
    }


def row(method: Method, rows: list[dict], target: float, sgd_per_epoch: float | None) -> str:
    """One table line: the point, accuracy after each whole epoch, time/epochs to target."""
    point = " ".join(f"{k.strip('-')} {v}" for k, v in method.grid[0])
    if not rows:
        return f"| {method.name} | {point} | failed (diverged) | — | — | — | — |"
    by_epoch = [r["test_acc"] for r in rows if float(r["epoch"]).is_integer()]
    hit = to_target(rows, target)
    per_epoch = rows[-1]["train_time_s"] / rows[-1]["epoch"]
    ratio = f"{per_epoch / sgd_per_epoch:.2f}×" if sgd_per_epoch else "—"
    return (
        f"| {method.name} | {point} | {' / '.join(f'{a:.4f}' for a in by_epoch)} | "
        + (f"{hit[1]:.0f} | {hit[0]:.2f}" if hit else "— | —")
        + f" | {max(r['test_acc'] for r in rows):.4f} | {ratio} |"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-converge"))
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument(
        "--best-damping",
        type=float,
        default=None,
        help="damping for the later studies (default: the damping study's best)",
    )
    ap.add_argument("--only", default=None, help="comma-separated study names")
    mine = ap.parse_args(argv)
    # the run machinery's settings: bench_converge.py's defaults
    args = parse_args(["--out", str(mine.out)])

    def score(rows: list[dict]) -> tuple:
        hit = to_target(rows, mine.target)
        return (0, hit[1]) if hit else (1, -max([r["test_acc"] for r in rows] or [0.0]))

    results: dict[str, list[tuple[Method, list[dict]]]] = {}
    best_damping, best_step = mine.best_damping or 1.0, 0.05
    for name, methods in studies(best_damping, best_step).items():
        if name not in FIRST_STUDIES and mine.best_damping is None:
            done = results.get("SENG damping (lr/λ fixed)", [])
            if done:
                m, _ = min(done, key=lambda mr: score(mr[1]))
                flags = dict(m.grid[0])
                best_damping = float(flags["--damping"])
                best_step = float(flags["--lr"]) / best_damping
                methods = studies(best_damping, best_step)[name]
        if mine.only and name not in mine.only.split(","):
            continue
        results[name] = [(m, run(BATCH_128, m, m.grid[0], 0, args)) for m in methods]
    sgd = [rows for _, rows in results.get("SGD learning rate", []) if rows]
    sgd_best = min(sgd, key=score) if sgd else None
    sgd_per_epoch = sgd_best[-1]["train_time_s"] / sgd_best[-1]["epoch"] if sgd_best else None
    lines = [
        f"Recipe studies: cnn, batch 128, one process, 3-epoch cosine budget, seed 0, "
        f"training subset {args.train_limit} images; target {mine.target:.0%}; "
        "s/epoch against SGD's best point.",
        "",
    ]
    for name, done in results.items():
        lines += [
            f"**{name}**",
            "",
            "| method | point | accuracy after epochs 1 / 2 / 3 | "
            f"time to {mine.target:.0%} (s) | epochs to {mine.target:.0%} | best acc | "
            "s/epoch vs SGD |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [row(m, rows, mine.target, sgd_per_epoch) for m, rows in done] + [""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
