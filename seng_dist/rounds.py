"""One class per distributed round: what goes into which collective, and the directions.

A :class:`Round` takes this rank's gradients, averages what must be averaged (gradients,
corrections ``U_w b_w`` or eq. 28's partial factors, and the 0/1 flags that make every rank
take the same decision), and hands back every parameter's direction:

* :class:`BlockDiagonalRound` (eq. 26): ``ḡ`` in one collective, then the corrections of
  ``b_w = (λI + U_wᵀU_w)⁻¹ U_wᵀ ḡ`` in a second;
* :class:`LaggedRound` (eq. 27): ``b_w`` from the previous step's averaged gradient, so the
  gradient and the corrections travel in ONE round; its first step is block-diagonal.

The round that carries the gradients goes in :class:`~seng_dist.buckets.Buckets`: with
``overlap`` its buckets start during backward (block-diagonal: the gradients; lagged: each
block's gradient with its correction, computed before the gradient is even there), else it is
one collective in ``step()``. :func:`make_round` picks the class from the config's
``variant``. On one process every collective is the identity and both are single-process SENG
(lagged with its lag).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import solver
from .buckets import BucketPlan, Buckets, Payload, first_positions
from .comm import Communicator
from .config import SENGConfig
from .curvature import BlockCurvature, ParamState
from .diagonal import make_diagonal
from .groups import StepSettings
from .layers import FALLBACK_RULE
from .warn import warn


@dataclass
class Exchanged:
    """A round's averaged result: per block ``z = ḡ + l2·θ``, the averaged slot and the
    damping diagonal's whitening ``W`` (None for ``λI``); the (clipped) averaged fallback
    gradients; and the averaged flags (``present`` then ``ready``, as decoded by
    :meth:`Agreement.decode`)."""

    zs: list[Tensor]
    slots: list[list[Tensor]]
    fallback: list[Tensor]
    flags: list[float]
    whitenings: list[Tensor | None]


class Agreement:
    """0/1 flags averaged with a round, so that every rank takes the same decision (a block
    has a gradient, a block has curvature, a rank's early buckets went stale) without a
    collective of its own.

    Each flag travels with its complement: "some rank" is a mean of the flags above 0 and
    "every rank" a mean of the complements equal to 0. Sums of non-negative numbers are 0 only
    when every term is, in any buffer dtype (a bf16 mean of 0/1 flags at hundreds of ranks
    cannot tell ``m-1`` from ``m``; these never need to).
    """

    def __init__(self, comm: Communicator, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.comm = comm
        self.device = device
        # The gradients' dtype when it is wider than float32 (a float64 model), so that the
        # flags share their buffer and the round stays one collective.
        self.dtype = torch.promote_types(dtype, torch.float32)

    def pack(self, values: list[bool]) -> Tensor | None:
        """The flags as a tensor to average (None on one process: nothing to agree on)."""
        if self.comm.world_size == 1 or not values:
            return None
        flags = torch.tensor(values, dtype=self.dtype, device=self.device)
        return torch.cat([flags, 1.0 - flags])

    def decode(self, flags: Tensor | None, local: list[bool]) -> list[float]:
        """Averaged flags as ``1.0`` (every rank), ``0.5`` (some) or ``0.0`` (none)."""
        if flags is None:
            return [float(v) for v in local]
        n = len(local)
        some, missing = flags[:n].tolist(), flags[n:].tolist()
        return [1.0 if m == 0.0 else (0.5 if s > 0.0 else 0.0)
                for s, m in zip(some, missing, strict=True)]


class Round(ABC):
    """The per-step exchange and the directions, for one variant.

    Args:
        config: the settings (clipping, non-finite skipping, the buffer dtype).
        curvatures: every preconditioned block's curvature.
        fallback: the trainable parameters outside the blocks (``d = -g/(1+λ)``, or the
            damping diagonal's rule).
        comm: the communicator.
        grads_averaged: the engine averages the gradients in backward (DDP,
            ``hvd.DistributedOptimizer``, the DeepSpeed engine): only corrections are sent.
        state: the per-parameter state mapping (the optimizer's ``state``).
        order: the model's parameters in registration order; backward makes their gradients
            ready roughly in reverse, which orders the buckets.
    """

    #: the name of the round that carries the gradients
    SENDS = "seng.grad"

    def __init__(self, config: SENGConfig, curvatures: list[BlockCurvature],
                 fallback: list[Tensor], comm: Communicator, *, grads_averaged: bool,
                 state: ParamState, order: Sequence[Tensor] = ()) -> None:
        self.config = config
        self.curvatures = curvatures
        self.fallback = fallback
        self.comm = comm
        self.grads_averaged = grads_averaged
        self._states = state
        self.diagonal = make_diagonal(config.diagonal, state)
        first = curvatures[0].block.weight if curvatures else fallback[0]
        self.agreement = Agreement(comm, first.device, first.dtype)
        self._warned: set[str] = set()
        #: per unit (each block, then each fallback parameter) its parameters
        self.units: list[list[Tensor]] = [list(c.block.params) for c in curvatures] + \
            [[p] for p in fallback]
        self.buckets = self._buckets(order)

    def _buckets(self, order: Sequence[Tensor]) -> Buckets:
        """The buckets of the round that carries the gradients: with ``overlap`` (and SENG
        averaging the gradients) of ``bucket_size_mb`` in the order backward fills them, else
        one."""
        dist = self.config.distributed
        hooks = dist.overlap and self.sends_gradients
        if hooks:
            first = first_positions(self.units, order)
            ready = sorted(range(len(self.units)), key=lambda u: -first[u])
            plan = BucketPlan.build(self.unit_bytes(), ready, int(dist.bucket_size_mb * 2**20))
        else:
            plan = BucketPlan.single(len(self.units))
        return Buckets(plan, self.units, self.comm, name=self.SENDS,
                       comm_dtype=dist.buffer_dtype,
                       accumulation=self.config.gradient_accumulation_steps, hooks=hooks)

    def unit_bytes(self) -> list[int]:
        """Each unit's payload in bytes in the buffer (its gradient's; the lagged round adds
        its correction slot)."""
        dtype = self.config.distributed.buffer_dtype
        return [sum(p.numel() for p in unit) * (dtype or unit[0].dtype).itemsize
                for unit in self.units]

    def arm(self, curvature_due: bool, settings: Callable[[], StepSettings]) -> None:
        """Set up the coming step's early buckets: called after every step (and whenever the
        state changed), with whether the step rebuilds the curvature and how to get the
        step's settings (a callable: read when the first bucket starts)."""
        self.buckets.arm(self._checked(self._gradients) if self.sends_gradients else None)

    def _checked(self, payload: Payload) -> Payload:
        """``payload`` after ``step()``'s checks of its units' parameters (a sparse gradient is
        refused with SENG's message in backward too)."""
        def run(units: Sequence[int]) -> list[list[Tensor]]:
            for u in units:
                self._check(self.units[u])
            return payload(units)
        return run

    def close(self) -> None:
        """Stop starting buckets during backward (the round is being replaced)."""
        self.buckets.retire()

    def _gradients(self, units: Sequence[int]) -> list[list[Tensor]]:
        """Each unit's gradient, fresh (a block's as its matrix; a missing one as zeros)."""
        nb = len(self.curvatures)
        return [[self.curvatures[u].block.grad_matrix()] if u < nb
                else [self._fallback_gradient(self.fallback[u - nb])] for u in units]

    def _fallback_gradient(self, p: Tensor) -> Tensor:
        # SENG never changes .grad: on several ranks it is averaged (and clipped) in a copy.
        if p.grad is None:
            return torch.zeros_like(p)
        return p.grad.clone() if self.multi else p.grad

    def _fresh(self, hyper: StepSettings) -> bool:
        """Whether the early buckets were computed with this step's settings."""
        return True

    def _send(self, payload: Payload, local: list[bool], hyper: StepSettings
              ) -> tuple[list[list[Tensor]], list[float]]:
        """The round in :attr:`buckets` (the early ones included) with the flags ``local``;
        when a rank's early buckets went stale, the whole round again from here, on every
        rank. Returns each unit's averaged payload and the decoded flags."""
        stale = self.buckets.stale or not self._fresh(hyper)
        flags = self.agreement.pack(local + [stale])
        payloads = self.buckets.finish(payload, flags)
        values = self.agreement.decode(flags, local + [stale])
        if values[-1] > 0.0:
            flags = self.agreement.pack(local + [False])
            payloads = self.buckets.finish(payload, flags)
            values = self.agreement.decode(flags, local + [False])
        return payloads, values[:-1]

    @property
    def multi(self) -> bool:
        """Whether there are other ranks to average with."""
        return self.comm.world_size > 1

    @property
    def sends_gradients(self) -> bool:
        """Whether this round averages the gradients (not already done by the engine)."""
        return self.multi and not self.grads_averaged

    def directions(self, hyper: StepSettings) -> tuple[list[Tensor], list[Tensor]] | None:
        """Every parameter with a gradient (on some rank) and its direction, running this
        step's collectives; None when ``skip_nonfinite`` and ``ḡ`` is not finite.

        ``hyper`` gives each parameter's damping and the L2 weight decay added to the averaged
        gradient before preconditioning.
        """
        self._check_gradients()
        present = [any(p.grad is not None for p in unit) for unit in self.units]
        ready = self._ready()
        done = self._exchange(present, ready, hyper)
        return None if done is None else self._finish(done, hyper)

    def _check_gradients(self) -> None:
        """Refuse sparse gradients; say once that parameters were frozen after construction."""
        for c in self.curvatures:
            self._check(c.block.params)
        self._check(self.fallback)

    def _check(self, params: Sequence[Tensor]) -> None:
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError("SENG does not support sparse gradients (use "
                                 "nn.Embedding(sparse=False))")
            if not p.requires_grad and "<frozen>" not in self._warned:
                self._warned.add("<frozen>")
                warn("SENG: parameters were frozen (requires_grad=False) after the optimizer "
                     "was built; they get no gradient and stay unchanged, but their layers' "
                     "curvature is kept. Build SENG after freezing (or pass skip_layers) to "
                     "leave them out")

    @abstractmethod
    def _exchange(self, present: list[bool], ready: list[bool], hyper: StepSettings
                  ) -> Exchanged | None:
        """Run the step's collectives on the gradients and the flags (``present`` per unit,
        ``ready`` per block)."""

    def _split(self, payloads: list[list[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """The block gradients and the fallback gradients: each unit's first tensor."""
        nb = len(self.curvatures)
        return [p[0] for p in payloads[:nb]], [p[0] for p in payloads[nb:]]

    def _ready(self) -> list[bool]:
        """Per block, whether this rank can precondition it this step."""
        return [c.ready for c in self.curvatures]

    def _missing(self, curvature: BlockCurvature) -> str:
        """Why a block has no agreed curvature, for the warning."""
        if not curvature.ready:
            return "it was not called with gradients on a curvature step"
        return "it has curvature here but not on every rank"

    def _averaged(self, gs: list[Tensor], fgs: list[Tensor], hyper: StepSettings
                  ) -> list[Tensor] | None:
        """After ``ḡ`` is known: None if it must be skipped (``skip_nonfinite``; every rank
        sees the same ``ḡ``, so every rank skips together); else clip it to
        ``max_grad_norm`` (no host sync) and add ``l2·θ`` to the block gradients in place (the
        weight's and the bias's own L2 when their groups differ).
        Returns the fallback gradients (new tensors when clipped: they may be ``.grad``)."""
        if self.config.skip_nonfinite and not solver.all_finite(gs + fgs):
            return None
        max_norm = self.config.max_grad_norm
        if max_norm is not None and gs + fgs:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs + fgs)))
            factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            if gs:
                torch._foreach_mul_(gs, factor)
            fgs = list(torch._foreach_mul(fgs, factor)) if fgs else fgs
        for c, g in zip(self.curvatures, gs, strict=True):
            b = c.block
            c.block.add_params_(g, hyper.l2[id(b.weight)],
                                hyper.l2[id(b.bias)] if b.bias is not None else 0.0)
        return fgs

    def _allreduce(self, tensors: list[Tensor], name: str) -> None:
        self.comm.allreduce_mean_(tensors, name=name,
                                  comm_dtype=self.config.distributed.buffer_dtype)

    def _finish(self, done: Exchanged, hyper: StepSettings
                ) -> tuple[list[Tensor], list[Tensor]]:
        """Every present parameter's direction from the averaged result."""
        nb, nf = len(self.curvatures), len(self.fallback)
        present, ready = done.flags[:nb + nf], done.flags[nb + nf:]
        params: list[Tensor] = []
        dirs: list[Tensor] = []
        for i, (c, z, slot) in enumerate(zip(self.curvatures, done.zs, done.slots, strict=True)):
            if not present[i]:
                continue
            damping = hyper.damping[id(c.block.weight)]
            w = done.whitenings[i]
            if ready[i] >= 1.0:
                # In D's coordinates: d = W (Ũb - Wz)/λ (docs/design.md).
                d = solver.direction(_whiten(z, w), c.combine(slot), damping)
                if w is not None:
                    d.mul_(w)
            else:
                self._warn_no_curvature(c)
                d = self.diagonal.without_curvature(z, w, damping)
            params.extend(c.block.params)
            dirs.extend(c.block.split(d))
        # The fallback rule, fused over the parameters that share damping and L2.
        alike: dict[tuple[float, float], list[tuple[Tensor, Tensor]]] = {}
        for p, g, h in zip(self.fallback, done.fallback, present[nb:], strict=True):
            if h:
                alike.setdefault((hyper.damping[id(p)], hyper.l2[id(p)]), []).append((p, g))
        for (damping, l2), kept in alike.items():
            fps, grads = [p for p, _ in kept], [g for _, g in kept]
            if l2:
                grads = list(torch._foreach_add(grads, fps, alpha=l2))
            dirs.extend(self.diagonal.fallback(fps, grads, damping))
            params.extend(fps)
        return params, dirs

    def _warn_no_curvature(self, curvature: BlockCurvature) -> None:
        name = curvature.block.name
        if name not in self._warned:
            self._warned.add(name)
            warn(f"SENG: layer {name!r} has no curvature yet ({self._missing(curvature)}); it "
                 f"follows the fallback rule {FALLBACK_RULE} until it has")


class BlockDiagonalRound(Round):
    """eq. 26: ``d = -(ḡ - mean_w U_w b_w)/λ`` with ``b_w`` from ``ḡ``; two collectives."""

    def _exchange(self, present: list[bool], ready: list[bool], hyper: StepSettings
                  ) -> Exchanged | None:
        local = present + ready
        values: list[float] | None = None
        if self.sends_gradients:
            payloads, values = self._send(self._gradients, local, hyper)
        else:
            payloads = self._gradients(range(len(self.units)))
        gs, fgs = self._split(payloads)
        averaged = self._averaged(gs, fgs, hyper)
        if averaged is None:
            return None
        here = (values if values is not None else present)[:len(gs)]
        ws = self._whitenings(gs, here)
        slots = [c.correction(_whiten(z, w) if h else None, hyper.damping[id(c.block.weight)])
                 for c, z, w, h in zip(self.curvatures, gs, ws, here, strict=True)]
        flags = None if values is not None else self.agreement.pack(local)
        if self.multi:
            self._allreduce(_flat(slots) + ([flags] if flags is not None else []),
                            "seng.correction")
        if values is None:
            values = self.agreement.decode(flags, local)
        return Exchanged(gs, slots, averaged, values, ws)

    def _whitenings(self, zs: list[Tensor], present: Sequence[float | bool]
                    ) -> list[Tensor | None]:
        """Each present block's ``W`` after folding in its averaged ``z`` (the same on every
        rank: every rank folds the same ``z``)."""
        return [self.diagonal.update(c.block.weight, z) if h else None
                for c, z, h in zip(self.curvatures, zs, present, strict=True)]


class LaggedRound(BlockDiagonalRound):
    """eq. 27: ``b_w`` from the previous step's averaged ``z``, so the gradient, the
    corrections and the flags travel in ONE round (one collective, or the buckets of one
    round when overlapped). The first step (no previous ``z`` yet) is block-diagonal. The
    previous ``z`` is kept in each block weight's state as ``PREVIOUS`` (it is part of the
    checkpoint)."""

    PREVIOUS = "prev_g"
    SENDS = "seng.step"

    #: the settings the step's early corrections were computed with (None: none were)
    _launched: StepSettings | None = None

    def _previous(self, curvature: BlockCurvature) -> Tensor | None:
        prev: Tensor | None = self._states.get(curvature.block.weight, {}).get(self.PREVIOUS)
        return prev

    @property
    def _lagging(self) -> bool:
        return any(self._previous(c) is not None for c in self.curvatures)

    def _ready(self) -> list[bool]:
        lagging = self._lagging
        return [c.ready and (not lagging or self._previous(c) is not None)
                for c in self.curvatures]

    def _missing(self, curvature: BlockCurvature) -> str:
        if curvature.ready and self._lagging and self._previous(curvature) is None:
            return "the lagged variant has no previous averaged gradient for it yet"
        return super()._missing(curvature)

    def _finish(self, done: Exchanged, hyper: StepSettings
                ) -> tuple[list[Tensor], list[Tensor]]:
        out = super()._finish(done, hyper)
        present = done.flags[:len(self.curvatures)]
        for c, z, p in zip(self.curvatures, done.zs, present, strict=True):
            if p:
                self._states[c.block.weight][self.PREVIOUS] = z
        return out

    def arm(self, curvature_due: bool, settings: Callable[[], StepSettings]) -> None:
        self._launched = None
        if not self._lagging or not self.sends_gradients:
            super().arm(curvature_due, settings)
        elif curvature_due:
            # The corrections need the curvature this step rebuilds in step(): none early.
            self.buckets.arm(None)
        else:
            def early(units: Sequence[int]) -> list[list[Tensor]]:
                if self._launched is None:
                    self._launched = settings()
                return self._payloads(units, self._launched)
            self.buckets.arm(self._checked(early))

    def _fresh(self, hyper: StepSettings) -> bool:
        return self._launched is None or self._launched.damping == hyper.damping

    def unit_bytes(self) -> list[int]:
        dtype = self.config.distributed.buffer_dtype
        sizes = super().unit_bytes()
        for u, c in enumerate(self.curvatures):
            slot = sum(a * b for a, b in c.slot_shapes())
            sizes[u] += slot * (dtype or c.block.weight.dtype).itemsize
        return sizes

    def _slots(self, units: Sequence[int], hyper: StepSettings) -> list[list[Tensor]]:
        """Each unit's correction slot from the previous ``z`` in the coordinates of the
        previous step's ``D`` (its ``W`` is the current one); none for a fallback unit."""
        out: list[list[Tensor]] = []
        for u in units:
            if u >= len(self.curvatures):
                out.append([])
                continue
            c = self.curvatures[u]
            out.append(c.correction(_whiten_previous(self._previous(c),
                                                     self.diagonal.current(c.block.weight)),
                                    hyper.damping[id(c.block.weight)]))
        return out

    def _payloads(self, units: Sequence[int], hyper: StepSettings) -> list[list[Tensor]]:
        """Each unit's gradient and correction slot, sent together."""
        return [g + s for g, s in zip(self._gradients(units), self._slots(units, hyper),
                                      strict=True)]

    def _exchange(self, present: list[bool], ready: list[bool], hyper: StepSettings
                  ) -> Exchanged | None:
        if not self._lagging:
            return super()._exchange(present, ready, hyper)
        local = present + ready
        every = range(len(self.units))
        if self.sends_gradients:
            payloads, values = self._send(lambda units: self._payloads(units, hyper), local,
                                          hyper)
            gs, fgs = self._split(payloads)
            slots = [p[1:] for p in payloads[:len(self.curvatures)]]
        else:
            # The engine averaged the gradients (or one process): the corrections and flags
            # are the round.
            gs, fgs = self._split(self._gradients(every))
            slots = self._slots(every, hyper)[:len(self.curvatures)]
            flags = self.agreement.pack(local)
            if self.multi:
                self._allreduce(_flat(slots) + ([flags] if flags is not None else []),
                                "seng.step")
            values = self.agreement.decode(flags, local)
        averaged = self._averaged(gs, fgs, hyper)
        if averaged is None:
            return None
        return Exchanged(gs, slots, averaged, values, self._whitenings(gs, values[:len(gs)]))


def make_round(config: SENGConfig, curvatures: list[BlockCurvature],
               fallback: list[Tensor], comm: Communicator, *, grads_averaged: bool,
               state: ParamState, order: Sequence[Tensor] = ()) -> Round:
    """The round of ``config.distributed.variant``."""
    match config.distributed.variant:
        case "blockdiag":
            cls: type[Round] = BlockDiagonalRound
        case "lagged":
            cls = LaggedRound
        case other:
            raise ValueError(f"variant must be one of 'blockdiag', 'lagged', got {other!r}")
    return cls(config, curvatures, fallback, comm, grads_averaged=grads_averaged,
               state=state, order=order)


def _flat(slots: list[list[Tensor]]) -> list[Tensor]:
    return [t for slot in slots for t in slot]


def _whiten(z: Tensor, w: Tensor | None) -> Tensor:
    """``Wz`` (``z`` itself for ``λI``)."""
    return z if w is None else z * w


def _whiten_previous(z: Tensor | None, w: Tensor | None) -> Tensor | None:
    return None if z is None else _whiten(z, w)
