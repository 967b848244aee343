"""Which distributed engine a training script runs under, and the few calls that differ.

``start("auto")`` reads the launcher's environment: ``horovodrun --gloo`` sets
``HOROVOD_RANK``, ``torchrun`` sets ``WORLD_SIZE``, ``mpirun``/``srun`` set
``OMPI_COMM_WORLD_SIZE`` / ``PMI_SIZE`` and mean the mpi4py engine; otherwise one process.
``--engine`` overrides it (``--engine horovod`` under ``mpirun`` or ``horovodrun --mpi``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

ENGINES = ("auto", "local", "torch", "horovod", "deepspeed", "mpi")


@dataclass
class Engine:
    name: str
    rank: int = 0
    world: int = 1
    local_size: int = 1

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (for metrics)."""
        if self.name in ("torch", "deepspeed"):
            dist.all_reduce(t)
        elif self.name == "horovod":
            import horovod.torch as hvd

            hvd.allreduce_(t, op=hvd.Sum, name="metrics")
        elif self.name == "mpi":
            from mpi4py import MPI

            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
        return t

    def average_buffers(self, model: nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) over ranks: SENG
        and Horovod keep them per rank, and evaluation and checkpoints need one set."""
        if self.world > 1:
            for b in model.buffers():
                if b.is_floating_point():
                    b.copy_(self.sum_(b.detach().double()).div_(self.world))

    def data_parallel(
        self, model: nn.Module, opt: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The engine's usual data parallelism for a baseline optimizer (SENG needs none)."""
        if self.name == "torch":
            return nn.parallel.DistributedDataParallel(model), opt
        if self.name == "horovod":
            import horovod.torch as hvd

            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            return model, hvd.DistributedOptimizer(opt, model.named_parameters())
        if self.name != "local":
            raise ValueError(
                f"the {self.name} engine trains SENG only in this script; run the "
                "baselines under torchrun or horovodrun"
            )
        return model, opt

    def finish(self) -> None:
        if self.name in ("torch", "deepspeed"):
            dist.destroy_process_group()


def _mpi_world_size() -> int:
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def start(name: str = "auto", timeout: float = 600.0) -> Engine:
    """Initialise the engine ``name`` (one of :data:`ENGINES`) and return it.

    ``timeout``: seconds a collective waits for a rank that does not arrive (hung, or stopped)
    before it fails on the others (Gloo, NCCL and Horovod's Gloo controller; MPI has none: it
    ends the job when a rank dies).
    """
    wait = timedelta(seconds=timeout)
    if name == "auto":
        if "HOROVOD_RANK" in os.environ:
            name = "horovod"
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            name = "torch"
        elif _mpi_world_size() > 1:
            name = "mpi"
        else:
            name = "local"
    if name == "torch":
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=wait)
        engine = Engine(
            "torch",
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        )
    elif name == "horovod":
        from seng_dist.comm.horovod import import_horovod

        hvd = import_horovod()
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(int(timeout)))
        hvd.init()
        engine = Engine("horovod", hvd.rank(), hvd.size(), hvd.local_size())
    elif name == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=wait
        )
        engine = Engine(
            "deepspeed",
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1))),
        )
    elif name == "mpi":
        from seng_dist.comm.mpi import MPICommunicator

        mpi = MPICommunicator()
        engine = Engine("mpi", mpi.rank, mpi.world_size, mpi.local_size)
    elif name == "local":
        engine = Engine("local")
    else:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {name!r}")
    # Ranks on one host share its cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // engine.local_size))
    return engine
