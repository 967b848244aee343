"""The torch.distributed engine: NCCL on GPU, Gloo on CPU, through a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Communicator, Work

# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor (now deprecated); older
# releases have only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TorchCommunicator(Communicator):
    """Collectives through ``torch.distributed`` on ``group`` (default: the world group).

    Needs ``torch.distributed.init_process_group`` first (``torchrun`` sets the environment
    for it). With NCCL, buffers must live on the current CUDA device; small bookkeeping
    tensors (the consistency check) are moved there.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "comm='torch' needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets "
                "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for it)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend and torch.cuda.is_available()
            else torch.device("cpu")
        )

    def allreduce_sum_flat_(self, buf: Tensor, name: str) -> None:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)

    def allreduce_sum_flat_async_(self, buf: Tensor, name: str) -> Work:
        work: Work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return work

    def reduce_scatter_sum_flat_async_(self, buf: Tensor, out: Tensor, name: str) -> Work:
        work: Work = _reduce_scatter(
            out, buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True
        )
        return work

    def broadcast_flat_(self, buf: Tensor, src: int, name: str) -> None:
        dist.broadcast(
            buf,
            src=dist.get_global_rank(self.group, src) if self.group is not None else src,
            group=self.group,
        )

    def allgather_flat(self, buf: Tensor, name: str) -> Tensor:
        local = buf.to(self.device)
        out = torch.empty(self.world_size * local.numel(), dtype=local.dtype, device=self.device)
        _all_gather(out, local, group=self.group)
        return out.to(buf.device)

    def barrier(self) -> None:
        dist.barrier(group=self.group)
