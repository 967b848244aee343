"""Plot test accuracy against epochs and against wall time for one or more training runs.

    python examples/plot.py runs.png seng=seng.jsonl sgd=sgd.csv

Each run is a metrics file written by ``train.py --metrics`` (JSON lines or CSV).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The per-epoch rows of a metrics file (``.csv``, else JSON lines)."""
    path = Path(path)
    with path.open() as f:
        if path.suffix == ".csv":
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        return [json.loads(line) for line in f if line.strip()]


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # the run's label


def write_metrics(path: str | Path, rows: list[dict]) -> None:
    """Write ``rows`` as CSV (for a ``.csv`` path) or JSON lines, replacing the file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        if path.suffix == ".csv":
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    tmp.replace(path)  # a reader never sees half a file


def plot_runs(
    runs: dict[str, list[dict]],
    out: str | Path,
    target: float | None = None,
    metric: str = "test_acc",
    at: str = "epoch",
) -> None:
    """Two panels, ``metric`` against ``at`` and against training time, one line a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, rows in runs.items():
        y = [r[metric] for r in rows]
        axes[0].plot([r[at] for r in rows], y, marker="o", ms=3, label=label)
        axes[1].plot([r["train_time_s"] for r in rows], y, marker="o", ms=3, label=label)
    for ax, xlabel in zip(axes, (at, "training time (s)"), strict=True):
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric.replace("_", " "))
    axes[1].legend(fontsize=8, loc="upper right" if metric.endswith("_loss") else "lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    plot_runs(
        {spec.split("=", 1)[0]: read_metrics(spec.split("=", 1)[-1]) for spec in sys.argv[2:]},
        sys.argv[1],
    )
