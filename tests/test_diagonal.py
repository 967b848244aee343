"""damping_diagonal="adam": ``d = -(UUᵀ + λD)⁻¹ g`` with ``D = diag(√v̂ + ε)``, exact against
the float64 reference (the implicit path where D is rank one); the parameters outside the
blocks take Adam's step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    EXACT_EXPLICIT,
    EXACT_IMPLICIT,
    SUM_ROUNDING,
    U32,
    TinyEncoder,
    make_mixed,
    seng_directions,
    solve_bound,
    tokens,
)
from torch import nn

from seng_dist import SENG
from seng_dist.reference import (
    block_matrix,
    per_sample_gradients,
    reference_directions,
    relative_error,
)

# ε of 1e-3 where a coordinate's gradient is zero (a key bias): float32 rounding there would
# otherwise be divided by ε alone; the rank-one test has no such coordinate and needs a tiny ε.
EPS, TINY_EPS = 1e-3, 1e-12
#: Adam's diagonal √v̂ + ε and the fallback's step: about 10 elementwise operations, u each.
ELEMENTWISE_ROUNDING = 10 * U32


def _fallback_bound(u: torch.Tensor) -> float:
    """How far the fallback's float32 step -g/(λ(|g| + ε)) can be from the float64 one,
    relatively: ``u`` the parameter's float64 per-sample gradients (B, ...).

    ∂d_j/∂g_j = -ε/(λ(|g_j| + ε)²), and g_j = mean_i u_ij is rounded by at most a sum's
    rounding of mean_i |u_ij| (the samples' terms may cancel), then the elementwise steps.
    """
    g = u.mean(0)
    diagonal = g.abs() + EPS
    sensitivity = (u.abs().mean(0) * EPS / diagonal**2).norm() / (g / diagonal).norm()
    return SUM_ROUNDING * float(sensitivity) + ELEMENTWISE_ROUNDING


def _directions_at_a_still_second_moment(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = EPS, **settings: Any
) -> tuple[SENG, dict]:
    """SENG's direction on (x, y) at its second step, the first taken with lr 0 on the same
    batch: ``v̂`` is then exactly ``g²`` both when the curvature is rebuilt and when it is
    applied, so ``D = |g| + ε``."""
    opt = SENG(
        model,
        damping_diagonal="adam",
        damping_beta2=0.9,
        damping_epsilon=eps,
        curvature_update_interval=1,
        **settings,
    )
    for group in opt.param_groups:
        group["lr"] = 0.0
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for group in opt.param_groups:
        group["lr"] = 1.0
    return opt, seng_directions(opt, model, x, y)


def test_adam_diagonal_is_exact_and_adams_step_outside_the_blocks():
    # The explicit path: the implicit one whitens its factors by D's rank-one fit, exact only
    # where D is rank one (the next test).
    torch.manual_seed(0)
    model = TinyEncoder(batch_first=True).train()
    x, y = tokens(n=4, t=6)
    layers = ["encoder.layers.0.self_attn.in_proj", "encoder.layers.0.linear1", "head"]
    ref = reference_directions(model, x, y, layers, 0.3, diagonal=lambda g: g.abs() + EPS)
    grads = per_sample_gradients(model, x, y)
    # The LayerNorms left to the fallback rule, to check Adam's step outside the blocks.
    opt, d = _directions_at_a_still_second_moment(
        model, x, y, skip_layers=(nn.LayerNorm,), **EXACT_EXPLICIT
    )
    assert {b.path for b in opt.blocks} == {"explicit"}
    # ε = 1e-3 where |g| is small makes cond(K̃ + λI) 45-252 here (solve_bound): the float32
    # error is about u·cond, 1.2e-5 on an AVX-512 machine against the 1e-5 this test once had.
    for layer in layers:
        u = block_matrix(grads, layer)
        bound = solve_bound(u, 0.3, u.mean(0).abs() + EPS)
        assert relative_error(d[layer], ref[layer]) < bound, layer
    # The LayerNorms follow the fallback rule: -g/(λ(|g| + ε)), Adam's step over λ.
    for name in ("encoder.layers.0.norm1.weight", "encoder.layers.1.norm2.bias"):
        g = grads[name].mean(0)
        bound = _fallback_bound(grads[name])
        assert relative_error(d[name], -g / (0.3 * (g.abs() + EPS))) < bound, name


def test_implicit_whitening_is_exact_when_the_diagonal_is_rank_one():
    # One sample through Linear layers on 2-D inputs: every block's gradient is gy ⊗ [x, 1],
    # so |g| + ε is rank one (to ε) and the factored whitening is the full one.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(1, 5, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2])
    ref = reference_directions(model, x, y, ["0", "2"], 0.3, diagonal=lambda g: g.abs() + TINY_EPS)
    grads = per_sample_gradients(model, x, y)
    opt, d = _directions_at_a_still_second_moment(model, x, y, TINY_EPS, **EXACT_IMPLICIT)
    assert {b.path for b in opt.blocks} == {"implicit"}
    for layer in ("0", "2"):
        u = block_matrix(grads, layer)
        bound = solve_bound(u, 0.3, u.mean(0).abs() + TINY_EPS)
        assert relative_error(d[layer], ref[layer]) < bound, layer


@pytest.mark.parametrize(
    "setting,value,message",
    [
        ("damping_diagonal", "diag", "damping_diagonal must be one of 'identity', 'adam'"),
        ("damping_beta2", 1.0, r"damping_beta2 must be a number in \[0, 1\)"),
        ("damping_epsilon", 0.0, "damping_epsilon must be a finite number > 0"),
    ],
)
def test_bad_diagonal_settings_are_named(setting, value, message):
    with pytest.raises(ValueError, match=message):
        SENG(make_mixed(), **{setting: value})
