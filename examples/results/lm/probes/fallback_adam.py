"""Probe: SENG on the blocks, Adam's direction on the embedding, positions and LayerNorms.

    python fallback_adam.py <peak lr of the blocks> <peak lr of the rest>   (probes: 0.03/0.1, 4e-4)

The rest is its own param group (4e-4 with SENG's heavy-ball momentum 0.9 is AdamW's 4e-3).
Needs ``grafting.patch`` applied with ``AdamGrafting.block`` returning ``d`` unchanged (the
blocks keep SENG's direction). Prints the validation loss every 50 steps as JSON lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import lm  # noqa: E402

from seng_dist import SENG, schedules  # noqa: E402

STEPS = 600


def schedule(peak: float) -> schedules.StepFn:
    return schedules.linear_warmup(schedules.cosine(peak, 1, STEPS, final=peak * 0.01), 30,
                                   peak * 0.01)


def main() -> None:
    lr, rest_lr = float(sys.argv[1]), float(sys.argv[2])
    train, val, _ = lm.load_corpus()
    torch.manual_seed(0)
    model = lm.ByteLM()
    rest = [p for n, p in model.named_parameters()
            if any(k in n for k in ("embed", "pos", "norm"))]
    opt = SENG(model, param_groups=[{"params": rest, "lr": schedule(rest_lr)}],
               lr=schedule(lr), damping=1.0, momentum=0.9, weight_decay=0.01,
               curvature_update_interval=50, grafting="adam", grafting_beta2=0.95,
               comm="local")
    rng = np.random.default_rng([0, 0])
    starts = np.random.default_rng(12345).integers(0, len(val) - 129, 256)
    for step in range(STEPS + 1):
        if step % 50 == 0:
            model.eval()
            with torch.no_grad():
                loss = np.mean([F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                                for x, y in (lm.windows(val, s, 128)
                                             for s in np.array_split(starts, 8))])
            model.train()
            print(json.dumps({"step": step, "val_loss": float(loss)}), flush=True)
        if step == STEPS:
            break
        x, y = lm.windows(train, rng.integers(0, len(train) - 129, 32), 128)
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()


if __name__ == "__main__":
    main()
