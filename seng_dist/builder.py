"""When and from what the curvature is rebuilt: capture arming and per-sample factors.

:class:`CurvatureBuilder` owns the capture hooks, the sketch generator and every block's
:class:`~seng_dist.curvature.BlockCurvature`. It arms the hooks only before a curvature step
(``step % T == 0``, or a rebuild that was asked for) and, at that step, rebuilds each block from
the captured pass. It never communicates: a one-process emulation of distributed SENG uses it as
it is (:mod:`seng_dist.reference`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import fisher
from .capture import Capture
from .config import Fisher, SENGConfig, resolve
from .curvature import BlockCurvature, ParamState, make_curvature
from .layers import Block, PerSample
from .passes import BackwardPasses


@dataclass(frozen=True)
class Rebuilt:
    """What one curvature step did: whether any block was rebuilt, and how many refused
    non-finite factors."""

    updated: bool
    skipped: int


class CurvatureBuilder:
    """Builds and rebuilds the curvature of ``blocks`` from captured forward/backward passes.

    Args:
        passes: the backward passes (a pass's end starts a fresh capture; the passes in the
            step's window are its micro-batches).
        blocks: the preconditioned layers.
        config: the settings (sketching, ``T``, ``ϱ``, loss reduction, accumulation, seed).
        state: the per-parameter state mapping the blocks' tensors live in (the optimizer's
            ``state``; a ``defaultdict(dict)`` outside an optimizer).
        rank: this process's rank, for messages.
    """

    def __init__(
        self,
        passes: BackwardPasses,
        blocks: list[Block],
        config: SENGConfig,
        state: ParamState,
        rank: int = 0,
    ) -> None:
        self.config = config
        self.rank = rank
        self.generator = torch.Generator().manual_seed(config.seed)
        self.curvatures: list[BlockCurvature] = [
            make_curvature(b, state, config.sketch, self.generator) for b in blocks
        ]
        #: the hooks that record each block's inputs and output gradients
        self.capture = Capture(blocks, passes)
        self.passes = passes
        self._rebuild_next = False
        #: the rebuild asked for by :meth:`drop` happens on every rank at once
        self._rebuild_all = False

    @property
    def armed(self) -> bool:
        """Whether the hooks are capturing for the coming step."""
        return self.capture.armed

    def idle(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether this is a curvature step on which no backward pass ran since the last step
        and every gradient of ``params`` is zero: ``hvd.broadcast_optimizer_state``'s dummy
        step, which must not use up the curvature update. Free on other steps; one host sync
        on that one."""
        if not self.armed or self.passes.in_window:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        return bool(grads) and not bool(torch.stack([g.abs().sum() for g in grads]).any())

    def scheduled(self, step: int) -> bool:
        """Whether ``step`` rebuilds the curvature by the schedule (``step % T == 0``), the
        same on every rank (a rebuild asked for by :meth:`drop` may be this rank's alone)."""
        return step % resolve(self.config, "curvature_update_interval", step) == 0

    def arm_for(self, step: int) -> None:
        """Install the capture hooks iff ``step`` is a curvature step."""
        if self.scheduled(step) or self._rebuild_next:
            self.capture.arm(self.config.curvature_batch_size)
        else:
            self.capture.disarm()

    def close(self) -> None:
        """Take the capture hooks off the model for good (the optimizer was retired)."""
        self.capture.disarm()

    def drop(self, everywhere: bool) -> None:
        """Forget every block's curvature and rebuild it at the next step (``everywhere``:
        every rank drops its own now, as on a resume on another number of ranks)."""
        for c in self.curvatures:
            c.clear()
        self._rebuild_next = True
        self._rebuild_all = everywhere
        self.capture.arm(self.config.curvature_batch_size)

    def rebuilds_everywhere(self, step: int) -> bool:
        """Whether every rank rebuilds its curvature at ``step`` (the same on every rank)."""
        return self.scheduled(step) or self._rebuild_all

    def postpone(self) -> Rebuilt:
        """Leave an asked-for rebuild to the next scheduled curvature step (see
        :meth:`~seng_dist.rounds.Round.rebuild_whitening`); its blocks follow the rule
        without curvature until then."""
        self.capture.disarm()
        self._rebuild_next = False
        return Rebuilt(updated=False, skipped=0)

    def sample(
        self, output: Tensor, distribution: fisher.Distribution, reduction: str
    ) -> Tensor | None:
        """On a curvature step, the captured output gradients of this micro-batch from the
        negative log-likelihood of targets drawn for the curvature batch's rows of ``output``
        (:mod:`seng_dist.fisher`); returns those targets (batch first), or None on another
        step."""
        if not self.armed or not self.capture.records:
            return None
        rows = output if self.config.batch_first else output.transpose(0, 1)
        rows = rows[: self.config.curvature_batch_size]
        target = fisher.draw(rows, distribution, self.generator)
        with torch.enable_grad():
            loss = fisher.per_sample_loss(rows, target, distribution, reduction).sum()
        self.capture.sample(loss)
        return target

    def refresh(
        self, loss_scale: float = 1.0, whitening: Callable[[Tensor], Tensor | None] | None = None
    ) -> Rebuilt:
        """On a curvature step (hooks armed), rebuild every block that was called with
        gradients from the captured pass, then disarm; otherwise do nothing.

        ``loss_scale`` is the scale a ``GradScaler`` put on the captured output gradients;
        ``whitening`` gives a block's ``W`` (by its weight) for a curvature kept in the damping
        diagonal's coordinates (:mod:`seng_dist.diagonal`).
        """
        if not self.armed:
            return Rebuilt(updated=False, skipped=0)
        self._check_batch_sizes()
        updated, skipped = False, 0
        for curvature in self.curvatures:
            sample = self._per_sample(curvature.block, loss_scale)
            if sample is None:
                continue
            w = whitening(curvature.block.weight) if whitening is not None else None
            if curvature.rebuild(sample, w):
                updated = True
            else:
                skipped += 1
        self.capture.disarm()
        self._rebuild_next = self._rebuild_all = False
        return Rebuilt(updated=updated, skipped=skipped)

    def _check_batch_sizes(self) -> None:
        """Every block of one forward saw the same batch: else a layer's batch dimension was
        misread (a sequence-first model), which would silently take time steps for samples."""
        sizes = {
            b.name: rec.batch_sizes for b, rec in self.capture.records.items() if rec.complete()
        }
        if len(set().union(*sizes.values())) > 1:
            listed = ", ".join(
                f"{name!r}: {', '.join(map(str, sorted(n)))}" for name, n in sizes.items()
            )
            raise ValueError(
                f"SENG: on rank {self.rank} the preconditioned layers saw different batch "
                f"sizes in one forward ({listed}). A layer whose input has the batch second "
                "(a sequence-first model, as nn.Transformer* modules with batch_first=False) "
                "needs batch_first=False in SENG's settings, unless a module around it "
                "declares batch_first; a layer that really sees another batch can be named in "
                "skip_layers"
            )

    def _per_sample(self, block: Block, loss_scale: float) -> PerSample | None:
        """``block``'s captured calls and their scale, or None if it was not called with
        gradients."""
        rec = self.capture.records.get(block)
        if rec is None or not rec.complete():
            return None
        if 0 in rec.batch_sizes:
            raise ValueError(
                f"SENG: the local batch on rank {self.rank} is empty on a "
                f"curvature step (layer {block.name!r}); every rank needs at least "
                "one sample per step (drop_last=True in the DataLoader or "
                "DistributedSampler)"
            )
        if self.config.fisher is Fisher.MC:
            if not rec.sampled:
                raise ValueError(
                    f"SENG: fisher='mc' but no opt.sample_fisher(output, distribution) came "
                    f"between the forward and backward() of this curvature step (layer "
                    f"{block.name!r}, rank {self.rank}); call it after every forward, or set "
                    "fisher='empirical'"
                )
            # Gradients of each sample's own negative log-likelihood: no scale to undo.
            return PerSample(block, rec.calls(), 1.0)
        # The captured gradients are those of loss/accumulation over the last micro-batch: the
        # accumulation is the passes SENG saw (told or not), or the setting's when gradients
        # came without a backward pass it saw.
        passes = self.passes.in_window or self.config.gradient_accumulation_steps
        scale = float(passes) / loss_scale
        if self.config.loss_reduction == "mean":
            scale *= next(iter(rec.batch_sizes))
        return PerSample(block, rec.calls(), scale)
