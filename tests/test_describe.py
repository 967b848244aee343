"""What SENG preconditions is visible: ``describe()``, skip_layers, unsupported layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seng_dist import SENG


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
    table = opt.describe()
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


def test_skip_layers_takes_one_name_or_class_or_an_iterable_and_refuses_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [b.name for b in SENG(model, skip_layers="2").blocks] == ["0"]
    with pytest.warns(UserWarning, match="no supported layer .* to precondition"):
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
