"""Capture on stock modules: in-place activations, conv variants, reuse between updates."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import EXACT_EXPLICIT, check_exact, seng_directions
from torch import nn
from torch.utils.checkpoint import checkpoint

from seng_dist import SENG
from seng_dist.reference import (
    block_matrix,
    per_sample_gradients,
    reference_directions,
    relative_error,
)


def _check_exact(model, layers, x, y, **kw):
    return check_exact(model, layers, x, y, **{**EXACT_EXPLICIT, **kw})


def _data(shape, n=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_inplace_relu_directly_on_layer_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 4),
    )
    x, y = _data((2, 6, 6))
    _check_exact(model, ["0", "3", "5"], x, y)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, dilation=2, padding=2, bias=False),
        dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
        dict(kernel_size=4, padding="same"),  # even kernel: asymmetric padding
    ],
    ids=["stride-pad", "dilation-nobias", "rect", "same-even"],
)
def test_conv2d_variants_are_exact(conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, **conv), nn.Flatten(), nn.LazyLinear(4))
    x, y = _data((2, 7, 7))
    model(x)  # materialise the lazy head
    _check_exact(model, ["0", "2"], x, y)


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _random_running_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that eval-mode BatchNorm normalises for real."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, BATCHNORMS):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize(
    "shape,layers",
    [
        ((5,), [nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)]),
        (
            (3, 5),
            [nn.Conv1d(3, 6, 1), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(), nn.Linear(30, 4)],
        ),
        (
            (2, 5, 5),
            [nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)],
        ),
        ((1, 3, 4, 4), [nn.BatchNorm3d(1), nn.Flatten(), nn.Linear(48, 4)]),
    ],
    ids=["bn1d", "bn1d-seq", "bn2d", "bn3d"],
)
def test_batchnorm_in_eval_mode_is_exact(shape, layers):
    torch.manual_seed(0)
    model = _random_running_stats(nn.Sequential(*layers))
    bn = next(i for i, m in enumerate(model) if isinstance(m, BATCHNORMS))
    x, y = _data(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Conv1d of one case is not preconditioned
        opt = _check_exact(model, [str(bn), str(len(model) - 1)], x, y)
    assert [b.n_A for b in opt.blocks if b.name == str(bn)] == [2]


def test_batchnorm_with_frozen_shift_is_exact_on_its_scale():
    torch.manual_seed(0)
    model = _random_running_stats(
        nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))
    )
    model[1].bias.requires_grad_(False)
    x, y = _data((5,))
    opt = _check_exact(model, ["1"], x, y)
    assert [(b.n_G, b.n_A) for b in opt.blocks if b.name == "1"] == [(6, 1)]


def test_batchnorm_per_sample_gradients_in_train_mode_sum_to_the_batch_gradient():
    # x̂ with the whole batch's statistics, of which the curvature batch is a part: the
    # per-sample rows of γ and β (statistics held constant) add up to autograd's gradient.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)
    )
    x, y = _data((2, 5, 5), n=16)
    twin = copy.deepcopy(model)
    opt = SENG(model, curvature_batch_size=None, sketch_size=None)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    bn = model[1]
    grad = torch.stack([bn.weight.grad, bn.bias.grad], dim=1).clone()
    opt.step()
    rows = opt.state[bn.weight]["U"]
    assert rows.shape == (16, 6)
    total = rows.sum(0).view(3, 2) * 16**0.5 / 16  # rows are ∇ψ_i/√ϱ
    assert relative_error(total, grad) < 1e-5
    # with a curvature batch of 4 the rows are the first 4 samples', normalised as above
    opt = SENG(twin, curvature_batch_size=4, sketch_size=None)
    F.cross_entropy(twin(x), y).backward()
    opt.step()
    part = opt.state[twin[1].weight]["U"]
    assert relative_error(part, rows[:4] * (16 / 4) ** 0.5) < 1e-5


def test_sync_batchnorm_and_skipped_batchnorm_follow_the_fallback_rule():
    model = nn.Sequential(nn.Linear(4, 6), nn.SyncBatchNorm(6), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=r"'1' \(SyncBatchNorm\) is not preconditioned"):
        assert [b.name for b in SENG(model).blocks] == ["0", "2"]
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    assert [b.name for b in SENG(model).blocks] == ["0", "1", "2"]
    assert [b.name for b in SENG(model, skip_layers=nn.BatchNorm1d).blocks] == ["0", "2"]


class SharedLinear(nn.Module):
    """One Linear called twice per forward: its per-sample gradient sums both calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def test_module_called_twice_is_exact():
    torch.manual_seed(0)
    x, y = _data((5,), classes=3)
    _check_exact(SharedLinear(), ["lin", "head"], x, y)


def test_sequence_linear_on_3d_and_4d_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(4 * 2 * 5, 3))
    x, y = _data((2, 5, 3), classes=3)  # Linear on (B, 2, 5, 3): κ = 10
    _check_exact(model, ["0", "2"], x, y)


def test_curvature_reused_between_updates_and_no_capture_in_between():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = SENG(model, lr=0.1, curvature_update_interval=3, sketch_size=None)
    x, y = _data((6,), classes=3)
    seen = []
    for step in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen.append((opt.curvature.armed, len(opt.curvature.capture.records)))
        opt.step()
        u = opt.state[model[0].weight]["U"]
        if step % 3 == 0:
            current = u
        assert u is current  # reused object between updates, replaced at updates
    assert seen == [(True, 2), (False, 0), (False, 0)] * 2 + [(True, 2)]
    assert opt.curvature_updates == 3


def test_interval_schedule_callable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    opt = SENG(model, curvature_update_interval=lambda s: 1 if s < 2 else 4)
    x, y = _data((6,), classes=3)
    for _ in range(9):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.curvature_updates == 4  # steps 0, 1, 4, 8


def test_eval_forward_without_grad_does_not_disturb_capture():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    opt = SENG(model, sketch_size=None)
    x, y = _data((6,), classes=3)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model(torch.randn(4, 6))
    assert opt.curvature.capture.records[opt.blocks[0]].complete()
    opt.step()
    assert opt.state[model[0].weight]["U"].shape[0] == 10


def test_uncalled_layer_falls_back_with_warning():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.spare = nn.Linear(4, 3)

        def forward(self, x):
            # The spare layer's parameters are used functionally: its hooks never fire.
            return self.used(x) + F.linear(x, self.spare.weight, self.spare.bias)

    torch.manual_seed(0)
    model = Unused()
    opt = SENG(model, lr=1.0, momentum=0.0, damping=1.0)
    x, y = _data((4,), classes=3)
    before = model.spare.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="'spare' has no curvature"):
        opt.step()
    assert not torch.equal(model.spare.weight, before)  # still updated (fallback rule)


def test_reflect_padded_conv_and_skip_layers_go_to_fallback():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
        nn.Linear(2, 2),
    )
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        opt = SENG(model, skip_layers=["3"])
    assert [b.name for b in opt.blocks] == ["2"]
    with pytest.raises(ValueError, match="skip_layers"):
        SENG(model, skip_layers=[3])


def test_torchvision_style_resnet_runs_with_inplace_ops():
    # BasicBlocks with ReLU(inplace=True) and `out += identity` after the last conv's BN.
    from examples.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=4, width=8)
    opt = SENG(model, lr=0.05, curvature_update_interval=2)
    x, y = _data((3, 32, 32), n=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert all("K" in opt.state[b.weight] for b in opt.blocks)
    assert opt.curvature_updates == 2


class Stack(nn.Module):
    """Three Linear blocks; the middle one optionally under activation checkpointing, and
    optionally an extra call of the head on a detached input (as a logging hook might)."""

    def __init__(self, checkpointed: str = "", extra_call: bool = False) -> None:
        super().__init__()
        self.body, self.mid, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.checkpointed, self.extra_call = checkpointed, extra_call

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mid(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if self.checkpointed:
            h = checkpoint(self.inner, h, use_reentrant=self.checkpointed == "reentrant")
        else:
            h = self.inner(h)
        if self.extra_call:
            self.head(h.detach())  # its output never gets a gradient
        return self.head(h)


STACK = ["body", "mid", "head"]


@pytest.mark.parametrize(
    "model",
    [Stack("reentrant"), Stack("non-reentrant"), Stack(extra_call=True)],
    ids=["reentrant-checkpoint", "non-reentrant-checkpoint", "detached-extra-call"],
)
def test_checkpointed_layers_and_extra_calls_keep_their_exact_curvature(model):
    torch.manual_seed(0)
    model.load_state_dict(Stack().state_dict())
    x, y = _data((5,), n=8, classes=3)
    plain = Stack()
    plain.load_state_dict(model.state_dict())
    ref = reference_directions(plain, x, y, STACK, 0.3)
    opt = SENG(model, **EXACT_EXPLICIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer may go without curvature
        d = seng_directions(opt, model, x, y)
    for layer in STACK:
        assert relative_error(d[layer], ref[layer]) < 1e-5, layer


@pytest.mark.parametrize("told", [True, False], ids=["told", "untold"])
def test_micro_batches_through_submodules_take_the_last_ones_curvature(told):
    """Two micro-batches, the loss divided by 2 (as HF Trainer, Accelerate and Lightning do,
    told to SENG or not), the model called through its submodules: U is the last
    micro-batch's per-sample gradients, g the mean over both."""
    torch.manual_seed(0)
    model = Stack()
    x, y = _data((5,), n=12, classes=3)
    halves = [(x[:6], y[:6]), (x[6:], y[6:])]
    opt = SENG(model, **EXACT_EXPLICIT, gradient_accumulation_steps=2 if told else 1)
    per_sample = [per_sample_gradients(model, xb, yb) for xb, yb in halves]
    for xb, yb in halves:
        out = model.head(model.inner(torch.tanh(model.body(xb))))
        (F.cross_entropy(out, yb) / 2).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt.step()  # lr 1 from θ = 0: the parameters are the direction
    for layer in STACK:
        u = block_matrix(per_sample[-1], layer).flatten(1)
        g = torch.cat([block_matrix(s, layer).flatten(1) for s in per_sample]).mean(0)
        Ut = u / u.shape[0] ** 0.5
        b = torch.linalg.solve(0.3 * torch.eye(len(Ut), dtype=Ut.dtype) + Ut @ Ut.T, Ut @ g)
        want = -(g - b @ Ut) / 0.3
        got = next(blk for blk in opt.blocks if blk.name == layer).param_matrix()
        assert relative_error(got.flatten(), want) < 1e-5, layer
