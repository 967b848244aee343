"""One class per distributed round: what goes into which collective, and the directions.

A :class:`Round` averages what must be averaged (gradients, corrections ``U_w b_w`` or eq.
28's partial factors, and the 0/1 flags that make every rank take the same decision) and hands
back every parameter's direction:

* :class:`BlockDiagonalRound` (eq. 26): ``ḡ`` in one collective, then the corrections of
  ``b_w = (λI + U_wᵀU_w)⁻¹ U_wᵀ ḡ`` in a second;
* :class:`LaggedRound` (eq. 27): ``b_w`` from the previous step's averaged gradient, so the
  gradient and the corrections travel in ONE round; its first step is block-diagonal, and a
  curvature step sends its corrections (which need the step's new curvature) in a second.

The gradient round honours DDP's contract: it finishes when the backward pass that completes
the step's accumulation ends, and writes the average into each ``.grad``, so whatever the user
does to ``.grad`` before ``step()`` (clipping, a GradScaler's unscaling and overflow check) acts
on the averaged gradient, on every rank alike, and ``step()`` reads ``.grad`` as it then is.
With ``overlap`` its buckets start during backward as the gradients arrive; without, it is one
collective at the end of the pass. It runs in ``step()`` only when no pass completed the
accumulation (gradients set by hand, or fewer passes than ``gradient_accumulation_steps``).
:func:`round_class` picks the class for the config's :class:`~seng_dist.config.Variant`. On
one process every collective is the identity and both are single-process SENG (lagged with its lag).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from . import solver
from .buckets import BucketPlan, Buckets, Payload, first_positions
from .comm import Communicator
from .config import SENGConfig, ShardState, Variant
from .curvature import BlockCurvature, ParamState
from .diagonal import make_diagonal
from .groups import StepSettings
from .layers import FALLBACK_RULE
from .passes import BackwardPasses
from .shards import ShardPlan, with_everywhere
from .warn import warn


class Agreement(Enum):
    """Which ranks have something (a gradient, curvature, an overflow): one flag of
    :class:`AgreementFlags` after the ranks averaged it, or this rank's own flag where nothing
    was averaged (:meth:`of`)."""

    ALL = "every rank"
    SOME = "some rank"
    NONE = "no rank"

    @classmethod
    def of(cls, value: bool) -> Agreement:
        """This rank's own flag, where it is the only rank that counts."""
        return cls.ALL if value else cls.NONE

    @property
    def anywhere(self) -> bool:
        """Whether some rank (or every rank) has it."""
        return self is not Agreement.NONE


@dataclass
class Exchanged:
    """A round's averaged result for the units whose directions this rank computes (all of
    them; with sharded state, those it owns): per block index ``z = ḡ + l2·θ`` and the damping
    diagonal's whitening ``W`` (None for ``λI``); per fallback index the (clipped) averaged
    gradient; every block's slot (averaged where this rank computes the direction); and every
    unit's agreed flags (``present`` per unit, then ``ready`` per block)."""

    zs: dict[int, Tensor]
    slots: list[list[Tensor]]
    fallback: dict[int, Tensor]
    flags: list[Agreement]
    whitenings: dict[int, Tensor | None]


@dataclass
class Agreed:
    """What the gradient round decided for the step. ``present``: per unit, which ranks have
    its gradient (this rank's own when ``local``, i.e. no gradient round ran: the engine
    averages, or one process). ``overflow``: some rank's GradScaler found an Inf/NaN.
    ``slots`` and ``ready``: the averaged corrections that travelled with the gradients
    (lagged) and, per block, which ranks could compute their own."""

    present: list[Agreement]
    local: bool
    overflow: bool = False
    slots: list[list[Tensor]] | None = None
    ready: list[Agreement] | None = None


class AgreementFlags:
    """0/1 flags averaged with a round, so that every rank takes the same decision (a block
    has a gradient, a block has curvature, a rank's GradScaler found an overflow) without a
    collective of its own. They travel as floats (a mean, in the round's buffer) and are
    decoded once into :class:`Agreement`.

    Each flag travels with its complement: "some rank" is a mean of the flags above 0 and
    "every rank" a mean of the complements equal to 0. Sums of non-negative numbers are 0 only
    when every term is, in any buffer dtype (a bf16 mean of 0/1 flags at hundreds of ranks
    cannot tell ``m-1`` from ``m``; these never need to).
    """

    def __init__(
        self, comm: Communicator, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> None:
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

    def decode(self, flags: Tensor | None, local: list[bool]) -> list[Agreement]:
        """The averaged ``flags`` of :meth:`pack` (``local`` itself when it gave None)."""
        if flags is None:
            return [Agreement.of(v) for v in local]
        n = len(local)
        some, missing = flags[:n].tolist(), flags[n:].tolist()
        return [
            Agreement.ALL if m == 0.0 else Agreement.SOME if s > 0.0 else Agreement.NONE
            for s, m in zip(some, missing, strict=True)
        ]


class Round(ABC):
    """The per-step exchange and the directions, for one variant.

    Args:
        config: the settings (clipping, non-finite skipping, the buffer dtype, overlap).
        curvatures: every preconditioned block's curvature.
        fallback: the trainable parameters outside the blocks (``d = -g/(1+λ)``, or the
            damping diagonal's rule).
        comm: the communicator.
        grads_averaged: the engine averages the gradients in backward (DDP,
            ``hvd.DistributedOptimizer``, the DeepSpeed engine): only corrections are sent.
        state: the per-parameter state mapping (the optimizer's ``state``).
        order: the model's parameters in registration order; backward makes their gradients
            ready roughly in reverse, which orders the buckets.
        passes: the backward passes; the gradient round listens to them (None: it runs in
            ``step()``).
        shards: the owners of the units of the round this one replaces (kept, with owners for
            units added since), so that sharded state stays where it is.
    """

    #: the name of the round that carries the gradients
    SENDS = "seng.grad"
    #: the name of the round of corrections computed in ``step()``
    CORRECTS = "seng.correction"

    def __init__(
        self,
        config: SENGConfig,
        curvatures: list[BlockCurvature],
        fallback: list[Tensor],
        comm: Communicator,
        *,
        grads_averaged: bool,
        state: ParamState,
        order: Sequence[Tensor] = (),
        passes: BackwardPasses | None = None,
        shards: ShardPlan | None = None,
    ) -> None:
        self.config = config
        self.curvatures = curvatures
        self.fallback = fallback
        self.comm = comm
        self.grads_averaged = grads_averaged
        self._param_state = state
        self.diagonal = make_diagonal(config.diagonal, state)
        first = curvatures[0].block.weight if curvatures else fallback[0]
        self.agreement = AgreementFlags(comm, first.device, first.dtype)
        self._warned: set[str] = set()
        #: per unit (each block, then each fallback parameter) its parameters
        self.units: list[list[Tensor]] = [list(c.block.params) for c in curvatures] + [
            [p] for p in fallback
        ]
        self.buckets, self.shards = self._buckets(order, shards)
        #: the units whose directions and updates this rank computes
        self.owned: frozenset[int] = frozenset(
            range(len(self.units)) if self.shards is None else self.shards.owned(comm.rank)
        )
        self.accumulation = config.gradient_accumulation_steps
        self.passes = passes
        #: the gradient round's outcome, once it ran for this step
        self.synced: Agreed | None = None
        self._payload: Payload = self._checked(self._gradients)
        if passes is not None and self.sends_gradients:
            passes.listeners.append(self)

    def _buckets(
        self, order: Sequence[Tensor], previous: ShardPlan | None
    ) -> tuple[Buckets, ShardPlan | None]:
        """The buckets of the round that carries the gradients (with ``overlap`` of
        ``bucket_size_mb`` in the order backward fills them, else one) and, with
        ``shard_state``, the units' owners: ``previous`` extended, or balanced per bucket."""
        dist = self.config.distributed
        sizes = self.unit_bytes()
        if dist.overlap and self.sends_gradients:
            first = first_positions(self.units, order)
            ready = sorted(range(len(self.units)), key=lambda u: -first[u])
            plan = BucketPlan.build(sizes, ready, int(dist.bucket_size_mb * 2**20))
        else:
            plan = BucketPlan.single(len(self.units))
        shards = None
        if self.multi and dist.shard_state is not ShardState.NONE:
            shards = (
                previous.extended(sizes)
                if previous is not None
                else ShardPlan.build(plan, sizes, self.comm.world_size)
            )
        scatter = dist.shard_state is ShardState.GRADIENTS and self.sends_gradients
        buckets = Buckets(
            plan,
            self.units,
            self.comm,
            name=self.SENDS,
            comm_dtype=dist.buffer_dtype,
            shards=shards if scatter else None,
        )
        return buckets, shards

    def unit_bytes(self) -> list[int]:
        """Each unit's payload in bytes in the buffer (its gradient's; the lagged round adds
        its correction slot)."""
        dtype = self.config.distributed.buffer_dtype
        return [
            sum(p.numel() for p in unit) * (dtype or solver.compute_dtype(unit[0].dtype)).itemsize
            for unit in self.units
        ]

    # ------------------------------------------------------------------ the backward passes
    def gradient(self, param: Tensor, passes: int) -> None:
        """A gradient arrived in pass ``passes + 1``: start the buckets it completes, once the
        pass is one that completes the accumulation."""
        self.synced = None  # a pass after the round: .grad is moving again
        self._refuse_extra_pass(passes + 1)
        if self.config.distributed.overlap and passes + 1 >= self.accumulation:
            self.buckets.gradient_ready(param, self._payload)

    def pass_ended(self, passes: int) -> None:
        """A pass ended: the round, if it completes the accumulation (or comes after it)."""
        if passes < self.accumulation:
            return
        self._refuse_extra_pass(passes)
        if passes > self.accumulation:
            self._warn_once(
                "extra",
                f"SENG: backward ran {passes} times before step() but "
                f"gradient_accumulation_steps={self.accumulation}: the gradients "
                f"are averaged again after each pass past the {self.accumulation}"
                "th (correct, one more round each). Set "
                "gradient_accumulation_steps to the backward passes per step to "
                "average once",
            )
        self.synced = self._sync(overflow=False)

    def window_opened(self) -> None:
        """The gradients were cleared: the next pass starts a new step."""
        self.synced = None

    def _refuse_extra_pass(self, passes: int) -> None:
        """``ValueError`` (before any of its collectives, on every rank alike) for a pass past
        the accumulation when the round freed the gradients of other ranks' units."""
        if passes > self.accumulation and self.buckets.shards is not None:
            raise ValueError(
                f"SENG: backward ran {passes} times before step() but "
                f"gradient_accumulation_steps={self.accumulation}. With "
                "shard_state='gradients' the round after the last pass left each rank the "
                "averaged gradients of its own layers only (the others' .grad were freed), "
                "so a further pass cannot be added to them. Set "
                "gradient_accumulation_steps to the backward passes per step"
            )

    def arm(self, curvature_due: bool, settings: Callable[[], StepSettings]) -> None:
        """Set up the coming step's gradient round: called after every step (and whenever the
        state changed), with whether the schedule rebuilds the curvature at that step (the
        same on every rank) and how to get the step's settings (a callable: read when the
        first payload is computed)."""
        self._payload = self._checked(self._gradients)

    def _checked(self, payload: Payload) -> Payload:
        """``payload`` after ``step()``'s checks of its units' parameters (a sparse gradient is
        refused with SENG's message in backward too)."""

        def run(units: Sequence[int]) -> list[list[Tensor]]:
            for u in units:
                self._check(self.units[u])
            return payload(units)

        return run

    def close(self) -> None:
        """Stop listening to the backward passes (the round is being replaced)."""
        if self.passes is not None and self in self.passes.listeners:
            self.passes.listeners.remove(self)

    def _gradients(self, units: Sequence[int]) -> list[list[Tensor]]:
        """Each unit's gradient as a new tensor (a block's as its matrix; a missing one as
        zeros): the round overwrites them with their means."""
        nb = len(self.curvatures)
        out: list[list[Tensor]] = []
        for u in units:
            if u < nb:
                out.append([self.curvatures[u].block.grad_matrix()])
            else:
                p = self.fallback[u - nb]
                dtype = solver.compute_dtype(p.dtype)
                out.append(
                    [
                        p.new_zeros(p.shape, dtype=dtype)
                        if p.grad is None
                        else p.grad.to(dtype, copy=True)
                    ]
                )
        return out

    def _sync(self, overflow: bool) -> Agreed:
        """The gradient round: every bucket not started yet, the flags (each unit's
        gradient, each block's readiness when its correction travels here, a GradScaler's
        overflow) in the last; then the averages into ``.grad`` of every unit some rank has a
        gradient for (with sharded gradients: of this rank's units, the others' freed)."""
        present = [any(p.grad is not None for p in unit) for unit in self.units]
        # Each block's readiness travels here only with the corrections it vouches for.
        ready = self._ready() if self._slots_sent else []
        scattered = self.buckets.shards is not None
        # Sharded gradients: whether this rank's own gradients hold an Inf/NaN (set below,
        # as a tensor: read with the other flags, without a host sync of its own).
        local = present + ready + [overflow] + ([False] if scattered else [])
        flags = self.agreement.pack(local)
        if scattered and flags is not None:
            bad = self._nonfinite()
            flags[len(local) - 1], flags[-1] = bad, 1.0 - bad
        payloads = self.buckets.finish(self._payload, flags)
        values = self.agreement.decode(flags, local)
        nu, nb = len(self.units), len(self.curvatures)
        agreed = values[:nu]
        with torch.no_grad():
            for u, (payload, some) in enumerate(zip(payloads, agreed, strict=True)):
                if scattered and u not in self.owned:
                    # Its owner holds the average: this rank's share of the memory goes.
                    for p in self.units[u]:
                        p.grad = None
                elif some.anywhere:
                    _write_grads(self.units[u], self._split_unit(u, payload[0]))
        if scattered:
            kept = [p for u in sorted(self.owned) for p in self.units[u] if p.grad is not None]
            if values[-1].anywhere and kept:
                # Some rank's gradient overflowed, so the average is not finite: say so in
                # every rank's shard, so that a GradScaler on each rank (which reads only its
                # own shard) finds it and every rank skips and backs off alike.
                torch._foreach_mul_([g for p in kept if (g := p.grad) is not None], float("nan"))
            if self.passes is not None:
                self.passes.rest_on(kept[0] if kept else None)
            values = values[:-1]
        overflow = values[-1].anywhere
        if not self._slots_sent:
            return Agreed(agreed, local=False, overflow=overflow)
        return Agreed(
            agreed,
            local=False,
            overflow=overflow,
            slots=[p[1:] for p in payloads[:nb]],
            ready=values[nu : nu + nb],
        )

    def _nonfinite(self) -> Tensor:
        """1.0 when one of this rank's gradients holds an Inf or NaN, else 0.0 (no host
        sync; their norms in float32, where a float16 gradient's norm cannot overflow)."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for unit in self.units:
            for p in unit:
                if p.grad is not None:
                    by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        norms = [
            n.to(self.agreement.dtype)
            for dtype, grads in by_dtype.items()
            for n in torch._foreach_norm(grads, 2, dtype=torch.promote_types(dtype, torch.float32))
        ]
        if not norms:
            return torch.zeros((), dtype=self.agreement.dtype, device=self.agreement.device)
        return torch.stack(norms).isfinite().all().logical_not().to(self.agreement.dtype)

    def _split_unit(self, u: int, gradient: Tensor) -> list[Tensor]:
        """Unit ``u``'s averaged gradient as one tensor per parameter."""
        if u < len(self.curvatures):
            return self.curvatures[u].block.split(gradient)
        return [gradient]

    @property
    def _slots_sent(self) -> bool:
        """Whether the gradient round's payloads carry the corrections (never here)."""
        return False

    def agree(self, overflow: bool) -> Agreed:
        """The gradient round's decisions for the step, running the round now if no backward
        pass did (``overflow``: this rank's GradScaler found an Inf/NaN; every rank's counts).
        Without a gradient round (the engine averages, or one process) this rank's own view."""
        self._check_gradients()
        if not self.sends_gradients:
            return Agreed(
                [Agreement.of(any(p.grad is not None for p in unit)) for unit in self.units],
                local=True,
                overflow=overflow,
            )
        if self.synced is None:
            done = self.passes.in_window if self.passes is not None else 0
            if 0 < done < self.accumulation:
                self._warn_once(
                    "short",
                    f"SENG: step() came after {done} backward pass(es) "
                    f"but gradient_accumulation_steps={self.accumulation}: the "
                    "gradients were averaged in step(), so what changed .grad "
                    "after backward (clipping, unscaling) acted on this rank's "
                    "gradients alone. Set gradient_accumulation_steps to the "
                    "backward passes per step",
                )
            self.synced = self._sync(overflow)
            return self.synced
        # .grad held the averaged gradient when the overflow was checked: every rank agrees.
        self.synced.overflow = self.synced.overflow or overflow
        return self.synced

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(message)

    @property
    def multi(self) -> bool:
        """Whether there are other ranks to average with."""
        return self.comm.world_size > 1

    @property
    def sends_gradients(self) -> bool:
        """Whether this round averages the gradients (not already done by the engine)."""
        return self.multi and not self.grads_averaged

    def directions(
        self, hyper: StepSettings, agreed: Agreed
    ) -> tuple[list[Tensor], list[Tensor]] | None:
        """Every parameter with a gradient (on some rank) and its direction from ``.grad``
        (averaged), running the step's correction round; None when ``skip_nonfinite`` and
        ``ḡ`` is not finite.

        ``hyper`` gives each parameter's damping and the L2 weight decay added to the averaged
        gradient before preconditioning; ``agreed`` is :meth:`agree`'s result.
        """
        nb = len(self.curvatures)
        gs = {u: c.block.grad_matrix() for u, c in enumerate(self.curvatures) if u in self.owned}
        fgs = {
            i: p.new_zeros(p.shape, dtype=solver.compute_dtype(p.dtype))
            if p.grad is None
            else p.grad.to(solver.compute_dtype(p.dtype))
            for i, p in enumerate(self.fallback)
            if nb + i in self.owned
        }
        done = self._exchange(gs, fgs, agreed, hyper)
        return None if done is None else self._finish(done, hyper)

    def _check_gradients(self) -> None:
        """Refuse sparse gradients; say once that parameters were frozen after construction."""
        for c in self.curvatures:
            self._check(c.block.params)
        self._check(self.fallback)

    def _check(self, params: Sequence[Tensor]) -> None:
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    "SENG does not support sparse gradients (use nn.Embedding(sparse=False))"
                )
            if not p.requires_grad and "<frozen>" not in self._warned:
                self._warned.add("<frozen>")
                warn(
                    "SENG: parameters were frozen (requires_grad=False) after the optimizer "
                    "was built; they get no gradient and stay unchanged, but their layers' "
                    "curvature is kept. Build SENG after freezing (or pass skip_layers) to "
                    "leave them out"
                )

    @abstractmethod
    def _exchange(
        self, gs: dict[int, Tensor], fgs: dict[int, Tensor], agreed: Agreed, hyper: StepSettings
    ) -> Exchanged | None:
        """The step's corrections for the averaged gradients ``gs`` (blocks) and ``fgs``
        (fallback) of the units this rank computes, with their collectives and flags."""

    def _ready(self) -> list[bool]:
        """Per block, whether this rank can precondition it this step."""
        return [c.ready for c in self.curvatures]

    def _corrected(
        self, slots: list[list[Tensor]], agreed: Agreed
    ) -> tuple[list[Agreement], list[Agreement]]:
        """The correction round: ``slots`` averaged in place with the flags still to agree on
        (each block's readiness; each unit's gradient too when no gradient round ran).
        Returns the agreed ``present`` and ``ready``."""
        mine = self._ready()
        local = ([v.anywhere for v in agreed.present] if agreed.local else []) + mine
        flags = self.agreement.pack(local)
        shared = [flags] if flags is not None else []
        dtype = self.config.distributed.buffer_dtype
        if self.multi and self.shards is not None:
            # Each owner receives the mean of its blocks' slots (and every rank the flags).
            segments = with_everywhere(self.shards.segments(range(len(slots)), slots), shared)
            self.comm.reduce_scatter_mean_async_(
                segments, name=self.CORRECTS, comm_dtype=dtype
            ).wait()
        elif self.multi:
            self._allreduce(_flat(slots) + shared, self.CORRECTS)
        values = self.agreement.decode(flags, local)
        if agreed.local:
            n = len(self.units)
            return values[:n], values[n:]
        return agreed.present, values

    def _missing(self, curvature: BlockCurvature) -> str:
        """Why a block has no agreed curvature, for the warning."""
        if not curvature.ready:
            return "it was not called with gradients on a curvature step"
        return "it has curvature here but not on every rank"

    def _averaged(
        self, gs: dict[int, Tensor], fgs: dict[int, Tensor], hyper: StepSettings
    ) -> dict[int, Tensor] | None:
        """After ``ḡ`` is known: None if it must be skipped (``skip_nonfinite``; every rank
        sees the same ``ḡ``, so every rank skips together); else clip it to
        ``max_grad_norm`` (no host sync) and add ``l2·θ`` to the block gradients in place (the
        weight's and the bias's own L2 when their groups differ).
        Returns the fallback gradients (new tensors when clipped: they may be ``.grad``).
        With sharded state each rank holds its own units' ``ḡ``: the norm's square and the
        non-finite check are summed over the ranks (one small collective)."""
        grads = list(gs.values()) + list(fgs.values())
        max_norm, skip = self.config.max_grad_norm, self.config.skip_nonfinite
        norm: Tensor | None = None
        if self.shards is not None and (skip or max_norm is not None):
            dtype = self.agreement.dtype
            squares = (
                torch.stack(torch._foreach_norm(grads)).to(dtype).square().sum()
                if grads
                else torch.zeros((), dtype=dtype, device=self.agreement.device)
            )
            # an Inf or NaN anywhere makes the sum of squares non-finite (no host sync here)
            stats = torch.stack([squares, squares.isfinite().logical_not().to(dtype)])
            self.comm.allreduce_mean_(list(stats.split(1)), name="seng.norm")
            # (a mean of the ranks' sums: times the ranks, it is the sum)
            total, bad_ranks = (stats * self.comm.world_size).unbind()
            if skip and bool(bad_ranks > 0):
                return None
            norm = total.sqrt()
        elif skip and not solver.all_finite(grads):
            return None
        elif max_norm is not None and grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if max_norm is not None and norm is not None:
            factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            if gs:
                torch._foreach_mul_(list(gs.values()), factor)
            if fgs:
                fgs = dict(zip(fgs, torch._foreach_mul(list(fgs.values()), factor), strict=True))
        for u, g in gs.items():
            b = self.curvatures[u].block
            b.add_params_(
                g, hyper.l2[id(b.weight)], hyper.l2[id(b.bias)] if b.bias is not None else 0.0
            )
        return fgs

    def _allreduce(self, tensors: list[Tensor], name: str) -> None:
        self.comm.allreduce_mean_(
            tensors, name=name, comm_dtype=self.config.distributed.buffer_dtype
        )

    def _finish(self, done: Exchanged, hyper: StepSettings) -> tuple[list[Tensor], list[Tensor]]:
        """Every present parameter's direction from the averaged result."""
        nb, nf = len(self.curvatures), len(self.fallback)
        present, ready = done.flags[: nb + nf], done.flags[nb + nf :]
        params: list[Tensor] = []
        dirs: list[Tensor] = []
        for i, z in sorted(done.zs.items()):
            c = self.curvatures[i]
            if present[i] is Agreement.NONE:
                continue
            damping = hyper.damping[id(c.block.weight)]
            w = done.whitenings[i]
            if ready[i] is Agreement.ALL:
                # In D's coordinates: d = W (Ũb - Wz)/λ (docs/design.md).
                d = solver.direction(_whiten(z, w), c.combine(done.slots[i]), damping)
                if w is not None:
                    d.mul_(w)
            else:
                self._warn_no_curvature(c)
                d = self.diagonal.without_curvature(z, w, damping)
            params.extend(c.block.params)
            dirs.extend(c.block.split(d))
        # The fallback rule, fused over the parameters that share damping and L2.
        alike: dict[tuple[float, float], list[tuple[Tensor, Tensor]]] = {}
        for i, g in sorted(done.fallback.items()):
            p = self.fallback[i]
            if present[nb + i].anywhere:
                alike.setdefault((hyper.damping[id(p)], hyper.l2[id(p)]), []).append((p, g))
        for (damping, l2), kept in alike.items():
            fps, grads = [p for p, _ in kept], [g for _, g in kept]
            if l2:
                grads = list(torch._foreach_add(grads, fps, alpha=l2))
            dirs.extend(self.diagonal.fallback(fps, grads, damping))
            params.extend(fps)
        return params, dirs

    # ------------------------------------------------------------------ sharded state
    def publish(self) -> None:
        """With sharded state, once the owners updated their units: every rank takes each
        unit's parameters from its owner, and what the variant keeps on every rank, in one
        all-gather."""
        if self.shards is None:
            return
        params = self.shards.segments(
            range(len(self.units)), [[p.detach() for p in unit] for unit in self.units]
        )
        extra, keep = self._published()
        self.comm.allgather_segments_(
            [a + b for a, b in zip(params, extra, strict=True)], name="seng.params"
        )
        keep()

    def _published(self) -> tuple[list[list[Tensor]], Callable[[], None]]:
        """Per rank, what travels with its parameters, and what to do once it arrived."""
        return [[] for _ in range(self.comm.world_size)], lambda: None

    def adopt_state(self) -> None:
        """A whole state was loaded (every unit's): with sharded state each rank keeps its own
        units' part, and every block's curvature (each rank's own)."""
        if self.shards is None:
            return
        nb = len(self.curvatures)
        for u, unit in enumerate(self.units):
            if u in self.owned:
                continue
            kept = self.curvatures[u].KEYS if u < nb else ()
            for p in unit:
                entries = self._param_state.get(p)
                if entries is None:
                    continue
                for key in [k for k in entries if k not in kept]:
                    del entries[key]
                if not entries:
                    del self._param_state[p]

    def rebuild_whitening(self, everywhere: bool) -> Callable[[Tensor], Tensor | None] | None:
        """How a curvature rebuild reads each block's ``W`` (by its weight), or None when this
        rank cannot rebuild now. With sharded state and a damping diagonal ``W`` lives with
        the block's owner: it is all-gathered (one collective) on steps where every rank
        rebuilds (``everywhere``, the same on every rank); a rebuild of this rank's alone
        waits for the next such step."""
        if self.shards is None or not self.diagonal.whitens:
            return self.diagonal.current
        if not everywhere:
            return None
        owned: dict[int, Tensor] = {}
        for u, c in enumerate(self.curvatures):
            w = self.diagonal.current(c.block.weight) if u in self.owned else None
            if w is not None:
                owned[u] = w
        segments, read = self._block_segments(owned)
        self.comm.allgather_segments_(segments, name="seng.whitening")
        table = {id(c.block.weight): w for c, w in zip(self.curvatures, read(), strict=True)}
        return lambda weight: table[id(weight)]

    def _block_segments(
        self, values: dict[int, Tensor]
    ) -> tuple[list[list[Tensor]], Callable[[], list[Tensor | None]]]:
        """Per-rank segments of an all-gather that carries blocks' ``(n_G, n_A)`` ``values``
        (this rank's: those of blocks it owns that have one) from their owners, with a 0/1
        flag per block; and the function that reads every block's value (None where its
        owner had none) once the all-gather ran."""
        assert self.shards is not None
        blocks = [c.block for c in self.curvatures]
        buffers = [
            values[u] if u in values else b.weight.new_zeros(b.n_G, b.n_A, dtype=b.compute_dtype)
            for u, b in enumerate(blocks)
        ]
        have = torch.tensor(
            [float(u in values) for u in range(len(blocks))],
            dtype=self.agreement.dtype,
            device=self.agreement.device,
        )
        segments = self.shards.segments(
            range(len(blocks)), [[buf, have[u : u + 1]] for u, buf in enumerate(buffers)]
        )

        def read() -> list[Tensor | None]:
            return [buf if flag else None for buf, flag in zip(buffers, have.tolist(), strict=True)]

        return segments, read

    def _warn_no_curvature(self, curvature: BlockCurvature) -> None:
        name = curvature.block.name
        if name not in self._warned:
            self._warned.add(name)
            warn(
                f"SENG: layer {name!r} has no curvature yet ({self._missing(curvature)}); it "
                f"follows the fallback rule {FALLBACK_RULE} until it has"
            )


class BlockDiagonalRound(Round):
    """eq. 26: ``d = -(ḡ - mean_w U_w b_w)/λ`` with ``b_w`` from ``ḡ``; two collectives."""

    def _exchange(
        self, gs: dict[int, Tensor], fgs: dict[int, Tensor], agreed: Agreed, hyper: StepSettings
    ) -> Exchanged | None:
        averaged = self._averaged(gs, fgs, hyper)
        if averaged is None:
            return None
        nb = len(self.curvatures)
        here = agreed.present[:nb]
        ws = self._whitenings(gs, here)
        whitened = self._everywhere({u: _whiten(z, ws[u]) for u, z in gs.items()}, here)
        slots = [
            c.correction(q, hyper.damping[id(c.block.weight)])
            for c, q in zip(self.curvatures, whitened, strict=True)
        ]
        present, ready = self._corrected(slots, agreed)
        return Exchanged(gs, slots, averaged, present + ready, ws)

    def _whitenings(
        self, zs: dict[int, Tensor], present: Sequence[Agreement]
    ) -> dict[int, Tensor | None]:
        """Each present block's ``W`` after folding in its averaged ``z`` (every rank that
        computes a block folds the same ``z``)."""
        return {
            u: self.diagonal.update(self.curvatures[u].block.weight, z)
            if present[u].anywhere
            else None
            for u, z in zs.items()
        }

    def _everywhere(
        self, qs: dict[int, Tensor], present: Sequence[Agreement]
    ) -> list[Tensor | None]:
        """Every present block's whitened ``Wz`` on every rank (each rank's correction needs
        all of them): with sharded state their owners all-gather them (one collective)."""
        if self.shards is None:
            return [qs[u] if h.anywhere else None for u, h in enumerate(present)]
        segments, read = self._block_segments({u: q for u, q in qs.items() if present[u].anywhere})
        self.comm.allgather_segments_(segments, name="seng.whitened")
        return read()


class LaggedRound(BlockDiagonalRound):
    """eq. 27: ``b_w`` from the previous step's averaged ``z``, so the gradient, the
    corrections and the flags travel in ONE round (one collective, or the buckets of one
    round when overlapped). The first step (no previous ``z`` yet) is block-diagonal; a
    curvature step, or a step whose corrections went stale between backward and ``step()``
    (its damping changed, or state was loaded), sends its corrections in a second round. The
    previous ``z`` is kept in each block weight's state as ``PREVIOUS`` (it is part of the
    checkpoint)."""

    PREVIOUS = "prev_g"
    SENDS = "seng.step"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: with sharded state: every block's whitened previous ``W z`` (None: none yet), the
        #: same on every rank (its owner all-gathers it with the parameters)
        self._whitened: list[Tensor | None] = [None] * len(self.curvatures)
        #: the settings the step's early corrections were computed with (None: none were)
        self._launched: StepSettings | None = None
        #: whether the payload carries the corrections
        self._with_slots = False
        #: the corrections that travelled with the gradients no longer hold
        self._stale = False

    def _previous(self, curvature: BlockCurvature) -> Tensor | None:
        prev: Tensor | None = self._param_state.get(curvature.block.weight, {}).get(self.PREVIOUS)
        return prev

    def _has_prior(self, u: int) -> bool:
        """Whether block ``u`` has a previous averaged gradient (on every rank alike)."""
        if self.shards is not None:
            return self._whitened[u] is not None
        return self._previous(self.curvatures[u]) is not None

    def _prior(self, u: int) -> Tensor | None:
        """Block ``u``'s previous ``z`` in the coordinates of the previous step's ``D``
        (its ``W`` is the current one)."""
        if self.shards is not None:
            return self._whitened[u]
        c = self.curvatures[u]
        return _whiten_previous(self._previous(c), self.diagonal.current(c.block.weight))

    @property
    def _lagging(self) -> bool:
        return any(self._has_prior(u) for u in range(len(self.curvatures)))

    def _ready(self) -> list[bool]:
        lagging = self._lagging
        return [
            c.ready and (not lagging or self._has_prior(u)) for u, c in enumerate(self.curvatures)
        ]

    def _missing(self, curvature: BlockCurvature) -> str:
        u = self.curvatures.index(curvature)
        if curvature.ready and self._lagging and not self._has_prior(u):
            return "the lagged variant has no previous averaged gradient for it yet"
        return super()._missing(curvature)

    def _finish(self, done: Exchanged, hyper: StepSettings) -> tuple[list[Tensor], list[Tensor]]:
        out = super()._finish(done, hyper)
        present = done.flags[: len(self.curvatures)]
        for u, z in done.zs.items():
            if present[u].anywhere:
                self._param_state[self.curvatures[u].block.weight][self.PREVIOUS] = z
                if self.shards is not None:
                    self._whitened[u] = _whiten(z, done.whitenings[u])
        return out

    def _published(self) -> tuple[list[list[Tensor]], Callable[[], None]]:
        # Every block's whitened z from its owner: the next step's corrections need them all.
        segments, read = self._block_segments(
            {u: q for u, q in enumerate(self._whitened) if q is not None and u in self.owned}
        )

        def keep() -> None:
            self._whitened = read()

        return segments, keep

    def adopt_state(self) -> None:
        if self.shards is not None:
            # Every rank holds the whole loaded state for a moment: each whitens every block's
            # previous gradient now, as its owner would have sent it.
            self._whitened = [
                _whiten_previous(self._previous(c), self.diagonal.current(c.block.weight))
                for c in self.curvatures
            ]
        super().adopt_state()

    def arm(self, curvature_due: bool, settings: Callable[[], StepSettings]) -> None:
        if self.synced is not None:
            # State loaded between backward and step(): the gradients in .grad still hold,
            # the corrections sent with them may not.
            self._stale = True
            return
        self._launched = None
        self._stale = False
        # A curvature step's corrections need the curvature it rebuilds in step().
        self._with_slots = self.sends_gradients and self._lagging and not curvature_due
        if not self._with_slots:
            super().arm(curvature_due, settings)
            return

        def early(units: Sequence[int]) -> list[list[Tensor]]:
            if self._launched is None:
                self._launched = settings()
            return self._payloads(units, self._launched)

        self._payload = self._checked(early)

    def window_opened(self) -> None:
        super().window_opened()
        self._stale = False

    def unit_bytes(self) -> list[int]:
        dtype = self.config.distributed.buffer_dtype
        sizes = super().unit_bytes()
        for u, c in enumerate(self.curvatures):
            slot = sum(a * b for a, b in c.slot_shapes())
            sizes[u] += slot * (dtype or c.block.compute_dtype).itemsize
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
            out.append(c.correction(self._prior(u), hyper.damping[id(c.block.weight)]))
        return out

    def _payloads(self, units: Sequence[int], hyper: StepSettings) -> list[list[Tensor]]:
        """Each unit's gradient and correction slot, sent together."""
        return [
            g + s for g, s in zip(self._gradients(units), self._slots(units, hyper), strict=True)
        ]

    @property
    def _slots_sent(self) -> bool:
        return self._with_slots

    def _exchange(
        self, gs: dict[int, Tensor], fgs: dict[int, Tensor], agreed: Agreed, hyper: StepSettings
    ) -> Exchanged | None:
        if not self._lagging:
            return super()._exchange(gs, fgs, agreed, hyper)
        averaged = self._averaged(gs, fgs, hyper)
        if averaged is None:
            return None
        sent, ready_sent = agreed.slots, agreed.ready
        if (
            sent is not None
            and ready_sent is not None
            and not self._stale
            and self._launched is not None
            and self._launched.damping == hyper.damping
        ):
            slots, present, ready = sent, agreed.present, ready_sent
        else:
            # The engine averaged the gradients (or one process), a curvature step, or stale
            # corrections: the corrections and flags are a round of their own.
            slots = self._slots(range(len(self.curvatures)), hyper)
            present, ready = self._corrected(slots, agreed)
        nb = len(self.curvatures)
        return Exchanged(gs, slots, averaged, present + ready, self._whitenings(gs, present[:nb]))


def round_class(variant: Variant) -> type[Round]:
    """The class that implements ``variant`` (mypy checks that every variant has one)."""
    match variant:
        case Variant.BLOCKDIAG:
            return BlockDiagonalRound
        case Variant.LAGGED:
            return LaggedRound


def _flat(slots: list[list[Tensor]]) -> list[Tensor]:
    return [t for slot in slots for t in slot]


def _whiten(z: Tensor, w: Tensor | None) -> Tensor:
    """``Wz`` (``z`` itself for ``λI``)."""
    return z if w is None else z * w


def _whiten_previous(z: Tensor | None, w: Tensor | None) -> Tensor | None:
    return None if z is None else _whiten(z, w)


def _write_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    """Put each averaged gradient in its parameter's ``.grad`` (in place where there is one,
    as DDP does, so references to it see the average)."""
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.reshape(p.shape).contiguous()
        else:
            p.grad.copy_(g.reshape(p.shape))
