"""A round's collectives in buckets, started during backward as the gradients become ready.

A round sends one payload per *unit*: a preconditioned block (its gradient matrix, and in the
lagged variant its correction slot) or one parameter outside the blocks (its gradient).
:class:`BucketPlan` groups the units into buckets in the order backward produces their
gradients; :class:`Buckets` puts a post-accumulate-grad hook on every parameter and, once every
parameter of a bucket has its gradient for the step, starts that bucket's mean-allreduce
asynchronously — as DDP's reducer does. Buckets start strictly in plan order, so every rank
runs the same collectives in the same order whatever its backward did; a bucket whose gradients
never came (an unused parameter) and every bucket after it start in ``step()``.

The last bucket (the first layers, whose gradients come last) also carries the 0/1 flags every
rank must agree on, computed in ``step()``: whether each unit has a gradient and curvature, and
whether this rank's early buckets went stale (a second backward pass before the step, state
loaded mid-step, a damping changed after the correction was sent). Stale on any rank, the round
runs again from ``step()`` on every rank: correct, at the cost of one more round, and said.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from .comm import Communicator, Pending
from .warn import warn

#: Cap of the last bucket, the one that starts only in ``step()``: small, so that little of the
#: round waits for the end of backward (DDP keeps the bucket it starts first at 1 MiB for the
#: mirror-image reason).
LAST_BUCKET_BYTES = 2**20

#: Computes the payloads of some units: one list of tensors per unit, fresh tensors the round
#: may overwrite with their means.
Payload = Callable[[Sequence[int]], list[list[Tensor]]]

# Which Buckets owns each parameter's hook: a newer SENG on the same parameters takes over, so
# an abandoned optimizer never starts collectives no step() of its will wait for.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def first_positions(units: Sequence[Sequence[Tensor]], order: Sequence[Tensor]) -> list[int]:
    """Each unit's earliest parameter position in ``order`` (``len(order)`` for a unit with
    none in it): backward makes gradients ready roughly in reverse of this."""
    index = {id(p): i for i, p in enumerate(order)}
    return [min((index.get(id(p), len(index)) for p in unit), default=len(index))
            for unit in units]


@dataclass(frozen=True)
class BucketPlan:
    """Units (by index) per bucket, in the order the buckets start."""

    buckets: tuple[tuple[int, ...], ...]

    @classmethod
    def single(cls, units: int) -> BucketPlan:
        """Every unit in one bucket: the round as one collective in ``step()``."""
        return cls((tuple(range(units)),))

    @classmethod
    def build(cls, sizes: Sequence[int], order: Sequence[int], cap: int,
              last_cap: int = LAST_BUCKET_BYTES) -> BucketPlan:
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
    """One round's buckets on this rank, and the hooks that start them during backward.

    Args:
        plan: the buckets.
        params: each unit's parameters (hooks go on the trainable ones).
        comm: the communicator.
        name: the round's name; bucket ``j`` is the collective ``"<name>/b<j>"``.
        comm_dtype: the buffer dtype (None: the tensors' own).
        accumulation: backward passes per step (``gradient_accumulation_steps``): a bucket
            is ready when each of its parameters had that many.
        hooks: install the hooks (overlap); without them every bucket starts in ``step()``.
    """

    def __init__(self, plan: BucketPlan, params: Sequence[Sequence[Tensor]],
                 comm: Communicator, *, name: str, comm_dtype: torch.dtype | None,
                 accumulation: int, hooks: bool) -> None:
        self.plan = plan
        self.comm = comm
        self.name = name
        self.comm_dtype = comm_dtype
        self.accumulation = accumulation
        self.units = sum(len(b) for b in plan.buckets)
        self._bucket_of: dict[int, int] = {}
        self._size = [0] * len(plan.buckets)
        for j, bucket in enumerate(plan.buckets):
            for u in bucket:
                for p in params[u]:
                    if p.requires_grad:
                        self._bucket_of[id(p)] = j
                        self._size[j] += 1
        self._handles: list[RemovableHandle] = []
        if hooks:
            me = weakref.ref(self)
            for unit in params:
                for p in unit:
                    if p.requires_grad:
                        self._handles.append(
                            p.register_post_accumulate_grad_hook(partial(_on_gradient, me)))
                        previous = _OWNERS.get(p)
                        owner = previous() if previous is not None else None
                        if owner is not None and owner is not self:
                            owner.retire()
                        _OWNERS[p] = me
        self._said_stale = False
        self._reset()

    @property
    def overlapping(self) -> bool:
        """Whether buckets may start during backward (hooks installed, not retired)."""
        return bool(self._handles)

    def _reset(self) -> None:
        self._counts: dict[int, int] = {}
        self._waiting = list(self._size)  # per bucket: parameters still short of a gradient
        self._pending: list[Pending] = []
        self._payloads: dict[int, list[Tensor]] = {}
        self._next = 0
        self.stale = False
        # Nothing starts early until the round arms the next step: a payload computed from
        # the wrong step's state must never be sent.
        self._early: Payload | None = None

    def retire(self) -> None:
        """Remove the hooks: from now on every bucket starts in ``step()``."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._early = None

    def arm(self, early: Payload | None) -> None:
        """Let the coming backward start buckets with payloads from ``early`` (None: nothing
        starts before ``step()``). Called after each step; called while buckets of the step
        are already out (state loaded between backward and step), it makes them stale."""
        if self._next > 0:
            self.stale = True
        self._early = early if self.overlapping else None

    def gradient_ready(self, param: Tensor) -> None:
        """The hook: ``param``'s gradient was accumulated; start what is ready."""
        for pending in self._pending:
            pending.progress()
        key = id(param)
        n = self._counts[key] = self._counts.get(key, 0) + 1
        if n > self.accumulation:
            self._went_stale(n)
            return
        if n == self.accumulation:
            self._waiting[self._bucket_of[key]] -= 1
        last = len(self.plan.buckets) - 1
        while self._early is not None and self._next < last and not self._waiting[self._next]:
            with torch.no_grad():
                self._start(self._early(self.plan.buckets[self._next]))

    def _went_stale(self, passes: int) -> None:
        self._early = None
        if self._next == 0:
            return  # nothing was sent early: the step's payloads are simply read in step()
        self.stale = True
        if not self._said_stale:
            self._said_stale = True
            warn(f"SENG: backward ran {passes} times before step() but "
                 f"gradient_accumulation_steps={self.accumulation}; buckets sent during the "
                 "earlier pass are sent again from step() (one more round per step). Set "
                 "gradient_accumulation_steps to the backward passes per step (it also scales "
                 "the curvature right), or overlap=False")

    def _start(self, payloads: list[list[Tensor]], flags: Tensor | None = None) -> None:
        j = self._next
        units = self.plan.buckets[j]
        tensors = [t for unit in payloads for t in unit]
        if flags is not None:
            tensors.append(flags)
        self._pending.append(self.comm.allreduce_mean_async_(
            tensors, name=f"{self.name}/b{j}", comm_dtype=self.comm_dtype))
        self._payloads.update(zip(units, payloads, strict=True))
        self._next = j + 1

    def finish(self, payload: Payload, flags: Tensor | None) -> list[list[Tensor]]:
        """Start every bucket not started yet (the last with ``flags``), wait for all, and
        return every unit's averaged payload (``flags`` are averaged in place). Early
        buckets' payloads are those computed when they started."""
        buckets = self.plan.buckets
        while self._next < len(buckets) - 1:
            self._start(payload(buckets[self._next]))
        self._start(payload(buckets[-1]), flags)
        for pending in self._pending:
            pending.wait()
        out = [self._payloads[u] for u in range(self.units)]
        self._reset()
        return out


def _on_gradient(buckets: weakref.ref[Buckets], param: Tensor) -> None:
    owner = buckets()
    if owner is not None:
        owner.gradient_ready(param)
