"""The report: the Markdown sections of ``results.md`` (what is sent, the two validations,
the predictions) and the plot ``scaling.png``, from numbers computed elsewhere. Formatting
only: nothing here measures or models.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .model import Cluster, Counted


def _ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def counts_table(model: str, counted: list[Counted]) -> list[str]:
    """What each setup sends per plain step: calls, rounds, bytes (also against DDP fp32's),
    buckets that may start during backward, and whether the bucket rule matches the count."""
    sgd = next(c for c in counted if c.setup.method == "sgd" and not c.setup.comm_dtype)
    lines = [
        f"| {model}: setup | calls/plain step | rounds | MiB/step per rank | × DDP fp32 "
        "bytes | buckets during backward | bucket sizes by the rule = counted |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in counted:
        early = sum(1 for m in c.plain.early if m.ready < 1.0)
        match = "-" if c.derived_matches is None else ("yes" if c.derived_matches else "no")
        lines.append(
            f"| {c.setup.label} | {c.calls} | {c.rounds} | {c.bytes / 2**20:.2f} | "
            f"{c.bytes / sgd.bytes:.3f} | {early} ({c.buckets_from}) | {match} |"
        )
    return lines


def predictions_table(rows: list[dict[str, Any]], gpus: Sequence[int]) -> list[str]:
    """One row per setup: ms per step (efficiency) at each GPU count."""
    lines = ["| setup | " + " | ".join(f"P={p}" for p in gpus) + " |", "|---|" + "---|" * len(gpus)]
    for r in rows:
        lines.append(
            f"| {r['setup']} | "
            + " | ".join(
                f"{_ms(r[str(p)]['ms'])} ({100 * r[str(p)]['efficiency']:.0f}%)" for p in gpus
            )
            + " |"
        )
    return lines


def gloo_section(
    sizes: Sequence[int],
    measured: dict[int, list[float]],
    validation: dict[str, Any],
    bench: list[dict[str, Any]] | None,
) -> list[str]:
    """Validation (a): the Gloo sweep at 2 and 3 ranks and each fit's predictions of the
    other; then, if given, bench_comm.py's waits next to the model's."""
    md = [
        "## Validation (a): Gloo loopback on this machine, 2 ⇄ 3 ranks",
        "",
        "Ring model fitted at one world size, predicting the other (float32 allreduce; "
        "2-20 back-to-back calls per trial, median of 5 trials, slowest rank). This "
        "machine has 2 cores: 3 ranks are oversubscribed, and whatever else runs on it "
        "shows up as noise.",
        "",
        "| size | 2 ranks (ms) | 3 ranks (ms) | 3 from the 2-rank fit (ms) | error | "
        "2 from the 3-rank fit (ms) | error |",
        "|---|---|---|---|---|---|---|",
    ]
    f23, f32 = validation["fit2_predict3"], validation["fit3_predict2"]
    for i, n in enumerate(sizes):
        md.append(
            f"| {n / 1024:,.0f} KiB | {1e3 * measured[2][i]:.3f} | "
            f"{1e3 * measured[3][i]:.3f} | {1e3 * f23['predicted_s'][i]:.3f} | "
            f"{f23['error_pct'][i]:+.0f}% | {1e3 * f32['predicted_s'][i]:.3f} | "
            f"{f32['error_pct'][i]:+.0f}% |"
        )
    md += [
        "",
        f"2-rank fit: α = {f23['alpha_us']:.1f} µs, 1/β = "
        f"{f23['bandwidth_MBps']:,.0f} MB/s; predicting 3 ranks: median |error| "
        f"{f23['median_abs_error_pct']:.0f}%. 3-rank fit: α = {f32['alpha_us']:.1f} µs, "
        f"1/β = {f32['bandwidth_MBps']:,.0f} MB/s; predicting 2 ranks: median |error| "
        f"{f32['median_abs_error_pct']:.0f}%.",
        "",
    ]
    if bench:
        errs = [abs(r["error_pct"]) for r in bench if r["error_pct"] is not None]
        md += [
            "`bench_comm.py`'s runs (CIFAR-style ResNet18, batch 32 per rank): the ms rank 0 "
            "waited in SENG's collectives against the model's ms for the same calls (the "
            "2-rank fit; equal-sized calls; nothing hidden, so compared only without "
            "overlap). Waiting includes waiting for a slower rank.",
            "",
            "| ranks | setup | ms/step | ms waited in collectives | model: ms in "
            "collectives | error |",
            "|---|---|---|---|---|---|",
        ]
        md += [
            f"| {r['world']} | {r['setup']} | {r['ms']:.0f} | {r['waited_ms']:.0f} | "
            f"{r['model_ms']:.0f} | "
            + ("-" if r["error_pct"] is None else f"{r['error_pct']:+.0f}%")
            + " |"
            for r in bench
        ]
        if errs:
            md.append(f"\nWithout overlap: median |error| {statistics.median(errs):.0f}%.")
        md.append("")
    return md


def table3_section(t3: list[dict[Any, Any]], cluster: Cluster) -> list[str]:
    """Validation (b): the model against the paper's Table 3 on ``cluster`` nodes."""
    md = [
        "## Validation (b): the paper's Table 3 (ResNet50, 128 per V100)",
        "",
        "Compute calibrated on the 4-GPU time per epoch (542.22 s) for each setup; cluster "
        f"{cluster.name} (the paper ran 4-16 GPUs on one node, 32 on two).",
        "",
        "| setup | 8 GPUs: model / paper (error) | 16 GPUs | 32 GPUs | efficiency "
        "8/16/32 (paper 0.92/0.90/0.93) | link bandwidth × to match 8 GPUs |",
        "|---|---|---|---|---|---|",
    ]
    for r in t3:
        cells = [
            f"{r[p]['predicted_s']:.2f} / {r[p]['paper_s']:.2f} s ({r[p]['error_pct']:+.1f}%)"
            for p in (8, 16, 32)
        ]
        eff = "/".join(f"{r[p]['efficiency']:.3f}" for p in (8, 16, 32))
        md.append(
            f"| {r['setup']} | " + " | ".join(cells) + f" | {eff} | "
            f"{r['bandwidth_factor_to_match_8']:.4f} |"
        )
    errs = [abs(r[p]["error_pct"]) for r in t3 for p in (8, 16, 32)]
    md += [
        "",
        f"|error| over setups and GPU counts: {min(errs):.1f}-{max(errs):.1f}%; the "
        "model's communication explains almost none of the paper's 7-10% loss.",
        "",
    ]
    return md


def prediction_sections(
    predictions: dict[str, list[dict[str, Any]]],
    results: dict[str, Any],
    cluster: Cluster,
    gpus: Sequence[int],
    per_gpu_batch: dict[str, int],
) -> list[str]:
    """Per model, ms per step (efficiency) at each of ``gpus``; then SENG lagged next to
    DDP SGD at 256 GPUs and the sensitivity to slower links (from ``results``)."""
    md = [
        f"## Predictions on {cluster.name} nodes: ms per step (efficiency)",
        "",
        "Weak scaling (per-GPU batch fixed); efficiency = the method's one-GPU compute-only "
        "step over its step at P. Links: "
        + "; ".join(
            f"{k.name} {k.bandwidth / 1e9:g} GB/s, {1e6 * k.latency:g} µs/step"
            for k in (cluster.intra, cluster.inter)
        )
        + f"; {cluster.nics_per_node} NICs per node.",
        "",
    ]
    for name, rows in predictions.items():
        c = results["compute"][name]
        md += [
            f"### {name} (per-GPU batch {per_gpu_batch[name]}; SGD compute "
            f"{_ms(1e3 * c['sgd_s'])} ms per step; SENG × {c['seng_ratio']:.3f}; "
            f"T = {c['curvature_interval']})",
            "",
        ]
        md += predictions_table(rows, gpus) + [""]
    md += [
        "## At 256 GPUs: SENG lagged next to DDP SGD (overlap)",
        "",
        "| model | buffers | uc | DDP SGD efficiency | SENG lagged efficiency | SENG lagged "
        "step / DDP SGD step |",
        "|---|---|---|---|---|---|",
    ]
    for name, head in results["headline_256"].items():
        md += [
            f"| {name} | {h['dtype']} | {h['uc']} | {100 * h['sgd']['efficiency']:.1f}% | "
            f"{100 * h['lagged']['efficiency']:.1f}% | {h['lagged_over_sgd_time']:.3f} |"
            for h in head
        ]
    md.append("")
    for name, sens in results["sensitivity_256"].items():
        md.append(
            f"Sensitivity, {name} (fp32, overlap, uc=exact): "
            + "; ".join(
                f"links ×{s['bandwidth_x']:g} bandwidth ×{s['latency_x']:g} latency: DDP SGD "
                f"{100 * s['sgd']:.1f}%, SENG lagged {100 * s['lagged']:.1f}%"
                for s in sens
            )
            + "."
        )
    md.append("")
    return md


def plot(
    predictions: dict[str, list[dict[str, Any]]], gpus: Sequence[int], cluster: Cluster, path: Path
) -> None:
    """Step time and efficiency against GPUs, per model (uc=exact, SENG's default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(predictions), 2, figsize=(12, 3.8 * len(predictions) + 1.2), squeeze=False
    )
    colours = {"sgd": "tab:gray", "blockdiag": "tab:blue", "lagged": "tab:red"}
    for (model, rows), (ax_t, ax_e) in zip(predictions.items(), axes, strict=True):
        for r in rows:
            if r["method"] != "sgd" and r["uc"] != "exact":
                continue
            style: dict[str, Any] = dict(
                color=colours[r["method"]],
                ls="-" if r["overlap"] else "--",
                marker="o" if r["comm_dtype"] is None else "s",
                ms=3,
                lw=1.2,
            )
            ax_t.plot(gpus, [r[str(p)]["ms"] for p in gpus], label=r["setup"], **style)
            ax_e.plot(gpus, [100 * r[str(p)]["efficiency"] for p in gpus], **style)
        for ax, what in ((ax_t, "step time (ms)"), (ax_e, "scaling efficiency (%)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(gpus), [str(p) for p in gpus])
            ax.set_xlabel(f"GPUs ({cluster.name} nodes)")
            ax.set_ylabel(what)
            ax.set_title(f"{model}: {what}")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 1.1 / (3.8 * len(predictions) + 1.2), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
