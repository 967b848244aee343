"""Sharded state (``shard_state``): which rank owns each unit, and what moves between owners.

A *unit* is what a round sends per step (:mod:`seng_dist.buckets`): one preconditioned block or
one parameter outside the blocks. With ``shard_state`` each unit has one owner rank, which alone
keeps its momentum, its damping diagonal's second moment and the lagged variant's previous
gradient, computes its direction and updates its parameters; then every rank takes the updated
parameters from their owners (one all-gather). With ``"gradients"`` the gradient round is a
reduce-scatter as well, so each rank ends the backward pass with the averaged gradients of its
own units only. The curvature is not sharded: each rank's ``U_w`` comes from its own batch and
serves every block.

Owners are chosen bucket by bucket (:meth:`ShardPlan.build`), balancing the bytes each rank
receives in every bucket, so that a reduce-scatter's segments are about equally long (a segment
is padded to the longest) and the state each rank keeps is about ``1/world_size`` of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .buckets import BucketPlan


@dataclass(frozen=True)
class ShardPlan:
    """The owner rank of each unit (by index), for ``world_size`` ranks."""

    owners: tuple[int, ...]
    world_size: int

    @classmethod
    def build(cls, buckets: BucketPlan, sizes: Sequence[int], world_size: int) -> ShardPlan:
        """Owners balanced within each bucket: its units, largest first, each to the rank
        with the fewest bytes in that bucket so far (ties: the fewest bytes overall, then the
        lowest rank). Deterministic, so every rank builds the same plan."""
        owners = [0] * len(sizes)
        total = [0] * world_size
        for bucket in buckets.buckets:
            load = [0] * world_size
            for u in sorted(bucket, key=lambda u: (-sizes[u], u)):
                r = min(range(world_size), key=lambda r: (load[r], total[r], r))
                owners[u] = r
                load[r] += sizes[u]
                total[r] += sizes[u]
        return cls(tuple(owners), world_size)

    def extended(self, sizes: Sequence[int]) -> ShardPlan:
        """This plan for ``len(sizes)`` units, the first ones as they are (their state stays
        with their owners) and each further one to the rank with the fewest bytes so far."""
        owners = list(self.owners)
        total = [0] * self.world_size
        for u, r in enumerate(owners):
            total[r] += sizes[u]
        for u in range(len(owners), len(sizes)):
            r = min(range(self.world_size), key=lambda r: (total[r], r))
            owners.append(r)
            total[r] += sizes[u]
        return ShardPlan(tuple(owners), self.world_size)

    def owned(self, rank: int) -> list[int]:
        """The units ``rank`` owns, in order."""
        return [u for u, r in enumerate(self.owners) if r == rank]

    def segments(
        self, units: Sequence[int], payloads: Sequence[Sequence[Tensor]]
    ) -> list[list[Tensor]]:
        """``payloads`` (one list per unit of ``units``) as one segment per rank: the tensors
        of the units it owns, in order."""
        out: list[list[Tensor]] = [[] for _ in range(self.world_size)]
        for u, payload in zip(units, payloads, strict=True):
            out[self.owners[u]].extend(payload)
        return out


def with_everywhere(segments: list[list[Tensor]], shared: Sequence[Tensor]) -> list[list[Tensor]]:
    """``segments`` with ``shared`` appended to every one: a reduce-scatter then hands every
    rank the mean of ``shared`` (the 0/1 flags every rank must agree on) in the same
    collective."""
    return [seg + list(shared) for seg in segments]
