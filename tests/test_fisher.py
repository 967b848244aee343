"""The Monte-Carlo Fisher (``fisher="mc"``, ``SENG.sample_fisher``) against the float64
reference, its draws against their distributions, and its misuse."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYERS, batch, make_mixed, seng_directions
from torch import Tensor, nn

from seng_dist import SENG
from seng_dist.fisher import Distribution, draw
from seng_dist.reference import reference_directions, relative_error

EXACT_EXPLICIT = dict(explicit_threshold=10**9, sketch_size=None)
EXACT_IMPLICIT = dict(
    explicit_threshold=0, sketch_size=None, factor_rank=None, factor_sketch_size=None, uc="exact"
)
Loss = Callable[[Tensor, Tensor], Tensor]


def _mc_directions(
    opt: SENG, model: nn.Module, x: Tensor, y: Tensor, loss: Loss, distribution: str, **kw
) -> tuple[dict[str, Tensor], Tensor]:
    """SENG's direction per block (``conftest.seng_directions``) with the Monte-Carlo Fisher,
    and the targets ``sample_fisher`` drew."""
    drawn: list[Tensor | None] = []

    def backward() -> None:
        out = model(x)
        drawn.append(opt.sample_fisher(out, distribution, **kw))
        loss(out, y).backward()

    d = seng_directions(opt, model, x, y, backward)
    assert drawn[0] is not None
    return d, drawn[0]


@pytest.mark.parametrize("exact", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize("rho", [None, 5])
def test_categorical_mc_fisher_equals_dense_solve(exact, rho):
    model = make_mixed()
    x, y = batch()
    opt = SENG(
        model, lr=1.0, damping=0.5, momentum=0.0, curvature_batch_size=rho, fisher="mc", **exact
    )
    d, targets = _mc_directions(opt, model, x, y, F.cross_entropy, "categorical")
    assert targets.shape == (rho or len(y),)
    ref = reference_directions(model, x, y, LAYERS, 0.5, rho, curvature_targets=targets)
    empirical = reference_directions(model, x, y, LAYERS, 0.5, rho)
    for layer in LAYERS:
        assert relative_error(d[layer], ref[layer]) < 1e-5, layer
    # The sampled targets really change the curvature (some differ from the labels).
    assert bool((targets != y[: len(targets)]).any())
    assert max(relative_error(ref[k], empirical[k]) for k in LAYERS) > 1e-3


class _Decoder(nn.Module):
    """A small MLP whose output is one value per pixel (Bernoulli logits or Gaussian means)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(12, 6)
        self.dec = nn.Linear(6, 12)

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(x)))


def _sum_bce(out: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, target, reduction="sum") / len(out)


def _per_sample_bce(out: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, target, reduction="sum")


def _mean_mse(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target)


@pytest.mark.parametrize(
    "distribution, reduction, loss, per_sample",
    [
        ("bernoulli", "sum", _sum_bce, _per_sample_bce),
        ("gaussian", "mean", _mean_mse, _mean_mse),
    ],
)
@pytest.mark.parametrize("exact", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
def test_elementwise_mc_fisher_equals_dense_solve(distribution, reduction, loss, per_sample, exact):
    torch.manual_seed(0)
    model = _Decoder()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(10, 12, generator=g)
    opt = SENG(
        model, lr=1.0, damping=0.3, momentum=0.0, curvature_batch_size=6, fisher="mc", **exact
    )
    d, targets = _mc_directions(opt, model, x, x, loss, distribution, reduction=reduction)
    assert targets.shape == (6, 12)
    ref = reference_directions(
        model,
        x,
        x,
        ["enc", "dec"],
        0.3,
        6,
        loss_fn=loss,
        curvature_targets=targets,
        curvature_loss_fn=per_sample,
    )
    for layer in ("enc", "dec"):
        assert relative_error(d[layer], ref[layer]) < 1e-5, layer


def test_draws_follow_their_distributions():
    # 40,000 draws per case: each frequency within 5 standard errors of its probability.
    n = 40_000
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0])
    idx = draw(logits.expand(n, 4), Distribution.CATEGORICAL, g)
    p = torch.softmax(logits, 0)
    freq = torch.bincount(idx, minlength=4).double() / n
    assert torch.all((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt())
    bern = draw(torch.full((n,), 0.7), Distribution.BERNOULLI, g)
    q = torch.sigmoid(torch.tensor(0.7)).item()
    assert abs(bern.mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)
    gauss = draw(torch.full((n,), 1.5), Distribution.GAUSSIAN, g)
    assert abs(gauss.mean().item() - 1.5) < 5 * math.sqrt(0.5 / n)
    assert abs(gauss.var().item() - 0.5) < 5 * 0.5 * math.sqrt(2 / n)


def test_mc_fisher_trains_on_plain_steps_and_returns_none_there():
    model = make_mixed().train()
    x, y = batch()
    opt = SENG(model, lr=0.05, fisher="mc", curvature_update_interval=2)
    drawn = []
    for _ in range(4):
        opt.zero_grad()
        out = model(x)
        drawn.append(opt.sample_fisher(out))
        F.cross_entropy(out, y).backward()
        opt.step()
    assert [t is not None for t in drawn] == [True, False, True, False]
    assert opt.curvature_updates == 2


def test_sample_fisher_needs_mc_setting():
    model = make_mixed()
    x, _ = batch()
    opt = SENG(model)
    with pytest.raises(ValueError, match="sample_fisher\\(\\) needs fisher='mc'"):
        opt.sample_fisher(model(x))


def test_mc_setting_needs_sample_fisher_on_curvature_steps():
    model = make_mixed()
    x, y = batch()
    opt = SENG(model, fisher="mc")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="no opt.sample_fisher"):
        opt.step()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(distribution="poisson"), "distribution must be one of 'categorical', 'bernoulli'"),
        (dict(reduction="none"), "reduction must be one of 'mean', 'sum'"),
    ],
)
def test_sample_fisher_refuses_bad_arguments(kw, message):
    model = make_mixed()
    x, _ = batch()
    opt = SENG(model, fisher="mc")
    with pytest.raises(ValueError, match=message):
        opt.sample_fisher(model(x), **kw)


def test_fisher_setting_is_checked():
    with pytest.raises(ValueError, match="fisher must be one of 'empirical', 'mc'"):
        SENG(make_mixed(), fisher="true")


def test_a_layer_frozen_after_construction_is_left_out_of_the_sampled_backward():
    model = make_mixed()
    x, y = batch()
    opt = SENG(model, fisher="mc")
    for p in model.head.parameters():
        p.requires_grad_(False)
    out = model(x)
    assert opt.sample_fisher(out) is not None
    F.cross_entropy(out, y).backward()
    with pytest.warns(UserWarning, match="frozen"):
        opt.step()
    assert opt.curvature_updates == 1
