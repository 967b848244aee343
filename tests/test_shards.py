"""ShardPlan: the owners of the units under ``shard_state`` (the rounds that use it are tested on
real ranks in test_distributed.py)."""

from __future__ import annotations

import torch

from seng_dist.buckets import BucketPlan
from seng_dist.shards import ShardPlan, with_everywhere


def test_owners_balance_each_bucket_largest_first_and_every_rank_builds_the_same_plan():
    sizes = [400, 100, 300, 200, 50, 50]
    plan = BucketPlan(((0, 1, 2, 3), (4, 5)))
    shards = ShardPlan.build(plan, sizes, 2)
    assert shards == ShardPlan.build(plan, sizes, 2)
    # bucket 0: 400 -> rank 0, 300 -> rank 1, 200 -> rank 1, 100 -> rank 0 (500 each);
    # bucket 1: one 50 each
    assert shards.owners == (0, 0, 1, 1, 0, 1)
    for bucket in plan.buckets:
        loads = [sum(sizes[u] for u in bucket if shards.owners[u] == r) for r in range(2)]
        assert max(loads) - min(loads) <= max(sizes[u] for u in bucket)
    assert shards.owned(0) == [0, 1, 4] and shards.owned(1) == [2, 3, 5]


def test_more_ranks_than_units_leaves_some_ranks_without_units():
    shards = ShardPlan.build(BucketPlan.single(2), [10, 10], 3)
    assert sorted(shards.owners) == [0, 1] and shards.owned(2) == []


def test_extended_keeps_the_owners_and_places_new_units_on_the_lightest_rank():
    shards = ShardPlan.build(BucketPlan.single(3), [300, 200, 100], 2)
    grown = shards.extended([300, 200, 100, 50, 500])
    assert grown.owners[:3] == shards.owners
    loads = [
        sum(s for s, r in zip([300, 200, 100], shards.owners, strict=True) if r == k)
        for k in (0, 1)
    ]
    first = min((0, 1), key=lambda r: (loads[r], r))
    assert grown.owners[3] == first


def test_segments_group_payloads_by_owner_and_shared_tensors_go_in_every_segment():
    shards = ShardPlan((1, 0, 1), 2)
    a, b, c, flags = (torch.full((2,), float(v)) for v in range(4))
    segments = shards.segments([0, 1, 2], [[a], [b], [c]])
    assert [[t[0].item() for t in seg] for seg in segments] == [[1.0], [0.0, 2.0]]
    shared = with_everywhere(segments, [flags])
    assert all(seg[-1] is flags for seg in shared)
