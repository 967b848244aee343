"""Scaling model: predicted step time and scaling efficiency of DDP SGD and distributed SENG.

Writes results.md, results.json and scaling.png to ``--out``; run from the repository root:

    python -m examples.scaling --out examples/results/scaling       # 1.5-5 min, 2 cores
    python -m examples.scaling --out /tmp/scaling --skip-sweep --models resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from .calibrate import (
    SPECS,
    SWEEP_SIZES,
    backward_progress,
    calibrate_resnet50,
    count_collectives,
    gloo_sweep,
    plans,
    seng_ratio_cpu,
)
from .model import (
    BACKWARD_FRACTION,
    CLUSTERS,
    GPUS,
    LINKS,
    PAPER,
    Compute,
    Setup,
    all_setups,
    headline,
    predict,
    sensitivity,
)
from .tables import counts_table, gloo_section, plot, prediction_sections, table3_section
from .validate import compare_bench_comm, validate_gloo, validate_table3


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m examples.scaling", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--out", default="examples/results/scaling", help="folder for the results")
    ap.add_argument("--models", default="resnet50,bytelm")
    ap.add_argument(
        "--cluster",
        default="dgx1",
        choices=list(CLUSTERS),
        help="the cluster of the predictions (Table 3 always uses dgx2)",
    )
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="SENG's and DDP's buckets")
    ap.add_argument(
        "--skip-sweep",
        action="store_true",
        help="skip validation (a), the Gloo loopback sweep (~1 min)",
    )
    ap.add_argument(
        "--bench-comm",
        default="examples/results/comm",
        help="folder of bench_comm_{2,3}ranks.json (optional comparison)",
    )
    ap.add_argument(
        "--lm-ratio",
        type=float,
        default=None,
        help="SENG/SGD compute ratio for ByteLM (default: measured here)",
    )
    ap.add_argument(
        "--lm-compute-ms",
        type=float,
        default=None,
        help="ByteLM's SGD compute per step on a V100 (default: its FLOPs at the "
        "rate the paper's ResNet50 timings imply)",
    )
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Count, calibrate, validate and predict; write the results to ``--out`` and return
    them (the contents of results.json)."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "paper": PAPER,
        "links": {k: asdict(v) for k, v in LINKS.items()},
        "clusters": {
            k: {**asdict(v), "intra": v.intra.name, "inter": v.inter.name}
            for k, v in CLUSTERS.items()
        },
        "backward_fraction": BACKWARD_FRACTION,
        "gpus": list(GPUS),
    }
    md = [
        f"# Scaling model: predicted step time and efficiency (torch {torch.__version__})",
        "",
        "Made by `python -m examples.scaling "
        + " ".join(argv or sys.argv[1:])
        + "`; formulas, figures and assumptions in `docs/scaling.md`.",
        "",
    ]

    if not args.skip_sweep:
        measured = {w: gloo_sweep(w, SWEEP_SIZES) for w in (2, 3)}
        va = results["validation_gloo"] = validate_gloo(SWEEP_SIZES, measured)
        f23 = va["fit2_predict3"]
        bench = results["bench_comm"] = compare_bench_comm(
            Path(args.bench_comm), f23["alpha_us"] * 1e-6, 1e-6 / f23["bandwidth_MBps"]
        )
        md += gloo_section(SWEEP_SIZES, measured, va, bench)
    predictions: dict[str, list[dict[str, Any]]] = {}
    cluster = CLUSTERS[args.cluster]
    resnet: tuple[Compute, float] | None = None  # SGD's compute and its FLOPs per step
    for name in args.models.split(","):
        spec = SPECS[name]
        progress, flops = backward_progress(spec)
        rows = count_collectives(name, all_setups(), bucket_mb=args.bucket_mb)
        counted = [plans(r, progress, args.bucket_mb) for r in rows]
        results.setdefault("counted", {})[name] = [
            {
                "setup": c.setup.label,
                "bytes": c.bytes,
                "calls": c.calls,
                "rounds": c.rounds,
                "plain": asdict(c.plain),
                "curvature": asdict(c.curvature),
                "buckets_from": c.buckets_from,
                "derived_matches": c.derived_matches,
            }
            for c in counted
        ]
        md += [f"## What is sent: {name} (counted on 2 Gloo ranks, plain step)", ""]
        md += counts_table(name, counted) + [""]
        step_flops = flops * spec.per_gpu_batch
        info: dict[str, Any]
        if name == "resnet50":
            ref = next(c for c in counted if c.setup == Setup("blockdiag", False, None, "factored"))
            calibrated = calibrate_resnet50(ref, CLUSTERS["dgx2"])
            ratio = calibrated.ratio
            resnet = (replace(calibrated, ratio=1.0), step_flops)
            info = {
                "calibrated_with": ref.setup.label,
                "effective_tflops": step_flops / calibrated.sgd_s / 1e12,
                "source": "Table 3 (4 GPUs) and Table 5 (SENG-800 / SGD)",
            }
            t3 = results["validation_table3"] = validate_table3(counted, CLUSTERS["dgx2"])
            md += table3_section(t3, CLUSTERS["dgx2"])
        else:
            if resnet is None:
                raise SystemExit(
                    "ByteLM's compute is scaled from ResNet50's: list resnet50 first in --models"
                )
            measured_ratio = None if args.lm_ratio else seng_ratio_cpu(spec)
            ratio = args.lm_ratio if measured_ratio is None else measured_ratio["ratio"]
            rate = resnet[1] / resnet[0].sgd_s
            info = {
                "seng_ratio_cpu": measured_ratio,
                "v100_rate_from_resnet50_tflops": rate / 1e12,
                "source": "FLOPs at ResNet50's V100 rate; SENG ratio measured here",
            }
        # every model's compute at ResNet50's V100 rate (ResNet50's own: its calibrated time)
        seconds = step_flops / (resnet[1] / resnet[0].sgd_s)
        if name != "resnet50" and args.lm_compute_ms:
            seconds = args.lm_compute_ms / 1e3
        compute = Compute(seconds, 1.0, curvature_interval=spec.curvature_interval)
        results.setdefault("compute", {})[name] = {
            **asdict(compute),
            "seng_ratio": ratio,
            "flops_per_step": step_flops,
            **info,
        }
        predictions[name] = predict(counted, compute, ratio, cluster)
        results.setdefault("predictions", {})[name] = predictions[name]
        results.setdefault("headline_256", {})[name] = headline(predictions[name])
        results.setdefault("sensitivity_256", {})[name] = sensitivity(
            counted, compute, ratio, cluster
        )
    md += prediction_sections(
        predictions,
        results,
        cluster,
        GPUS,
        {name: SPECS[name].per_gpu_batch for name in predictions},
    )
    plot(predictions, GPUS, cluster, out / "scaling.png")
    md += [
        "![step time and efficiency](scaling.png)",
        "",
        f"({time.time() - started:.0f} s on this machine.)",
    ]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n".join(md))
    return results


if __name__ == "__main__":
    main()
