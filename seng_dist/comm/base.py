"""The communication seam: one small abstract class every engine implements.

The distributed SENG variants talk only to :class:`Communicator`. An engine implements four
primitives on ONE flat, contiguous buffer (sum-allreduce, broadcast, allgather, barrier); the
public methods here pack a list of tensors into that buffer (optionally cast to a lower
``comm_dtype``), run one collective, and unpack, so every round is one call to the engine.
"""

from __future__ import annotations

import importlib
import io
import json
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from torch import Tensor


class CommunicationError(RuntimeError):
    """A collective failed: in a running job, almost always another rank died or hung.

    The message names the collective, this rank and the engine, and keeps the engine's own
    error as ``__cause__``.
    """


def import_engine(module: str, install_hint: str) -> ModuleType:
    """Import an engine's package on demand, or raise an ImportError that says how to
    install it (``import seng_dist`` never needs one)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{install_hint} ({err})") from err


#: ``comm_dtype`` names and the dtypes they mean.
COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Communicator(ABC):
    """Collectives over the ranks of one job, fused into one flat buffer per call.

    Subclasses set ``rank`` and ``world_size`` and implement the four primitives; ``name`` is a
    deterministic label for engines that match operations by name across ranks (Horovod).
    """

    rank: int = 0
    world_size: int = 1
    #: buffer dtypes the engine cannot reduce (checked against ``comm_dtype`` up front)
    unsupported_dtypes: tuple[torch.dtype, ...] = ()

    @property
    def name(self) -> str:
        """The engine's name, for messages."""
        return type(self).__name__

    # ------------------------------------------------------------------ engine primitives
    @abstractmethod
    def allreduce_sum_flat_(self, buf: Tensor, name: str) -> None:
        """Sum ``buf`` (1-D, contiguous) over all ranks, in place."""

    @abstractmethod
    def broadcast_flat_(self, buf: Tensor, src: int, name: str) -> None:
        """Overwrite ``buf`` (1-D, contiguous) with rank ``src``'s copy."""

    @abstractmethod
    def allgather_flat(self, buf: Tensor, name: str) -> Tensor:
        """Every rank's ``buf`` (same length on all ranks) stacked: ``(world_size, len)``."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every rank gets here."""

    # ------------------------------------------------------------------ fused public API
    def allreduce_mean_(self, tensors: Sequence[Tensor], *, name: str,
                        comm_dtype: torch.dtype | None = None) -> None:
        """Replace each tensor by its mean over ranks, in place, with one collective.

        Tensors are packed into one flat buffer of ``comm_dtype`` (default: their own dtype;
        tensors of several dtypes without a ``comm_dtype`` take one buffer per dtype).
        """
        if self.world_size == 1 or not tensors:
            return
        for i, (dtype, group) in enumerate(_by_dtype(tensors, comm_dtype).items()):
            buf = _pack(group, dtype)
            with self._guard("allreduce", name):
                self.allreduce_sum_flat_(buf, f"{name}.{i}")
            # Sum then divide (not divide then sum): a mean of equal values stays exact, which
            # the 0/1 flags packed with the gradients rely on.
            buf.div_(self.world_size)
            _unpack(buf, group)

    def broadcast_(self, tensors: Sequence[Tensor], *, name: str, src: int = 0) -> None:
        """Overwrite each tensor with rank ``src``'s copy, in place, one collective per dtype."""
        if self.world_size == 1 or not tensors:
            return
        for i, (dtype, group) in enumerate(_by_dtype(tensors, None).items()):
            buf = _pack(group, dtype)
            with self._guard("broadcast", name):
                self.broadcast_flat_(buf, src, f"{name}.{i}")
            _unpack(buf, group)

    def allgather(self, tensor: Tensor, *, name: str) -> Tensor:
        """``(world_size, *tensor.shape)``: every rank's ``tensor`` (same shape everywhere)."""
        if self.world_size == 1:
            return tensor.unsqueeze(0).clone()
        flat = tensor.detach().reshape(-1).contiguous()
        with self._guard("allgather", name):
            gathered = self.allgather_flat(flat, name)
        return gathered.view(self.world_size, *tensor.shape)

    @contextmanager
    def _guard(self, kind: str, name: str) -> Iterator[None]:
        """Turn an engine's failure inside a collective into a :class:`CommunicationError`
        that says where it happened and what to do (the engines' own messages rarely do)."""
        try:
            yield
        except CommunicationError:
            raise
        except RuntimeError as err:  # Gloo, NCCL, Horovod and mpi4py all raise RuntimeErrors
            raise CommunicationError(
                f"SENG: {kind} {name!r} failed on rank {self.rank} of {self.world_size} "
                f"({self.name}): {err} -- most likely another rank died or timed out; its own "
                "log names the cause. Restart the job from its last checkpoint") from err

    def broadcast_object(self, obj: Any, *, name: str, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (serialised with ``torch.save``; for start-up
        and resume, not for the step)."""
        if self.world_size == 1:
            return obj
        data = torch.empty(0, dtype=torch.uint8)
        if self.rank == src:
            data = _to_bytes(obj)
        length = torch.tensor([data.numel()], dtype=torch.int64)
        self.broadcast_([length], name=f"{name}.len", src=src)
        if self.rank != src:
            data = torch.empty(int(length), dtype=torch.uint8)
        self.broadcast_([data], name=f"{name}.data", src=src)
        if self.rank == src:
            return obj
        return _from_bytes(data)

    def allgather_object(self, obj: Any, *, name: str) -> list[Any]:
        """Every rank's ``obj`` (serialised with ``torch.save``; for start-up and checkpoints,
        not for the step)."""
        if self.world_size == 1:
            return [obj]
        data = _to_bytes(obj)
        lengths = self.allgather(torch.tensor([data.numel()], dtype=torch.int64),
                                 name=f"{name}.len").view(-1).tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[:data.numel()] = data
        rows = self.allgather(padded, name=f"{name}.data")
        return [_from_bytes(rows[r, :lengths[r]]) for r in range(self.world_size)]

    def check_consistent(self, settings: dict[str, str], what: str = "SENG") -> None:
        """Raise ``ValueError`` on every rank if ``settings`` differ between ranks.

        The message names each differing setting with every rank's value, so a job launched
        with a wrong flag on one node says which flag.
        """
        if self.world_size == 1:
            return
        views = self.allgather_object(settings, name=f"{what}.consistency")
        keys = sorted(set().union(*views))
        diff = [k for k in keys if len({json.dumps(v.get(k)) for v in views}) > 1]
        if diff:
            lines = [f"  {k}: " + ", ".join(f"rank {r}: {_short(v.get(k, '<missing>'))}"
                                            for r, v in enumerate(views)) for k in diff]
            raise ValueError(f"{what} settings or model structure differ across the "
                             f"{self.world_size} ranks; every rank must build the same model "
                             "and pass the same settings:\n" + "\n".join(lines))


class LocalCommunicator(Communicator):
    """One process: every collective is the identity."""

    def allreduce_sum_flat_(self, buf: Tensor, name: str) -> None:
        pass

    def broadcast_flat_(self, buf: Tensor, src: int, name: str) -> None:
        pass

    def allgather_flat(self, buf: Tensor, name: str) -> Tensor:
        return buf.unsqueeze(0).clone()

    def barrier(self) -> None:
        pass


class CountingCommunicator(Communicator):
    """Wraps a communicator and counts the collectives and payload bytes it runs.

    Counting happens at the flat-buffer level, so one count is one call into the engine and
    the bytes are those of the packed buffer (in ``comm_dtype`` when one is used). ``calls``
    holds ``(kind, name, bytes, seconds)`` per collective; the seconds are wall time in the
    engine's call (with NCCL, the launch only: the collective itself is asynchronous).
    """

    def __init__(self, inner: Communicator) -> None:
        if not isinstance(inner, Communicator):
            raise TypeError(f"CountingCommunicator wraps a Communicator, got {type(inner)}")
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.unsupported_dtypes = inner.unsupported_dtypes
        self.calls: list[tuple[str, str, int, float]] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def reset(self) -> None:
        self.calls.clear()

    @property
    def collectives(self) -> int:
        return len(self.calls)

    @property
    def bytes(self) -> int:
        return sum(c[2] for c in self.calls)

    @property
    def seconds(self) -> float:
        return sum(c[3] for c in self.calls)

    def _timed(self, kind: str, name: str, buf: Tensor, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = call()
        self.calls.append((kind, name, buf.numel() * buf.element_size(),
                           time.perf_counter() - start))
        return out

    def allreduce_sum_flat_(self, buf: Tensor, name: str) -> None:
        self._timed("allreduce", name, buf, lambda: self.inner.allreduce_sum_flat_(buf, name))

    def broadcast_flat_(self, buf: Tensor, src: int, name: str) -> None:
        self._timed("broadcast", name, buf,
                    lambda: self.inner.broadcast_flat_(buf, src, name))

    def allgather_flat(self, buf: Tensor, name: str) -> Tensor:
        return self._timed("allgather", name, buf, lambda: self.inner.allgather_flat(buf, name))

    def barrier(self) -> None:
        self.inner.barrier()


def _by_dtype(tensors: Sequence[Tensor], comm_dtype: torch.dtype | None
              ) -> dict[torch.dtype, list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[comm_dtype or t.dtype].append(t)
    return groups


def _pack(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _unpack(buf: Tensor, tensors: list[Tensor]) -> None:
    chunks = torch.split(buf, [t.numel() for t in tensors])
    torch._foreach_copy_([t.detach() for t in tensors],
                         [c.view(t.shape) for c, t in zip(chunks, tensors, strict=True)])


def _to_bytes(obj: Any) -> Tensor:
    """``obj`` serialised by ``torch.save`` as a uint8 tensor."""
    stream = io.BytesIO()
    torch.save(obj, stream)
    return torch.frombuffer(bytearray(stream.getvalue()), dtype=torch.uint8)


def _from_bytes(data: Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)


def _short(value: object, limit: int = 120) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "…"
