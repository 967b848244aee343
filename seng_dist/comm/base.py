"""The communication seam: one small abstract class every engine implements.

The distributed SENG variants talk only to :class:`Communicator`. An engine implements four
primitives on ONE flat, contiguous buffer (sum-allreduce, broadcast, allgather, barrier), and
may implement the asynchronous sum-allreduce and the (asynchronous) sum-reduce-scatter, whose
defaults here run on the four; the public methods here pack a list of tensors into that buffer
(optionally cast to a lower ``comm_dtype``), run one collective, and unpack, so every call is
one call to the engine. Sharded state (``shard_state``) uses the two segment methods:
:meth:`Communicator.reduce_scatter_mean_async_` hands each rank the mean of its own segment
and :meth:`Communicator.allgather_segments_` gives every rank each rank's segment.

Names: a collective's name is ``"<round>"`` or ``"<round>/<part>"`` (a round sent in several
buckets: ``"seng.step/b0"``, ``"seng.step/b1"``); :func:`round_of` reads the round back, and
:class:`CountingCommunicator` counts rounds and calls apart.
"""

from __future__ import annotations

import ctypes
import importlib
import io
import json
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

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


def round_of(name: str) -> str:
    """The round a collective's name belongs to (its part before the first ``/``)."""
    return name.split("/", 1)[0]


class Work(Protocol):
    """An engine's handle of a collective in flight."""

    def wait(self) -> Any:
        """Block until the collective has finished and its result is in the buffer."""


class _Done:
    """The handle of a collective that ran synchronously."""

    def wait(self) -> None:
        return None


class Pending:
    """A fused mean-allreduce in flight (:meth:`Communicator.allreduce_mean_async_`):
    :meth:`wait` finishes it and writes each tensor's mean over the ranks in place."""

    def __init__(
        self,
        comm: Communicator,
        name: str,
        parts: list[tuple[Tensor, list[Tensor], Work]],
        kind: str = "allreduce",
    ) -> None:
        self._comm = comm
        self._name = name
        self._parts = parts
        self._kind = kind

    def progress(self) -> None:
        """Let the engine advance the collective (engines that progress only inside their own
        calls, as MPI libraries without a progress thread, need such calls)."""
        for _, _, work in self._parts:
            self._comm.progress_flat(work)

    def wait(self) -> None:
        """Wait for the engine, then divide and unpack (once; later calls do nothing)."""
        parts, self._parts = self._parts, []
        for buf, group, work in parts:
            with self._comm.guard(self._kind, self._name):
                self._comm.wait_flat(work, buf, self._name)
            # Sum then divide (not divide then sum): a mean of equal values stays exact.
            buf.div_(self._comm.world_size)
            _unpack(buf, group)


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

    def allreduce_sum_flat_async_(self, buf: Tensor, name: str) -> Work:
        """Start summing ``buf`` over all ranks, in place; the result is there after
        :meth:`wait_flat`. Engines without asynchronous collectives keep this default: the
        sum runs now and the handle is already done."""
        self.allreduce_sum_flat_(buf, name)
        return _Done()

    def wait_flat(self, work: Work, buf: Tensor, name: str) -> None:
        """Finish ``work``, the handle :meth:`allreduce_sum_flat_async_` gave for ``buf``."""
        work.wait()

    def progress_flat(self, work: Work) -> None:
        """Advance ``work`` without waiting (default: nothing; the engine progresses it)."""
        del work  # most engines progress collectives on their own threads or streams

    def reduce_scatter_sum_flat_async_(self, buf: Tensor, out: Tensor, name: str) -> Work:
        """Start summing ``buf`` (``world_size`` equal chunks) over all ranks into ``out``, this
        rank's chunk of the sum; it is there after :meth:`wait_flat` (called with ``out``).
        The default runs a sum-allreduce now and copies the chunk out (the right result, at an
        allreduce's cost): engines with a reduce-scatter override it."""
        self.allreduce_sum_flat_(buf, name)
        out.copy_(buf.view(self.world_size, -1)[self.rank])
        return _Done()

    # ------------------------------------------------------------------ fused public API
    def allreduce_mean_(
        self, tensors: Sequence[Tensor], *, name: str, comm_dtype: torch.dtype | None = None
    ) -> None:
        """Replace each tensor by its mean over ranks, in place, with one collective.

        Tensors are packed into one flat buffer of ``comm_dtype`` (default: their own dtype;
        tensors of several dtypes without a ``comm_dtype`` take one buffer per dtype).
        """
        self.allreduce_mean_async_(tensors, name=name, comm_dtype=comm_dtype).wait()

    def allreduce_mean_async_(
        self, tensors: Sequence[Tensor], *, name: str, comm_dtype: torch.dtype | None = None
    ) -> Pending:
        """Start :meth:`allreduce_mean_` and return at once; the tensors hold their means
        after the handle's ``wait()``. The tensors are packed now: changing them before the
        wait changes nothing that is sent, and the wait overwrites them."""
        if self.world_size == 1 or not tensors:
            return Pending(self, name, [])
        parts = []
        for i, (dtype, group) in enumerate(_by_dtype(tensors, comm_dtype).items()):
            buf = _pack(group, dtype)
            with self.guard("allreduce", name):
                parts.append((buf, group, self.allreduce_sum_flat_async_(buf, f"{name}/{i}")))
        return Pending(self, name, parts)

    def reduce_scatter_mean_async_(
        self,
        segments: Sequence[Sequence[Tensor]],
        *,
        name: str,
        comm_dtype: torch.dtype | None = None,
    ) -> Pending:
        """Start averaging ``segments[r]`` (the tensors rank ``r`` receives) over the ranks,
        each rank receiving only its own: after the handle's ``wait()``, ``segments[rank]``
        holds the means, in place, and the other segments are as they were. Every rank passes
        segments of the same shapes; each dtype (or ``comm_dtype``) is one collective, of
        ``world_size`` chunks as long as the longest segment (shorter ones padded)."""
        if self.world_size == 1 or not any(segments):
            return Pending(self, name, [])
        parts = []
        for i, per_rank in enumerate(_segments_by_dtype(segments, comm_dtype)):
            dtype, tensors = per_rank
            length = max(sum(t.numel() for t in seg) for seg in tensors)
            first = next(t for seg in tensors for t in seg)
            buf = torch.zeros(self.world_size, length, dtype=dtype, device=first.device)
            for r, seg in enumerate(tensors):
                if seg:
                    buf[r, : sum(t.numel() for t in seg)] = _pack(seg, dtype)
            out = buf.new_empty(length)
            with self.guard("reduce_scatter", name):
                work = self.reduce_scatter_sum_flat_async_(buf.view(-1), out, f"{name}/{i}")
            parts.append((out, tensors[self.rank], work))
        return Pending(self, name, parts, kind="reduce_scatter")

    def allgather_segments_(self, segments: Sequence[Sequence[Tensor]], *, name: str) -> None:
        """Give every rank every rank's segment: ``segments[rank]`` is sent and each
        ``segments[r]`` is overwritten, in place, with rank ``r``'s (same shapes on every
        rank; one collective per dtype, each row as long as the longest segment). Tensors go
        in their own dtype: what is gathered arrives bit for bit."""
        if self.world_size == 1 or not any(segments):
            return
        for i, (dtype, tensors) in enumerate(_segments_by_dtype(segments, None)):
            length = max(sum(t.numel() for t in seg) for seg in tensors)
            first = next(t for seg in tensors for t in seg)
            row = torch.zeros(length, dtype=dtype, device=first.device)
            mine = tensors[self.rank]
            if mine:
                row[: sum(t.numel() for t in mine)] = _pack(mine, dtype)
            with self.guard("allgather", name):
                rows = self.allgather_flat(row, f"{name}/{i}").view(self.world_size, length)
            for r, seg in enumerate(tensors):
                if r != self.rank and seg:
                    _unpack(rows[r], seg)

    def broadcast_(self, tensors: Sequence[Tensor], *, name: str, src: int = 0) -> None:
        """Overwrite each tensor with rank ``src``'s copy, in place, one collective per dtype."""
        if self.world_size == 1 or not tensors:
            return
        for i, (dtype, group) in enumerate(_by_dtype(tensors, None).items()):
            buf = _pack(group, dtype)
            with self.guard("broadcast", name):
                self.broadcast_flat_(buf, src, f"{name}/{i}")
            _unpack(buf, group)

    def allgather(self, tensor: Tensor, *, name: str) -> Tensor:
        """``(world_size, *tensor.shape)``: every rank's ``tensor`` (same shape everywhere)."""
        if self.world_size == 1:
            return tensor.unsqueeze(0).clone()
        flat = tensor.detach().reshape(-1).contiguous()
        with self.guard("allgather", name):
            gathered = self.allgather_flat(flat, name)
        return gathered.view(self.world_size, *tensor.shape)

    @contextmanager
    def guard(self, kind: str, name: str) -> Iterator[None]:
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
                "log names the cause. Restart the job from its last checkpoint"
            ) from err

    def broadcast_object(self, obj: Any, *, name: str, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (serialised with ``torch.save``; for start-up
        and resume, not for the step)."""
        if self.world_size == 1:
            return obj
        data = torch.empty(0, dtype=torch.uint8)
        if self.rank == src:
            data = _to_bytes(obj)
        length = torch.tensor([data.numel()], dtype=torch.int64)
        self.broadcast_([length], name=f"{name}/len", src=src)
        if self.rank != src:
            data = torch.empty(int(length), dtype=torch.uint8)
        self.broadcast_([data], name=f"{name}/data", src=src)
        if self.rank == src:
            return obj
        return _from_bytes(data)

    def allgather_object(self, obj: Any, *, name: str) -> list[Any]:
        """Every rank's ``obj`` (serialised with ``torch.save``; for start-up and checkpoints,
        not for the step)."""
        if self.world_size == 1:
            return [obj]
        data = _to_bytes(obj)
        lengths = (
            self.allgather(torch.tensor([data.numel()], dtype=torch.int64), name=f"{name}/len")
            .view(-1)
            .tolist()
        )
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[: data.numel()] = data
        rows = self.allgather(padded, name=f"{name}/data")
        return [_from_bytes(rows[r, : lengths[r]]) for r in range(self.world_size)]

    def check_consistent(self, settings: dict[str, str], what: str = "SENG") -> None:
        """Raise ``ValueError`` on every rank if ``settings`` differ between ranks.

        The message names each differing setting with every rank's value, so a job launched
        with a wrong flag on one node says which flag.
        """
        if self.world_size == 1:
            return
        views = self.allgather_object(settings, name=f"{what}/consistency")
        keys = sorted(set().union(*views))
        diff = [k for k in keys if len({json.dumps(v.get(k)) for v in views}) > 1]
        if diff:
            lines = [
                f"  {k}: "
                + ", ".join(
                    f"rank {r}: {_short(v.get(k, '<missing>'))}" for r, v in enumerate(views)
                )
                for k in diff
            ]
            raise ValueError(
                f"{what} settings or model structure differ across the "
                f"{self.world_size} ranks; every rank must build the same model "
                "and pass the same settings:\n" + "\n".join(lines)
            )


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


@dataclass
class Call:
    """One collective a :class:`CountingCommunicator` ran."""

    kind: str
    name: str
    bytes: int
    #: wall time in the engine's calls: the launch plus, for an asynchronous collective, the
    #: wait for it (the time it kept this rank waiting)
    seconds: float

    @property
    def round(self) -> str:
        """The round it belongs to (:func:`round_of`)."""
        return round_of(self.name)


class CountingCommunicator(Communicator):
    """Wraps a communicator and counts the collectives, rounds and payload bytes it runs.

    Counting happens at the flat-buffer level, so one call is one call into the engine and
    the bytes are those of the packed buffer (in ``comm_dtype`` when one is used); calls named
    ``"<round>/<part>"`` (the buckets of one round) count as one round. ``calls`` holds a
    :class:`Call` per collective; its seconds are wall time in the engine (with NCCL, the launch
    and the wait only: the collective itself runs on the GPU).
    """

    def __init__(self, inner: Communicator) -> None:
        if not isinstance(inner, Communicator):
            raise TypeError(f"CountingCommunicator wraps a Communicator, got {type(inner)}")
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self.unsupported_dtypes = inner.unsupported_dtypes
        self.calls: list[Call] = []
        self._in_flight: dict[int, Call] = {}

    @property
    def name(self) -> str:
        return self.inner.name

    def reset(self) -> None:
        self.calls.clear()

    @property
    def collectives(self) -> int:
        """Calls into the engine."""
        return len(self.calls)

    @property
    def rounds(self) -> int:
        """Rounds: the distinct :func:`round_of` of the calls' names."""
        return len({c.round for c in self.calls})

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.calls)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.calls)

    def _timed(self, kind: str, name: str, buf: Tensor, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = call()
        self.calls.append(
            Call(kind, name, buf.numel() * buf.element_size(), time.perf_counter() - start)
        )
        return out

    def allreduce_sum_flat_(self, buf: Tensor, name: str) -> None:
        self._timed("allreduce", name, buf, lambda: self.inner.allreduce_sum_flat_(buf, name))

    def allreduce_sum_flat_async_(self, buf: Tensor, name: str) -> Work:
        work = self._timed(
            "allreduce", name, buf, lambda: self.inner.allreduce_sum_flat_async_(buf, name)
        )
        self._in_flight[id(work)] = self.calls[-1]
        return work

    def wait_flat(self, work: Work, buf: Tensor, name: str) -> None:
        call = self._in_flight.pop(id(work))
        start = time.perf_counter()
        self.inner.wait_flat(work, buf, name)
        call.seconds += time.perf_counter() - start

    def progress_flat(self, work: Work) -> None:
        self.inner.progress_flat(work)

    def reduce_scatter_sum_flat_async_(self, buf: Tensor, out: Tensor, name: str) -> Work:
        work = self._timed(
            "reduce_scatter",
            name,
            buf,
            lambda: self.inner.reduce_scatter_sum_flat_async_(buf, out, name),
        )
        self._in_flight[id(work)] = self.calls[-1]
        return work

    def broadcast_flat_(self, buf: Tensor, src: int, name: str) -> None:
        self._timed("broadcast", name, buf, lambda: self.inner.broadcast_flat_(buf, src, name))

    def allgather_flat(self, buf: Tensor, name: str) -> Tensor:
        return self._timed("allgather", name, buf, lambda: self.inner.allgather_flat(buf, name))

    def barrier(self) -> None:
        self.inner.barrier()


def _by_dtype(
    tensors: Sequence[Tensor], comm_dtype: torch.dtype | None
) -> dict[torch.dtype, list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[comm_dtype or t.dtype].append(t)
    return groups


def _pack(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])


def _segments_by_dtype(
    segments: Sequence[Sequence[Tensor]], comm_dtype: torch.dtype | None
) -> list[tuple[torch.dtype, list[list[Tensor]]]]:
    """Per buffer dtype (in order of first use), each rank's tensors of that dtype."""
    dtypes: dict[torch.dtype, None] = {}
    for seg in segments:
        for t in seg:
            dtypes[comm_dtype or t.dtype] = None
    return [
        (d, [[t for t in seg if (comm_dtype or t.dtype) == d] for seg in segments]) for d in dtypes
    ]


def _unpack(buf: Tensor, tensors: list[Tensor]) -> None:
    """Copy ``buf``'s leading elements into ``tensors`` (a padded buffer's tail is left)."""
    if not tensors:
        return
    sizes = [t.numel() for t in tensors]
    chunks = torch.split(buf[: sum(sizes)], sizes)
    torch._foreach_copy_(
        [t.detach() for t in tensors],
        [c.view(t.shape) for c, t in zip(chunks, tensors, strict=True)],
    )


def _to_bytes(obj: Any) -> Tensor:
    """``obj`` serialised by ``torch.save`` as a uint8 tensor."""
    stream = io.BytesIO()
    torch.save(obj, stream)
    return torch.frombuffer(bytearray(stream.getvalue()), dtype=torch.uint8)


def _from_bytes(data: Tensor) -> Any:
    """The object :func:`_to_bytes` serialised into ``data`` (e.g. a row of a gathered table)."""
    # One copy of host memory into bytes, which BytesIO reads without copying again; not
    # Tensor.numpy(): `import seng_dist` needs only torch, and torch may run without numpy.
    flat = data.detach().cpu().contiguous()
    return torch.load(
        io.BytesIO(ctypes.string_at(flat.data_ptr(), flat.nbytes)), weights_only=False
    )


def _short(value: object, limit: int = 120) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "…"
