"""The per-layer SENG solver as pure tensor functions.

Nothing here communicates or keeps state: the optimizer (and the distributed variants) call
these functions on one block's curvature and gradient. Notation follows the paper
(``../shared/paper``) and DESIGN.md:

* explicit blocks keep ``Ut = Uᵀ`` of shape ``(ϱ, n)`` (rows are ``u_i / √ϱ``);
* implicit blocks keep ``Gf`` ``(ϱ·r, n_G)`` and ``Af`` ``(ϱ·r, n_A)``, the transposes of the
  paper's ``G̃`` and ``Ã`` (eq. 16): row ``i·r + j`` is factor ``j`` of sample ``i``, and
  ``u_i / √ϱ ≈ vec(Σ_j Gf[i·r+j]ᵀ Af[i·r+j])``;
* a sketch is ``(idx, scale)``: the sampled rows and their ``1/√(q p_j)`` weights (eq. 14).

The direction is ``d = -(g - U b) / λ`` with ``b = (λI + ΞᵀΞ)⁻¹ Ξᵀ ξ`` (eq. 8, 12, 24).
"""

from __future__ import annotations

import torch
from torch import Tensor

Sketch = tuple[Tensor, Tensor]


def sample_rows(n: int, q: int | None, method: str, replacement: bool,
                generator: torch.Generator, weights: Tensor | None = None,
                device: torch.device | None = None) -> Sketch | None:
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
        w = weights.detach().to("cpu", torch.float64)
        total = w.sum()
        p = torch.full_like(w, 1.0 / n)
        if total > 0:
            p = 0.99 * w / total + 0.01 / n
        if replacement:
            idx = torch.multinomial(p, q, replacement=True, generator=generator)
            scale = (q * p[idx]).rsqrt()
        else:
            pi = _inclusion_probabilities(p, q)
            start = torch.rand((), generator=generator, dtype=torch.float64)
            points = start + torch.arange(q, dtype=torch.float64)
            idx = torch.searchsorted(torch.cumsum(pi, 0), points, right=True).clamp_(max=n - 1)
            scale = pi[idx].rsqrt()
    device = device if device is not None else (weights.device if weights is not None else None)
    return idx.to(device), scale.to(device)


def _inclusion_probabilities(p: Tensor, q: int) -> Tensor:
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


def explicit_sketch(Ut: Tensor, sketch: Sketch | None) -> Tensor:
    """``Ξᵀ = (ΩU)ᵀ``, shape ``(ϱ, q)``; ``Ut`` itself when not sketched."""
    if sketch is None:
        return Ut
    idx, scale = sketch
    return Ut[:, idx] * scale.to(Ut.dtype)


def explicit_utz(X: Tensor, z: Tensor, sketch: Sketch | None) -> Tensor:
    """``Ξᵀ ξ`` with ``ξ = Ω z`` for a flat ``z`` of length n (eq. 11)."""
    if sketch is not None:
        idx, scale = sketch
        z = z[idx] * scale.to(z.dtype)
    return X @ z


def explicit_uc(Ut: Tensor, c: Tensor) -> Tensor:
    """``U c`` as a flat vector of length n."""
    return c.to(Ut.dtype) @ Ut


# --------------------------------------------------------------------------- implicit path

def low_rank_factors(G_hat: Tensor, A_hat: Tensor, rank: int | None) -> tuple[Tensor, Tensor]:
    """Factors ``G (ϱ, r, n_G)``, ``A (ϱ, r, n_A)`` with ``G_iᵀ A_i ≈ Ĝ_iᵀ Â_i`` (eq. 15).

    Exact when ``rank`` is None or at least ``min(κ, n_G, n_A)``: the factors are ``Ĝ, Â``
    themselves when ``κ`` is the smallest size, else the per-sample gradient against an
    identity (rank ``min(n_G, n_A)``, no truncation). Otherwise the best rank-``rank``
    approximation of each per-sample gradient by truncated SVD, computed on a ``κ×κ`` core
    through thin QR when ``κ`` is small; ``√σ`` goes to each side.
    """
    rho, kappa, n_g = G_hat.shape
    n_a = A_hat.shape[2]
    exact = rank is None or rank >= min(kappa, n_g, n_a)
    if exact and kappa <= min(n_g, n_a):
        return G_hat, A_hat
    if exact:
        u = torch.bmm(G_hat.transpose(1, 2), A_hat)  # (ϱ, n_G, n_A)
        if n_g <= n_a:
            eye = torch.eye(n_g, dtype=u.dtype, device=u.device).expand(rho, n_g, n_g)
            return eye, u
        eye = torch.eye(n_a, dtype=u.dtype, device=u.device).expand(rho, n_a, n_a)
        return u.transpose(1, 2), eye
    if kappa <= min(n_g, n_a):
        qg, rg = torch.linalg.qr(G_hat.transpose(1, 2))  # (ϱ, n_G, κ), (ϱ, κ, κ)
        qa, ra = torch.linalg.qr(A_hat.transpose(1, 2))
        p, s, vh = torch.linalg.svd(rg @ ra.transpose(1, 2))
        left, right = qg @ p[..., :rank], qa @ vh[:, :rank].transpose(1, 2)
    else:
        u = torch.bmm(G_hat.transpose(1, 2), A_hat)
        p, s, vh = torch.linalg.svd(u, full_matrices=False)
        left, right = p[..., :rank], vh[:, :rank].transpose(1, 2)
    root = s[:, :rank].sqrt().unsqueeze(1)
    return (left * root).transpose(1, 2), (right * root).transpose(1, 2)


def implicit_sketch(F: Tensor, sketch: Sketch | None) -> Tensor:
    """Row sketch of a factor matrix: ``(Ω G̃)ᵀ``, shape ``(ϱ·r, ζ)`` (eq. 17)."""
    if sketch is None:
        return F
    idx, scale = sketch
    return F[:, idx] * scale.to(F.dtype)


def implicit_gram(XG: Tensor, XA: Tensor, r: int) -> Tensor:
    """``ΞᵀΞ`` of eq. 21: ``K_ij = Σ_kl (Ξ_Aiᵀ Ξ_Aj)_kl (Ξ_Giᵀ Ξ_Gj)_kl``, shape ``(ϱ, ϱ)``."""
    m = (XG @ XG.T) * (XA @ XA.T)
    rho = m.shape[0] // r
    return m.view(rho, r, rho, r).sum(dim=(1, 3))


def implicit_utz(XG: Tensor, XA: Tensor, z: Tensor, r: int,
                 sketch_g: Sketch | None, sketch_a: Sketch | None) -> Tensor:
    """``Uᵀz`` by eq. 19 for ``z`` as an ``(n_G, n_A)`` matrix: ``Ξ_z = Ω_G z Ω_Aᵀ``."""
    if sketch_g is not None:
        z = z[sketch_g[0]] * sketch_g[1].to(z.dtype).unsqueeze(1)
    if sketch_a is not None:
        z = z[:, sketch_a[0]] * sketch_a[1].to(z.dtype)
    v = ((XG @ z) * XA).sum(dim=1)
    return v.view(-1, r).sum(dim=1)


def implicit_uc_exact(Gf: Tensor, Af: Tensor, c: Tensor, r: int) -> Tensor:
    """``U c = Σ_i c_i G_iᵀ A_i`` as one matrix product, shape ``(n_G, n_A)``."""
    w = c.to(Gf.dtype).repeat_interleave(r).unsqueeze(1)
    return (Gf * w).T @ Af


def partial_factors(Gf: Tensor, Af: Tensor, c: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``Gᶜ = Σ √|c_i| G_i`` and ``Aᶜ = Σ c_i / (Σ_j √|c_j|) A_i``, shapes ``(r, n_G)``, ``(r, n_A)``.

    The factored ``Uc ≈ Gᶜᵀ Aᶜ`` of eq. 23; summed over workers they give eq. 28.
    """
    c = c.to(Gf.dtype)
    w = c.abs().sqrt()
    rho = c.shape[0]
    gc = torch.einsum("i,irg->rg", w, Gf.view(rho, r, -1))
    ac = torch.einsum("i,ira->ra", c / w.sum().clamp_min(torch.finfo(c.dtype).tiny),
                      Af.view(rho, r, -1))
    return gc, ac


def implicit_uc_factored(Gf: Tensor, Af: Tensor, c: Tensor, r: int) -> Tensor:
    """``U c`` by the paper's factored approximation (eq. 23), shape ``(n_G, n_A)``."""
    gc, ac = partial_factors(Gf, Af, c, r)
    return gc.T @ ac


# --------------------------------------------------------------------------- the small solve

def damped_cholesky(K: Tensor, damping: float) -> Tensor:
    """Cholesky factor of ``K + λI`` in float64, for a batch ``(L, ϱ, ϱ)`` of Gram matrices.

    float64 because ``λ`` may be tiny next to ``‖K‖`` and the matrix is only ``ϱ×ϱ``.
    """
    k = K.to(torch.float64)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    return torch.linalg.cholesky(k + damping * eye)


def solve_coefficients(chol: Tensor, z: Tensor) -> Tensor:
    """``b = (K + λI)⁻¹ z`` for a batch ``z`` of shape ``(L, ϱ)`` from :func:`damped_cholesky`."""
    b = torch.cholesky_solve(z.to(chol.dtype).unsqueeze(-1), chol)
    return b.squeeze(-1).to(z.dtype)


def direction(g: Tensor, uc: Tensor, damping: float) -> Tensor:
    """``d = -(g - U b) / λ`` (eq. 8/13/24)."""
    return (uc - g).div_(damping)
