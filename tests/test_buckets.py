"""Bucket plans, and the hooks that start buckets during backward (one process: the
communicator is the identity, so what is checked is when each bucket's payload is taken)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from seng_dist.buckets import LAST_BUCKET_BYTES, BucketPlan, Buckets
from seng_dist.comm import LocalCommunicator


def test_plan_fills_buckets_in_ready_order_and_keeps_the_last_one_small():
    plan = BucketPlan.build([100] * 6, order=[5, 4, 3, 2, 1, 0], cap=250, last_cap=150)
    assert plan.buckets == ((5, 4, 3), (2, 1), (0,))
    # The last bucket holds at least one unit, however large.
    assert BucketPlan.build([10, 500], order=[0, 1], cap=250).buckets == ((0,), (1,))
    # It is never larger than a bucket.
    assert BucketPlan.build([100] * 3, order=[2, 1, 0], cap=150, last_cap=LAST_BUCKET_BYTES
                            ).buckets == ((2, 1), (0,))
    assert BucketPlan.single(3).buckets == ((0, 1, 2),)
    assert BucketPlan.build([], order=[], cap=10).buckets == ((),)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.sum()


class Recorder:
    """The payload callable: records which units were asked for, and when."""

    def __init__(self, units: list[list[Tensor]]) -> None:
        self.units = units
        self.taken: list[tuple[int, ...]] = []

    def __call__(self, units: Sequence[int]) -> list[list[Tensor]]:
        self.taken.append(tuple(units))
        return [[torch.cat([torch.zeros_like(p).reshape(-1) if p.grad is None else
                            p.grad.reshape(-1) for p in self.units[u]])] for u in units]


def _setup(accumulation: int = 1) -> tuple[Chain, Buckets, Recorder]:
    torch.manual_seed(0)
    model = Chain()
    units: list[list[Tensor]] = [list(layer.parameters()) for layer in model.layers]
    # One unit per bucket, in backward's order (last layer first); the first layer last.
    plan = BucketPlan(((3,), (2,), (1,), (0,)))
    buckets = Buckets(plan, units, LocalCommunicator(), name="test", comm_dtype=None,
                      accumulation=accumulation, hooks=True)
    return model, buckets, Recorder(units)


def test_buckets_start_during_backward_in_plan_order_the_last_in_finish():
    model, buckets, early = _setup()
    buckets.arm(early)
    model(torch.randn(2, 3)).backward()
    assert early.taken == [(3,), (2,), (1,)]  # the last bucket waits for finish
    late = Recorder(early.units)
    out = buckets.finish(late, None)
    assert late.taken == [(0,)]
    assert [len(p) for p in out] == [1] * 4
    assert torch.equal(out[3][0], torch.cat([p.grad.reshape(-1)
                                             for p in model.layers[3].parameters()]))
    assert not buckets.stale
    # finish disarms: nothing starts in the next backward until the round arms it again.
    model.zero_grad()
    model(torch.randn(2, 3)).backward()
    assert early.taken == [(3,), (2,), (1,)]


def test_a_bucket_without_its_gradient_holds_back_every_later_one():
    model, buckets, early = _setup()
    buckets.arm(early)
    skipped = set(model.layers[2].parameters())
    loss = model(torch.randn(2, 3))
    loss.backward(inputs=[p for p in model.parameters() if p not in skipped])
    assert early.taken == [(3,)]  # bucket (2,) never became ready, so (1,) waits for it too
    late = Recorder(early.units)
    buckets.finish(late, None)
    assert late.taken == [(2,), (1,), (0,)]


def test_accumulation_starts_buckets_on_the_last_backward_of_the_step():
    model, buckets, early = _setup(accumulation=2)
    buckets.arm(early)
    model(torch.randn(2, 3)).backward()
    assert early.taken == []
    model(torch.randn(2, 3)).backward()
    assert early.taken == [(3,), (2,), (1,)]
    assert not buckets.stale


def test_a_backward_too_many_makes_the_early_buckets_stale_and_says_so():
    model, buckets, early = _setup()
    buckets.arm(early)
    model(torch.randn(2, 3)).backward()
    with pytest.warns(UserWarning, match="backward ran 2 times before step.. but "
                                         "gradient_accumulation_steps=1"):
        model(torch.randn(2, 3)).backward()
    assert buckets.stale and early.taken == [(3,), (2,), (1,)]
    buckets.finish(Recorder(early.units), None)
    assert not buckets.stale


def test_arming_while_buckets_are_out_makes_them_stale():
    model, buckets, early = _setup()
    buckets.arm(early)
    model(torch.randn(2, 3)).backward()
    buckets.arm(early)  # e.g. load_state_dict between backward and step
    assert buckets.stale


def test_a_newer_round_on_the_same_parameters_takes_the_hooks_over():
    model, old, early = _setup()
    units: list[list[Tensor]] = [list(layer.parameters()) for layer in model.layers]
    new = Buckets(BucketPlan(((3, 2), (1, 0))), units, LocalCommunicator(), name="new",
                  comm_dtype=None, accumulation=1, hooks=True)
    assert not old.overlapping and new.overlapping
    old.arm(early)
    fresh = Recorder(units)
    new.arm(fresh)
    model(torch.randn(2, 3)).backward()
    assert early.taken == [] and fresh.taken == [(3, 2)]
