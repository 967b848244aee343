"""What SENG preconditions is visible: ``describe()``, skip_layers, unsupported layers, and
the warning when most of a model follows the first-order fallback rule."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seng_dist import SENG, SENGWarning
from seng_dist.describe import MOSTLY_FIRST_ORDER


class Net(nn.Module):
    """A ConvTranspose1d (not preconditioned), a Conv2d, BatchNorm and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.ConvTranspose1d(3, 4, 3)
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.stem(x.flatten(2)[:, :1].expand(-1, 3, -1))  # (B, 4, 38)
        h = F.relu(self.bn(self.conv(x))) + seq.mean()
        return self.head(F.relu(self.fc(h.flatten(1))))


def described() -> tuple[Net, SENG]:
    """:class:`Net` with BatchNorm in a group of its own, after one SENG step (the README's
    ``describe()`` example is this one's table)."""
    torch.manual_seed(0)
    model = Net()
    with pytest.warns(UserWarning, match=r"'stem' \(ConvTranspose1d\) is not preconditioned"):
        opt = SENG(
            model,
            explicit_threshold=200,
            factor_rank=2,
            param_groups=[{"params": [model.bn.weight, model.bn.bias], "weight_decay": 0.0}],
        )
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 5, (4,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model, opt


def test_describe_lists_every_parameter_with_its_path_and_why():
    model, opt = described()
    table = opt.describe().split("\n\n")[0]  # the rows, without the per-path summary
    assert "group  factor rank  curvature bytes" in table.splitlines()[0]
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert set(rows) == {n for n, _ in model.named_parameters()}
    assert "ConvTranspose1d is not a supported layer type" in rows["stem.weight"]
    bn = rows["bn.weight"].split()
    assert bn[1:4] == ["BatchNorm2d", "4x2", "explicit"] and bn[-3] == "0"  # own param group
    assert "(with the weight)" in rows["bn.bias"]
    assert (
        "explicit" in rows["conv.weight"]
        and "n = 40 < explicit_threshold 200" in rows["conv.weight"]
    )
    fc = rows["fc.weight"].split()
    curvature = next(c for c in opt.curvature.curvatures if c.block.name == "fc")
    assert fc[2:4] == ["32x65", "implicit"] and fc[-2] == "2"  # factor rank
    assert int(fc[-1].replace(",", "")) == curvature.nbytes() > 0
    assert "(with the weight)" in rows["fc.bias"]


def test_describe_ends_with_each_paths_parameters_elements_and_share():
    model, opt = described()
    table, summary = opt.describe().split("\n\n")
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    counts: dict[str, list[int]] = {"explicit": [], "implicit": [], "fallback": []}
    for line in table.splitlines()[2:]:
        counts[line.split()[3]].append(numel[line.split()[0]])
    lines = summary.splitlines()
    assert lines[0].split() == ["path", "parameters", "elements", "share"]
    total = sum(numel.values())
    expected = [
        [path, f"{len(n):,}", f"{sum(n):,}", f"{sum(n) / total:.1%}"] for path, n in counts.items()
    ]
    assert [line.split() for line in lines[2:]] == [
        *expected,
        ["total", f"{len(numel):,}", f"{total:,}", "100.0%"],
    ]
    assert counts["fallback"] == [36, 4]  # the ConvTranspose1d


class Gain(nn.Module):
    """A per-feature scale: a layer type SENG does not precondition."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class Shift(Gain):
    """Another layer type SENG does not precondition."""


def first_order_warnings(model: nn.Module, **settings: Any) -> list[str]:
    """The "mostly first-order" warnings that building SENG on ``model`` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SENG(model, **settings)
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, SENGWarning) and "first-order fallback" in str(w.message)
    ]


def test_a_mostly_first_order_model_warns_once_with_the_share_the_largest_types_and_the_fix():
    model = nn.Sequential(nn.Linear(4, 2), Gain(60), Shift(20), nn.PReLU(12), nn.PReLU(2))
    (message,) = first_order_warnings(model)  # 10 elements preconditioned, 94 not
    assert "90.4% of the trainable elements (94 of 104) follow the first-order fallback" in message
    assert "Largest fallback layer types: Gain (60), Shift (20), PReLU (14)." in message
    assert "register their type with seng_dist.register_layer_kind" in message
    assert "set damping_diagonal='adam'" in message and "skip_layers" in message
    (adam,) = first_order_warnings(model, damping_diagonal="adam")
    assert "damping_diagonal" not in adam  # already set: not offered


def test_more_than_the_threshold_warns_and_up_to_it_does_not():
    assert MOSTLY_FIRST_ORDER == 0.5
    linear = nn.Linear(4, 1)  # 5 elements preconditioned
    assert first_order_warnings(nn.Sequential(linear, Gain(5))) == []  # 50%: not more
    assert len(first_order_warnings(nn.Sequential(linear, Gain(6)))) == 1  # 54.5%


def test_the_fallback_that_skip_layers_asked_for_does_not_count():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(4, 1), Gain(4))
    assert first_order_warnings(model, skip_layers="0") == []  # 4 of the other 9
    assert first_order_warnings(model, skip_layers=(nn.Linear, Gain)) == []  # all asked for
    (message,) = first_order_warnings(model, skip_layers=nn.Linear)
    assert "100.0% of the trainable elements outside skip_layers (4 of 4)" in message
    assert "(SENG preconditions no layer)" in message


def test_skip_layers_takes_one_name_or_class_or_an_iterable_and_refuses_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [b.name for b in SENG(model, skip_layers="2").blocks] == ["0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no "mostly first-order" warning
        assert [b.name for b in SENG(model, skip_layers=nn.Linear).blocks] == []
    assert [b.name for b in SENG(model, skip_layers=("0",)).blocks] == ["2"]
    with pytest.raises(ValueError, match="skip_layers names 'fc', which match no module"):
        SENG(model, skip_layers="fc")
    with pytest.raises(ValueError, match="skip_layers must be a module name"):
        SENG(model, skip_layers=3)


def test_skip_layers_may_name_a_frozen_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    assert [b.name for b in SENG(model, skip_layers="0").blocks] == ["2"]
