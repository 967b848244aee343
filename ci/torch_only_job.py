"""Two Gloo ranks through SENG where only torch and seng_dist are installed (ci/torch_only.sh
launches it with torchrun): for both variants, construction (the ranks' consistency check,
an allgather_object), a few steps, an all-ranks ``state_dict`` (allgather_object) resumed
bit-exactly on a fresh optimizer, and ``broadcast_state`` (broadcast_object). Any failure, or
numpy being importable, ends the job with a non-zero exit.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seng_dist import SENG


def make_model(seed: int) -> nn.Module:
    """A small CNN (a Conv2d and a Linear block), initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def make_seng(model: nn.Module, variant: str) -> SENG:
    """SENG of ``variant`` with a curvature update every other step."""
    return SENG(
        model, lr=0.05, damping=1.0, momentum=0.9, variant=variant, curvature_update_interval=2
    )


def train(model: nn.Module, opt: SENG, steps: range) -> None:
    """``steps`` steps on this rank's own random batches (the same for the same step)."""
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def weights(model: nn.Module) -> torch.Tensor:
    """The model's parameters in one flat tensor."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def check_same_on_all_ranks(model: nn.Module, what: str) -> None:
    """Raise unless every rank holds the same weights (SENG keeps the ranks in step)."""
    mine = weights(model)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if not all(torch.equal(w, every[0]) for w in every):
        raise AssertionError(f"{what}: the ranks' weights differ")


def run(variant: str) -> None:
    """One variant: build, train, save, resume, broadcast the state; raise on a mismatch."""
    rank = dist.get_rank()
    # Each rank starts from its own weights: construction must give every rank rank 0's.
    model = make_model(seed=rank)
    opt = make_seng(model, variant)
    check_same_on_all_ranks(model, f"{variant}: after construction")
    # state_dict() gathers every rank's curvature, so the resume below is exact.
    opt.state_dict_all_ranks = True
    train(model, opt, range(3))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, range(3, 6))
    check_same_on_all_ranks(model, f"{variant}: after 6 steps")

    resumed = make_model(seed=rank + 10)
    resumed.load_state_dict(saved["model"])
    opt_resumed = make_seng(resumed, variant)
    opt_resumed.load_state_dict(saved["opt"])
    train(resumed, opt_resumed, range(3, 6))
    if not torch.equal(weights(resumed), weights(model)):
        raise AssertionError(f"{variant}: the resumed run differs from the one it saved")

    opt_resumed.broadcast_state(src=0)
    train(resumed, opt_resumed, range(6, 8))
    check_same_on_all_ranks(resumed, f"{variant}: after broadcast_state and 2 more steps")


def main() -> None:
    if importlib.util.find_spec("numpy") is not None:
        raise SystemExit("numpy is importable here: this job must run where only torch is")
    dist.init_process_group("gloo")
    try:
        for variant in ("blockdiag", "lagged"):
            run(variant)
        if dist.get_rank() == 0:
            print(
                f"torch-only job: blockdiag and lagged on {dist.get_world_size()} Gloo ranks "
                f"with torch {torch.__version__} and no numpy: OK",
                flush=True,
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Every check has passed: leave without the interpreter's C++ teardown, where Gloo's
    # threads sometimes abort the process ("terminate called without an active exception",
    # 2 runs in ~8 here, after the OK line) and would fail a job that succeeded.
    sys.stdout.flush()
    os._exit(0)
