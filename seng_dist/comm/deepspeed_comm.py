"""The DeepSpeed engine: collectives through ``deepspeed.comm``, which names this module
(:mod:`seng_dist.deepspeed` is the DeepSpeed config plugin).

``deepspeed.init_distributed()`` (or ``deepspeed.initialize``) must have run; the ``deepspeed``
launcher, ``torchrun`` and ``mpirun`` (with ``auto_mpi_discovery``) all set it up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Communicator, Work, import_engine

INSTALL_HINT = (
    "DeepSpeed is not installed. Install it with `bash ci/install_deepspeed.sh` "
    "from the seng-dist checkout (DeepSpeed 0.19.8 with DS_BUILD_OPS=0 and its "
    "CPU shared-memory op prebuilt), or `pip install deepspeed` after torch"
)


class DeepSpeedCommunicator(Communicator):
    """Collectives through ``deepspeed.comm`` on the world group."""

    def __init__(self) -> None:
        comm = import_engine("deepspeed.comm", INSTALL_HINT)
        if not comm.is_initialized():
            raise ValueError(
                "comm='deepspeed' needs DeepSpeed's communication initialised: "
                "call deepspeed.init_distributed() first, or build SENG through "
                "seng_dist.deepspeed.initialize"
            )
        self.comm = comm
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()
        backend = str(comm.get_backend() if hasattr(comm, "get_backend") else "").lower()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend and torch.cuda.is_available()
            else torch.device("cpu")
        )

    def allreduce_sum_flat_(self, buf: Tensor, name: str) -> None:
        self.comm.all_reduce(buf, op=self.comm.ReduceOp.SUM)

    def allreduce_sum_flat_async_(self, buf: Tensor, name: str) -> Work:
        work: Work = self.comm.all_reduce(buf, op=self.comm.ReduceOp.SUM, async_op=True)
        return work

    def reduce_scatter_sum_flat_async_(self, buf: Tensor, out: Tensor, name: str) -> Work:
        work: Work = self.comm.reduce_scatter_tensor(
            out, buf, op=self.comm.ReduceOp.SUM, async_op=True
        )
        return work

    def broadcast_flat_(self, buf: Tensor, src: int, name: str) -> None:
        self.comm.broadcast(buf, src=src)

    def allgather_flat(self, buf: Tensor, name: str) -> Tensor:
        local = buf.to(self.device)
        out = torch.empty(self.world_size * local.numel(), dtype=local.dtype, device=self.device)
        self.comm.all_gather_into_tensor(out, local)
        return out.to(buf.device)

    def barrier(self) -> None:
        self.comm.barrier()
