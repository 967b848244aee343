"""Plain-step cost: SENG's step without a curvature update against SGD's and Adam's, in one
process, interleaved.

Every optimizer trains its own copy of the model on the same synthetic batch; one repetition
runs one step of each, in turn, so drift of the machine's speed reaches all of them alike.
SENG rebuilds its curvature once (the first step, not timed) and then takes plain steps only
(``curvature_update_interval`` past the run). A step is ``zero_grad``, forward, backward and
``step()``; the table gives the medians over the repetitions of the whole step and of
``step()`` alone, and the whole step's ratio to SGD's and to Adam's (AdamW's on the LM).

Models: the small CNN at batch 128, a deep autoencoder MLP of 8 Linear layers of 30k-314k
weights each at batch 256, and the byte-level Transformer LM at batch 32 × 128 tokens.

    python examples/bench_plain_step.py --out examples/results/step/plain
    python examples/bench_plain_step.py --models mlp --reps 30     # one model, quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lm import ByteLM  # noqa: E402
from models import MODELS, autoencoder  # noqa: E402

from seng_dist import SENG  # noqa: E402

Batch = tuple[Tensor, Tensor]
Loss = Callable[[nn.Module, Batch], Tensor]


def _cnn() -> tuple[nn.Module, Batch, Loss]:
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g))
    return MODELS["cnn"](num_classes=10, in_channels=1), batch, _cross_entropy


def _mlp() -> tuple[nn.Module, Batch, Loss]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 784, generator=g)
    return autoencoder(), (x, x), _bernoulli


def _lm() -> tuple[nn.Module, Batch, Loss]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (32, 129), generator=g)
    return ByteLM(), (idx[:, :-1], idx[:, 1:]), _cross_entropy


def _cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    out = model(batch[0])
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), batch[1].reshape(-1))


def _bernoulli(model: nn.Module, batch: Batch) -> Tensor:
    return F.binary_cross_entropy_with_logits(model(batch[0]), batch[1], reduction="sum") / len(
        batch[1]
    )


MODELS_PLAIN = {"cnn": _cnn, "mlp": _mlp, "lm": _lm}


def _optimizers(model: nn.Module, name: str) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    """Each optimizer with its own copy of ``model`` (first-order ones at usual settings; SENG
    at its defaults and with Adam's diagonal)."""
    out: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    adam = torch.optim.AdamW if name == "lm" else torch.optim.Adam
    makers: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        "adam": lambda m: adam(m.parameters(), lr=1e-3),
        "seng": lambda m: SENG(m, lr=0.01, curvature_update_interval=10**9),
        "seng-adam": lambda m: SENG(
            m, lr=1e-4, damping_diagonal="adam", curvature_update_interval=10**9
        ),
    }
    for key, make in makers.items():
        m = copy.deepcopy(model)
        out[key] = (m, make(m))
    return out


def measure(name: str, reps: int) -> dict[str, dict[str, float]]:
    """Median whole-step and ``step()`` times (s) per optimizer, interleaved."""
    torch.manual_seed(0)
    model, batch, loss_fn = MODELS_PLAIN[name]()
    opts = _optimizers(model, name)
    whole: dict[str, list[float]] = {k: [] for k in opts}
    step_only: dict[str, list[float]] = {k: [] for k in opts}
    for rep in range(reps + 3):  # the first three: curvature step and warm-up
        for key, (m, opt) in opts.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            loss_fn(m, batch).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if rep >= 3:
                whole[key].append(t2 - t0)
                step_only[key].append(t2 - t1)
    return {
        k: {"step": statistics.median(whole[k]), "step_only": statistics.median(step_only[k])}
        for k in opts
    }


def table(results: dict[str, dict[str, dict[str, float]]], reps: int) -> str:
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} interleaved "
        "repetitions; medians",
        "",
        "| model | optimizer | step (ms) | step() alone (ms) | × SGD | × Adam |",
        "|---|---|---|---|---|---|",
    ]
    for model, res in results.items():
        for key, r in res.items():
            lines.append(
                f"| {model} | {key} | {1e3 * r['step']:.2f} | {1e3 * r['step_only']:.2f} | "
                f"{r['step'] / res['sgd']['step']:.3f} | {r['step'] / res['adam']['step']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS_PLAIN), choices=list(MODELS_PLAIN))
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", default=None, help="folder for results.md and results.json")
    args = ap.parse_args(argv)
    results = {name: measure(name, args.reps) for name in args.models}
    text = table(results, args.reps)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(text)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
