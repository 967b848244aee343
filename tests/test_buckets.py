"""Bucket plans, and buckets started as a backward pass's gradients arrive (one process: the
communicator is the identity, so what is checked is when each bucket's payload is taken)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from seng_dist.buckets import LAST_BUCKET_BYTES, BucketPlan, Buckets
from seng_dist.comm import LocalCommunicator
from seng_dist.passes import BackwardPasses


def test_plan_fills_buckets_in_ready_order_and_keeps_the_last_one_small():
    plan = BucketPlan.build([100] * 6, order=[5, 4, 3, 2, 1, 0], cap=250, last_cap=150)
    assert plan.buckets == ((5, 4, 3), (2, 1), (0,))
    # The last bucket holds at least one unit, however large.
    assert BucketPlan.build([10, 500], order=[0, 1], cap=250).buckets == ((0,), (1,))
    # It is never larger than a bucket.
    assert BucketPlan.build(
        [100] * 3, order=[2, 1, 0], cap=150, last_cap=LAST_BUCKET_BYTES
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
        return [
            [
                torch.cat(
                    [
                        torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1)
                        for p in self.units[u]
                    ]
                )
            ]
            for u in units
        ]


class Driver:
    """Feeds a Buckets from a model's backward passes, as a round does: every gradient to
    :meth:`Buckets.gradient_ready`, and the round finished when a pass ends."""

    def __init__(self, buckets: Buckets, payload: Recorder) -> None:
        self.buckets, self.payload = buckets, payload
        self.started_in_pass: list[int] = []

    def gradient(self, param: Tensor, passes: int) -> None:
        self.buckets.gradient_ready(param, self.payload)

    def pass_ended(self, passes: int) -> None:
        self.started_in_pass.append(self.buckets.started)

    def window_opened(self) -> None:
        pass


def _setup() -> tuple[Chain, Buckets, Recorder]:
    torch.manual_seed(0)
    model = Chain()
    units: list[list[Tensor]] = [list(layer.parameters()) for layer in model.layers]
    # One unit per bucket, in backward's order (last layer first); the first layer last.
    plan = BucketPlan(((3,), (2,), (1,), (0,)))
    buckets = Buckets(plan, units, LocalCommunicator(), name="test", comm_dtype=None)
    early = Recorder(units)
    passes = BackwardPasses(model, list(model.parameters()))
    passes.listeners.append(Driver(buckets, early))
    model.passes = passes  # type: ignore[assignment]  # kept alive with the model
    return model, buckets, early


def test_buckets_start_during_backward_in_plan_order_the_last_in_finish():
    model, buckets, early = _setup()
    model(torch.randn(2, 3)).backward()
    assert early.taken == [(3,), (2,), (1,)]  # the last bucket waits for finish
    assert buckets.started == 3
    late = Recorder(early.units)
    out = buckets.finish(late, None)
    assert late.taken == [(0,)]
    assert [len(p) for p in out] == [1] * 4
    assert torch.equal(
        out[3][0], torch.cat([p.grad.reshape(-1) for p in model.layers[3].parameters()])
    )
    assert buckets.started == 0  # finish resets: the next pass starts from the first bucket


def test_a_bucket_without_its_gradient_holds_back_every_later_one():
    model, buckets, early = _setup()
    skipped = set(model.layers[2].parameters())
    loss = model(torch.randn(2, 3))
    loss.backward(inputs=[p for p in model.parameters() if p not in skipped])
    assert early.taken == [(3,)]  # bucket (2,) never became ready, so (1,) waits for it too
    late = Recorder(early.units)
    buckets.finish(late, None)
    assert late.taken == [(2,), (1,), (0,)]


def test_a_parameter_counts_once_per_pass_until_the_round_resets():
    model, buckets, early = _setup()
    w = model.layers[3].weight
    buckets.gradient_ready(w, early)
    buckets.gradient_ready(w, early)  # the same gradient again: still short of the bias
    assert early.taken == []
    buckets.gradient_ready(model.layers[3].bias, early)
    assert early.taken == [(3,)]
    buckets.reset()
    buckets.gradient_ready(w, early)
    assert early.taken == [(3,)]
