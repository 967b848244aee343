"""The SENG optimizer: it orchestrates one step (see ``docs/design.md`` for the module map).

The step counter, empty steps, param groups and the order of a step live here; capture arming
is :class:`~seng_dist.builder.CurvatureBuilder`'s, the round :mod:`seng_dist.rounds`', the
update :mod:`seng_dist.update`'s, the checkpoint's parts :mod:`seng_dist.checkpoint`'s and the
per-block math :mod:`seng_dist.curvature`'s and :mod:`seng_dist.solver`'s.
"""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.weak import WeakIdKeyDictionary

from .builder import CurvatureBuilder
from .checkpoint import Counters, StateCodec, split_curvature, structure_settings
from .comm import Communicator, make_communicator
from .config import (
    GROUP_SETTINGS,
    DampingDiagonal,
    Fisher,
    SENGConfig,
    ShardState,
    Variant,
    check_choice,
    resolve,
)
from .curvature import BlockCurvature
from .describe import describe_table, first_order_warning, placements
from .fisher import ELEMENT_REDUCTIONS, Distribution
from .groups import GroupSchedules, StepSettings, check_shape, group_params
from .layers import FALLBACK_RULE, Block, find_blocks
from .passes import BackwardPasses, UnsteppedPasses
from .rounds import round_class
from .update import apply_update
from .warn import warn


class Owners:
    """Which live SENG updates each parameter: one at a time. Only that one holds hooks on
    it, so an optimizer that was replaced never starts collectives that no ``step()`` of its
    will wait for, and never steps the parameter behind the newer one's back."""

    def __init__(self) -> None:
        self._of: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> weakref(SENG)

    def of(self, params: list[Tensor]) -> list[SENG]:
        """The live optimizers that own some of ``params``, each once."""
        found: dict[int, SENG] = {}
        for p in params:
            ref = self._of.get(p)
            owner = ref() if ref is not None else None
            if owner is not None:
                found[id(owner)] = owner
        return list(found.values())

    def claim(self, params: list[Tensor], owner: SENG) -> None:
        """Record ``owner`` as the one that updates ``params`` from now on."""
        ref = weakref.ref(owner)
        for p in params:
            self._of[p] = ref


#: the owners of this process's parameters
OWNERS = Owners()

RETIRED = "SENG: this optimizer was retired (retire() was called); build a new one to train on"
SUPERSEDED = (
    "SENG: this optimizer was retired when a newer SENG was built on the same "
    "parameters: only one SENG updates a parameter, and the newer one holds the hooks "
    "on the model now. Use the newer one (to carry this one's state over, save its "
    "state_dict() before building the newer one and load it there)"
)
TAKEN_OVER = (
    "SENG: this optimizer was taken over by the wrapper that {wrapper} built on its "
    "param_groups (hvd.DistributedOptimizer): its model, hooks, curvature and state "
    "moved there. Use the optimizer that hvd.DistributedOptimizer returned"
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _live(method: Callable[Concatenate[SENG, _P], _R]) -> Callable[Concatenate[SENG, _P], _R]:
    """``method``, refused with the reason once its SENG was retired (taken over, or built
    again on the same parameters)."""

    @functools.wraps(method)
    def checked(self: SENG, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._retired is not None:
            raise RuntimeError(self._retired)
        return method(self, *args, **kwargs)

    return checked


class SENG(torch.optim.Optimizer):
    """Sketchy Empirical Natural Gradient (Yang et al., 2021) as a ``torch.optim.Optimizer``.

    Per supported layer (the types :func:`seng_dist.supported_layer_types` lists; weight and
    bias as one block) ``d = -(U Uᵀ + λI)⁻¹ g`` with ``U`` the per-sample gradients of the
    curvature batch over ``√ϱ`` (``λI`` becomes ``λD``, Adam's diagonal, with
    ``damping_diagonal="adam"``); every other trainable parameter follows ``d = -g/(1 + λ)``
    (``-g/(λD)``); then heavy-ball momentum and ``θ ← θ + lr·v``. What is computed, and how:
    ``docs/design.md``.

    Args:
        model: the ``nn.Module`` to train (or the ``DistributedDataParallel`` around it); hooks
            are installed on its supported layers only while a curvature update is due.
        config: a :class:`~seng_dist.SENGConfig` (default: its defaults).
        param_groups: torch-style param groups (``{"params": ..., "lr": ...}``; a group may
            set ``lr``, ``damping``, ``momentum`` and ``weight_decay``, each a value or a
            callable of the step); the trainable parameters they leave out form one more group
            with the config's values. None: one group.
        comm: the engine for the collectives: None (torch.distributed when a process group
            is initialised, then Horovod when initialised, else one process), ``"local"``,
            ``"torch"``, ``"horovod"``, ``"deepspeed"``, ``"mpi"``, or a Communicator.
        grads_averaged: whether the engine already averages the gradients in backward (DDP,
            ``hvd.DistributedOptimizer``, the DeepSpeed engine); SENG then averages only its
            corrections. None: True for a ``DistributedDataParallel`` model, else False.
        **settings: any setting of :class:`~seng_dist.SENGConfig` by its flat name
            (``lr=0.05, factor_rank=2, variant="lagged"``), applied on top of ``config``. ``lr``,
            ``damping``, ``momentum`` and ``weight_decay`` are kept in ``param_groups`` so
            ``torch.optim.lr_scheduler`` works; a callable overwrites the group's value at
            every step.

    Distributed: every rank keeps its own curvature ``U_w`` from its local batch; the
    ``variant`` chooses the round (``docs/design.md``). As under DDP, when the ``backward()``
    that completes a step's accumulation returns, ``.grad`` holds the gradient averaged over
    the ranks: clipping, a ``GradScaler``'s unscaling and overflow check, or any other edit
    before ``step()`` acts on it, and the step uses ``.grad`` as it then is. At construction
    every rank checks that the settings and the model structure agree (``ValueError`` on every
    rank naming what differs) and takes rank 0's parameters and buffers, as DDP does.

    One SENG updates a parameter: building a SENG on parameters that another SENG updates
    retires the older one (its hooks come off the model, and using it raises
    ``RuntimeError``). ``hvd.DistributedOptimizer(opt)`` takes ``opt`` over: the wrapper it
    returns continues ``opt`` (same state, settings and param groups), and ``opt`` is retired.

    ``nn.MultiheadAttention`` calls its projections through ``torch.nn.functional.linear``.
    While an attention forward runs on a curvature step, SENG replaces that function,
    process-wide, with a wrapper that passes every call, from any thread, with the same
    arguments to the function it replaced (torch's, or your own patch, which is called and
    stays in place), and records only the calls of that forward's own thread; the function
    is put back when the last such forward ends. Patch ``F.linear`` outside attention
    forwards. Under ``torch.compile`` the attention's calls are not seen: its projections
    follow the fallback rule (with a warning) while the model's other layers are
    preconditioned.
    """

    #: When True, ``state_dict()`` is a collective that every rank must call (DeepSpeed's
    #: ``save_checkpoint`` does; the DeepSpeed plugin sets it): it holds every rank's
    #: curvature, and ``load_state_dict`` gives each rank its own back, so a checkpoint that
    #: one rank writes resumes every rank bit-exactly. Otherwise the state holds this rank's.
    state_dict_all_ranks: bool = False

    #: The ``torch.amp.GradScaler`` whose ``step(opt)`` calls ``opt.step()``, if any: the
    #: captured output gradients carry its loss scale, which the curvature divides out. Needed
    #: only when ``scaler.unscale_(opt)`` runs before ``scaler.step(opt)`` (to clip): otherwise
    #: the scaler hands its scale to ``step()`` itself.
    grad_scaler: torch.amp.GradScaler | None = None

    #: ``GradScaler.step(opt)`` always calls ``step()``, with the scale still on ``.grad``
    #: (unless ``unscale_`` ran) and its overflow check as ``self.grad_scale``/``found_inf``:
    #: an overflow step is skipped here, on every rank together, and counted.
    _step_supports_amp_scaling = True

    #: Why this SENG may no longer be used, once it is retired: taken over by
    #: ``hvd.DistributedOptimizer``'s wrapper, or replaced by a newer SENG on its parameters.
    #: A class attribute because torch's ``__init__`` calls the checked ``add_param_group``
    #: before this class's ``__init__`` could set it; retiring sets it on the instance.
    _retired: str | None = None

    def __init__(
        self,
        model: nn.Module,
        config: SENGConfig | None = None,
        *,
        param_groups: list[dict[str, Any]] | None = None,
        comm: str | Communicator | None = None,
        grads_averaged: bool | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            self._take_over(_original_of(model, type(self)))
            return
        if config is not None and not isinstance(config, SENGConfig):
            raise ValueError(f"config must be a seng_dist.SENGConfig or None, got {config!r}")
        cfg = self.config = (config or SENGConfig()).replace(**settings)
        self.schedules = GroupSchedules(cfg)
        grads_averaged, model = _unwrap(model, grads_averaged)
        super().__init__(
            _groups(model, param_groups), {k: resolve(cfg, k, 0) for k in GROUP_SETTINGS}
        )
        self.model = model
        self.layout = find_blocks(
            model, cfg.skip_layers, cfg.sketch.explicit_threshold, cfg.batch_first
        )
        self.blocks: list[Block] = self.layout.blocks
        mostly_first_order = first_order_warning(
            placements(model, self.layout, self.param_groups),
            cfg.diagonal.damping_diagonal is DampingDiagonal.ADAM,
        )
        if mostly_first_order is not None:
            warn(mostly_first_order)
        GroupSchedules.check_blocks(self.blocks, self.param_groups)
        self.communicator = make_communicator(comm)
        _check_dtype(self.communicator, cfg)
        self.passes = BackwardPasses(model, group_params(self.param_groups))
        self._unstepped = UnsteppedPasses(cfg.gradient_accumulation_steps)
        self.passes.listeners.append(self._unstepped)
        try:
            self._build(model, grads_averaged)
        except BaseException:
            self.passes.close()  # a SENG that failed to build leaves no hooks behind
            raise
        # Only a SENG that was built takes the parameters over: a failure above (ranks that
        # disagree, say) leaves an older SENG on them working.
        self._claim(group_params(self.param_groups))
        self._arm(0)

    def _build(self, model: nn.Module, grads_averaged: bool) -> None:
        """The curvature, state, round and the ranks' agreement, once the hooks that count
        the backward passes are on the model."""
        cfg = self.config
        self.curvature = CurvatureBuilder(
            self.passes, self.blocks, cfg, self.state, self.communicator.rank
        )
        in_blocks = {id(p) for b in self.blocks for p in b.params}
        self._fallback: list[Tensor] = [
            p for p in group_params(self.param_groups) if id(p) not in in_blocks
        ]
        self._counters = Counters()
        self._codec = StateCodec(cfg, self.blocks, self.curvature, self.communicator)
        self._said_empty = False
        self._wrappers_checked = False
        self._settings_key: tuple = ()
        self._settings = StepSettings({}, {})
        self._set_round(grads_averaged)
        if self.communicator.world_size > 1:
            self._check_ranks_agree()
            self.communicator.broadcast_(
                [t.detach() for t in model.parameters()] + list(model.buffers()), name="seng.init"
            )

    @_live
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim.Optimizer.add_param_group``). Its keys are checked
        and its callables kept as schedules. Parameters added after construction follow the
        fallback rule ``d = -g/(1+damping)`` (SENG preconditions the layers it found when it
        was built), with a warning; on several ranks every rank must add the same group (it is
        checked, as at construction)."""
        step = self._counters.step if hasattr(self, "_counters") else 0
        group, scheduled = self.schedules.prepare(param_group, step)
        super().add_param_group(group)  # torch's own checks (e.g. a parameter in two groups)
        self.schedules.add(scheduled)
        if not hasattr(self, "_fallback"):  # torch's __init__ adding the constructor's groups
            return
        added = list(self.param_groups[-1]["params"])
        self._fallback.extend(added)
        self.passes.watch(added)
        self._claim(added)
        self._set_round(self.round.grads_averaged)  # its units and buckets include them now
        warn(
            f"SENG: the {len(added)} parameter(s) added with add_param_group follow the "
            f"fallback rule {FALLBACK_RULE}: SENG preconditions the layers it found when it "
            "was built. Build SENG with param_groups=[...] to have them preconditioned"
        )
        if self.communicator.world_size > 1:
            self._check_ranks_agree()

    def _check_ranks_agree(self) -> None:
        """``ValueError`` on every rank unless the ranks' settings, engine, model structure and
        param groups agree (a collective)."""
        self.communicator.check_consistent(
            structure_settings(
                self.config,
                self.communicator,
                self.round.grads_averaged,
                self.model,
                self.blocks,
                self.param_groups,
            )
        )

    def _set_round(self, grads_averaged: bool) -> None:
        """Build the round (again: for the Horovod wrapper, or parameters added later)."""
        previous = getattr(self, "round", None)
        if (
            grads_averaged
            and self.config.distributed.variant is Variant.LAGGED
            and (previous is None or not previous.grads_averaged)
        ):
            warn(
                "SENG: the engine averages the gradients in backward (DDP, "
                "hvd.DistributedOptimizer); variant='lagged' then costs the engine's "
                "collectives plus SENG's one per step. Use SENG alone to send gradient and "
                "correction together"
            )
        if (
            grads_averaged
            and self.communicator.world_size > 1
            and self.config.distributed.shard_state is ShardState.GRADIENTS
            and (previous is None or not previous.grads_averaged)
        ):
            warn(
                "SENG: the engine averages the gradients in backward (DDP, "
                "hvd.DistributedOptimizer), so every rank holds all of them: "
                "shard_state='gradients' shards the optimizer state only here, as "
                "'optimizer' does. Use SENG without the engine's wrapper to shard the "
                "gradients too"
            )
        if previous is not None:
            previous.close()
        self.round = round_class(self.config.distributed.variant)(
            self.config,
            self.curvature.curvatures,
            self._fallback,
            self.communicator,
            grads_averaged=grads_averaged,
            state=self.state,
            order=list(self.model.parameters()),
            passes=self.passes,
            shards=previous.shards if previous is not None else None,
        )
        if previous is not None:
            self._arm(self._counters.step)

    # ------------------------------------------------------------------ ownership
    def _claim(self, params: list[Tensor]) -> None:
        """Become the one SENG that updates ``params``: an older SENG on any of them (a SENG
        built again on the same model) is retired, its hooks taken off the model."""
        for older in OWNERS.of(params):
            if older is not self:
                older.retire(SUPERSEDED)
        OWNERS.claim(params, self)

    def retire(self, reason: str = RETIRED) -> None:
        """Take this SENG's hooks off the model (backward passes, capture, buckets): from now
        on using it raises ``RuntimeError(reason)``. A newer SENG built on the same parameters
        does this to the older one."""
        self.passes.close()
        self.round.close()
        self.curvature.close()
        self._retired = reason

    def _take_over(self, original: SENG) -> None:
        """Continue ``original`` as this object. ``hvd.DistributedOptimizer(original)`` builds
        its wrapper, an instance of a subclass of ``type(original)``, by calling that class on
        ``original.param_groups`` (see :func:`_original_of`). Everything ``original`` holds
        (model, hooks, curvature, state, param groups, counters, communicator) is handed here
        unchanged and ``original`` is retired: every method of it raises
        :data:`TAKEN_OVER`, so this object is the only one that acts on those pieces. Horovod's
        hooks average the gradients in backward, so from now on SENG averages only its
        corrections."""
        # Every attribute moves except those that shadow a method on the instance (an lr
        # scheduler wraps opt.step there): the wrapper's class brings its own methods.
        cls = type(self)
        vars(self).update(
            {k: v for k, v in vars(original).items() if not callable(getattr(cls, k, None))}
        )
        original._retired = TAKEN_OVER.format(wrapper=cls.__module__)
        self._retired = None
        OWNERS.claim(group_params(self.param_groups), self)
        self._set_round(grads_averaged=True)

    def _arm(self, step: int) -> None:
        """Prepare step ``step``: the capture hooks iff it rebuilds the curvature, and the
        round's buckets that may start during its backward."""
        self.curvature.arm_for(step)
        # The schedule, not this rank's arming: what the round sends must match on every rank.
        self.round.arm(self.curvature.scheduled(step), self._early_settings)

    def _early_settings(self) -> StepSettings:
        """The coming step's settings, for corrections computed during its backward (the
        step checks that they still hold)."""
        self.schedules.resolve(self.param_groups, self._counters.step)
        return self._step_settings()

    # ------------------------------------------------------------------ counters
    @property
    @_live
    def step_count(self) -> int:
        """Steps taken so far."""
        return self._counters.step

    @property
    @_live
    def curvature_updates(self) -> int:
        """Curvature updates done."""
        return self._counters.curvature_updates

    @property
    @_live
    def curvature_skips(self) -> int:
        """Block curvature updates refused because a factor was not finite."""
        return self._counters.curvature_skips

    @property
    @_live
    def nonfinite_steps(self) -> int:
        """Steps skipped because the averaged gradient was not finite (``skip_nonfinite``) or
        a ``GradScaler`` found an overflow on some rank."""
        return self._counters.nonfinite_steps

    @_live
    def curvature_state_bytes(self) -> int:
        """Bytes held by curvature state: ``U``/factors, their sketches, Gram matrices and the
        cached inverses."""
        return sum(c.nbytes() for c in self.curvature.curvatures)

    # ------------------------------------------------------------------ the step
    @_live
    @torch.no_grad()
    def step(  # type: ignore[override]  # returns the closure's loss, as torch's own do
        self, closure: Callable[[], Tensor] | None = None
    ) -> Tensor | None:
        """One SENG update from the gradients in ``.grad`` (averaged over the ranks when the
        backward pass ended); rebuilds the curvature first on curvature steps."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            if self.curvature.idle(p for g in self.param_groups for p in g["params"]):
                return self._empty(loss)
            if not self._take(self._counters.step):
                return self._empty(loss)
            return loss
        finally:
            # The gradients are consumed (or the step is taken again by the next call).
            self.passes.open_window()
            self._unstepped.stepped()
            self._arm(self._counters.step)

    def _take(self, k: int) -> bool:
        """Step ``k`` (or its skip); False when no parameter had a gradient on any rank."""
        loss_scale, overflow = self._amp_scaling()
        agreed = self.round.agree(overflow)
        if agreed.overflow:
            # The GradScaler lowers its scale; the step, its curvature update included, is
            # taken again by the next call.
            self._counters.nonfinite_steps += 1
            return True
        self.schedules.resolve(self.param_groups, k)
        whitening = self.round.rebuild_whitening(self.curvature.rebuilds_everywhere(k))
        if whitening is None:
            rebuilt = self.curvature.postpone()
        else:
            rebuilt = self.curvature.refresh(loss_scale, whitening)
        self._counters.curvature_updates += int(rebuilt.updated)
        self._counters.curvature_skips += rebuilt.skipped
        found = self.round.directions(self._step_settings(), agreed)
        if found is None:
            n = self._counters.nonfinite_steps = self._counters.nonfinite_steps + 1
            if n & (n - 1) == 0:  # 1st, 2nd, 4th, ...: visible, but not a flood
                warn(
                    f"SENG: step {k} skipped: the averaged gradient holds NaN or Inf ({n} "
                    "such step(s) so far); parameters and momentum are unchanged"
                )
            return True
        if not found[0]:
            return False
        apply_update(self.state, self.param_groups, *found, self.config.decoupled_weight_decay)
        self.round.publish()
        self._counters.step = k + 1
        self._stop_double_averaging()
        return True

    def _amp_scaling(self) -> tuple[float, bool]:
        """``(the loss scale the captured curvature carries, whether this rank's GradScaler
        found an Inf/NaN)``; takes a scale that ``GradScaler.step`` left on ``.grad`` off it
        (as ``unscale_`` would)."""
        found: Tensor | None = getattr(self, "found_inf", None)
        if found is None:  # no GradScaler.step around this call
            return (1.0 if self.grad_scaler is None else float(self.grad_scaler.get_scale()), False)
        overflow = bool(found.item() > 0)
        scale: Tensor | None = getattr(self, "grad_scale", None)
        if scale is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads and not overflow:
                torch._foreach_div_(grads, scale.to(grads[0].device))
            return float(scale), overflow
        if self.grad_scaler is None:
            raise ValueError(
                "SENG: scaler.unscale_(opt) ran before scaler.step(opt), so SENG "
                "cannot read the loss scale that its captured curvature carries: "
                "set opt.grad_scaler = scaler once, after building both"
            )
        return float(self.grad_scaler.get_scale()), overflow

    def _stop_double_averaging(self) -> None:
        """After the first step: if a ``DistributedDataParallel`` wraps the model SENG was
        built on (wrapped after SENG, as Lightning's ddp strategy and Accelerate's
        ``prepare`` do), DDP averages the gradients already; stop averaging them again."""
        if self._wrappers_checked:
            return
        self._wrappers_checked = True
        if not self.round.sends_gradients or not _wrapped_by_ddp(self.model):
            return
        warn(
            "SENG: a DistributedDataParallel wraps the model after SENG was built on it; DDP "
            "averages the gradients, so from now on SENG averages only its corrections (as "
            "if built with grads_averaged=True). Build SENG on the DDP model, or with "
            "grads_averaged=True where a framework wraps it later, to say so"
        )
        self._set_round(grads_averaged=True)

    @_live
    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; the next backward pass starts a new step's
        accumulation."""
        super().zero_grad(set_to_none)
        self.passes.open_window()

    def _empty(self, loss: Tensor | None) -> Tensor | None:
        """A step with nothing to do (no gradient on any rank; or zeros with no forward since
        the last step): nothing changed, it keeps its step number and curvature update for the
        next call, and that is said once."""
        if not self._said_empty:
            self._said_empty = True
            warn(
                f"SENG: step() with no gradients to apply (before any backward, or zeros "
                f"with no forward/backward since the last step) did nothing; step "
                f"{self._counters.step} and its curvature update wait for the next step(). "
                "Likely callers: hvd.broadcast_optimizer_state (its dummy step creates "
                "optimizer state; SENG has none to create) or a step() before the first "
                "backward()"
            )
        return loss

    def _step_settings(self) -> StepSettings:
        """Each parameter's damping and L2, rebuilt (and the groups' split layers checked)
        only when a group's values changed: a scheduler may have moved them."""
        key = tuple(
            (g["lr"], g["damping"], g["weight_decay"], len(g["params"])) for g in self.param_groups
        )
        if key != self._settings_key:
            if len(self.param_groups) > 1:
                GroupSchedules.check_blocks(self.blocks, self.param_groups)
            self._settings = GroupSchedules.step_settings(
                self.param_groups, self.config.decoupled_weight_decay
            )
            self._settings_key = key
        return self._settings

    @_live
    def sample_fisher(
        self, output: Tensor, distribution: str = "categorical", reduction: str = "mean"
    ) -> Tensor | None:
        """Name the model's predictive distribution for ``fisher="mc"``: call it after each
        forward and before its ``backward()``, with the model's ``output`` (logits for
        ``"categorical"`` (classes last) and ``"bernoulli"``, means for ``"gaussian"``) and
        the reduction of each sample's loss over its elements (``"mean"`` or ``"sum"``).

        On a curvature step it draws targets for the curvature batch and takes the layers'
        output gradients from their negative log-likelihood (one extra backward, the graph
        kept for yours) and returns the targets (batch first);
        on other steps it does nothing and returns None. :mod:`seng_dist.fisher` has the
        losses; ``torch.utils.checkpoint`` with ``use_reentrant=True`` cannot run it."""
        if self.config.fisher is not Fisher.MC:
            raise ValueError(
                "SENG: sample_fisher() needs fisher='mc' (this optimizer has "
                f"fisher={str(self.config.fisher)!r}: U is built from your loss's gradients)"
            )
        kind = Distribution.parse("sample_fisher's distribution", distribution)
        check_choice("sample_fisher's reduction", reduction, ELEMENT_REDUCTIONS)
        return self.curvature.sample(output, kind, reduction)

    @_live
    def describe(self) -> str:
        """A table of every parameter: layer, layer type, block shape, path
        (explicit/implicit/fallback) and why, param group, factor rank, curvature bytes; then
        per path the parameters, elements and share of the elements."""
        return describe_table(
            placements(self.model, self.layout, self.param_groups),
            self.curvature.curvatures,
            self.config.sketch.explicit_threshold,
        )

    # ------------------------------------------------------------------ state
    @_live
    def broadcast_state(self, src: int = 0) -> None:
        """Give every rank rank ``src``'s parameters, buffers and optimizer state, and rebuild
        the curvature on every rank at the next step.

        For a resume where only ``src`` loaded the checkpoint (Horovod's usual start:
        ``hvd.broadcast_parameters`` + ``hvd.broadcast_optimizer_state``; the latter does not
        know SENG's state, this does). The curvature is per rank (each rank's ``U_w`` comes from
        its own batch), so it is not copied from ``src``: every rank drops it and rebuilds it
        from the next step's batch. Momentum, the lagged gradient, the step and the sketch
        generator come from ``src``. For a bit-exact resume, save and load ``state_dict()`` on
        every rank instead. Every rank must call this.
        """
        comm = self.communicator
        if self.round.shards is not None:
            raise ValueError(
                "SENG: broadcast_state() with shard_state="
                f"{str(self.config.distributed.shard_state)!r}: each rank holds only its own "
                "shard of the state, so one rank cannot hand it to the others. Load the "
                "checkpoint's state_dict() on every rank instead: it holds every shard (and "
                "can be loaded on any number of ranks), and each rank keeps its own"
            )
        comm.broadcast_(
            [t.detach() for t in self.model.parameters()] + list(self.model.buffers()),
            name="seng.state.model",
            src=src,
        )
        shared = None
        if comm.rank == src:  # without the curvature: every rank rebuilds its own
            shared = self._state_dict(all_ranks=False)  # (only src is here: no collective)
            shared["state"], _ = split_curvature(shared["state"], self._curvature_indices())
        state = comm.broadcast_object(shared, name="seng.state.optimizer", src=src)
        if comm.rank != src:
            self.load_state_dict(state)
        self.curvature.drop(everywhere=True)
        self._arm(self._counters.step)

    @_live
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (momentum, lagged gradient, curvature per parameter) plus
        SENG's own under ``"seng"``: counters, the sketch generator, the settings and the
        preconditioned layers (checked on load). With ``shard_state`` it is a collective that
        every rank calls: it gathers every rank's shard into the unsharded layout."""
        return self._state_dict(self.state_dict_all_ranks)

    def _state_dict(self, all_ranks: bool) -> dict[str, Any]:
        sd = super().state_dict()
        if self.round.shards is not None:
            sd["state"] = self._codec.gather(sd["state"], self._curvature_indices())
        sd = self._codec.pack(sd, self._counters, self._curvature_indices(), all_ranks)
        if self.grad_scaler is not None:
            # its loss scale resumes with the step (an engine's scaler is not in its checkpoint)
            sd["seng"]["grad_scaler"] = self.grad_scaler.state_dict()
        return sd

    @_live
    def load_state_dict(
        self, state_dict: dict[str, Any], load_optimizer_states: bool = True
    ) -> None:
        """Load a :meth:`state_dict` saved for the same layers and curvature settings (and
        the GradScaler's state, when it holds one and a ``grad_scaler`` is set). With sharded
        state every rank loads it and keeps its own part. ``load_optimizer_states=False``
        (DeepSpeed's mixed-precision engines pass the flag) loads nothing."""
        if not load_optimizer_states:
            return
        indexed = self._curvature_indices()
        torch_part, saved = self._codec.unpack(state_dict, indexed)
        # torch replaces self.state on load; the blocks and the round keep a reference to it.
        kept = self.state
        super().load_state_dict(torch_part)
        kept.clear()
        kept.update(self.state)
        self.state = kept
        self._counters = self._codec.restore(saved, indexed)
        scaler = saved.extra.get("grad_scaler")
        if scaler and self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(scaler)
        self.round.adopt_state()
        self._arm(self._counters.step)

    def _curvature_indices(self) -> list[tuple[int, BlockCurvature]]:
        """``(index of the block's weight in the state_dict, its curvature)`` per block."""
        index = {
            id(p): i
            for i, p in enumerate(p for group in self.param_groups for p in group["params"])
        }
        return [(index[id(c.block.weight)], c) for c in self.curvature.curvatures]


def _original_of(groups: Any, wrapper: type[SENG]) -> SENG:
    """The SENG whose own ``param_groups`` list ``groups`` is, when ``wrapper`` is a subclass
    of its class: ``hvd.DistributedOptimizer`` builds its wrapper as an instance of a subclass
    of ``type(opt)`` on ``opt.param_groups``, and that wrapper takes the SENG over
    (:meth:`SENG._take_over`)."""
    if isinstance(groups, list) and all(isinstance(g, dict) and "params" in g for g in groups):
        for owner in OWNERS.of([p for g in groups for p in g["params"]]):
            if (
                owner.param_groups is groups
                and wrapper is not type(owner)
                and issubclass(wrapper, type(owner))
            ):
                return owner
    raise ValueError(
        f"model must be a torch.nn.Module, got {type(groups).__name__} (a list "
        "of param groups is taken only as a live SENG's own param_groups, from a "
        "wrapper that rebuilds it on them, as hvd.DistributedOptimizer does)"
    )


def _wrapped_by_ddp(model: nn.Module) -> bool:
    """Whether some ``DistributedDataParallel`` in this process wraps ``model``, directly or
    around a module that holds it (Lightning's DDP wraps a wrapper of the LightningModule):
    a scan of the garbage collector's objects, run once."""
    return any(
        isinstance(o, DistributedDataParallel) and any(m is model for m in o.module.modules())
        for o in gc.get_objects()
    )


def _unwrap(model: nn.Module, grads_averaged: bool | None) -> tuple[bool, nn.Module]:
    """``(grads_averaged, the module to precondition)``: DDP averages the gradients in
    backward, so SENG then averages only its corrections."""
    ddp = isinstance(model, DistributedDataParallel)
    if grads_averaged is not None and not isinstance(grads_averaged, bool):
        raise ValueError(f"grads_averaged must be None, True or False, got {grads_averaged!r}")
    if ddp and grads_averaged is False:
        raise ValueError(
            "grads_averaged=False with a DistributedDataParallel model: DDP "
            "averages the gradients in backward, so SENG would average them "
            "twice; leave grads_averaged=None (or pass the unwrapped model)"
        )
    module = cast(nn.Module, model.module) if ddp else model
    return (ddp if grads_averaged is None else grads_averaged), module


def _groups(model: nn.Module, param_groups: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The constructor's param groups: the given ones, then one with every other trainable
    parameter of the model (the config's values)."""
    if param_groups is None:
        param_groups = []
    if not isinstance(param_groups, (list, tuple)):
        raise ValueError(
            "param_groups must be a list of dicts like torch optimizers take "
            f"([{{'params': [...], 'weight_decay': 0.0}}, ...]), got "
            f"{type(param_groups).__name__}"
        )
    for i, g in enumerate(param_groups):
        check_shape(g, i)
    groups = [dict(g, params=_as_list(g["params"])) for g in param_groups]
    listed = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in listed]
    if rest:
        groups.append({"params": rest})
    if not any(g["params"] for g in groups):
        raise ValueError(
            "model has no trainable parameters (requires_grad=True): SENG has nothing to optimize"
        )
    return groups


def _as_list(params: Any) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def _check_dtype(comm: Communicator, config: SENGConfig) -> None:
    dtype = config.distributed.buffer_dtype
    if dtype in comm.unsupported_dtypes:
        from .comm import COMM_DTYPES

        allowed = [repr(k) for k, v in COMM_DTYPES.items() if v not in comm.unsupported_dtypes]
        raise ValueError(
            f"comm_dtype={config.distributed.comm_dtype!r} is not supported by "
            f"the {comm.name} engine; use one of {', '.join(allowed)}"
        )
