"""The SENG optimizer (single process; the solver lives in :mod:`seng_dist.solver`)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from . import solver
from .capture import Capture
from .config import SENGConfig, resolve
from .layers import Block, find_blocks

_SCHEDULED = ("lr", "damping", "momentum", "weight_decay")
_CURVATURE_KEYS = ("U", "Xz", "sketch_idx", "Gf", "Af", "YG", "YA", "sketch_g_idx",
                   "sketch_a_idx", "K")


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
        comm: None or ``"local"``: this release runs on one process.
        skip_layers: module names (prefixes) or classes left to the fallback rule.
        loss_reduction: ``"mean"`` (per-sample gradients are rescaled by the batch size) or
            ``"sum"``: the reduction of the loss whose gradient the user computes.
        seed: seed of the sketch generator (its state is part of ``state_dict``).

    With ``variant="lagged"`` on one process, step ``k`` uses ``b`` from step ``k-1``'s
    gradient; the first step uses the block-diagonal rule.
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
                 comm: Any = None,
                 skip_layers: Iterable[str | type] = (),
                 loss_reduction: str = "mean",
                 seed: int = 0) -> None:
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
            loss_reduction=loss_reduction)
        if comm not in (None, "local"):
            raise ValueError(f"comm must be None or 'local' in this release, got {comm!r}")
        if (comm is None and torch.distributed.is_available()
                and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            raise ValueError("comm=None found an initialised torch.distributed process group "
                             "with several ranks; this release of SENG runs on one process")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters (requires_grad=True): "
                             "SENG has nothing to optimize")
        cfg = self.config
        defaults = {k: resolve(getattr(cfg, k), 0) for k in _SCHEDULED}
        super().__init__(params, defaults)
        self.model = model
        self.blocks: list[Block] = find_blocks(model, tuple(skip_layers))
        for b in self.blocks:
            b.path = "explicit" if b.n < cfg.explicit_threshold else "implicit"
        block_params = {id(p) for b in self.blocks for p in b.params}
        self._fallback = [p for p in params if id(p) not in block_params]
        self._generator = torch.Generator().manual_seed(seed)
        self._inverse: dict[Block, tuple[float, Tensor]] = {}
        self._warned: set[str] = set()
        self._seng: dict[str, Any] = {"step": 0, "curvature_updates": 0,
                                      "curvature_skips": 0}
        self._capture = Capture(model, self.blocks)
        self._arm_for(0)

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
    def curvature_updates(self) -> int:
        """Curvature updates done."""
        return self._seng["curvature_updates"]

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
                if not (math.isfinite(v) and (v > 0 if key in ("lr", "damping") else v >= 0)):
                    raise ValueError(f"{key} schedule returned {v!r} at step {step}; it must "
                                     f"be finite and {'> 0' if key in ('lr', 'damping') else '>= 0'}")
                group[key] = v
        return group

    def _arm_for(self, step: int) -> None:
        """Install the capture hooks iff ``step`` is a curvature step."""
        interval = resolve(self.config.curvature_update_interval, step)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError("curvature_update_interval must be an int >= 1, got "
                             f"{interval!r} at step {step}")
        if step % interval == 0:
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
        if self._capture.armed:
            self._update_curvature()
            self._capture.disarm()

        params, dirs = [], []
        decoupled = self.config.decoupled_weight_decay
        for block in self.blocks:
            if all(p.grad is None for p in block.params):
                continue
            if any(p.grad is not None and p.grad.is_sparse for p in block.params):
                raise ValueError(f"SENG does not support sparse gradients (layer {block.name})")
            g = block.grad_matrix()
            if wd and not decoupled:
                g.add_(block.param_matrix(), alpha=wd)
            d = self._block_direction(block, g, lam)
            params.extend(block.params)
            dirs.extend(block.split(d))
        fb = [p for p in self._fallback if p.grad is not None]
        if fb:
            if any(p.grad.is_sparse for p in fb):
                raise ValueError("SENG does not support sparse gradients "
                                 "(use nn.Embedding(sparse=False))")
            grads = [p.grad for p in fb]
            if wd and not decoupled:
                grads = torch._foreach_add(grads, fb, alpha=wd)
            dirs.extend(torch._foreach_mul(grads, -1.0 / (1.0 + lam)))
            params.extend(fb)
        self._apply(params, dirs, lr, mu, wd if decoupled else 0.0)

        self._seng["step"] = k + 1
        self._arm_for(k + 1)
        return loss

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

    def _block_direction(self, block: Block, g: Tensor, lam: float) -> Tensor:
        """The SENG direction of one block for its ``(n_G, n_A)`` gradient ``g``."""
        st = self.state[block.weight]
        if "K" not in st:
            if block.name not in self._warned:
                self._warned.add(block.name)
                warnings.warn(f"SENG: layer {block.name!r} has no curvature yet (it was not "
                              "called with gradients on a curvature step); it follows the "
                              "fallback rule d = -g/(1+damping) until it has", stacklevel=3)
            return g.mul_(-1.0 / (1.0 + lam))
        z = g
        if self.config.variant == "lagged":
            # b from the previous step's gradient (eq. 27); the first step has none.
            z = st.get("prev_g", g)
            st["prev_g"] = g.clone()
        inverse = self._damped_inverse(block, lam)
        if block.path == "explicit":
            U = st["U"]
            coeff = solver.explicit_utz(st.get("Xz", U), z.view(-1), st.get("sketch_idx"))
            uc = solver.explicit_uc(U, inverse @ coeff).view_as(g)
        else:
            Gf, Af = st["Gf"], st["Af"]
            r = Gf.shape[0] // st["K"].shape[0]
            coeff = solver.implicit_utz(st.get("YG", Gf), st.get("YA", Af), z, r,
                                        st.get("sketch_g_idx"), st.get("sketch_a_idx"))
            uc_fn = (solver.implicit_uc_exact if self.config.uc == "exact"
                     else solver.implicit_uc_factored)
            uc = uc_fn(Gf, Af, inverse @ coeff, r)
        return solver.direction(g, uc, lam)

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
        for block in self.blocks:
            rec = records.get(block)
            if rec is None or not rec.complete():
                continue
            scale = float(rec.batch_size) if cfg.loss_reduction == "mean" else 1.0
            G_hat, A_hat = block.per_sample_factors(rec.inputs, rec.grads, scale)
            rho = G_hat.shape[0]
            G_hat = G_hat * (1.0 / math.sqrt(rho))
            if block.path == "explicit":
                new = self._explicit_state(G_hat, A_hat)
            else:
                new = self._implicit_state(G_hat, A_hat)
            # One host sync per block, not one per tensor.
            finite = torch.stack([torch.isfinite(t).all() for t in new.values()
                                  if t.is_floating_point()]).all()
            if not bool(finite):
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
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["seng"] = dict(self._seng, rng=self._generator.get_state(),
                          config=self.config.fingerprint(), blocks=self._block_signature())
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
        self._seng = {k: extra[k] for k in ("step", "curvature_updates", "curvature_skips")}
        self._inverse.clear()
        self._arm_for(self._seng["step"])

    def _block_signature(self) -> list[tuple[str, int, int, str]]:
        return [(b.name, b.n_G, b.n_A, b.path) for b in self.blocks]
