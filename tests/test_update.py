"""The momentum's two places (``momentum_on``): on the directions and on the gradients."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from conftest import displacement_error, make_mixed, train_steps
from torch import nn

from seng_dist import SENG
from seng_dist.layers import find_blocks
from seng_dist.update import GradientMomentum

# Every block explicit and unsketched, BatchNorm to the fallback rule: once built, the
# preconditioner P is fixed until the next curvature step.
EXACT = dict(
    lr=0.1,
    damping=0.5,
    weight_decay=1e-3,
    curvature_batch_size=None,
    sketch_size=None,
    factor_rank=None,
    factor_sketch_size=None,
    skip_layers=("bn",),
)
STEPS = 6


def _trajectory(momentum_on: str, interval: int) -> tuple[list[dict], dict]:
    model = make_mixed()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    named = dict(model.named_parameters())
    # the fallback parameters with a μ of their own (P is diagonal there; within a block the
    # weight and bias need one μ for the two to agree: P mixes their columns)
    groups = [
        {"params": [p for n, p in named.items() if not n.startswith("bn.")], "momentum": 0.9},
        {"params": [model.bn.weight, model.bn.bias], "momentum": 0.5},
    ]
    opt = SENG(
        model,
        param_groups=groups,
        momentum_on=momentum_on,
        curvature_update_interval=interval,
        **EXACT,
    )
    history = []
    for k in range(STEPS):
        train_steps(model, opt, range(k, k + 1), 0)
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return history, start


def test_momentum_on_the_gradient_is_momentum_on_the_direction_while_the_curvature_holds():
    # P built once (step 0): Σ μʲ P g_{k-j} = P Σ μʲ g_{k-j}, so the two differ by rounding.
    direction, start = _trajectory("direction", interval=STEPS)
    gradient, _ = _trajectory("gradient", interval=STEPS)
    assert displacement_error(gradient, direction, start) <= 1e-5


def test_momentum_on_the_gradient_preconditions_past_gradients_with_the_new_curvature():
    # P rebuilt every step: the past gradients meet today's P, not their own.
    direction, start = _trajectory("direction", interval=1)
    gradient, _ = _trajectory("gradient", interval=1)
    assert displacement_error(gradient, direction, start) > 1e-3


def test_no_momentum_keeps_no_buffer():
    model = make_mixed()
    opt = SENG(model, momentum=0.0, momentum_on="gradient", **EXACT)
    train_steps(model, opt, range(2), 0)
    assert not any("gradient_momentum" in s or "momentum_buffer" in s for s in opt.state.values())


@pytest.mark.parametrize("momentum_on", ["direction", "gradient"])
def test_each_place_keeps_its_own_buffer(momentum_on):
    model = make_mixed()
    opt = SENG(model, momentum_on=momentum_on, **EXACT)
    train_steps(model, opt, range(2), 0)
    keys = {k for s in opt.state.values() for k in s if k.endswith("momentum") or "buffer" in k}
    assert keys == {"gradient_momentum" if momentum_on == "gradient" else "momentum_buffer"}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_blocks_bias_column_keeps_the_bias_momentum():
    layer = nn.Linear(3, 2)
    block = find_blocks(layer, (), 10**6, True).blocks[0]
    momentum = {id(layer.weight): 0.9, id(layer.bias): 0.5}
    z1, z2 = torch.randn(2, 4), torch.randn(2, 4)
    buffers = GradientMomentum(defaultdict(dict))
    assert torch.equal(buffers.block(block, z1, momentum), z1)
    m = buffers.block(block, z2, momentum)
    want = torch.cat([0.9 * z1[:, :3] + z2[:, :3], 0.5 * z1[:, 3:] + z2[:, 3:]], dim=1)
    torch.testing.assert_close(m, want)
