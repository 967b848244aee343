"""The heavy-ball momentum and the parameter update ``θ ← θ + lr·v``, with each param group's
``lr``, ``momentum`` and (decoupled) ``weight_decay``.

With ``momentum_on="direction"`` (the paper's) :func:`apply_update` sums the preconditioned
directions, ``v ← μv + d``. With ``"gradient"`` :class:`GradientMomentum` sums the averaged
gradients before they are preconditioned, ``m ← μm + z``, so ``d = P_k m`` preconditions every
past gradient with the current curvature ``P_k``, and :func:`apply_update` steps along ``d``.
The two agree while ``P`` does not move.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .layers import Block

#: the per-parameter state key of the momentum buffer (as torch's SGD names it)
MOMENTUM = "momentum_buffer"


class GradientMomentum:
    """``m ← μm + z`` on the averaged gradients (``momentum_on="gradient"``), kept in the
    optimizer's state: a block's under its weight (one ``(n_G, n_A)`` matrix, the bias's
    column with the bias's ``μ``), a fallback parameter's under itself."""

    #: the per-parameter state key of the buffer
    KEY = "gradient_momentum"

    def __init__(self, state: MutableMapping[Any, dict[str, Any]]) -> None:
        self._state = state

    def block(self, block: Block, z: Tensor, momentum: dict[int, float]) -> Tensor:
        """The block's momentum after folding in its averaged gradient matrix ``z``."""
        mus = [momentum[id(p)] for p in block.params]
        if not any(mus):
            return z
        m = self._state[block.weight].get(self.KEY)
        if m is None:
            m = self._state[block.weight][self.KEY] = z.clone()
            return m
        if len(set(mus)) == 1:
            m.mul_(mus[0])
        else:
            for piece, mu in zip(block.split(m), mus, strict=True):
                piece.mul_(mu)
        return m.add_(z)

    def params(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], momentum: dict[int, float]
    ) -> list[Tensor]:
        """Each parameter's momentum after folding in its averaged gradient."""
        out = []
        for p, g in zip(params, grads, strict=True):
            mu = momentum[id(p)]
            if not mu:
                out.append(g)
                continue
            m = self._state[p].get(self.KEY)
            if m is None:
                m = self._state[p][self.KEY] = g.clone()
            else:
                m.mul_(mu).add_(g)
            out.append(m)
        return out


def apply_update(
    state: MutableMapping[Any, dict[str, Any]],
    groups: list[dict[str, Any]],
    params: list[Tensor],
    dirs: list[Tensor],
    decoupled: bool,
    momentum: bool = True,
) -> None:
    """Update ``params`` along ``dirs``, group by group (``state`` holds the buffers);
    ``momentum``: whether the directions get the groups' heavy-ball momentum."""
    if len(groups) == 1:
        g = groups[0]
        _heavy_ball(
            state,
            params,
            dirs,
            g["lr"],
            g["momentum"] if momentum else 0.0,
            g["weight_decay"] if decoupled else 0.0,
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
                group["momentum"] if momentum else 0.0,
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
    if decoupled_wd:
        torch._foreach_mul_(params, 1.0 - lr * decoupled_wd)
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
    torch._foreach_add_(params, dirs, alpha=lr)
