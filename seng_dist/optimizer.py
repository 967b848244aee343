"""The SENG optimizer (single process; the solver lives in :mod:`seng_dist.solver`)."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import solver
from .capture import Capture
from .comm import COMM_DTYPES, Communicator, make_communicator
from .config import SENGConfig, resolve
from .layers import Block, find_blocks

_SCHEDULED = ("lr", "damping", "momentum", "weight_decay")
_COUNTERS = ("step", "curvature_updates", "curvature_skips", "nonfinite_steps")
_CURVATURE_KEYS = ("U", "Xz", "sketch_idx", "Gf", "Af", "YG", "YA", "sketch_g_idx",
                   "sketch_a_idx", "K")


# id(param_groups) -> the SENG that owns them, so that hvd.DistributedOptimizer (which builds a
# subclass instance from ``optimizer.param_groups``) can be given the original's set-up.
_LIVE: "weakref.WeakValueDictionary[int, SENG]" = weakref.WeakValueDictionary()


class SENG(torch.optim.Optimizer):
    """Sketchy Empirical Natural Gradient (Yang et al., 2021) as a ``torch.optim.Optimizer``.

    Per supported layer (``nn.Linear``, ``nn.Conv2d``; weight and bias as one block) the
    direction is ``d = -(U Uᵀ + λI)⁻¹ g``, computed as ``-(g - U b)/λ`` with
    ``b = (λI + UᵀU)⁻¹ Uᵀ g`` where ``U`` holds the per-sample gradients of the curvature batch
    divided by ``√ϱ``. Blocks with fewer than ``explicit_threshold`` entries keep ``U``
    explicitly and sketch ``q = sketch_size`` of its rows; larger blocks keep rank-``rank``
    factors of each per-sample gradient and sketch ``factor_sketch_size`` rows of each factor.
    Every other trainable parameter (BatchNorm, LayerNorm, Embedding, skipped layers) follows
    ``d = -g/(1 + λ)``. The update is ``θ ← θ + lr·v`` with ``v`` the heavy-ball momentum of
    ``d``; L2 weight decay is added to ``g`` before preconditioning unless
    ``decoupled_weight_decay``.

    Args:
        model: the ``nn.Module`` to train; hooks are installed on its supported layers only
            while a curvature update is due.
        lr, damping, momentum, weight_decay: values, or callables of the step (0-based).
            ``lr`` and the others are kept in ``param_groups`` so ``torch.optim.lr_scheduler``
            works; a callable overwrites the group's value at every step.
        curvature_update_interval: ``T``: the curvature is rebuilt on steps ``k`` with
            ``k % T == 0`` from the forward/backward that precedes ``step()``, and reused in
            between. The sketches are drawn at each rebuild and kept until the next, so the
            damped Gram matrix's inverse (through Cholesky) is cached while ``damping`` is
            unchanged.
        curvature_batch_size: ``ϱ``: the first ϱ samples of the local batch build ``U``
            (default 32, chosen for cost and memory: see README; None: the whole batch).
        explicit_threshold: block size ``n`` below which ``U`` is kept explicitly.
        sketch_size: rows ``q`` sampled from an explicit ``U`` (None: exact; blocks with
            ``n <= q`` are solved exactly).
        sketch_method: ``"uniform"`` or ``"leverage"`` (``p_j ∝ ‖U_j,:‖²``), for both paths.
        sketch_replacement: sample rows with replacement.
        rank: rank of each per-sample gradient's factors on the implicit path (None: exact).
        factor_sketch_size: rows sampled from each factor matrix on the implicit path.
        uc: ``"factored"`` (eq. 23) or ``"exact"`` (``Σ c_i G_iᵀ A_i``, one matrix product).
        variant: ``"blockdiag"`` or ``"lagged"`` (``b`` from the previous step's gradient).
        comm: the engine for the collectives: None (torch.distributed when a process group
            is initialised, then Horovod when initialised, else one process), ``"local"``,
            ``"torch"``, ``"horovod"``, ``"deepspeed"``, ``"mpi"``, or a Communicator.
        comm_dtype: dtype of the communication buffer: None (the gradients' dtype),
            ``"bfloat16"``/``"float16"`` (or the torch dtypes) to halve the bytes sent
            (Horovod: float16 only).
        skip_layers: module names (prefixes) or classes left to the fallback rule.
        loss_reduction: ``"mean"`` (per-sample gradients are rescaled by the batch size) or
            ``"sum"``: the reduction of the loss whose gradient the user computes.
        gradient_accumulation_steps: the number of micro-batches whose gradients are summed
            before each ``step()``, each loss divided by it (DeepSpeed's and the usual manual
            accumulation). The curvature comes from the last micro-batch, its captured
            gradients multiplied back by this number.
        max_grad_norm: clip the averaged gradient (all parameters, before weight decay) to
            this global norm, as ``clip_grad_norm_`` after DDP would (None: no clipping).
        skip_nonfinite: skip a step whose (averaged) gradient holds a NaN or Inf, as
            ``GradScaler`` does: parameters, momentum and the lagged gradient stay as they
            were, the step is counted in ``nonfinite_steps`` (and ``state_dict``) and warned
            about, and the next ``step()`` repeats step ``k``. Every rank sees the same
            averaged gradient, so every rank skips together. Off by default: it costs one
            host sync per step. The curvature never takes non-finite factors either way
            (``curvature_skips``).
        seed: seed of the sketch generator (its state is part of ``state_dict``).

    Distributed (DESIGN.md section 2): every rank keeps its own curvature ``U_w`` from its
    local batch; SENG averages the gradients itself (do not wrap the model in
    ``DistributedDataParallel``; if you do, pass the wrapped model and SENG leaves the gradient
    averaging to DDP). ``variant="blockdiag"`` (eq. 26) averages ``g``, then averages each
    rank's correction ``U_w b_w`` (two collectives per step). ``variant="lagged"`` (eq. 27)
    computes ``b_w`` from the previous step's averaged gradient, so the gradient and the
    correction travel in ONE collective; its first step uses the block-diagonal rule. Implicit
    blocks with ``uc="factored"`` send the partial factors ``Gᶜ_w, Aᶜ_w`` (eq. 28) instead of an
    ``n``-sized correction. At construction every rank checks that the settings and the model
    structure agree (``ValueError`` on every rank naming what differs) and takes rank 0's
    parameters and buffers, as DDP does. On one process ``variant="lagged"`` is SENG with a
    one-step lag.
    """

    def __init__(self, model: nn.Module, lr: float | Callable[[int], float] = 0.1,
                 damping: float | Callable[[int], float] = 1.0,
                 momentum: float | Callable[[int], float] = 0.9,
                 weight_decay: float | Callable[[int], float] = 0.0, *,
                 decoupled_weight_decay: bool = False,
                 curvature_update_interval: int | Callable[[int], int] = 200,
                 curvature_batch_size: int | None = SENGConfig.curvature_batch_size,
                 explicit_threshold: int = SENGConfig.explicit_threshold,
                 sketch_size: int | None = SENGConfig.sketch_size,
                 sketch_method: str = "uniform",
                 sketch_replacement: bool = False,
                 rank: int | None = SENGConfig.rank,
                 factor_sketch_size: int | None = SENGConfig.factor_sketch_size,
                 uc: str = "factored",
                 variant: str = "blockdiag",
                 comm: str | Communicator | None = None,
                 comm_dtype: str | torch.dtype | None = None,
                 skip_layers: Iterable[str | type] = (),
                 loss_reduction: str = "mean",
                 gradient_accumulation_steps: int = 1,
                 max_grad_norm: float | None = None,
                 skip_nonfinite: bool = False,
                 seed: int = 0) -> None:
        if isinstance(model, list) and id(model) in _LIVE:
            self._adopt(_LIVE[id(model)])
            return
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = SENGConfig(
            lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            curvature_update_interval=curvature_update_interval,
            curvature_batch_size=curvature_batch_size, explicit_threshold=explicit_threshold,
            sketch_size=sketch_size, sketch_method=sketch_method,
            sketch_replacement=sketch_replacement, rank=rank,
            factor_sketch_size=factor_sketch_size, uc=uc, variant=variant,
            loss_reduction=loss_reduction, comm_dtype=_dtype_name(comm_dtype),
            gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters (requires_grad=True): "
                             "SENG has nothing to optimize")
        cfg = self.config
        defaults = {k: resolve(getattr(cfg, k), 0) for k in _SCHEDULED}
        super().__init__(params, defaults)
        # DDP averages the gradients in backward: SENG then only averages its corrections.
        self._grads_averaged = isinstance(model, DistributedDataParallel)
        if self._grads_averaged:
            model = model.module
            if cfg.variant == "lagged":
                warnings.warn("SENG: the model is wrapped in DistributedDataParallel, which "
                              "averages gradients in backward; variant='lagged' then costs "
                              "DDP's collectives plus SENG's one per step. Pass the unwrapped "
                              "model to let SENG send gradient and correction together.",
                              stacklevel=2)
        self.model = model
        self.blocks: list[Block] = find_blocks(model, tuple(skip_layers))
        if not self.blocks:
            warnings.warn("SENG: the model has no nn.Linear or nn.Conv2d layer to precondition "
                          "(or skip_layers names them all): every parameter follows "
                          "d = -g/(1+damping), i.e. momentum SGD with lr/(1+damping)",
                          stacklevel=2)
        for b in self.blocks:
            b.path = "explicit" if b.n < cfg.explicit_threshold else "implicit"
        block_params = {id(p) for b in self.blocks for p in b.params}
        self._fallback = [p for p in params if id(p) not in block_params]
        self._generator = torch.Generator().manual_seed(seed)
        self._inverse: dict[Block, tuple[float, Tensor]] = {}
        self._warned: set[str] = set()
        self._seng: dict[str, Any] = dict.fromkeys(_COUNTERS, 0)
        self._capture = Capture(model, self.blocks)
        self._rebuild = False  # rebuild the curvature at the next step (see broadcast_state)
        self._comm = make_communicator(comm)
        self._comm_dtype = COMM_DTYPES[cfg.comm_dtype] if cfg.comm_dtype else None
        if self._comm_dtype in self._comm.unsupported_dtypes:
            raise ValueError(f"comm_dtype={cfg.comm_dtype!r} is not supported by the "
                             f"{self._comm.name} engine; use one of "
                             + ", ".join(repr(k) for k, v in COMM_DTYPES.items()
                                         if v not in self._comm.unsupported_dtypes))
        if self._comm.world_size > 1:
            self._comm.check_consistent(self._consistency_settings())
            self._comm.broadcast_([t.detach() for t in model.parameters()]
                                  + list(model.buffers()), name="seng.init")
        self._arm_for(0)
        _LIVE[id(self.param_groups)] = self

    def _adopt(self, original: "SENG") -> None:
        """Become ``original`` inside ``hvd.DistributedOptimizer(original, ...)``.

        Horovod builds its wrapper by calling the optimizer class on ``original.param_groups``;
        the wrapper shares the original's model, curvature, state and communicator, and since
        Horovod's hooks average the gradients in backward, SENG averages only its corrections.
        """
        self.__dict__.update(original.__dict__)
        self._grads_averaged = True
        if self.config.variant == "lagged":
            warnings.warn("SENG: wrapped in hvd.DistributedOptimizer, which averages the "
                          "gradients in backward; variant='lagged' then costs Horovod's "
                          "allreduces plus SENG's one per step. Use SENG alone to send gradient "
                          "and correction together.", stacklevel=3)

    # ------------------------------------------------------------------ public helpers
    @property
    def step_count(self) -> int:
        """Steps taken so far."""
        return self._seng["step"]

    @property
    def curvature_skips(self) -> int:
        """Curvature updates refused because a factor was not finite."""
        return self._seng["curvature_skips"]

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped because the averaged gradient was not finite (``skip_nonfinite``)."""
        return self._seng["nonfinite_steps"]

    @property
    def curvature_updates(self) -> int:
        """Curvature updates done."""
        return self._seng["curvature_updates"]

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
        comm = self._comm
        comm.broadcast_([t.detach() for t in self.model.parameters()]
                        + list(self.model.buffers()), name="seng.state.model", src=src)
        state = comm.broadcast_object(self.state_dict() if comm.rank == src else None,
                                      name="seng.state.optimizer", src=src)
        if comm.rank != src:
            self.load_state_dict(state)
        self._drop_curvature()
        self._arm_for(self._seng["step"])

    def _drop_curvature(self) -> None:
        """Forget the curvature and rebuild it at the next step."""
        for block in self.blocks:
            for key in _CURVATURE_KEYS:
                self.state[block.weight].pop(key, None)
        self._inverse.clear()
        self._rebuild = True

    @property
    def communicator(self) -> Communicator:
        """The communicator this optimizer runs its collectives on."""
        return self._comm

    def curvature_state_bytes(self) -> int:
        """Bytes held by curvature state: ``U``/factors, their sketches and Gram matrices."""
        total = 0
        for b in self.blocks:
            st = self.state.get(b.weight, {})
            total += sum(st[k].numel() * st[k].element_size()
                         for k in _CURVATURE_KEYS if k in st)
        total += sum(c.numel() * c.element_size() for _, c in self._inverse.values())
        return total

    # ------------------------------------------------------------------ the step
    def _hyper(self, group: dict, step: int) -> dict:
        for key in _SCHEDULED:
            value = getattr(self.config, key)
            if callable(value):
                v = float(value(step))
                positive = key in ("lr", "damping")
                if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
                    raise ValueError(f"{key} schedule returned {v!r} at step {step}; it must "
                                     f"be finite and {'> 0' if positive else '>= 0'}")
                group[key] = v
        return group

    def _arm_for(self, step: int) -> None:
        """Install the capture hooks iff ``step`` is a curvature step."""
        interval = resolve(self.config.curvature_update_interval, step)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError("curvature_update_interval must be an int >= 1, got "
                             f"{interval!r} at step {step}")
        if step % interval == 0 or self._rebuild:
            self._capture.arm(self.config.curvature_batch_size)
        else:
            self._capture.disarm()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SENG update; rebuilds the curvature first on curvature steps."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._seng["step"]
        group = self._hyper(self.param_groups[0], k)
        lr, lam, mu, wd = group["lr"], group["damping"], group["momentum"], group["weight_decay"]
        self._refresh_curvature()
        decoupled = self.config.decoupled_weight_decay
        found = self._directions(lam, 0.0 if decoupled else wd)
        if found is None:
            self._skip_nonfinite_step(k)
            return loss
        self._apply(*found, lr, mu, wd if decoupled else 0.0)

        self._seng["step"] = k + 1
        self._arm_for(k + 1)
        return loss

    def _skip_nonfinite_step(self, step: int) -> None:
        """Count and report a skipped step; step ``step`` is taken again by the next call."""
        n = self._seng["nonfinite_steps"] = self._seng["nonfinite_steps"] + 1
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, ...: visible, but not a flood
            warnings.warn(f"SENG: step {step} skipped: the averaged gradient holds NaN or Inf "
                          f"({n} such step(s) so far); parameters and momentum are unchanged",
                          stacklevel=5)
        self._arm_for(step)

    def _refresh_curvature(self) -> None:
        """Rebuild the curvature from the captured pass, if this is a curvature step."""
        if self._capture.armed:
            self._update_curvature()
            self._capture.disarm()
            self._rebuild = False

    def _apply(self, params: list[Tensor], dirs: list[Tensor], lr: float, mu: float,
               decoupled_wd: float) -> None:
        """Heavy-ball momentum on the direction, then ``θ ← θ + lr·v``."""
        if not params:
            return
        if decoupled_wd:
            torch._foreach_mul_(params, 1.0 - lr * decoupled_wd)
        if mu:
            bufs, fresh = [], []
            for p, d in zip(params, dirs):
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = d.clone()
                    fresh.append(True)
                else:
                    fresh.append(False)
                bufs.append(st["momentum_buffer"])
            old = [b for b, f in zip(bufs, fresh) if not f]
            if old:
                torch._foreach_mul_(old, mu)
                torch._foreach_add_(old, [d for d, f in zip(dirs, fresh) if not f])
            dirs = bufs
        torch._foreach_add_(params, dirs, alpha=lr)

    def _directions(self, lam: float, l2: float
                    ) -> tuple[list[Tensor], list[Tensor]] | None:
        """Every parameter with a gradient and its direction, running this step's collectives;
        None when ``skip_nonfinite`` and the averaged gradient is not finite.

        ``l2`` is the weight decay added to the (averaged) gradient before preconditioning.
        """
        comm, blocks, fb = self._comm, self.blocks, self._fallback
        for p in self.param_groups[0]["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError("SENG does not support sparse gradients (use "
                                 "nn.Embedding(sparse=False))")
            if not p.requires_grad and "<frozen>" not in self._warned:
                self._warned.add("<frozen>")
                warnings.warn("SENG: parameters were frozen (requires_grad=False) after the "
                              "optimizer was built; they get no gradient and stay unchanged, "
                              "but their layers' curvature is kept. Build SENG after freezing "
                              "(or pass skip_layers) to leave them out", stacklevel=5)
        multi = comm.world_size > 1
        states = [self.state[b.weight] for b in blocks]
        present = [any(p.grad is not None for p in b.params) for b in blocks]
        present += [p.grad is not None for p in fb]
        lagged = self.config.variant == "lagged" and any("prev_g" in st for st in states)
        have_curv = ["K" in st and (not lagged or "prev_g" in st) for st in states]
        gs = [b.grad_matrix() for b in blocks]
        if multi:
            # SENG never changes .grad: the fallback gradients are averaged in copies.
            fgs = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in fb]
        else:
            fgs = [p.grad for p in fb]
        flags = self._flags(present + have_curv)
        send_grads = multi and not self._grads_averaged
        values: list[float] | None = None
        if lagged:
            # eq. 27: b_w from the previous step's averaged gradient, so the gradient, the
            # correction and the flags travel in ONE collective.
            slots = [self._correction(b, st.get("prev_g"), lam) for b, st in zip(blocks, states)]
            comm.allreduce_mean_((gs + fgs if send_grads else []) + _flat(slots)
                                 + ([flags] if flags is not None else []),
                                 name="seng.step", comm_dtype=self._comm_dtype)
            if self.config.skip_nonfinite and not _finite(gs + fgs):
                return None
            fgs = self._clip(gs, fgs)
            zs = self._with_l2(blocks, gs, l2)
        else:
            if send_grads:
                comm.allreduce_mean_(gs + fgs + [flags], name="seng.grad",
                                     comm_dtype=self._comm_dtype)
                values = self._flag_values(flags, present + have_curv)
            # The same averaged gradient on every rank: every rank skips, or none does.
            if self.config.skip_nonfinite and not _finite(gs + fgs):
                return None
            here = values if values is not None else present
            fgs = self._clip(gs, fgs)
            zs = self._with_l2(blocks, gs, l2)
            slots = [self._correction(b, z if h else None, lam)
                     for b, z, h in zip(blocks, zs, here)]
            if multi:
                comm.allreduce_mean_(_flat(slots) + ([] if send_grads else [flags]),
                                     name="seng.correction", comm_dtype=self._comm_dtype)
        if values is None:
            values = self._flag_values(flags, present + have_curv)
        present_all, curv_all = values[:len(present)], values[len(present):]

        params: list[Tensor] = []
        dirs: list[Tensor] = []
        for i, (block, st, z, slot) in enumerate(zip(blocks, states, zs, slots)):
            if not present_all[i]:
                continue
            if curv_all[i] >= 1.0:
                d = solver.direction(z, _combine(slot), lam)
            else:
                self._warn_no_curvature(block, st, lagged)
                d = z.mul(-1.0 / (1.0 + lam))
            if self.config.variant == "lagged":
                st["prev_g"] = z
            params.extend(block.params)
            dirs.extend(block.split(d))
        kept = [(p, g) for j, (p, g) in enumerate(zip(fb, fgs)) if present_all[len(blocks) + j]]
        if kept:
            fps, grads = [p for p, _ in kept], [g for _, g in kept]
            if l2:
                grads = torch._foreach_add(grads, fps, alpha=l2)
            dirs.extend(torch._foreach_mul(grads, -1.0 / (1.0 + lam)))
            params.extend(fps)
        return params, dirs

    def _flags(self, values: list[bool]) -> Tensor | None:
        """0/1 flags to average with a round (None on one process: nothing to agree on)."""
        if self._comm.world_size == 1 or not values:
            return None
        device = self.param_groups[0]["params"][0].device
        return torch.tensor(values, dtype=torch.float32, device=device)

    def _flag_values(self, flags: Tensor | None, local: list[bool]) -> list[float]:
        """Averaged flags as ``[1.0]`` (every rank), ``(0, 1)`` (some) or ``0.0`` (none)."""
        if flags is None:
            return [float(v) for v in local]
        m = self._comm.world_size
        # Tolerances, not equality: a bf16/fp16 buffer rounds the mean of 0/1 flags.
        return [1.0 if v > 1.0 - 0.5 / m else (0.5 if v > 0.5 / m else 0.0)
                for v in flags.tolist()]

    def _clip(self, gs: list[Tensor], fgs: list[Tensor]) -> list[Tensor]:
        """Scale the averaged gradient to global norm <= ``max_grad_norm`` (no host sync):
        the block matrices in place, the fallback gradients into new tensors (they may be
        ``.grad`` itself)."""
        max_norm = self.config.max_grad_norm
        if max_norm is None or not gs + fgs:
            return fgs
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs + fgs)))
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if gs:
            torch._foreach_mul_(gs, factor)
        return torch._foreach_mul(fgs, factor) if fgs else fgs

    @staticmethod
    def _with_l2(blocks: list[Block], gs: list[Tensor], l2: float) -> list[Tensor]:
        """``z = ḡ + l2·θ`` per block, in place on the (fresh) gradient matrices."""
        if l2:
            for b, g in zip(blocks, gs):
                g.add_(b.param_matrix(), alpha=l2)
        return gs

    def _correction(self, block: Block, z: Tensor | None, lam: float) -> list[Tensor]:
        """This rank's correction ``U_w b_w`` for ``b_w = (λI + U_wᵀU_w)⁻¹ U_wᵀ z``.

        Explicit blocks and ``uc="exact"`` give one ``(n_G, n_A)`` matrix; ``uc="factored"``
        gives the partial factors ``Gᶜ_w (r, n_G)``, ``Aᶜ_w (r, n_A)`` of eq. 28, zero-padded to
        the rank every rank can agree on. Zeros when there is no curvature or no ``z``, so every
        rank packs the same shapes.
        """
        st = self.state[block.weight]
        w = block.weight
        r_slot = self._slot_rank(block)
        if z is None or "K" not in st:
            if block.path == "implicit" and self.config.uc == "factored":
                return [w.new_zeros(r_slot, block.n_G), w.new_zeros(r_slot, block.n_A)]
            return [w.new_zeros(block.n_G, block.n_A)]
        inverse = self._damped_inverse(block, lam)
        if block.path == "explicit":
            U = st["U"]
            coeff = solver.explicit_utz(st.get("Xz", U), z.reshape(-1), st.get("sketch_idx"))
            return [solver.explicit_uc(U, inverse @ coeff).view(block.n_G, block.n_A)]
        Gf, Af = st["Gf"], st["Af"]
        r = Gf.shape[0] // st["K"].shape[0]
        coeff = solver.implicit_utz(st.get("YG", Gf), st.get("YA", Af), z, r,
                                    st.get("sketch_g_idx"), st.get("sketch_a_idx"))
        c = inverse @ coeff
        if self.config.uc == "exact":
            return [solver.implicit_uc_exact(Gf, Af, c, r)]
        gc, ac = solver.partial_factors(Gf, Af, c, r)
        if r < r_slot:
            gc = torch.cat([gc, gc.new_zeros(r_slot - r, block.n_G)])
            ac = torch.cat([ac, ac.new_zeros(r_slot - r, block.n_A)])
        return [gc, ac]

    def _slot_rank(self, block: Block) -> int:
        """The most factors a sample of ``block`` can have: ``min(rank, n_G, n_A)``."""
        rank = self.config.rank
        return min(block.n_G, block.n_A) if rank is None else min(rank, block.n_G, block.n_A)

    def _warn_no_curvature(self, block: Block, st: dict, lagged: bool) -> None:
        if block.name in self._warned:
            return
        self._warned.add(block.name)
        if "K" not in st:
            why = "it was not called with gradients on a curvature step"
        elif lagged and "prev_g" not in st:
            why = "the lagged variant has no previous averaged gradient for it yet"
        else:
            why = "it has curvature here but not on every rank"
        warnings.warn(f"SENG: layer {block.name!r} has no curvature yet ({why}); it follows "
                      "the fallback rule d = -g/(1+damping) until it has", stacklevel=6)

    def _damped_inverse(self, block: Block, lam: float) -> Tensor:
        cached = self._inverse.get(block)
        if cached is None or cached[0] != lam:
            cached = (lam, solver.damped_inverse(self.state[block.weight]["K"], lam))
            self._inverse[block] = cached
        return cached[1]

    # ------------------------------------------------------------------ curvature
    def _update_curvature(self) -> None:
        cfg = self.config
        records = self._capture.records
        updated = False
        loss_scale = 1.0 if self.grad_scaler is None else float(self.grad_scaler.get_scale())
        for block in self.blocks:
            rec = records.get(block)
            if rec is None or not rec.complete():
                continue
            if rec.batch_size == 0:
                raise ValueError(f"SENG: the local batch on rank {self._comm.rank} is empty on "
                                 f"a curvature step (layer {block.name!r}); every rank needs at "
                                 "least one sample per step (drop_last=True in the DataLoader "
                                 "or DistributedSampler)")
            # The captured gradients are those of loss/accumulation over the last micro-batch.
            scale = float(cfg.gradient_accumulation_steps) / loss_scale
            if cfg.loss_reduction == "mean":
                scale *= rec.batch_size
            G_hat, A_hat = block.per_sample_factors(rec.inputs, rec.grads, scale)
            rho = G_hat.shape[0]
            G_hat = G_hat * (1.0 / math.sqrt(rho))
            if block.path == "explicit":
                new = self._explicit_state(G_hat, A_hat)
            else:
                new = self._implicit_state(G_hat, A_hat)
            if not _finite([t for t in new.values() if t.is_floating_point()]):
                self._seng["curvature_skips"] += 1
                continue
            st = self.state[block.weight]
            for key in _CURVATURE_KEYS:
                st.pop(key, None)
            st.update(new)
            self._inverse.pop(block, None)
            updated = True
        if updated:
            self._seng["curvature_updates"] += 1

    def _explicit_state(self, G_hat: Tensor, A_hat: Tensor) -> dict[str, Tensor]:
        cfg = self.config
        Ut = solver.per_sample_grads(G_hat, A_hat)
        weights = Ut.pow(2).sum(0) if cfg.sketch_method == "leverage" else None
        sk = solver.sample_rows(Ut.shape[1], cfg.sketch_size, cfg.sketch_method,
                                cfg.sketch_replacement, self._generator, weights, Ut.device)
        X = solver.sketch_columns(Ut, sk)
        out = {"U": Ut, "K": X @ X.T}
        if sk is not None:
            out.update(Xz=solver.sketch_columns(Ut, sk, power=2), sketch_idx=sk[0])
        return out

    def _implicit_state(self, G_hat: Tensor, A_hat: Tensor) -> dict[str, Tensor]:
        cfg = self.config
        G, A = solver.low_rank_factors(G_hat, A_hat, cfg.rank, self._generator)
        Gf = G.reshape(-1, G.shape[2]).contiguous()
        Af = A.reshape(-1, A.shape[2]).contiguous()
        out = {"Gf": Gf, "Af": Af}
        xs = []
        for side, F in (("g", Gf), ("a", Af)):
            weights = F.pow(2).sum(0) if cfg.sketch_method == "leverage" else None
            sk = solver.sample_rows(F.shape[1], cfg.factor_sketch_size, cfg.sketch_method,
                                    cfg.sketch_replacement, self._generator, weights, F.device)
            xs.append(solver.sketch_columns(F, sk))
            if sk is not None:
                out[f"Y{side.upper()}"] = solver.sketch_columns(F, sk, power=2)
                out[f"sketch_{side}_idx"] = sk[0]
        out["K"] = solver.implicit_gram(xs[0], xs[1], G.shape[1])
        return out

    # ------------------------------------------------------------------ state
    #: When True, ``state_dict()`` is a collective that every rank must call (DeepSpeed's
    #: ``save_checkpoint`` does; the DeepSpeed plugin sets it): it holds every rank's
    #: curvature, and ``load_state_dict`` gives each rank its own back, so a checkpoint that
    #: one rank writes resumes every rank bit-exactly. Otherwise the state holds this rank's.
    state_dict_all_ranks: bool = False

    #: The ``torch.amp.GradScaler`` whose ``step(opt)`` calls ``opt.step()``, if any: the
    #: captured output gradients carry its loss scale, which the curvature divides out (the
    #: parameter gradients arrive unscaled, and a step with an overflow is never called, so it
    #: never enters the curvature).
    grad_scaler: torch.amp.GradScaler | None = None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        extra = dict(self._seng, rng=self._generator.get_state(),
                     config=self.config.fingerprint(), blocks=self._block_signature())
        if self.state_dict_all_ranks and self._comm.world_size > 1:
            sd["state"] = {i: dict(st) for i, st in sd["state"].items()}
            mine = {i: {k: st.pop(k) for k in _CURVATURE_KEYS if k in st}
                    for i, st in sd["state"].items()}
            extra["curvature_by_rank"] = self._comm.allgather_object(mine,
                                                                     name="seng.state_dict")
        sd["seng"] = extra
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("seng", None)
        if extra is None:
            raise ValueError("state_dict has no 'seng' entry: it was not saved by SENG")
        if extra["blocks"] != self._block_signature():
            raise ValueError("state_dict was saved for another model: its preconditioned "
                             f"layers {extra['blocks']} differ from this model's "
                             f"{self._block_signature()}")
        mine = self.config.fingerprint()
        diff = [k for k in mine if k in ("explicit_threshold", "rank", "uc", "variant",
                                         "sketch_size", "factor_sketch_size", "sketch_method")
                and extra["config"].get(k) != mine[k]]
        if diff:
            raise ValueError("state_dict was saved with other SENG settings: " + ", ".join(
                f"{k}={extra['config'].get(k)!r} (here {mine[k]!r})" for k in diff))
        # torch casts every state tensor to its parameter's dtype on load; the sketches' row
        # indices must stay integers, so they are put back as saved.
        indices = {(i, k): v for i, st in state_dict["state"].items() for k, v in st.items()
                   if torch.is_tensor(v) and not v.is_floating_point()}
        super().load_state_dict(state_dict)
        params = self.param_groups[0]["params"]
        for (i, k), v in indices.items():
            self.state[params[i]][k] = v.to(params[i].device)
        self._generator.set_state(extra["rng"])
        # .get: checkpoints from before a counter existed load with it at 0.
        self._seng = {k: extra.get(k, 0) for k in _COUNTERS}
        self._inverse.clear()
        by_rank = extra.get("curvature_by_rank")
        if by_rank is not None and len(by_rank) == self._comm.world_size:
            for i, entries in by_rank[self._comm.rank].items():
                self.state[params[i]].update({k: v.to(params[i].device)
                                              for k, v in entries.items()})
        elif by_rank is not None:
            warnings.warn(f"SENG: the checkpoint holds the curvature of {len(by_rank)} ranks "
                          f"and this job has {self._comm.world_size}; every rank rebuilds its "
                          "curvature at the next step", stacklevel=2)
            self._drop_curvature()
        self._arm_for(self._seng["step"])

    def _consistency_settings(self) -> dict[str, str]:
        """What every rank must agree on: settings, engine and model structure."""
        out = {f"setting {k}": repr(v) for k, v in self.config.fingerprint().items()}
        out["engine"] = self._comm.name
        out["model wrapped in DistributedDataParallel"] = repr(self._grads_averaged)
        out["number of preconditioned layers"] = repr(len(self.blocks))
        for i, b in enumerate(self.blocks):
            out[f"preconditioned layer {i}"] = f"{b.name} ({b.n_G}x{b.n_A}, {b.path})"
        shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in self.model.named_parameters()
                  if p.requires_grad]
        out["number of trainable parameters"] = repr(len(shapes))
        for i, s in enumerate(shapes):
            out[f"trainable parameter {i}"] = repr(s)
        return out

    def _block_signature(self) -> list[tuple[str, int, int, str]]:
        return [(b.name, b.n_G, b.n_A, b.path) for b in self.blocks]


def _combine(slot: list[Tensor]) -> Tensor:
    """``mean_w U_w b_w``: the averaged matrix, or eq. 28's product of averaged factors."""
    if len(slot) == 1:
        return slot[0]
    return slot[0].T @ slot[1]


def _finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one host sync (not one per tensor)."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _flat(slots: list[list[Tensor]]) -> list[Tensor]:
    return [t for slot in slots for t in slot]


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """``comm_dtype`` as a name (torch dtypes accepted); validation is SENGConfig's."""
    if isinstance(dtype, torch.dtype):
        return next((k for k, v in COMM_DTYPES.items() if v == dtype), str(dtype))
    return dtype
