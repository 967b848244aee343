"""One MPI rank for tests/test_mpi.py: ``mpirun -np N python mpi_worker.py JOBS.pt OUTDIR``.

Runs the torch.distributed tests' jobs (``test_distributed.train_jobs``) on mpi4py collectives and
saves this rank's results to ``OUTDIR/<rank>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_distributed import train_jobs  # noqa: E402


def main() -> None:
    jobs_path, outdir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)  # as in the emulation, so BLAS results match bit for bit
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    # All ranks run on this host: the local rank and size are the world's.
    from seng_dist.comm.mpi import MPICommunicator

    mpi = MPICommunicator()
    assert (mpi.local_rank, mpi.local_size) == (rank, size), (mpi.local_rank, mpi.local_size)
    result = train_jobs(rank, size, torch.load(jobs_path, weights_only=False))
    torch.save(result, os.path.join(outdir, f"{rank}.pt"))


if __name__ == "__main__":
    main()
