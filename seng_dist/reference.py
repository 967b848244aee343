"""Independent references for checking SENG: the exact float64 direction, and distributed
SENG emulated in one process. Both are public: they check SENG on a user's own model.

* :func:`reference_directions` shares nothing with the solver: per-sample gradients come from
  ``torch.func`` (``vmap(grad(...))``) on a float64 copy of the model, and each layer's
  direction is ``-(U Uᵀ + λI)⁻¹ g`` (or ``-(U Uᵀ + λD)⁻¹ g`` for a given diagonal ``D``) by
  Sherman-Morrison-Woodbury in float64. Models with BatchNorm must be in eval mode:
  in train mode the batch statistics couple the samples and a per-sample gradient is not
  defined.
* :func:`emulate_distributed` runs distributed SENG's formulas (``docs/design.md``) for M
  workers in one process, with no communicator: each worker's curvature and correction come
  from the (communication-free) curvature objects on its shard, and the averaging, the two
  variants and eq. 28 are written out here with plain tensor means.

Checking your own model against the exact direction: without sketching, SENG's step with
``lr=1`` and no momentum is ``-(U Uᵀ + λI)⁻¹ g`` on every block, up to float32 rounding. Build
the reference before the step (it reads the current parameters) with the same damping,
curvature batch and loss (the loss of a batch must be the mean of its samples' losses)::

    import torch.nn.functional as F
    from seng_dist import SENG
    from seng_dist.reference import reference_directions, relative_error

    model.eval()  # fixed BatchNorm statistics, so that per-sample gradients are defined
    opt = SENG(model, lr=1.0, damping=0.3, momentum=0.0, curvature_batch_size=None,
               explicit_threshold=10**9, sketch_size=None)
    ref = reference_directions(model, x, y, [b.name for b in opt.blocks], damping=0.3)
    before = {b.name: b.param_matrix().clone() for b in opt.blocks}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for b in opt.blocks:
        print(b.name, relative_error(b.param_matrix() - before[b.name], ref[b.name]))

Errors near float32's rounding (1e-6 to 1e-5; more where λ is small against the curvature)
say the block's direction is exact. The implicit (low-rank) path is exact too with
``explicit_threshold=0, sketch_size=None, factor_rank=None, factor_sketch_size=None,
uc="exact"``.
A distributed run is checked against :func:`emulate_distributed`, given the initial model,
the same settings and every rank's batch of every step (``shards[step][rank]``): the
parameters it returns for each step are what every rank holds after that step.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .builder import CurvatureBuilder
from .config import Fisher, SENGConfig, resolve
from .fisher import Distribution
from .layers import find_blocks
from .passes import BackwardPasses


def per_sample_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> dict[str, Tensor]:
    """``∇ψ_i`` for every sample, per parameter name, in float64: shape ``(B, *p.shape)``."""
    m = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in m.named_buffers()}

    def loss_i(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(m, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    # Token ids (an Embedding's input) stay integers.
    return vmap(grad(loss_i), in_dims=(None, 0, 0))(
        params, x.double() if x.is_floating_point() else x, y
    )


def block_matrix(grads: dict[str, Tensor], layer: str) -> Tensor:
    """``[W | b]`` of a block from per-name tensors with a leading sample dim: ``(B, n_G, n_A)``.

    ``layer`` is a block name: a module's (``weight``, ``bias``), or an attention module's
    projection, ``<attn>.in_proj`` (``in_proj_weight``, ``in_proj_bias``) or
    ``<attn>.q_proj`` (``q_proj_weight`` alone; likewise ``k``, ``v``).
    """
    if f"{layer}.weight" in grads:
        w, b = grads[f"{layer}.weight"], grads.get(f"{layer}.bias")
    else:
        w, b = grads[f"{layer}_weight"], grads.get(f"{layer}_bias")
    w = w.reshape(w.shape[0], w.shape[1], -1)
    return w if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1)


def reference_directions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: list[str],
    damping: float,
    curvature_batch_size: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    diagonal: Callable[[Tensor], Tensor] | None = None,
    curvature_targets: Tensor | None = None,
    curvature_loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Exact SENG direction ``-(UUᵀ + λD)⁻¹ g`` of each named layer, ``(n_G, n_A)`` float64.

    ``g`` is the mean gradient over the whole batch, ``U = [u_1 … u_ϱ]/√ϱ`` over its first
    ϱ samples; ``D`` is ``I``, or ``diagonal(g)`` (the block's shape) when given. For the
    Monte-Carlo Fisher, ``u_i`` are the gradients of ``curvature_loss_fn`` (default
    ``loss_fn``) at ``curvature_targets`` (one per curvature sample, as
    ``SENG.sample_fisher`` returned them).
    """
    grads = per_sample_gradients(model, x, y, loss_fn)
    sampled = None
    if curvature_targets is not None:
        k = curvature_targets.shape[0]
        sampled = per_sample_gradients(
            model, x[:k], curvature_targets, curvature_loss_fn or loss_fn
        )
    out = {}
    for layer in layers:
        u = block_matrix(grads, layer)
        d = None if diagonal is None else diagonal(u.mean(0))
        cu = None if sampled is None else block_matrix(sampled, layer)
        out[layer] = exact_direction(u, damping, curvature_batch_size, d, cu)
    return out


def exact_direction(
    u: Tensor,
    damping: float,
    curvature_batch_size: int | None = None,
    diagonal: Tensor | None = None,
    curvature_u: Tensor | None = None,
) -> Tensor:
    """``-(UUᵀ + λD)⁻¹ g`` from per-sample gradients ``u`` (B, ...): ``g`` their mean, ``U``
    the first ϱ of them (of ``curvature_u`` when given) over ``√ϱ``, ``D`` the given diagonal
    (``u[0]``'s shape) or ``I``; by Sherman-Morrison-Woodbury, ``(D⁻¹g - D⁻¹U b)/λ`` with
    ``b = (λI + UᵀD⁻¹U)⁻¹ UᵀD⁻¹g``, so that a block of any size costs ϱ×ϱ solves."""
    shape = u.shape[1:]
    u = u.reshape(u.shape[0], -1)
    g = u.mean(0)
    inv = torch.ones_like(g) if diagonal is None else 1.0 / diagonal.reshape(-1)
    rows = u if curvature_u is None else curvature_u.reshape(curvature_u.shape[0], -1)
    rho = (
        rows.shape[0] if curvature_batch_size is None else min(curvature_batch_size, rows.shape[0])
    )
    Ut = rows[:rho] / rho**0.5
    K = (Ut * inv) @ Ut.T + damping * torch.eye(rho, dtype=u.dtype, device=u.device)
    b = torch.linalg.solve(K, Ut @ (inv * g))
    return -(inv * (g - b @ Ut) / damping).reshape(shape)


def relative_error(a: Tensor, b: Tensor) -> float:
    """``‖a - b‖ / ‖b‖`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- distributed


def emulate_distributed(
    model: nn.Module,
    shards: list[list[tuple[Tensor, Tensor]]],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    distribution: str = "categorical",
    **seng_kwargs: Any,
) -> list[dict[str, Tensor]]:
    """Distributed SENG on ``shards[k][w]`` (step k, worker w), emulated in one process.

    Returns the parameters (by name) after every step. Every worker has a replica of
    ``model``; its curvature comes from a :class:`~seng_dist.builder.CurvatureBuilder` on that
    replica (so sketches and randomized factors draw from the same seeded generator as a real
    rank would) and each worker's correction from its blocks' ``correction``. The rest is
    ``docs/design.md`` ("Distributed SENG") written out with plain tensor means:
    ``ḡ = mean_w g_w`` (clipped to ``max_grad_norm`` if set); ``z = ḡ + wd·θ``; each worker's
    ``U_w c_w`` for ``c_w = (λI + K_w)⁻¹ U_wᵀ z_src`` with ``z_src = z`` (blockdiag, and the
    first lagged step) or the previous step's ``z`` (lagged); ``d = -(z - mean_w U_w c_w)/λ``,
    with eq. 28's ``(mean_w Gᶜ_w)ᵀ (mean_w Aᶜ_w)`` on implicit blocks with ``uc="factored"``;
    the fallback ``-z/(1+λ)``; heavy-ball momentum and ``θ ← θ + lr·v``. Every gradient must
    be present. With ``damping_diagonal="adam"``: every block's and fallback parameter's
    ``v ← β₂v + (1-β₂)z²`` and ``W = (√(v/(1-β₂ᵗ)) + ε)^-½``; the curvature built from ``W``
    of the step before (none at the first step), the sources ``W z`` (blockdiag) or the
    previous ``z`` times the previous ``W`` (lagged), ``d = W (U c - W z)/λ`` and the
    fallback ``-W² z/λ``. With ``fisher="mc"`` each worker's curvature comes from targets
    drawn from ``distribution`` (per-sample losses reduced by their mean), as a rank's
    ``opt.sample_fisher(output, distribution)`` draws them.
    """
    cfg = SENGConfig.from_settings(**seng_kwargs)
    run = _Emulation(model, cfg, len(shards[0]), Distribution.parse("distribution", distribution))
    previous: list[Tensor] | None = None
    history = []
    for k, step_shards in enumerate(shards):
        before = [run.moments.whitening(i) for i in range(len(run.per_block))]
        run.backward(step_shards, loss_fn, before)
        lr, lam, mu, wd = (
            float(resolve(cfg, h, k)) for h in ("lr", "damping", "momentum", "weight_decay")
        )
        l2 = 0.0 if cfg.decoupled_weight_decay else wd
        zs, fmeans = run.averaged(l2)
        lagged = cfg.distributed.variant == "lagged" and previous is not None
        ws = [run.moments.update(i, z) for i, z in enumerate(zs)]
        if lagged and previous is not None:
            sources = [_times(z, w) for z, w in zip(previous, before, strict=True)]
        else:
            sources = [_times(z, w) for z, w in zip(zs, ws, strict=True)]
        update = run.directions(zs, fmeans, sources, ws, lam, l2)
        previous = zs
        run.apply(update, lr, mu, wd)
        for builder in run.builders:
            builder.arm_for(k + 1)
        history.append({n: p.detach().clone() for n, p in run.params[0].items()})
    return history


def _times(z: Tensor, w: Tensor | None) -> Tensor:
    return z if w is None else z * w


class _Moments:
    """The damping diagonal's second moments, written out: ``W`` per key (None for ``λI``,
    or before the key's first step)."""

    def __init__(self, cfg: SENGConfig) -> None:
        self.on = cfg.diagonal.damping_diagonal == "adam"
        self.beta2, self.eps = cfg.diagonal.damping_beta2, cfg.diagonal.damping_epsilon
        self.sq: dict[Any, Tensor] = {}
        self.steps: dict[Any, int] = {}

    def whitening(self, key: Any) -> Tensor | None:
        if key not in self.sq:
            return None
        v = self.sq[key] / (1.0 - self.beta2 ** self.steps[key])
        return (v.sqrt() + self.eps).rsqrt()

    def update(self, key: Any, z: Tensor) -> Tensor | None:
        if not self.on:
            return None
        self.sq[key] = (
            self.sq.get(key, torch.zeros_like(z))
            .mul(self.beta2)
            .addcmul(z, z, value=1.0 - self.beta2)
        )
        self.steps[key] = self.steps.get(key, 0) + 1
        return self.whitening(key)


class _Emulation:
    """The workers' replicas and curvature builders, and the formulas written out.

    The same operation forms as the optimizer (alpha-adds, products with reciprocals), so that
    only the order of the ranks' sums can differ from a real run.
    """

    def __init__(
        self, model: nn.Module, cfg: SENGConfig, workers: int, distribution: Distribution
    ) -> None:
        self.cfg = cfg
        self.distribution = distribution
        self.replicas = [copy.deepcopy(model) for _ in range(workers)]
        self.builders = []
        for rep in self.replicas:
            blocks = find_blocks(
                rep, cfg.skip_layers, cfg.sketch.explicit_threshold, cfg.batch_first
            ).blocks
            passes = BackwardPasses(rep, list(rep.parameters()))
            self.builders.append(CurvatureBuilder(passes, blocks, cfg, defaultdict(dict)))
            self.builders[-1].arm_for(0)
        # block i of every worker
        self.per_block = list(zip(*(b.curvatures for b in self.builders), strict=True))
        self.params = [dict(rep.named_parameters()) for rep in self.replicas]
        self.names = {id(p): n for n, p in self.params[0].items()}
        in_blocks = {id(p) for c in self.builders[0].curvatures for p in c.block.params}
        self.fallback = [
            n for n, p in self.params[0].items() if p.requires_grad and id(p) not in in_blocks
        ]
        self.momentum: dict[str, Tensor] = {}
        self.moments = _Moments(cfg)

    def backward(
        self,
        shards: list[tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        whitenings: list[Tensor | None],
    ) -> None:
        """Each worker's gradient on its shard, and its curvature (from ``whitenings[i]``'s
        ``W`` for block ``i``) on curvature steps."""
        for builder, rep, (x, y) in zip(self.builders, self.replicas, shards, strict=True):
            for p in rep.parameters():
                p.grad = None
            builder.passes.open_window()
            out = rep(x)
            if self.cfg.fisher is Fisher.MC:
                builder.sample(out, self.distribution, "mean")
            loss_fn(out, y).backward()
            index = {id(c.block.weight): i for i, c in enumerate(builder.curvatures)}

            def whitening(weight: Tensor, index: dict[int, int] = index) -> Tensor | None:
                return whitenings[index[id(weight)]]

            builder.refresh(whitening=whitening)

    def averaged(self, l2: float) -> tuple[list[Tensor], list[Tensor]]:
        """``z = ḡ + l2·θ`` per block and ``ḡ`` per fallback parameter (``ḡ`` clipped)."""
        means = [torch.stack([c.block.grad_matrix() for c in cs]).mean(0) for cs in self.per_block]
        fmeans = [
            torch.stack([_grad(ps[n], n) for ps in self.params]).mean(0) for n in self.fallback
        ]
        if self.cfg.max_grad_norm is not None:  # the averaged gradient, before weight decay
            norm = torch.cat([t.reshape(-1) for t in means + fmeans]).norm()
            factor = min(1.0, self.cfg.max_grad_norm / (float(norm) + 1e-6))
            means, fmeans = [t * factor for t in means], [t * factor for t in fmeans]
        zs = [
            m.add_(cs[0].block.param_matrix(), alpha=l2)
            for m, cs in zip(means, self.per_block, strict=True)
        ]
        return zs, fmeans

    def directions(
        self,
        zs: list[Tensor],
        fmeans: list[Tensor],
        sources: list[Tensor],
        ws: list[Tensor | None],
        lam: float,
        l2: float,
    ) -> dict[str, Tensor]:
        """Every parameter's direction, by name: each worker's correction for ``sources``."""
        update: dict[str, Tensor] = {}
        for cs, z, src, w in zip(self.per_block, zs, sources, ws, strict=True):
            parts = [c.correction(src, lam) for c in cs]
            if len(parts[0]) == 1:
                uc = torch.stack([p[0] for p in parts]).mean(0)
            else:
                uc = torch.stack([p[0] for p in parts]).mean(0).T @ torch.stack(
                    [p[1] for p in parts]
                ).mean(0)
            d = (uc - _times(z, w)) / lam
            d = _times(d, w)
            for p, piece in zip(cs[0].block.params, cs[0].block.split(d), strict=True):
                update[self.names[id(p)]] = piece
        for n, g in zip(self.fallback, fmeans, strict=True):
            g = g.add(self.params[0][n].detach(), alpha=l2)
            w = self.moments.update(n, g)
            update[n] = g * (-1.0 / (1.0 + lam)) if w is None else g * w * w * (-1.0 / lam)
        return update

    @torch.no_grad()
    def apply(self, update: dict[str, Tensor], lr: float, mu: float, wd: float) -> None:
        """Heavy-ball momentum and ``θ ← θ + lr·v`` on worker 0, copied to the others."""
        for name, d in update.items():
            if mu:
                v = self.momentum[name] = (
                    d.clone() if name not in self.momentum else self.momentum[name].mul_(mu).add_(d)
                )
            else:
                v = d
            p = self.params[0][name]
            if self.cfg.decoupled_weight_decay and wd:
                p.mul_(1.0 - lr * wd)
            p.add_(v, alpha=lr)
        for rep in self.replicas[1:]:
            for mine, theirs in zip(rep.parameters(), self.replicas[0].parameters(), strict=True):
                mine.copy_(theirs)


def _grad(p: Tensor, name: str) -> Tensor:
    if p.grad is None:
        raise ValueError(f"emulate_distributed needs every gradient; {name!r} has none")
    return p.grad
