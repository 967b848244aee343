"""Layer kinds: Conv1d, grouped and depthwise convolutions, exact against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT_EXPLICIT, EXACT_IMPLICIT, check_exact
from torch import nn

from seng_dist import SENG, SENGWarning
from seng_dist.reference import relative_error


def _check(model: nn.Module, layers: list[str], shape: tuple[int, ...], settings: dict) -> SENG:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 3, (8,), generator=g)
    model(x)  # materialise a lazy head
    return check_exact(model, layers, x, y, **settings)


@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=4, padding="same", dilation=1, bias=False),
        dict(kernel_size=2, dilation=2),
    ],
    ids=["stride-pad", "same-even-nobias", "dilation"],
)
def test_conv1d_is_exact(conv, settings):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, **conv), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    _check(model, ["0", "3"], (3, 9), settings)


@pytest.mark.parametrize(
    "conv,shape",
    [
        (nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5)),
        (nn.Conv2d(4, 4, 3, stride=2, groups=4), (4, 7, 7)),  # depthwise
        (nn.Conv2d(4, 8, 3, padding="same", groups=4, bias=False), (4, 5, 5)),  # multiplier 2
        (nn.Conv1d(4, 4, 3, groups=4), (4, 9)),
    ],
    ids=["grouped", "depthwise", "depthwise-x2-nobias", "depthwise-1d"],
)
def test_grouped_and_depthwise_convs_are_exact_on_the_explicit_path_at_any_size(conv, shape):
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    opt = _check(model, ["0", "3"], shape, dict(EXACT_IMPLICIT))  # threshold 0: all implicit
    paths = {b.name: b.path for b in opt.blocks}
    assert paths == {"0": "explicit", "3": "implicit"}
    row = next(line for line in opt.describe().splitlines() if line.startswith("0.weight"))
    assert "grouped convolution: explicit path at any size" in row


def test_an_unbatched_conv1d_call_is_one_sample():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3)
    opt = SENG(conv, curvature_update_interval=1, sketch_size=None)
    conv(torch.randn(2, 7)).pow(2).sum().backward()  # (C, L): no batch dimension
    opt.step()
    assert opt.state[conv.weight]["U"].shape == (1, 3 * 7)


def test_a_kinds_per_sample_gradients_are_the_product_of_its_factors():
    # LayerKind.grads, the per-call gradients a new kind may rely on, against torch.func.
    from seng_dist.kinds import ConvKind, LayerKind
    from seng_dist.reference import per_sample_gradients

    torch.manual_seed(0)
    for module, x in (
        (nn.Linear(4, 3), torch.randn(5, 2, 4)),
        (nn.Conv1d(2, 3, 3, padding=1), torch.randn(5, 2, 6)),
    ):
        out = module(x)
        gy = torch.randn_like(out)
        kind = LayerKind() if isinstance(module, nn.Linear) else ConvKind()
        mine = kind.grads(module, x, gy, bias=True)
        ref = per_sample_gradients(module, x, gy, loss_fn=lambda o, g: (o * g).sum())
        w = ref["weight"].reshape(5, 3, -1)
        assert relative_error(mine, torch.cat([w, ref["bias"].unsqueeze(-1)], -1)) < 1e-5


def test_the_supported_layer_types_are_one_list_that_messages_and_find_blocks_use():
    import seng_dist
    from seng_dist.layers import find_blocks

    types = seng_dist.supported_layer_types()
    assert types == (
        "nn.Linear",
        "nn.Conv1d",
        "nn.Conv2d",
        "nn.BatchNorm1d",
        "nn.BatchNorm2d",
        "nn.BatchNorm3d",
        "nn.MultiheadAttention",
    )
    layout = find_blocks(nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2)))
    assert layout.fallback["0"] == (
        "Embedding is not a supported layer type (seng_dist.supported_layer_types())"
    )
    with pytest.warns(SENGWarning, match=", ".join(types)):
        SENG(nn.Sequential(nn.Embedding(4, 3)))  # the warning lists them
