"""The pure solver functions on small random problems, against dense formulas."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seng_dist import SENG, solver


def _factors(rho=6, kappa=9, n_g=5, n_a=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rho, kappa, n_g, generator=g, dtype=torch.float64),
        torch.randn(rho, kappa, n_a, generator=g, dtype=torch.float64),
    )


def _dense(G, A):
    return torch.einsum("irg,ira->iga", G, A)


@pytest.mark.parametrize(
    "shape",
    [(6, 3, 5, 7), (6, 9, 5, 7), (6, 9, 8, 4)],
    ids=["kappa-small", "n_G-small", "n_A-small"],
)
def test_exact_factors_reproduce_per_sample_gradients(shape):
    G_hat, A_hat = _factors(*shape)
    G, A = solver.low_rank_factors(G_hat, A_hat, None)
    assert torch.allclose(_dense(G, A), _dense(G_hat, A_hat))


@pytest.mark.parametrize("decay, bound", [(0.0, 1.10), (0.5, 1.01)], ids=["flat", "decaying"])
def test_truncated_factors_are_near_optimal(decay, bound):
    # Within `bound` of the Eckart–Young optimum; gradients' spectra decay, random ones don't.
    G_hat, A_hat = _factors(rho=4, kappa=40, n_g=30, n_a=50)
    G_hat = G_hat * torch.exp(-decay * torch.arange(40, dtype=torch.float64)).view(1, -1, 1)
    u = _dense(G_hat, A_hat)
    s = torch.linalg.svdvals(u)
    gen = torch.Generator().manual_seed(0)
    for rank in (1, 3, 10, 28):  # randomized below 30 - oversample, QR-exact above
        G, A = solver.low_rank_factors(G_hat, A_hat, rank, gen)
        err = (_dense(G, A) - u).flatten(1).norm(dim=1)
        optimal = s[:, rank:].norm(dim=1)
        assert torch.all(err <= bound * optimal), (rank, err / optimal)


def test_gram_and_utz_match_dense_products():
    G_hat, A_hat = _factors()
    r = G_hat.shape[1]
    Gf, Af = G_hat.reshape(-1, 5), A_hat.reshape(-1, 7)
    U = _dense(G_hat, A_hat).reshape(6, -1).T  # (n, ϱ)
    z = torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(solver.implicit_gram(Gf, Af, r), U.T @ U)
    assert torch.allclose(solver.implicit_utz(Gf, Af, z, r, None, None), U.T @ z.reshape(-1))
    c = torch.randn(6, dtype=torch.float64)
    assert torch.allclose(solver.implicit_uc_exact(Gf, Af, c, r).reshape(-1), U @ c)
    Ut = solver.per_sample_grads(G_hat, A_hat)
    assert torch.allclose(solver.explicit_utz(Ut, z.reshape(-1), None), U.T @ z.reshape(-1))
    assert torch.allclose(solver.explicit_uc(Ut, c), U @ c)


def test_factored_uc_is_exact_for_one_rank_one_sample():
    G_hat, A_hat = _factors(rho=1, kappa=1)
    c = torch.tensor([-0.7], dtype=torch.float64)
    Gf, Af = G_hat.reshape(1, -1), A_hat.reshape(1, -1)
    assert torch.allclose(
        solver.implicit_uc_factored(Gf, Af, c, 1), solver.implicit_uc_exact(Gf, Af, c, 1)
    )
    gc, ac = solver.partial_factors(Gf, Af, torch.zeros(1, dtype=torch.float64), 1)
    assert torch.all(torch.isfinite(ac)) and torch.all(gc == 0)  # c = 0 does not divide by 0


def test_sketched_utz_is_unbiased_and_weights_fold_into_factors():
    G_hat, A_hat = _factors(rho=3, kappa=2, n_g=6, n_a=8)
    Gf, Af = G_hat.reshape(-1, 6), A_hat.reshape(-1, 8)
    z = torch.randn(6, 8, dtype=torch.float64)
    exact = solver.implicit_utz(Gf, Af, z, 2, None, None)
    gen = torch.Generator().manual_seed(1)
    acc = torch.zeros_like(exact)
    trials = 3000
    for _ in range(trials):
        sg = solver.sample_rows(6, 3, "uniform", True, gen)
        sa = solver.sample_rows(8, 4, "uniform", True, gen)
        acc += solver.implicit_utz(
            solver.sketch_columns(Gf, sg, 2), solver.sketch_columns(Af, sa, 2), z, 2, sg[0], sa[0]
        )
    assert torch.allclose(acc / trials, exact, rtol=0.1, atol=0.1 * exact.abs().max())


@pytest.mark.parametrize("method", ["uniform", "leverage"])
def test_sample_rows_without_replacement(method):
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(50, generator=gen) ** 4
    assert solver.sample_rows(50, 50, method, False, gen, w) is None
    assert solver.sample_rows(50, None, method, True, gen, w) is None
    idx, scale = solver.sample_rows(50, 20, method, False, gen, w)
    assert idx.unique().numel() == 20 and torch.all(scale >= 1.0)
    pi = solver.inclusion_probabilities(torch.softmax(torch.randn(50, generator=gen) * 3, 0), 20)
    assert pi.sum().item() == pytest.approx(20) and torch.all(pi <= 1)


EPS32 = torch.finfo(torch.float32).eps


def _low_rank_rows(rho, n, rank, dtype, seed=0):
    """``ϱ`` rows of length ``n`` spanning only ``rank`` dimensions, with a decaying spectrum
    (per-sample gradients: ϱ > n on a BatchNorm block, a few directions dominate)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rho, rank, generator=g, dtype=torch.float64)
    a = a * torch.exp(-0.05 * torch.arange(rank, dtype=torch.float64))
    return (a @ torch.randn(rank, n, generator=g, dtype=torch.float64) / n**0.5).to(dtype)


def test_damped_inverse_keeps_k_dtype_while_well_conditioned():
    M = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    K = (M @ M.T).float()
    damping = 1.01 * float(K.trace()) * EPS32**0.5  # near the smallest rounded to float32
    inv = solver.damped_inverse(K, damping)
    expected = torch.linalg.inv(K.double() + damping * torch.eye(5, dtype=torch.float64))
    assert inv.dtype == torch.float32
    # float32 rounding of an inverse whose condition number is at most 1/√ε
    assert torch.allclose(inv.double(), expected, rtol=0, atol=EPS32**0.5 * expected.abs().max())
    assert solver.damped_inverse(K, damping / 2).dtype == torch.float64


@pytest.mark.parametrize(
    "dtype, damping", [(torch.float32, 1e-9), (torch.bfloat16, 1e-3)], ids=["float32", "bfloat16"]
)
def test_damped_inverse_clamps_a_gram_that_rounding_left_indefinite(dtype, damping):
    # ϱ = 32 samples of a 16-entry block: K has 16 zero eigenvalues, rounded to ±ε·‖K‖.
    X = _low_rank_rows(32, 16, 16, dtype)
    K = X @ X.T
    values = torch.linalg.eigvalsh(K.double())
    assert values.min() < -damping  # where Cholesky raised (issue 27: λ 1e-9, bf16 λ 1e-3)
    inv = solver.damped_inverse(K, damping)
    assert inv.dtype == torch.float64 and torch.allclose(inv, inv.T)
    spectrum = torch.linalg.eigvalsh(inv)
    # K's eigenvalues clamped at 0, K + λI's at K's rounding level: the inverse is positive
    # definite, at most 1/λ, and never amplifies rounding noise past 1/(ε·tr K)
    level = solver.rounding_level(K)
    assert spectrum.min() > 0 and spectrum.max() <= (1 + 1e-9) / max(damping, level)
    assert spectrum.max() > (1 - 1e-9) / max(damping, level)  # the noise is treated as zero
    # and on K's directions far above its rounding it inverts K + λI, to float64's rounding
    # of a product with entries up to 1/λ
    k = K.double()
    values, vectors = torch.linalg.eigh((k + k.T) / 2)
    top = vectors[:, values > level]
    eye = torch.eye(32, dtype=torch.float64)
    tol = 32 * torch.finfo(torch.float64).eps * float(k.trace()) / damping
    assert torch.allclose(inv @ ((k + damping * eye) @ top), top, atol=tol)


@pytest.mark.parametrize("seed", range(3))
def test_small_damping_direction_keeps_half_of_float32_digits(seed):
    # ϱ = 128 float32 rows of rank 40 at λ = 1e-3 (tr(K)/λ ≈ 1e6): an inverse rounded to
    # float32 lost the curvature's 1/σ² under its 1/λ entries (errors 5e-3 to 2e-2).
    Ut = _low_rank_rows(128, 2000, 40, torch.float32, seed)
    extra = _low_rank_rows(1, 2000, 1, torch.float64, seed + 100)[0]
    g = (Ut.double().mean(0) * 3 + 0.3 * extra).float()
    damping = 1e-3
    U = Ut.double()
    b = torch.linalg.solve(U @ U.T + damping * torch.eye(128, dtype=torch.float64), U @ g.double())
    expected = solver.direction(g.double(), b @ U, damping)
    c = solver.apply_inverse(solver.damped_inverse(Ut @ Ut.T, damping), Ut @ g)
    d = solver.direction(g, solver.explicit_uc(Ut, c), damping)
    assert c.dtype == torch.float32
    assert float((d.double() - expected).norm() / expected.norm()) < EPS32**0.5


def test_damped_inverse_refuses_what_it_cannot_invert():
    K = torch.zeros(4, 4)  # the Gram of a layer without gradients
    with pytest.raises(ValueError, match=r"\(K \+ λI\)⁻¹ overflows float32"):
        solver.damped_inverse(K, 1e-39)  # 1/λ beyond float32
    with pytest.raises(ValueError, match=r"\(K \+ λI\)⁻¹ overflows float64"):
        solver.damped_inverse(K.double(), 1e-320)
    K[0, 1] = float("nan")
    with pytest.raises(ValueError, match="K holds NaN or Inf"):
        solver.damped_inverse(K, 1.0)


def test_compute_dtype_is_at_least_float32():
    assert solver.compute_dtype(torch.bfloat16) == torch.float32
    assert solver.compute_dtype(torch.float16) == torch.float32
    assert solver.compute_dtype(torch.float32) == torch.float32
    assert solver.compute_dtype(torch.float64) == torch.float64


# --------------------------------------------------------------------------- issue 27's runs


def _cnn_run(damping, dtype=torch.float32, lr=None, steps=3, **settings):
    """A Conv2d (with bias) + BatchNorm + Linear CNN on 64 random 8×8 images, SENG rebuilding
    its curvature every step; ``lr`` defaults to ``0.1·λ`` (a step of 0.1 g outside the
    curvature's span). Returns the optimizer, the losses and the model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    ).to(dtype)
    opt = SENG(
        model,
        damping=damping,
        lr=0.1 * damping if lr is None else lr,
        curvature_update_interval=1,
        **settings,
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 8, 8, generator=g).to(dtype)
    y = torch.randint(10, (64,), generator=g)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return opt, losses, model


@pytest.mark.parametrize(
    "dtype, damping",
    [(torch.float32, 1e-9), (torch.bfloat16, 1e-7)],
    ids=["float32-1e-9", "bfloat16-1e-7"],
)
def test_small_damping_trains(dtype, damping):
    # Cholesky raised at step 0: K rounded to negative eigenvalues larger than λ.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damping is below the layers' rounding level
        opt, losses, model = _cnn_run(damping, dtype, steps=4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    for b in opt.blocks:  # bf16 factors, float32 Gram: bf16's rounding of K is not kept
        assert opt.state[b.weight]["K"].dtype == torch.float32
    opt.load_state_dict(opt.state_dict())
    assert all(opt.state[b.weight]["K"].dtype == torch.float32 for b in opt.blocks)


@pytest.mark.parametrize(
    "dtype, damping, lr, settings",
    [
        (torch.bfloat16, 1e-3, 3e-3, {}),
        # the conv bias's gradient is ~0 before BatchNorm, so Adam's W is ~1e4 on it and the
        # whitened K spans 1e7 down to rounding
        (torch.float32, 1e-2, 1e-2, {"damping_diagonal": "adam"}),
    ],
    ids=["bfloat16-1e-3", "adam-1e-2"],
)
def test_an_indefinite_gram_does_not_stop_training(dtype, damping, lr, settings):
    # Cholesky raised at step 1, once the first (large: lr/λ = 3 and 1) step had moved the
    # parameters; now the steps go on, as large as lr/λ makes them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, losses, model = _cnn_run(damping, dtype, lr=lr, steps=4, **settings)
    assert len(losses) == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_damping_below_the_rounding_level_is_warned_once_per_layer():
    # λ = 1e-12 at lr 0.1: the step outside the span of the ϱ samples is 1e11·g, so the
    # parameters overflow within 4 steps; that must not happen silently.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, model = _cnn_run(1e-12, lr=0.1, steps=4)
    said = {m.split("'")[1]: m for m in (str(w.message) for w in caught) if "rounding level" in m}
    assert len(said) == sum("rounding level" in str(w.message) for w in caught)  # once each
    assert set(said) == {"0", "1", "4"}
    assert re.fullmatch(
        r"SENG: damping 1e-12 is below the rounding level of layer '4''s "
        r"curvature \(float32 ε·tr\(K\) = (\S+)\): .* times 1/λ = 1e\+12\. "
        r"Use a damping between \1 and tr\(K\) = \S+, with lr scaled alike",
        said["4"],
    )
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_a_gram_that_cannot_be_inverted_names_the_layer_and_damping(monkeypatch):
    opt, _, _ = _cnn_run(0.5, steps=1)
    conv = opt.blocks[0]
    opt.state[conv.weight]["K"][0, 0] = float("nan")  # as a corrupted checkpoint could hold
    with pytest.raises(
        ValueError,
        match=r"layer '0' cannot be preconditioned at damping 0\.25"
        r": its Gram matrix K holds NaN or Inf",
    ):
        opt.curvature.curvatures[0].correction(conv.grad_matrix(), 0.25)

    def fails(_):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    with pytest.raises(
        RuntimeError,
        match=r"layer '4' cannot be preconditioned at damping "
        r"1e-09: the eigendecomposition .*\(did not converge\)",
    ):
        opt.curvature.curvatures[2].correction(opt.blocks[2].grad_matrix(), 1e-9)


def test_truncated_factors_of_a_bfloat16_model_are_computed_in_float32():
    # CPU LAPACK has no bf16 QR/SVD: the implicit path's truncated factors raised
    # NotImplementedError on a bf16 model; they match the float32 ones to bf16 rounding.
    g = torch.Generator().manual_seed(0)
    G_hat, A_hat = torch.randn(4, 9, 6, generator=g), torch.randn(4, 9, 7, generator=g)
    G, A = solver.low_rank_factors(G_hat.bfloat16(), A_hat.bfloat16(), 2)
    assert G.dtype == A.dtype == torch.bfloat16
    G32, A32 = solver.low_rank_factors(G_hat.bfloat16().float(), A_hat.bfloat16().float(), 2)
    u, u32 = torch.bmm(G.float().transpose(1, 2), A.float()), torch.bmm(G32.transpose(1, 2), A32)
    assert float((u - u32).norm() / u32.norm()) < 2 * 2.0**-8  # two bf16 roundings
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).to(
        torch.bfloat16
    )
    opt = SENG(model, explicit_threshold=0, factor_rank=2)
    x = torch.randn(16, 3, 8, 8, generator=g).bfloat16()
    F.cross_entropy(model(x).float(), torch.randint(0, 4, (16,), generator=g)).backward()
    opt.step()
    assert opt.curvature_updates == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
