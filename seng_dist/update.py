"""The parameter update: heavy-ball momentum on the direction, then ``θ ← θ + lr·v``, with each
param group's ``lr``, ``momentum`` and (decoupled) ``weight_decay``. A bf16 or fp16 parameter
is updated through a float32 master copy kept in its state (as mixed-precision optimizers do),
then rounded back into the parameter: updates smaller than its rounding are not lost."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from .solver import compute_dtype

#: the per-parameter state key of the momentum buffer (as torch's SGD names it)
MOMENTUM = "momentum_buffer"
#: the per-parameter state key of a low-precision parameter's float32 master copy
MASTER = "master"


def apply_update(
    state: MutableMapping[Any, dict[str, Any]],
    groups: list[dict[str, Any]],
    params: list[Tensor],
    dirs: list[Tensor],
    decoupled: bool,
) -> None:
    """Update ``params`` along ``dirs``, group by group (``state`` holds the buffers)."""
    if len(groups) == 1:
        g = groups[0]
        _heavy_ball(
            state, params, dirs, g["lr"], g["momentum"], g["weight_decay"] if decoupled else 0.0
        )
        return
    direction = {id(p): d for p, d in zip(params, dirs, strict=True)}
    for group in groups:
        ps = [p for p in group["params"] if id(p) in direction]
        if ps:
            _heavy_ball(
                state,
                ps,
                [direction[id(p)] for p in ps],
                group["lr"],
                group["momentum"],
                group["weight_decay"] if decoupled else 0.0,
            )


def _heavy_ball(
    state: MutableMapping[Any, dict[str, Any]],
    params: list[Tensor],
    dirs: list[Tensor],
    lr: float,
    mu: float,
    decoupled_wd: float,
) -> None:
    targets = [_master(state, p) for p in params]
    if decoupled_wd:
        torch._foreach_mul_(targets, 1.0 - lr * decoupled_wd)
    if mu:
        bufs = [state[p].get(MOMENTUM) for p in params]
        old = [(b, d) for b, d in zip(bufs, dirs, strict=True) if b is not None]
        if old:
            torch._foreach_mul_([b for b, _ in old], mu)
            torch._foreach_add_([b for b, _ in old], [d for _, d in old])
        for p, b, d in zip(params, bufs, dirs, strict=True):
            if b is None:
                state[p][MOMENTUM] = d.clone()
        dirs = [state[p][MOMENTUM] for p in params]
    torch._foreach_add_(targets, dirs, alpha=lr)
    rounded = [(p, m) for p, m in zip(params, targets, strict=True) if m is not p]
    if rounded:
        torch._foreach_copy_([p for p, _ in rounded], [m for _, m in rounded])


def _master(state: MutableMapping[Any, dict[str, Any]], param: Tensor) -> Tensor:
    """What the update writes: ``param`` itself, or for a bf16/fp16 one its float32 master copy
    (made from the parameter at its first update)."""
    dtype = compute_dtype(param.dtype)
    if dtype == param.dtype:
        return param
    master: Tensor | None = state[param].get(MASTER)
    if master is None:
        master = state[param][MASTER] = param.detach().to(dtype)
    return master
