"""Backend-neutral communication for distributed SENG.

``make_communicator(comm)`` turns the optimizer's ``comm`` argument into a
:class:`Communicator`: None picks torch.distributed when a process group is initialised, then
Horovod when it is imported and initialised, and the local (one-process) communicator
otherwise. Engine packages are imported only when their engine is chosen.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import (
    COMM_DTYPES,
    Call,
    CommunicationError,
    Communicator,
    CountingCommunicator,
    LocalCommunicator,
    Pending,
    Work,
    round_of,
)

ENGINES = ("local", "torch", "horovod", "deepspeed", "mpi")

__all__ = [
    "COMM_DTYPES",
    "Call",
    "CommunicationError",
    "Communicator",
    "CountingCommunicator",
    "LocalCommunicator",
    "ENGINES",
    "Pending",
    "Work",
    "make_communicator",
    "round_of",
]


def make_communicator(comm: Any) -> Communicator:
    """The communicator for ``comm``: None, one of :data:`ENGINES`, or a Communicator."""
    if isinstance(comm, Communicator):
        return comm
    if comm is None:
        from .horovod import horovod_initialized

        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            comm = "torch"
        else:
            comm = "horovod" if horovod_initialized() else "local"
    if comm == "local":
        return LocalCommunicator()
    if comm == "torch":
        from .torch_dist import TorchCommunicator

        return TorchCommunicator()
    if comm == "horovod":
        from .horovod import HorovodCommunicator

        return HorovodCommunicator()
    if comm == "mpi":
        from .mpi import MPICommunicator

        return MPICommunicator()
    if comm == "deepspeed":
        from .deepspeed_comm import DeepSpeedCommunicator

        return DeepSpeedCommunicator()
    raise ValueError(
        f"comm must be None, one of {', '.join(map(repr, ENGINES))}, or a "
        f"seng_dist.comm.Communicator instance, got {comm!r}"
    )
