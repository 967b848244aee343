"""The damping's diagonal ``D`` in ``d = -(U Uᵀ + λD)⁻¹ g``: one class per ``damping_diagonal``.

The paper damps with ``λI``: every direction outside the span of ``U``'s ϱ columns takes the
step ``-g/λ``, SGD's. :class:`AdamDiagonal` damps with ``λD``, ``D = diag(√v̂ + ε)`` from the
averaged gradient's running second moment (Adam's), so those directions take Adam's step
``-g/(λ(√v̂ + ε))`` and the curvature corrects it on the directions it sees. The solve is the
paper's in ``D``'s coordinates: with ``W = D^-½``, ``(UUᵀ + λD)⁻¹ = W (ŨŨᵀ + λI)⁻¹ W`` for
``Ũ = WU``, so a block's curvature is built from whitened per-sample factors (``W`` of the
second moment at that curvature step, :meth:`Diagonal.current`) and a step whitens the
gradient, runs the usual Sherman-Morrison-Woodbury solve and whitens the result. ``W`` moves
every step while ``Ũ`` keeps the ``W`` it was built with: the preconditioner is then
``W_k (Ũ Ũᵀ + λI)⁻¹ W_k``, still symmetric positive definite, and exact on curvature steps
whose second moment did not move.

An implicit block keeps factors ``G_i, A_i``, so its ``W`` must factor too:
:func:`~seng_dist.solver.factored_whitening` fits ``D`` by the outer product of its row and
column means (Adafactor's rank-one fit), exact when ``D`` is rank one. The gradient and the
result are whitened by the full ``W`` on both paths.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from .config import DampingDiagonal, DiagonalConfig
from .curvature import ParamState


class Diagonal(ABC):
    """``D``: its whitening ``W = D^-½`` per block, and the directions without curvature."""

    #: whether ``W`` is ever anything but None (the curvature is kept in ``D``'s coordinates)
    whitens: bool = False

    @abstractmethod
    def current(self, key: Tensor) -> Tensor | None:
        """``W`` from the second moment kept under ``key`` (a block's weight or a fallback
        parameter) as it is now; None for ``λI`` or before the first step."""

    @abstractmethod
    def update(self, key: Tensor, z: Tensor) -> Tensor | None:
        """Fold this step's averaged gradient ``z`` into the second moment under ``key``;
        the new ``W`` (None for ``λI``)."""

    @abstractmethod
    def without_curvature(self, z: Tensor, w: Tensor | None, damping: float) -> Tensor:
        """The direction of a block that has no curvature on every rank, from its ``z`` and
        its ``W`` of :meth:`update`."""

    @abstractmethod
    def fallback(self, params: list[Tensor], grads: list[Tensor], damping: float) -> list[Tensor]:
        """The directions of the parameters outside the blocks (their second moments are
        updated)."""


class IdentityDiagonal(Diagonal):
    """The paper's ``λI``; outside the blocks (and before a block has curvature)
    ``d = -g/(1 + λ)``, a step that stays bounded however small ``λ`` is."""

    def current(self, key: Tensor) -> Tensor | None:
        return None

    def update(self, key: Tensor, z: Tensor) -> Tensor | None:
        return None

    def without_curvature(self, z: Tensor, w: Tensor | None, damping: float) -> Tensor:
        return z.mul(-1.0 / (1.0 + damping))

    def fallback(self, params: list[Tensor], grads: list[Tensor], damping: float) -> list[Tensor]:
        return list(torch._foreach_mul(grads, -1.0 / (1.0 + damping)))


class AdamDiagonal(Diagonal):
    """``D = diag(√v̂ + ε)``: per parameter (per block: under its weight, the shape of ``z``)
    ``v ← β₂v + (1-β₂)z²`` with its own step count ``t``, ``v̂ = v/(1-β₂ᵗ)``. Without
    curvature (``U = 0``) the direction is ``-z/(λD)``, Adam's step over ``λ``."""

    whitens = True
    #: the per-parameter state keys: the second moment and its step count
    SQUARES = "damping_sq"
    STEPS = "damping_steps"

    def __init__(self, config: DiagonalConfig, state: ParamState) -> None:
        self.beta2 = config.damping_beta2
        self.eps = config.damping_epsilon
        self._param_state = state

    def current(self, key: Tensor) -> Tensor | None:
        state = self._param_state.get(key, {})
        return self._whitening(state) if self.SQUARES in state else None

    def update(self, key: Tensor, z: Tensor) -> Tensor:
        state = self._param_state[key]
        sq = state.get(self.SQUARES)
        if sq is None:
            sq = state[self.SQUARES] = torch.zeros_like(z)
        state[self.STEPS] = state.get(self.STEPS, 0) + 1
        sq.mul_(self.beta2).addcmul_(z, z, value=1.0 - self.beta2)
        return self._whitening(state)

    def _whitening(self, state: dict[str, Any]) -> Tensor:
        """``W = (√v̂ + ε)^-½`` of a parameter's state."""
        corrected = state[self.SQUARES] / (1.0 - self.beta2 ** state[self.STEPS])
        return corrected.sqrt_().add_(self.eps).rsqrt_()

    def without_curvature(self, z: Tensor, w: Tensor | None, damping: float) -> Tensor:
        assert w is not None  # update() always returns one
        return (z * w).mul_(w).mul_(-1.0 / damping)

    def fallback(self, params: list[Tensor], grads: list[Tensor], damping: float) -> list[Tensor]:
        return [
            self.without_curvature(g, self.update(p, g), damping)
            for p, g in zip(params, grads, strict=True)
        ]


def make_diagonal(config: DiagonalConfig, state: ParamState) -> Diagonal:
    """The diagonal of ``config.damping_diagonal`` (mypy checks that every choice has one)."""
    match config.damping_diagonal:
        case DampingDiagonal.IDENTITY:
            return IdentityDiagonal()
        case DampingDiagonal.ADAM:
            return AdamDiagonal(config, state)
