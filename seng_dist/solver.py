"""The per-layer SENG solver as pure tensor functions.

Nothing here communicates or keeps state: the optimizer (and the distributed variants) call
these functions on one block's curvature and gradient. Notation follows the paper (Yang et
al., 2021, "Sketchy Empirical Natural Gradient Methods for Deep Learning") and
``docs/design.md``:

* explicit blocks keep ``Ut = Uᵀ`` of shape ``(ϱ, n)`` (rows are ``u_i / √ϱ``);
* implicit blocks keep ``Gf`` ``(ϱ·r, n_G)`` and ``Af`` ``(ϱ·r, n_A)``, the transposes of the
  paper's ``G̃`` and ``Ã`` (eq. 16): row ``i·r + j`` is factor ``j`` of sample ``i``, and
  ``u_i / √ϱ ≈ vec(Σ_j Gf[i·r+j]ᵀ Af[i·r+j])``;
* a sketch is ``(idx, scale)``: the sampled rows and their ``1/√(q p_j)`` weights (eq. 14);
  the weights are folded into the stored factors, so only ``idx`` is kept between updates.

The direction is ``d = -(g - U b) / λ`` with ``b = (λI + ΞᵀΞ)⁻¹ Ξᵀ ξ`` (eq. 8, 12, 24).
"""

from __future__ import annotations

import torch
from torch import Tensor

Sketch = tuple[Tensor, Tensor]


def sample_rows(
    n: int,
    q: int | None,
    method: str,
    replacement: bool,
    generator: torch.Generator,
    weights: Tensor | None = None,
    device: torch.device | None = None,
) -> Sketch | None:
    """Row sampling of eq. 14: ``q`` of ``n`` rows with scales ``1/√(q p_j)``.

    ``method`` is ``"uniform"`` or ``"leverage"`` (``p_j ∝ weights_j``, the squared row norms).
    Returns None when no sketch is needed (``q`` is None, or ``q >= n`` without replacement:
    the exact problem is then no larger than the sketched one). The leverage distribution is
    mixed with 1% of the uniform one so that rows of zero norm keep a chance. With
    replacement the weights are eq. 14's ``1/√(q p_j)``. Without replacement, leverage rows are
    drawn by systematic sampling with inclusion probabilities ``π_j = min(1, c·p_j)``
    (``Σ π_j = q``) and weighted ``1/√π_j`` — eq. 14's weights for small ``q p_j``, exact
    in expectation, and exact outright as ``q → n`` (successive sampling with
    ``1/√(q p_j)`` is neither).
    """
    if q is None or (q >= n and not replacement):
        return None
    if method == "uniform":
        if replacement:
            idx = torch.randint(n, (q,), generator=generator)
        else:
            idx = torch.randperm(n, generator=generator)[:q]
        scale = torch.full((q,), (n / q) ** 0.5)
    else:
        if weights is None:
            raise ValueError("leverage-score sampling needs the rows' weights")
        w = weights.detach().to("cpu", torch.float64)
        total = w.sum()
        p = torch.full_like(w, 1.0 / n)
        if total > 0:
            p = 0.99 * w / total + 0.01 / n
        if replacement:
            idx = torch.multinomial(p, q, replacement=True, generator=generator)
            scale = (q * p[idx]).rsqrt()
        else:
            pi = inclusion_probabilities(p, q)
            start = torch.rand((), generator=generator, dtype=torch.float64)
            points = start + torch.arange(q, dtype=torch.float64)
            idx = torch.searchsorted(torch.cumsum(pi, 0), points, right=True).clamp_(max=n - 1)
            scale = pi[idx].rsqrt()
    device = device if device is not None else (weights.device if weights is not None else None)
    return idx.to(device), scale.to(device)


def inclusion_probabilities(p: Tensor, q: int) -> Tensor:
    """``π = min(1, c·p)`` with ``c`` such that ``Σ π = q`` (rows capped at 1 are certain)."""
    capped = torch.zeros_like(p, dtype=torch.bool)
    while True:
        c = (q - int(capped.sum())) / float(p[~capped].sum())
        newly = ~capped & (c * p >= 1.0)
        if not bool(newly.any()):
            return torch.where(capped, torch.ones_like(p), c * p)
        capped |= newly


# --------------------------------------------------------------------------- explicit path


def per_sample_grads(G_hat: Tensor, A_hat: Tensor) -> Tensor:
    """``Uᵀ`` rows before normalisation: ``vec(Ĝ_iᵀ Â_i)``, shape ``(ϱ, n_G·n_A)``."""
    return torch.bmm(G_hat.transpose(1, 2), A_hat).reshape(G_hat.shape[0], -1)


def sketch_columns(M: Tensor, sketch: Sketch | None, power: int = 1) -> Tensor:
    """Sampled columns of ``M`` times ``scale**power``; ``M`` itself when not sketched.

    With ``M = Uᵀ`` and ``power=1`` this is ``Ξᵀ = (ΩU)ᵀ`` (eq. 11); with ``M = G̃ᵀ`` it is
    ``(Ω_G G̃)ᵀ`` (eq. 17). ``power=2`` folds ``Ω``'s weights of both sides of ``Ξᵀ Ω z`` into
    the stored factor, so a step only gathers the rows of ``z``.
    """
    if sketch is None:
        return M
    idx, scale = sketch
    return M.index_select(1, idx) * scale.to(M.dtype).pow(power)


def explicit_utz(Xz: Tensor, z: Tensor, idx: Tensor | None) -> Tensor:
    """``Ξᵀ ξ`` for a flat ``z`` of length n, with ``Xz = sketch_columns(Uᵀ, Ω, power=2)``."""
    if idx is not None:
        z = z.index_select(0, idx)
    return Xz @ z


def explicit_uc(Ut: Tensor, c: Tensor) -> Tensor:
    """``U c`` as a flat vector of length n."""
    return c @ Ut


# --------------------------------------------------------------------------- implicit path


def low_rank_factors(
    G_hat: Tensor,
    A_hat: Tensor,
    rank: int | None,
    generator: torch.Generator | None = None,
    oversample: int = 4,
    power_iters: int = 1,
) -> tuple[Tensor, Tensor]:
    """Factors ``G (ϱ, r, n_G)``, ``A (ϱ, r, n_A)`` with ``G_iᵀ A_i ≈ Ĝ_iᵀ Â_i`` (eq. 15).

    Exact when ``rank`` is None or at least ``m = min(κ, n_G, n_A)``: the factors are ``Ĝ, Â``
    themselves when ``κ`` is the smallest size, else the per-sample gradient against an
    identity (rank ``min(n_G, n_A)``, no truncation). Otherwise a truncated SVD of each
    per-sample gradient with ``√σ`` on each side: computed exactly on a ``κ×κ`` core (thin QR)
    when ``rank + oversample >= m``, else by randomized SVD (Halko et al., 2011: a Gaussian
    range sketch of ``rank + oversample`` columns drawn from ``generator``, ``power_iters``
    power iterations) applied in factored form, so the ``n_G×n_A`` per-sample gradients are
    never formed.
    """
    if G_hat.dtype.itemsize < 4:
        # CPU LAPACK has no 16-bit QR/SVD, and their rounding would swamp the factors anyway.
        G, A = low_rank_factors(
            G_hat.float(), A_hat.float(), rank, generator, oversample, power_iters
        )
        return G.to(G_hat.dtype), A.to(A_hat.dtype)
    rho, kappa, n_g = G_hat.shape
    n_a = A_hat.shape[2]
    m = min(kappa, n_g, n_a)
    if rank is None or rank >= m:
        if kappa <= min(n_g, n_a):
            return G_hat, A_hat
        u = torch.bmm(G_hat.transpose(1, 2), A_hat)  # (ϱ, n_G, n_A)
        if n_g <= n_a:
            eye = torch.eye(n_g, dtype=u.dtype, device=u.device).expand(rho, n_g, n_g)
            return eye, u
        eye = torch.eye(n_a, dtype=u.dtype, device=u.device).expand(rho, n_a, n_a)
        return u.transpose(1, 2), eye
    Gt, At = G_hat.transpose(1, 2), A_hat.transpose(1, 2)  # (ϱ, n_G, κ), (ϱ, n_A, κ)
    k = rank + oversample
    if k >= m:
        if kappa <= min(n_g, n_a):
            qg, rg = torch.linalg.qr(Gt)
            qa, ra = torch.linalg.qr(At)
            p, s, vh = torch.linalg.svd(rg @ ra.transpose(1, 2))
            left, right = qg @ p[..., :rank], qa @ vh[:, :rank].transpose(1, 2)
        else:
            p, s, vh = torch.linalg.svd(torch.bmm(Gt, A_hat), full_matrices=False)
            left, right = p[..., :rank], vh[:, :rank].transpose(1, 2)
    else:
        left, s, right = _randomized_svd(G_hat, A_hat, rank, k, generator, power_iters)
    root = s[:, :rank].sqrt().unsqueeze(1)
    return (left * root).transpose(1, 2), (right * root).transpose(1, 2)


def _randomized_svd(
    G_hat: Tensor,
    A_hat: Tensor,
    rank: int,
    k: int,
    generator: torch.Generator | None,
    power_iters: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets ``(left (ϱ, n_G, rank), σ (ϱ, k), right (ϱ, n_A, rank))``
    of each ``u_i = Ĝ_iᵀ Â_i`` from a ``k``-column Gaussian range sketch, never forming ``u``."""
    Gt, At = G_hat.transpose(1, 2), A_hat.transpose(1, 2)  # (ϱ, n_G, κ), (ϱ, n_A, κ)
    # Products with Â are written as (k×κ)·Â or (k×n_A)·Âᵀ: with unfold's layout these are
    # the fast orientations for batched GEMM (measured ~2× over Â·(n_A×k)).
    omega = torch.randn(k, A_hat.shape[2], generator=generator, dtype=G_hat.dtype).to(G_hat.device)
    y = Gt @ (omega @ At).transpose(1, 2)  # u Ω, (ϱ, n_G, k)
    for _ in range(power_iters):
        q = torch.linalg.qr(y).Q
        z = torch.linalg.qr(((G_hat @ q).transpose(1, 2) @ A_hat).transpose(1, 2)).Q
        y = Gt @ (z.transpose(1, 2) @ At).transpose(1, 2)  # u z, z a basis of uᵀq
    q = torch.linalg.qr(y).Q  # (ϱ, n_G, k)
    b = (G_hat @ q).transpose(1, 2) @ A_hat  # qᵀ u, (ϱ, k, n_A)
    # SVD of the wide b through a thin QR of bᵀ: a k×k SVD (measured ~4× faster).
    qb, rb = torch.linalg.qr(b.transpose(1, 2))
    p, s, vh = torch.linalg.svd(rb.transpose(1, 2))
    return q @ p[..., :rank], s, qb @ vh[:, :rank].transpose(1, 2)


def implicit_gram(XG: Tensor, XA: Tensor, r: int) -> Tensor:
    """``ΞᵀΞ`` of eq. 21: ``K_ij = Σ_kl (Ξ_Aiᵀ Ξ_Aj)_kl (Ξ_Giᵀ Ξ_Gj)_kl``, shape ``(ϱ, ϱ)``."""
    m = (XG @ XG.T) * (XA @ XA.T)
    rho = m.shape[0] // r
    return m.view(rho, r, rho, r).sum(dim=(1, 3))


def implicit_utz(
    YG: Tensor, YA: Tensor, z: Tensor, r: int, idx_g: Tensor | None, idx_a: Tensor | None
) -> Tensor:
    """``Uᵀz`` by eq. 19 for ``z`` as an ``(n_G, n_A)`` matrix: ``Ξ_z = Ω_G z Ω_Aᵀ``.

    ``YG, YA = sketch_columns(Gf, Ω_G, 2), sketch_columns(Af, Ω_A, 2)`` carry both sides'
    sketch weights, so only the sampled rows and columns of ``z`` are gathered here.
    """
    if idx_g is not None:
        z = z.index_select(0, idx_g)
    if idx_a is not None:
        z = z.index_select(1, idx_a)
    v = ((YG @ z) * YA).sum(dim=1)
    return v if r == 1 else v.view(-1, r).sum(dim=1)


def implicit_uc_exact(Gf: Tensor, Af: Tensor, c: Tensor, r: int) -> Tensor:
    """``U c = Σ_i c_i G_iᵀ A_i`` as one matrix product, shape ``(n_G, n_A)``."""
    w = c.to(Gf.dtype)
    w = (w if r == 1 else w.repeat_interleave(r)).unsqueeze(1)
    return (Gf * w).T @ Af


def partial_factors(Gf: Tensor, Af: Tensor, c: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``Gᶜ = Σ √|c_i| G_i`` and ``Aᶜ = Σ c_i / (Σ_j √|c_j|) A_i``, of shapes ``(r, n_G)`` and
    ``(r, n_A)``.

    The factored ``Uc ≈ Gᶜᵀ Aᶜ`` of eq. 23; summed over workers they give eq. 28.
    """
    c = c.to(Gf.dtype)
    w = c.abs().sqrt()
    rho = c.shape[0]
    gc = torch.einsum("i,irg->rg", w, Gf.view(rho, r, -1))
    ac = torch.einsum(
        "i,ira->ra", c / w.sum().clamp_min(torch.finfo(c.dtype).tiny), Af.view(rho, r, -1)
    )
    return gc, ac


def implicit_uc_factored(Gf: Tensor, Af: Tensor, c: Tensor, r: int) -> Tensor:
    """``U c`` by the paper's factored approximation (eq. 23), shape ``(n_G, n_A)``."""
    gc, ac = partial_factors(Gf, Af, c, r)
    return gc.T @ ac


# --------------------------------------------------------------------------- the small solve


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype SENG computes and keeps in for parameters (or factors) of ``dtype``: at least
    float32. The Gram matrix ``K``: rounded to bf16 it has eigenvalues down to -5e-4·‖K‖
    (measured), below many runs' ``-λ``; products of bf16 or fp16 factors are exact in float32.
    For bf16/fp16 parameters also the captured factors, the curvature, the averaged gradient,
    the directions, the optimizer state and the master copy of the parameters."""
    return torch.promote_types(dtype, torch.float32)


def rounding_level(K: Tensor) -> float:
    """``ε·tr(K)`` (``ε`` of K's dtype): the size of K's rounding errors, under which its
    eigenvalues are noise."""
    return torch.finfo(K.dtype).eps * float(K.diagonal().sum())


def damped_inverse(K: Tensor, damping: float) -> Tensor:
    """``(K + λI)⁻¹`` for a Gram matrix ``K``, positive semi-definite up to its rounding.

    While ``tr(K)/λ ≤ ε^-½`` (``ε`` of K's dtype) the inverse is rounded to K's dtype with
    errors below ``√ε`` (computed through Cholesky in float64, as release 0.1.0 did: its
    checkpoints resume bit-exactly). Below that damping the small solve is kept in float64 and
    goes through the symmetric eigendecomposition of ``K``: rounding (bf16 factors, a whitened
    Gram spanning 1e6 to 1e-2) leaves negative eigenvalues larger than a small ``λ``, where
    Cholesky fails, and an inverse rounded to K's dtype keeps its ``1/λ`` entries and buries
    the ``1/σ²`` of the curvature's own directions. The eigenvalues are clamped at 0, and
    ``σ² + λ`` at :func:`rounding_level`: a direction whose curvature is lost in rounding is
    treated as outside the span of ``U`` (step ``-g/λ``) rather than amplified by ``1/λ`` times
    its noise. The matrix is only ``ϱ×ϱ`` and is cached by the caller while ``λ`` is unchanged;
    apply it with :func:`apply_inverse`. ``ValueError`` if ``K`` or the inverse is not finite.
    """
    k = K.to(torch.float64)
    if not bool(torch.isfinite(k).all()):
        raise ValueError("its Gram matrix K holds NaN or Inf")
    level = rounding_level(K)
    inverse = None
    if level <= damping * torch.finfo(K.dtype).eps ** 0.5:  # tr(K)/λ ≤ ε^-½
        eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
        factor, info = torch.linalg.cholesky_ex(k + damping * eye)
        if int(info) == 0:  # else K is far from PSD, not a rounded Gram: clamp it below
            inverse = torch.cholesky_inverse(factor).to(K.dtype)
    if inverse is None:
        values, vectors = torch.linalg.eigh((k + k.T) / 2)
        inverse = (vectors / (values.clamp_min(0.0) + damping).clamp_min(level)) @ vectors.T
    if not bool(torch.isfinite(inverse).all()):  # K ≈ 0 and a subnormal λ
        raise ValueError(f"(K + λI)⁻¹ overflows {str(inverse.dtype).removeprefix('torch.')}")
    return inverse


def apply_inverse(inverse: Tensor, v: Tensor) -> Tensor:
    """``(K + λI)⁻¹ v`` in the precision of :func:`damped_inverse`'s result, in ``v``'s
    dtype."""
    return (inverse @ v.to(inverse.dtype)).to(v.dtype)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one host sync (not one per tensor)."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def direction(g: Tensor, uc: Tensor, damping: float) -> Tensor:
    """``d = -(g - U b) / λ`` (eq. 8/13/24), written over ``uc`` (a fresh tensor: on a CPU a
    new tensor of a layer's size costs its page faults every step)."""
    return uc.sub_(g).div_(damping)


def factored_whitening(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(w_G, w_A)`` with ``w ≈ w_G w_Aᵀ`` for an ``(n_G, n_A)`` whitening ``w = D^-½``:
    ``D ≈ r cᵀ/m`` from its row means ``r``, column means ``c`` and mean ``m``."""
    d = w.pow(-2)
    root = d.mean().sqrt()
    return (d.mean(1) / root).rsqrt_(), (d.mean(0) / root).rsqrt_()
