"""Step-time and memory benchmark: SENG against SGD and ASDL's K-FAC and SENG, in one run.

Each (model, optimizer) pair runs in its own process, one after another, so that its peak
resident memory is its own. Step times on this shared 2-core machine drift by 10-20% between
processes, so every process also trains an SGD twin of the model and alternates one SGD step
with each measured step: the ratios are against the SGD steps of the same process. Timings are
medians of wall-clock steps (forward, backward and optimizer step) after a warm-up step, on
synthetic data of the model's input shape. The curvature interval is set so the run holds two
measured curvature steps and the plain steps between them; the amortised cost at T is
``(curvature + (T-1)·plain) / T``.

    python examples/bench_step.py                       # small CNN (b64) and ResNet18 (b128)
    python examples/bench_step.py --models cnn --plain-steps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import MODELS  # noqa: E402

SETUPS = {  # model: (input shape, batch, plain steps measured per curvature interval)
    "cnn": ((1, 28, 28), 64, 10),
    "resnet18": ((3, 32, 32), 128, 2),
    "vgg16_bn": ((3, 32, 32), 128, 2),
}
OPTIMIZERS = ["sgd", "seng", "asdl-kfac", "asdl-seng"]


def _steps(model, make_step, interval: int, shape, batch: int) -> tuple[float, float, float]:
    """Run 2·interval+1 steps, each followed by an SGD-twin step; return the medians of the
    curvature steps, the plain steps and the twin's steps, in seconds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    times, twin_times = [], []
    for _ in range(2 * interval + 1):
        t0 = time.perf_counter()
        make_step(x, y)
        t1 = time.perf_counter()
        sgd.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        sgd.step()
        times.append(t1 - t0)
        twin_times.append(time.perf_counter() - t1)
    curv = [times[interval], times[2 * interval]]
    plain = [t for i, t in enumerate(times) if i % interval]
    return statistics.median(curv), statistics.median(plain), statistics.median(twin_times[1:])


def worker(model_name: str, opt_name: str, seng_kwargs: dict) -> dict:
    torch.manual_seed(0)
    shape, batch, plain_steps = SETUPS[model_name]
    model = MODELS[model_name](num_classes=10, in_channels=shape[0])
    interval = plain_steps + 1
    out: dict = {"params": sum(p.numel() for p in model.parameters())}
    step_only: list[float] = []  # opt.step() alone, for optimizers where it is separable

    def timed_step(opt):
        t0 = time.perf_counter()
        opt.step()
        step_only.append(time.perf_counter() - t0)

    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(x, y):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            timed_step(opt)

        out["curv_s"], out["plain_s"], out["sgd_s"] = _steps(model, step, interval, shape, batch)
        out["curv_s"] = out["plain_s"] = statistics.median([out["curv_s"], out["plain_s"]])
    elif opt_name == "seng":
        from seng_dist import SENG

        opt = SENG(
            model,
            lr=0.01,
            damping=1.0,
            momentum=0.9,
            curvature_update_interval=interval,
            **seng_kwargs,
        )

        def step(x, y):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            timed_step(opt)

        out["curv_s"], out["plain_s"], out["sgd_s"] = _steps(model, step, interval, shape, batch)
        out["state_bytes"] = opt.curvature_state_bytes()
        out["paths"] = {p: sum(b.path == p for b in opt.blocks) for p in ("explicit", "implicit")}
    else:
        from asdl import KfacGradientMaker, PreconditioningConfig, SengGradientMaker

        config = PreconditioningConfig(
            data_size=batch,
            damping=1.0,
            preconditioner_upd_interval=interval,
            curvature_upd_interval=interval,
        )
        maker = (KfacGradientMaker if opt_name == "asdl-kfac" else SengGradientMaker)(model, config)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(x, y):
            opt.zero_grad()
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(F.cross_entropy, dummy, y)
            maker.forward_and_backward()
            opt.step()

        out["curv_s"], out["plain_s"], out["sgd_s"] = _steps(model, step, interval, shape, batch)
    if step_only:
        out["step_only_plain_s"] = statistics.median(
            [t for i, t in enumerate(step_only) if i % interval]
        )
        out["step_only_curv_s"] = statistics.median(step_only[interval::interval])
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet18"], choices=list(SETUPS))
    ap.add_argument("--optimizers", nargs="+", default=OPTIMIZERS, choices=OPTIMIZERS)
    ap.add_argument(
        "--plain-steps",
        type=int,
        default=None,
        help="plain steps per curvature interval (default: per model)",
    )
    ap.add_argument(
        "--seng",
        default="{}",
        help="JSON of extra SENG settings, e.g. "
        "'{\"sketch_size\": null}' (default: the package defaults)",
    )
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_steps is not None:
        for k, (s, b, _) in SETUPS.items():
            SETUPS[k] = (s, b, args.plain_steps)
    seng_kwargs = json.loads(args.seng)
    if args.worker:
        print(json.dumps(worker(*args.worker, seng_kwargs)))
        return

    results: dict = {}
    for model in args.models:
        for opt in args.optimizers:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                model,
                opt,
                "--seng",
                args.seng,
            ]
            if args.plain_steps is not None:
                cmd += ["--plain-steps", str(args.plain_steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{model}/{opt} failed:\n{proc.stderr}")
            results[(model, opt)] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"# {model} {opt}: {results[(model, opt)]}", file=sys.stderr, flush=True)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, SENG settings "
        f"{seng_kwargs or 'defaults'}\n"
    )
    print(
        "Times: ms per step (ratio to the same process's SGD-twin step). Peak RSS: the "
        "process's maximum resident memory, each process holding its optimizer's model and "
        "the SGD twin (ratio to the SGD process).\n"
    )
    print(
        "| model (batch) | optimizer | curvature step | plain step | amortised T=10 | "
        "amortised T=200 | peak RSS | curvature state |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        sgd = results.get((model, "sgd"))
        for opt in args.optimizers:
            r = results[(model, opt)]
            c, p, base = r["curv_s"], r["plain_s"], r["sgd_s"]
            am10, am200 = (c + 9 * p) / 10, (c + 199 * p) / 200
            cells = [f"{model} ({SETUPS[model][1]})", opt]
            for v in (c, p, am10, am200):
                cells.append(f"{v * 1e3:.0f} ms ({_fmt_ratio(v, base)})")
            rss = f"{r['peak_rss'] / 2**20:.0f} MiB"
            if sgd:
                rss += f" ({_fmt_ratio(r['peak_rss'], sgd['peak_rss'])})"
            cells.append(rss)
            if "state_bytes" in r:
                pb = 4 * r["params"]
                cells.append(
                    f"{r['state_bytes'] / 2**20:.1f} MiB ({r['state_bytes'] / pb:.2f}× "
                    f"params; {r['paths']['explicit']} explicit, "
                    f"{r['paths']['implicit']} implicit)"
                )
            else:
                cells.append("")
            print("| " + " | ".join(cells) + " |")
    print(
        "\nopt.step() alone (median; forward/backward excluded). Single steps on this shared "
        "machine vary by ±10%, so for SENG vs SGD the step-only times are the low-noise "
        "measure: the plain-step ratio below is (fwd+bwd + SENG step) / (fwd+bwd + SGD step) "
        "with fwd+bwd = the SGD process's median step minus its step() time.\n"
    )
    print(
        "| model | SGD step() | SENG plain step() | SENG curvature step() | "
        "plain-step ratio | amortised T=200 ratio |"
    )
    print("|---|---|---|---|---|---|")
    for model in args.models:
        sgd, seng = results.get((model, "sgd")), results.get((model, "seng"))
        if not (sgd and seng):
            continue
        sgd_step = sgd["step_only_plain_s"]
        fb = sgd["plain_s"] - sgd_step
        plain = (fb + seng["step_only_plain_s"]) / (fb + sgd_step)
        curv = (fb + seng["step_only_curv_s"]) / (fb + sgd_step)
        print(
            f"| {model} | {sgd_step * 1e3:.1f} ms | {seng['step_only_plain_s'] * 1e3:.1f} ms | "
            f"{seng['step_only_curv_s'] * 1e3:.0f} ms | {plain:.3f}× | "
            f"{(curv + 199 * plain) / 200:.3f}× |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}/{o}": r for (m, o), r in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
