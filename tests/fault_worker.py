"""One rank of a job in which rank 1 fails: ``python fault_worker.py kill|stop [TIMEOUT]``.

Started by tests/test_faults.py under each launcher (none, torchrun, horovodrun, mpirun). Every
rank trains a small model with SENG on the engine its launcher implies; at step 5 rank 1 sends
itself SIGKILL (``kill``: a crashed node) or SIGSTOP (``stop``: a hung one). ``TIMEOUT`` is the
seconds a collective waits for a missing rank (examples/engines.py ``start``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import engines  # noqa: E402
from seng_dist import SENG  # noqa: E402


def main() -> None:
    fault = sys.argv[1]
    engine = engines.start("auto", timeout=float(sys.argv[2]) if len(sys.argv) > 2 else 600.0)
    torch.manual_seed(engine.rank)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = SENG(model, lr=0.05, curvature_update_interval=2, comm=engine.name)
    for step in range(10_000):
        if engine.rank == 1 and step == 5:
            print(f"rank 1: sending itself {fault}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    raise SystemExit("rank survived 10000 steps: the fault went unnoticed")


if __name__ == "__main__":
    main()
