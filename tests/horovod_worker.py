"""One Horovod rank for tests/test_horovod.py: ``python horovod_worker.py JOBS.pt OUTDIR``.

Runs the same jobs as the torch.distributed tests (``test_distributed.train_jobs``) on Horovod's
collectives and saves this rank's results to ``OUTDIR/<rank>.pt``.
"""

from __future__ import annotations

import os
import sys

import horovod.torch as hvd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_distributed import train_jobs  # noqa: E402


def main() -> None:
    jobs_path, outdir = sys.argv[1], sys.argv[2]
    hvd.init()
    torch.set_num_threads(1)  # as in the emulation, so BLAS results match bit for bit
    jobs = torch.load(jobs_path, weights_only=False)
    result = train_jobs(hvd.rank(), hvd.size(), jobs)
    torch.save(result, os.path.join(outdir, f"{hvd.rank()}.pt"))


if __name__ == "__main__":
    main()
