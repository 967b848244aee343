"""Per-block curvature: one class per solver path, chosen once per block.

A :class:`BlockCurvature` rebuilds its block's curvature from the per-sample factors
``Ĝ/√ϱ, Â`` (:meth:`~BlockCurvature.rebuild`), computes this rank's correction ``U_w b_w`` for a
gradient ``z`` (:meth:`~BlockCurvature.correction`, with its own cache of the damped Gram
inverse) in the slot shapes it sends to the other ranks, and turns the ranks' averaged slot into
``mean_w U_w b_w`` (:meth:`~BlockCurvature.combine`). The math is :mod:`seng_dist.solver`'s.

The tensors live in the optimizer's per-parameter state of the block's weight (looked up at each
use: the mapping is the optimizer's ``state``), under the names in each class's ``KEYS``, as
torch optimizers keep their state: ``opt.state[weight]`` shows them and ``state_dict()`` keeps
torch's format. Only this class writes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import MutableMapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import solver
from .config import SketchConfig
from .layers import Block, PerSample
from .warn import warn

_GRAM = "K"

#: the per-parameter state mapping (an optimizer's ``state``)
ParamState = MutableMapping[Any, dict[str, Any]]


class BlockCurvature(ABC):
    """One block's curvature state and the per-block solve."""

    #: the block path this class implements
    PATH: ClassVar[str]
    #: names of the state tensors it keeps (``"K"``, the Gram matrix, is always one)
    KEYS: ClassVar[tuple[str, ...]]

    def __init__(
        self, block: Block, state: ParamState, settings: SketchConfig, generator: torch.Generator
    ) -> None:
        self.block = block
        self.settings = settings
        self._param_state = state
        self._generator = generator
        self._inverse: tuple[float, Tensor] | None = None
        self._warned_damping = False

    @property
    def _state(self) -> dict[str, Any]:
        # Read without adding an entry: torch's state_dict lists every parameter with one.
        return self._param_state.get(self.block.weight, {})

    @property
    def ready(self) -> bool:
        """Whether the block has curvature (it is built at the first curvature step)."""
        return _GRAM in self._state

    def rebuild(self, sample: PerSample, whitening: Tensor | None = None) -> bool:
        """Replace the curvature by the one of ``U = [vec(∇ψ_i)]/√ϱ`` of ``sample`` (of
        ``Ũ = WU`` for a whitening ``W`` of the block's ``(n_G, n_A)`` shape,
        :mod:`seng_dist.diagonal`); keep the old one and return False if a new factor is not
        finite."""
        new = self._build(sample, whitening)
        if not solver.all_finite([t for t in new.values() if t.is_floating_point()]):
            return False
        self.clear()
        self._param_state[self.block.weight].update(new)
        return True

    def correction(self, z: Tensor | None, damping: float) -> list[Tensor]:
        """This rank's slot for ``b_w = (λI + U_wᵀU_w)⁻¹ U_wᵀ z``: tensors of
        :meth:`slot_shapes`, zeros when there is no ``z`` or no curvature (so every rank sends
        the same shapes)."""
        if z is None or not self.ready:
            w = self.block.weight
            dtype = solver.compute_dtype(w.dtype)
            return [w.new_zeros(shape, dtype=dtype) for shape in self.slot_shapes()]
        return self._correction(z, self._damped_inverse(damping))

    @abstractmethod
    def slot_shapes(self) -> list[tuple[int, int]]:
        """Shapes of the tensors :meth:`correction` returns."""

    def combine(self, slot: list[Tensor]) -> Tensor:
        """``mean_w U_w b_w`` as an ``(n_G, n_A)`` matrix from the averaged slot."""
        return slot[0]

    def state_dict(self) -> dict[str, Tensor]:
        """The curvature tensors (empty before the first rebuild)."""
        return {k: self._state[k] for k in self.KEYS if k in self._state}

    def load_state_dict(self, entries: dict[str, Tensor]) -> None:
        """Take saved curvature tensors: floating ones in the parameter's
        :func:`~seng_dist.solver.compute_dtype`, the sketches' row indices as saved (they must
        stay integers), all on the parameter's device."""
        unknown = sorted(set(entries) - set(self.KEYS))
        if unknown:
            raise ValueError(
                f"curvature state of layer {self.block.name!r} has entries "
                f"{unknown} that the {self.PATH} path does not keep"
            )
        self.clear()
        w = self.block.weight
        dtype = solver.compute_dtype(w.dtype)
        if entries:
            self._param_state[w].update(
                {
                    k: v.to(w.device, dtype) if v.is_floating_point() else v.to(w.device)
                    for k, v in entries.items()
                }
            )

    def clear(self) -> None:
        """Forget the curvature (and the cached inverse)."""
        for key in self.KEYS:
            self._state.pop(key, None)
        self._inverse = None

    def nbytes(self) -> int:
        """Bytes held by the curvature tensors and the cached inverse."""
        tensors = list(self.state_dict().values())
        if self._inverse is not None:
            tensors.append(self._inverse[1])
        return sum(t.numel() * t.element_size() for t in tensors)

    @abstractmethod
    def _build(self, sample: PerSample, whitening: Tensor | None) -> dict[str, Tensor]:
        """The state tensors of the new curvature (of ``Ũ = WU`` with a whitening)."""

    @abstractmethod
    def _correction(self, z: Tensor, inverse: Tensor) -> list[Tensor]:
        """The slot for ``z`` given ``(K + λI)⁻¹``."""

    def _damped_inverse(self, damping: float) -> Tensor:
        if self._inverse is None or self._inverse[0] != damping:
            K = self._state[_GRAM]
            try:
                inverse = solver.damped_inverse(K, damping)
            except ValueError as e:
                raise ValueError(
                    f"SENG: layer {self.block.name!r} cannot be preconditioned at "
                    f"damping {damping:g}: {e}"
                ) from e
            except torch.linalg.LinAlgError as e:
                raise RuntimeError(
                    f"SENG: layer {self.block.name!r} cannot be preconditioned "
                    f"at damping {damping:g}: the eigendecomposition of its "
                    f"Gram matrix K failed ({e})"
                ) from e
            self._warn_small_damping(K, damping)
            self._inverse = (damping, inverse)
        return self._inverse[1]

    def _warn_small_damping(self, K: Tensor, damping: float) -> None:
        """Say once when ``λ`` is below the rounding level ``ε·tr(K)`` of the Gram matrix: K's
        eigenvalues under it are noise, treated by the solve as outside the span of the ϱ
        samples, where the step is ``1/λ`` times the gradient (λ 1e-12 took a CNN's
        parameters to Inf in 4 steps at lr 0.1)."""
        level = solver.rounding_level(K)
        if self._warned_damping or damping >= level:
            return
        self._warned_damping = True
        trace = float(K.diagonal().sum())
        warn(
            f"SENG: damping {damping:g} is below the rounding level of layer "
            f"{self.block.name!r}'s curvature ({str(K.dtype).removeprefix('torch.')} "
            f"ε·tr(K) = {level:.2g}): K's eigenvalues under it are rounding noise, and the "
            f"step outside the span of its ϱ samples is the (whitened) gradient times "
            f"1/λ = {1 / damping:.2g}. Use a damping between {level:.2g} and "
            f"tr(K) = {trace:.2g}, with lr scaled alike"
        )

    def _sketch(self, M: Tensor, q: int | None) -> Any:
        """Draw a row sketch of the columns of ``M`` (``None``: no sketch is needed)."""
        s = self.settings
        weights = M.pow(2).sum(0) if s.sketch_method == "leverage" else None
        return solver.sample_rows(
            M.shape[1], q, s.sketch_method, s.sketch_replacement, self._generator, weights, M.device
        )


class ExplicitCurvature(BlockCurvature):
    """Small blocks: ``Uᵀ`` kept explicitly, its rows sketched (eq. 10-14).

    A block whose samples each have one factor pair (a Linear on flat inputs: ``u_i = g_i ⊗
    a_i``) keeps the factors ``Gf, Af`` instead, unsketched: ``ϱ(n_G + n_A)`` numbers instead
    of ``ϱ·n``, ``K`` and ``Uᵀz`` exact, and a step's products run as two matrix products
    rather than two passes over ``ϱ·n`` numbers (memory-bound: they were most of the plain
    step's cost on an MLP). Only where the factors hold at most an eighth of ``U``'s numbers
    (both sides at least about 16 wide): on smaller blocks both forms cost the same and ``U``
    is kept, as before. Not under a damping diagonal, whose whitening of ``U`` does not
    factor."""

    #: the factors are kept where ``FACTOR_SHARE·(n_G + n_A) <= n_G·n_A``
    FACTOR_SHARE = 8

    PATH = "explicit"
    KEYS = ("U", "Xz", "sketch_idx", "Gf", "Af", _GRAM)

    def slot_shapes(self) -> list[tuple[int, int]]:
        return [(self.block.n_G, self.block.n_A)]

    def _build(self, sample: PerSample, whitening: Tensor | None) -> dict[str, Tensor]:
        b = self.block
        if whitening is None and b.kind.factorable and self.FACTOR_SHARE * (b.n_G + b.n_A) <= b.n:
            G_hat, A_hat = sample.factors()
            if G_hat.shape[1] == 1:
                Gf, Af = G_hat[:, 0].contiguous(), A_hat[:, 0].contiguous()
                dtype = solver.compute_dtype(Gf.dtype)
                return {
                    "Gf": Gf,
                    "Af": Af,
                    _GRAM: solver.implicit_gram(Gf.to(dtype), Af.to(dtype), 1),
                }
        Ut = sample.grads()
        if whitening is not None:
            Ut = Ut * whitening.reshape(1, -1)
        sk = self._sketch(Ut, self.settings.sketch_size)
        X = solver.sketch_columns(Ut, sk)
        X = X.to(solver.compute_dtype(X.dtype))
        out = {"U": Ut, _GRAM: X @ X.T}
        if sk is not None:
            out.update(Xz=solver.sketch_columns(Ut, sk, power=2), sketch_idx=sk[0])
        return out

    def _correction(self, z: Tensor, inverse: Tensor) -> list[Tensor]:
        st = self._state
        if "Gf" in st:
            Gf, Af = st["Gf"], st["Af"]
            c = solver.apply_inverse(inverse, solver.implicit_utz(Gf, Af, z, 1, None, None))
            return [solver.implicit_uc_exact(Gf, Af, c, 1)]
        U = st["U"]
        coeff = solver.explicit_utz(st.get("Xz", U), z.reshape(-1), st.get("sketch_idx"))
        c = solver.apply_inverse(inverse, coeff)
        return [solver.explicit_uc(U, c).view(self.block.n_G, self.block.n_A)]


class ImplicitCurvature(BlockCurvature):
    """Large blocks: rank-``r`` factors of each per-sample gradient, their rows sketched
    (eq. 15-24). With ``uc="factored"`` the slot is the partial factors ``Gᶜ_w, Aᶜ_w`` of
    eq. 28 (zero-padded to the rank every rank can agree on), else the ``U c`` matrix."""

    PATH = "implicit"
    KEYS = ("Gf", "Af", "YG", "YA", "sketch_g_idx", "sketch_a_idx", _GRAM)

    @property
    def slot_rank(self) -> int:
        """The most factors a sample of the block can have: ``min(factor_rank, n_G, n_A)``."""
        b, rank = self.block, self.settings.factor_rank
        return min(b.n_G, b.n_A) if rank is None else min(rank, b.n_G, b.n_A)

    def slot_shapes(self) -> list[tuple[int, int]]:
        b = self.block
        if self.settings.uc == "factored":
            return [(self.slot_rank, b.n_G), (self.slot_rank, b.n_A)]
        return [(b.n_G, b.n_A)]

    def combine(self, slot: list[Tensor]) -> Tensor:
        # eq. 28: the product of the averaged partial factors.
        return slot[0].T @ slot[1] if len(slot) == 2 else super().combine(slot)

    def _build(self, sample: PerSample, whitening: Tensor | None) -> dict[str, Tensor]:
        G_hat, A_hat = sample.factors()
        if whitening is not None:
            w_G, w_A = solver.factored_whitening(whitening)
            G_hat, A_hat = G_hat * w_G, A_hat * w_A
        G, A = solver.low_rank_factors(G_hat, A_hat, self.settings.factor_rank, self._generator)
        Gf = G.reshape(-1, G.shape[2]).contiguous()
        Af = A.reshape(-1, A.shape[2]).contiguous()
        out = {"Gf": Gf, "Af": Af}
        xs = []
        for side, F in (("G", Gf), ("A", Af)):
            sk = self._sketch(F, self.settings.factor_sketch_size)
            xs.append(solver.sketch_columns(F, sk))
            if sk is not None:
                out[f"Y{side}"] = solver.sketch_columns(F, sk, power=2)
                out[f"sketch_{side.lower()}_idx"] = sk[0]
        dtype = solver.compute_dtype(Gf.dtype)
        out[_GRAM] = solver.implicit_gram(xs[0].to(dtype), xs[1].to(dtype), G.shape[1])
        return out

    def _correction(self, z: Tensor, inverse: Tensor) -> list[Tensor]:
        st = self._state
        Gf, Af = st["Gf"], st["Af"]
        r = Gf.shape[0] // st[_GRAM].shape[0]
        c = solver.apply_inverse(
            inverse,
            solver.implicit_utz(
                st.get("YG", Gf),
                st.get("YA", Af),
                z,
                r,
                st.get("sketch_g_idx"),
                st.get("sketch_a_idx"),
            ),
        )
        if self.settings.uc == "exact":
            return [solver.implicit_uc_exact(Gf, Af, c, r)]
        gc, ac = solver.partial_factors(Gf, Af, c, r)
        pad = self.slot_rank - r
        if pad:
            gc = torch.cat([gc, gc.new_zeros(pad, self.block.n_G)])
            ac = torch.cat([ac, ac.new_zeros(pad, self.block.n_A)])
        return [gc, ac]


#: the curvature class of each path
CURVATURE_CLASSES: dict[str, type[BlockCurvature]] = {
    cls.PATH: cls for cls in (ExplicitCurvature, ImplicitCurvature)
}


def make_curvature(
    block: Block, state: ParamState, settings: SketchConfig, generator: torch.Generator
) -> BlockCurvature:
    """The curvature object for ``block``'s path."""
    return CURVATURE_CLASSES[block.path](block, state, settings, generator)
