"""The MPI engine: mpi4py collectives on the fused flat buffer (buffers, never pickles).

Launch with ``mpirun -np N`` or ``srun``. The tensors themselves are MPI's buffers: mpi4py
reads their memory through DLPack (no copy, and no numpy: ``import seng_dist`` needs only
torch). CUDA buffers go to MPI directly when the MPI library is CUDA-aware and are staged
through host memory otherwise.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import Tensor

from .base import Communicator, Work, import_engine

INSTALL_HINT = (
    "mpi4py or an MPI library is missing. Install them with `bash ci/install_mpi.sh` "
    "(Debian: apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py==4.1.2)"
)


def _cuda_aware() -> bool:
    """Whether the loaded MPI library reports CUDA support (Open MPI's
    ``MPIX_Query_cuda_support``; other libraries: assume not, and stage through the host)."""
    try:
        query = getattr(ctypes.CDLL(None), "MPIX_Query_cuda_support", None)
    except OSError:
        return False
    return bool(query()) if query is not None else False


class MPICommunicator(Communicator):
    """Collectives through ``mpi4py`` on ``MPI.COMM_WORLD`` (or the given communicator)."""

    # MPI has no portable 16-bit float datatype (Open MPI 4.1 none at all).
    unsupported_dtypes = (torch.bfloat16, torch.float16)

    def __init__(self, comm: Any = None) -> None:
        import_engine("mpi4py", INSTALL_HINT)
        MPI = import_engine("mpi4py.MPI", INSTALL_HINT)
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        # Ranks sharing this host, for device choice and thread counts.
        host = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = host.Get_rank(), host.Get_size()
        host.Free()
        self.cuda_aware = _cuda_aware()

    def _host(self, buf: Tensor) -> tuple[Tensor, bool]:
        """The tensor MPI reads and writes, and whether it is a host copy of ``buf``."""
        if buf.device.type == "cpu" or self.cuda_aware:
            return buf, False
        return buf.cpu(), True

    def allreduce_sum_flat_(self, buf: Tensor, name: str) -> None:
        work, staged = self._host(buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, work, op=self.MPI.SUM)
        if staged:
            buf.copy_(work)

    def allreduce_sum_flat_async_(self, buf: Tensor, name: str) -> Work:
        work, staged = self._host(buf)
        return _MPIWork(
            self.comm.Iallreduce(self.MPI.IN_PLACE, work, op=self.MPI.SUM), work if staged else None
        )

    def reduce_scatter_sum_flat_async_(self, buf: Tensor, out: Tensor, name: str) -> Work:
        send, _ = self._host(buf)
        recv, staged = self._host(out)
        return _MPIWork(
            self.comm.Ireduce_scatter_block(send, recv, op=self.MPI.SUM),
            recv if staged else None,
            send,
        )

    def progress_flat(self, work: Work) -> None:
        if isinstance(work, _MPIWork):
            work.request.Test()

    def wait_flat(self, work: Work, buf: Tensor, name: str) -> None:
        work.wait()
        staged = work.staged if isinstance(work, _MPIWork) else None
        if staged is not None:
            buf.copy_(staged)

    def broadcast_flat_(self, buf: Tensor, src: int, name: str) -> None:
        work, staged = self._host(buf)
        self.comm.Bcast(work, root=src)
        if staged:
            buf.copy_(work)

    def allgather_flat(self, buf: Tensor, name: str) -> Tensor:
        work, staged = self._host(buf.contiguous())
        out = torch.empty(self.world_size * work.numel(), dtype=work.dtype, device=work.device)
        self.comm.Allgather(work, out)
        return out.to(buf.device) if staged else out

    def barrier(self) -> None:
        self.comm.Barrier()


class _MPIWork:
    """An ``Iallreduce`` request and, for a CUDA buffer staged through the host, the host copy
    the result arrives in. MPI libraries progress a non-blocking collective inside MPI calls
    (or on a progress thread where one is configured): ``progress_flat`` tests it, the wait
    finishes it."""

    def __init__(self, request: Any, staged: Tensor | None, send: Tensor | None = None) -> None:
        # ``send``: a send buffer MPI reads until the request completes (kept alive here).
        self.request, self.staged, self._send = request, staged, send

    def wait(self) -> None:
        self.request.Wait()
