"""A round's collectives in buckets, started during backward as the gradients become ready.

A round sends one payload per *unit*: a preconditioned block (its gradient matrix, and in the
lagged variant its correction slot) or one parameter outside the blocks (its gradient).
:class:`BucketPlan` groups the units into buckets in the order backward produces their
gradients; :class:`Buckets` starts a bucket's mean-allreduce asynchronously once every
parameter of it has its gradient for the pass, as DDP's reducer does, and the rest when the
round finishes (at the end of the backward pass, or in ``step()``). Buckets start strictly in
plan order, so every rank runs the same collectives in the same order whatever its backward
did; a bucket whose gradients never came (an unused parameter) and every bucket after it start
when the round finishes. The last bucket also carries the 0/1 flags every rank must agree on.
With sharded gradients (:class:`~seng_dist.shards.ShardPlan`) a bucket is a reduce-scatter:
each rank receives the means of the units it owns (and of the flags) only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .comm import Communicator, Pending
from .shards import ShardPlan, with_everywhere

#: Cap of the last bucket, the one that starts only when the round finishes: small, so that
#: little of the round waits for the end of backward (DDP keeps the bucket it starts first at
#: 1 MiB for the mirror-image reason).
LAST_BUCKET_BYTES = 2**20

#: Computes the payloads of some units: one list of tensors per unit, fresh tensors the round
#: may overwrite with their means.
Payload = Callable[[Sequence[int]], list[list[Tensor]]]


def first_positions(units: Sequence[Sequence[Tensor]], order: Sequence[Tensor]) -> list[int]:
    """Each unit's earliest parameter position in ``order`` (``len(order)`` for a unit with
    none in it): backward makes gradients ready roughly in reverse of this."""
    index = {id(p): i for i, p in enumerate(order)}
    return [min((index.get(id(p), len(index)) for p in unit), default=len(index)) for unit in units]


@dataclass(frozen=True)
class BucketPlan:
    """Units (by index) per bucket, in the order the buckets start."""

    buckets: tuple[tuple[int, ...], ...]

    @classmethod
    def single(cls, units: int) -> BucketPlan:
        """Every unit in one bucket: the round as one collective in ``step()``."""
        return cls((tuple(range(units)),))

    @classmethod
    def build(
        cls, sizes: Sequence[int], order: Sequence[int], cap: int, last_cap: int = LAST_BUCKET_BYTES
    ) -> BucketPlan:
        """Buckets of about ``cap`` bytes over the units in ``order`` (the order backward
        makes their gradients ready); the last bucket takes the trailing units up to
        ``min(last_cap, cap)`` bytes (at least one unit). ``sizes`` are the units' payload
        bytes."""
        if not order:
            return cls(((),))
        last_cap = min(last_cap, cap)
        rest = list(order)
        tail: list[int] = [rest.pop()]
        total = sizes[tail[0]]
        while rest and total + sizes[rest[-1]] <= last_cap:
            total += sizes[rest[-1]]
            tail.insert(0, rest.pop())
        buckets: list[tuple[int, ...]] = []
        current: list[int] = []
        filled = 0
        for u in rest:
            current.append(u)
            filled += sizes[u]
            if filled >= cap:
                buckets.append(tuple(current))
                current, filled = [], 0
        if current:
            buckets.append(tuple(current))
        return cls(tuple(buckets) + (tuple(tail),))


class Buckets:
    """One round's buckets on this rank: started in plan order as their gradients arrive
    (:meth:`gradient_ready`), the rest by :meth:`finish`.

    Args:
        plan: the buckets.
        params: each unit's parameters.
        comm: the communicator.
        name: the round's name; bucket ``j`` is the collective ``"<name>/b<j>"``.
        comm_dtype: the buffer dtype (None: the tensors' own).
        shards: the units' owners, when each rank receives only its own units' means (the
            other units' payloads come back as this rank sent them).
    """

    def __init__(
        self,
        plan: BucketPlan,
        params: Sequence[Sequence[Tensor]],
        comm: Communicator,
        *,
        name: str,
        comm_dtype: torch.dtype | None,
        shards: ShardPlan | None = None,
    ) -> None:
        self.plan = plan
        self.shards = shards
        self.comm = comm
        self.name = name
        self.comm_dtype = comm_dtype
        self.units = sum(len(b) for b in plan.buckets)
        self._bucket_of: dict[int, int] = {}
        self._size = [0] * len(plan.buckets)
        for j, bucket in enumerate(plan.buckets):
            for u in bucket:
                for p in params[u]:
                    if p.requires_grad:
                        self._bucket_of[id(p)] = j
                        self._size[j] += 1
        self.reset()

    def reset(self) -> None:
        """Forget the pass's gradients (a new pass starts)."""
        self._seen: set[int] = set()
        self._waiting = list(self._size)  # per bucket: parameters still short of a gradient
        self._pending: list[Pending] = []
        self._payloads: dict[int, list[Tensor]] = {}
        self._next = 0

    @property
    def started(self) -> int:
        """Buckets started in this round so far."""
        return self._next

    def gradient_ready(self, param: Tensor, payload: Payload) -> None:
        """``param``'s gradient arrived: start, with ``payload``, the buckets now complete
        (in plan order; never the last, which carries the flags)."""
        for pending in self._pending:
            pending.progress()
        key = id(param)
        if key in self._seen or key not in self._bucket_of:
            return
        self._seen.add(key)
        self._waiting[self._bucket_of[key]] -= 1
        last = len(self.plan.buckets) - 1
        while self._next < last and not self._waiting[self._next]:
            with torch.no_grad():
                self._start(payload(self.plan.buckets[self._next]))

    def _start(self, payloads: list[list[Tensor]], flags: Tensor | None = None) -> None:
        j = self._next
        units = self.plan.buckets[j]
        name = f"{self.name}/b{j}"
        shared = [flags] if flags is not None else []
        if self.shards is not None:
            segments = with_everywhere(self.shards.segments(units, payloads), shared)
            pending = self.comm.reduce_scatter_mean_async_(
                segments, name=name, comm_dtype=self.comm_dtype
            )
        else:
            tensors = [t for unit in payloads for t in unit] + shared
            pending = self.comm.allreduce_mean_async_(
                tensors, name=name, comm_dtype=self.comm_dtype
            )
        self._pending.append(pending)
        self._payloads.update(zip(units, payloads, strict=True))
        self._next = j + 1

    def finish(self, payload: Payload, flags: Tensor | None) -> list[list[Tensor]]:
        """Start every bucket not started yet (the last with ``flags``), wait for all, and
        return every unit's averaged payload (``flags`` are averaged in place); then
        :meth:`reset`. Buckets started earlier keep the payloads computed when they
        started."""
        buckets = self.plan.buckets
        with torch.no_grad():
            while self._next < len(buckets) - 1:
                self._start(payload(buckets[self._next]))
            self._start(payload(buckets[-1]), flags)
            for pending in self._pending:
                pending.wait()
        out = [self._payloads[u] for u in range(self.units)]
        self.reset()
        return out
