"""The Horovod engine: Horovod's own named collectives (Gloo or MPI controller).

Launch with ``horovodrun -np N python train.py`` (``--gloo`` or ``--mpi``) or ``mpirun``;
call ``hvd.init()`` before building SENG. Horovod matches operations across ranks by name, so
every call carries the deterministic name SENG gives its round.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch
from torch import Tensor

from .base import Communicator, Work, import_engine

INSTALL_HINT = (
    "Horovod with PyTorch support is not installed. Install it with "
    "`bash ci/install_horovod.sh` from the seng-dist checkout: Horovod 0.28.1 must be built "
    "after torch, with `pip install --no-build-isolation` and C++17 set in both CMakeLists "
    "(see integrations/horovod/README.md)"
)


def import_horovod() -> ModuleType:
    """``horovod.torch``, or an ImportError that says how to install it."""
    return import_engine("horovod.torch", INSTALL_HINT)


class HorovodCommunicator(Communicator):
    """Collectives through ``horovod.torch`` (needs ``hvd.init()`` first)."""

    # Horovod 0.28 rejects torch.bfloat16 tensors ("Tensor type torch.BFloat16Tensor is not
    # supported"); float16 works.
    unsupported_dtypes = (torch.bfloat16,)

    def __init__(self) -> None:
        hvd = import_horovod()
        if not hvd.is_initialized():
            raise ValueError(
                "comm='horovod' needs Horovod initialised: call "
                "horovod.torch.init() first and launch with `horovodrun -np N` "
                "or `mpirun -np N`"
            )
        self.hvd = hvd
        self.rank = hvd.rank()
        self.world_size = hvd.size()

    def allreduce_sum_flat_(self, buf: Tensor, name: str) -> None:
        self.hvd.allreduce_(buf, op=self.hvd.Sum, name=name)

    def allreduce_sum_flat_async_(self, buf: Tensor, name: str) -> Work:
        return _HorovodWork(self.hvd, self.hvd.allreduce_async_(buf, op=self.hvd.Sum, name=name))

    def reduce_scatter_sum_flat_async_(self, buf: Tensor, out: Tensor, name: str) -> Work:
        # Horovod splits the first dimension over the ranks: one row each.
        rows = buf.view(self.world_size, -1)
        return _HorovodWork(
            self.hvd, self.hvd.reducescatter_async(rows, name=name, op=self.hvd.Sum), out
        )

    def broadcast_flat_(self, buf: Tensor, src: int, name: str) -> None:
        self.hvd.broadcast_(buf, root_rank=src, name=name)

    def allgather_flat(self, buf: Tensor, name: str) -> Tensor:
        return self.hvd.allgather(buf.unsqueeze(0), name=name).reshape(-1)

    def barrier(self) -> None:
        self.hvd.barrier()


class _HorovodWork:
    """A Horovod handle; ``hvd.synchronize`` waits for it (and returns a reduce-scatter's
    result, which goes into ``out``)."""

    def __init__(self, hvd: ModuleType, handle: int, out: Tensor | None = None) -> None:
        self.hvd, self.handle, self.out = hvd, handle, out

    def wait(self) -> None:
        result = self.hvd.synchronize(self.handle)
        if self.out is not None:
            self.out.copy_(result.reshape(-1))


def horovod_initialized() -> bool:
    """Whether Horovod is imported and initialised (without importing it)."""
    hvd = sys.modules.get("horovod.torch")
    return hvd is not None and hvd.is_initialized()
