"""The pure solver functions on small random problems, against dense formulas."""

from __future__ import annotations

import pytest
import torch

from seng_dist import solver


def _factors(rho=6, kappa=9, n_g=5, n_a=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rho, kappa, n_g, generator=g, dtype=torch.float64),
            torch.randn(rho, kappa, n_a, generator=g, dtype=torch.float64))


def _dense(G, A):
    return torch.einsum("irg,ira->iga", G, A)


@pytest.mark.parametrize("shape", [(6, 3, 5, 7), (6, 9, 5, 7), (6, 9, 8, 4)],
                         ids=["kappa-small", "n_G-small", "n_A-small"])
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
    assert torch.allclose(solver.implicit_uc_factored(Gf, Af, c, 1),
                          solver.implicit_uc_exact(Gf, Af, c, 1))
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
        acc += solver.implicit_utz(solver.sketch_columns(Gf, sg, 2),
                                   solver.sketch_columns(Af, sa, 2), z, 2, sg[0], sa[0])
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


def test_damped_inverse():
    M = torch.randn(5, 5, dtype=torch.float64)
    K = (M @ M.T).float()
    inv = solver.damped_inverse(K, 1e-3)
    expected = torch.linalg.inv(K.double() + 1e-3 * torch.eye(5, dtype=torch.float64))
    assert inv.dtype == torch.float32
    assert torch.allclose(inv.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
