"""Writes ``release-0.1.0.pt``: SENG checkpoints made by seng-dist 0.1.0 (commit 85d0b3f, before
the optimizer was split into curvature objects and rounds), kept so that every later release is
tested to load them (``tests/test_checkpoint.py``).

Run from a checkout of that release:
``PYTHONPATH=.:tests python tests/data/make_release_checkpoint.py``.
For each variant it trains MixedNet for 4 steps (the curvature rebuilt at step 3, with sketch
indices on both paths), saves the model and optimizer state, trains 3 more steps and saves the
parameters that release reached. Those are rounded as the machine that ran this rounds (an AMD
EPYC with AVX2, one thread, reproduces them bit for bit; an AVX-512 Xeon does not), so the test
holds a resume to them within float32's rounding over the 3 steps, not bit for bit.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from conftest import batch, make_mixed

from seng_dist import SENG

SETTINGS: dict[str, Any] = dict(
    lr=0.05,
    damping=0.5,
    momentum=0.9,
    weight_decay=1e-3,
    curvature_update_interval=3,
    explicit_threshold=40,
    sketch_size=24,
    sketch_method="leverage",
    rank=2,
    factor_sketch_size=4,
    curvature_batch_size=10,
)
HEAD, TAIL = 4, 3


def train(model: torch.nn.Module, opt: SENG, steps: range) -> None:
    for k in steps:
        x, y = batch(16, seed=100 + k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    data = {}
    for variant in ("blockdiag", "lagged"):
        model = make_mixed().train()
        opt = SENG(model, variant=variant, **SETTINGS)
        train(model, opt, range(HEAD))
        # A copy: both state dicts hold the live tensors, which the next steps change in place.
        saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
        train(model, opt, range(HEAD, HEAD + TAIL))
        data[variant] = dict(
            saved, after={n: p.detach().clone() for n, p in model.named_parameters()}
        )
    torch.save({"settings": SETTINGS, "head": HEAD, "tail": TAIL, "runs": data}, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("release-0.1.0.pt"))
