"""Parameter groups: each group's lr, damping, momentum and weight decay, the checks on them,
add_param_group, torch's lr schedulers, the state and the ranks' agreement."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from launch import run_ranks
from torch import nn

from seng_dist import SENG


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _step(model: nn.Module, opt: SENG, seed: int = 0) -> None:
    x, y = _batch(seed)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _moves(model: nn.Module, run) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


SETTINGS = dict(curvature_update_interval=1, sketch_size=None, curvature_batch_size=None)


def test_each_group_steps_as_a_one_group_seng_with_its_values():
    """Layer 0 in a group with (lr, damping, momentum) = (0.3, 2.0, 0.0), layer 2 in one with
    (0.05, 0.5, 0.9): blocks are independent, so each layer moves exactly as under a
    one-group SENG with its group's values; only the second group keeps momentum."""
    a, b = (0.3, 2.0, 0.0), (0.05, 0.5, 0.9)
    model = _mlp()
    opt = SENG(
        model,
        param_groups=[
            {"params": model[0].parameters(), "lr": a[0], "damping": a[1], "momentum": a[2]},
            {"params": model[2].parameters(), "lr": b[0], "damping": b[1], "momentum": b[2]},
        ],
        **SETTINGS,
    )
    moved = _moves(model, lambda: _step(model, opt))
    for layer, (lr, damping, momentum) in (("0", a), ("2", b)):
        ref = _mlp()
        ref_opt = SENG(ref, lr=lr, damping=damping, momentum=momentum, **SETTINGS)
        ref_moved = _moves(ref, lambda ref=ref, ref_opt=ref_opt: _step(ref, ref_opt))
        for p in ("weight", "bias"):
            name = f"{layer}.{p}"
            assert torch.allclose(moved[name], ref_moved[name], rtol=1e-5, atol=1e-7), name
    assert "momentum_buffer" not in opt.state[model[0].weight]
    assert "momentum_buffer" in opt.state[model[2].weight]


def test_no_weight_decay_on_biases_is_l2_on_the_weights_only():
    """Weights decayed, biases not: the same step as a group-less SENG whose weight gradients
    carry the L2 term by hand (L2 enters the preconditioned gradient linearly)."""
    wd = 0.1
    model = _mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = SENG(
        model,
        param_groups=[
            {"params": weights, "weight_decay": wd},
            {"params": biases, "weight_decay": 0.0},
        ],
        momentum=0.0,
        **SETTINGS,
    )
    moved = _moves(model, lambda: _step(model, opt))
    ref = _mlp()
    ref_opt = SENG(ref, momentum=0.0, **SETTINGS)
    x, y = _batch()

    def by_hand() -> None:
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        for n, p in ref.named_parameters():
            if n.endswith("weight"):
                p.grad.add_(p.detach(), alpha=wd)
        ref_opt.step()

    ref_moved = _moves(ref, by_hand)
    for name in moved:
        assert torch.allclose(moved[name], ref_moved[name], rtol=1e-5, atol=1e-7), name


def test_a_group_with_lr_zero_stays_put_and_torch_schedulers_drive_each_group():
    model = _mlp()
    opt = SENG(model, param_groups=[{"params": model[2].parameters(), "lr": 0.0}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.1]  # the rest: a group of its own
    head = [p.detach().clone() for p in model[2].parameters()]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5**s])
    for s in range(3):
        _step(model, opt, s)
        sched.step()
    assert all(torch.equal(a, b) for a, b in zip(head, model[2].parameters(), strict=True))
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5**3)


@pytest.mark.parametrize("key", ["lr", "damping"])
def test_weight_and_bias_of_one_layer_in_groups_with_different_lr_or_damping_is_refused(key):
    model = _mlp()
    with pytest.raises(
        ValueError,
        match=f"layer '0' has its weight in param group 0 and its "
        f"bias in param group 1 with a different {key}",
    ):
        SENG(
            model,
            param_groups=[
                {"params": [model[0].weight], key: 0.5},
                {"params": [model[0].bias], key: 0.25},
            ],
        )
    # weight decay and momentum may differ
    SENG(
        model,
        param_groups=[
            {"params": [model[0].weight], "weight_decay": 1e-4},
            {"params": [model[0].bias], "momentum": 0.0},
        ],
    )


def test_a_scheduler_that_splits_a_layers_lr_is_refused_at_the_step():
    model = _mlp()
    opt = SENG(model, param_groups=[{"params": [model[0].weight]}, {"params": [model[0].bias]}])
    opt.param_groups[1]["lr"] = 0.01  # as a per-group scheduler would
    with pytest.raises(ValueError, match="layer '0' has its weight in param group 0"):
        _step(model, opt)


@pytest.mark.parametrize(
    "group, message",
    [
        ({"params": [], "weight_deacy": 0.0}, "param group 0 has unknown key.s. weight_deacy"),
        ({"params": [], "damping": 0.0}, "param group 0's damping must be > 0"),
        ({"params": [], "lr": -1.0}, "param group 0's lr must be >= 0"),
        ({"lr": 0.1}, "param group 0 must be a dict with a 'params' entry"),
    ],
)
def test_bad_groups_are_refused_naming_the_group_and_key(group, message):
    with pytest.raises(ValueError, match=message):
        SENG(_mlp(), param_groups=[group])


def test_add_param_group_follows_the_fallback_rule_and_says_so():
    model = _mlp()
    opt = SENG(model, lr=0.1, momentum=0.0, **SETTINGS)
    extra = nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="added with add_param_group follow the fallback rule"):
        opt.add_param_group({"params": [extra], "lr": 0.5, "damping": 3.0})
    with pytest.raises(ValueError, match="unknown key.s. momentun"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "momentun": 0.5})
    x, y = _batch()
    opt.zero_grad()
    loss = F.cross_entropy(model(x) + extra, y)
    loss.backward()
    grad = extra.grad.clone()
    opt.step()
    assert torch.allclose(extra.detach(), 1.0 - 0.5 * grad / (1.0 + 3.0))
    assert "<outside the model: (3,)>  -" in opt.describe()


def test_group_schedules_and_state_round_trip():
    model = _mlp()
    opt = SENG(
        model,
        param_groups=[{"params": model[0].parameters(), "lr": lambda s: 0.1 / (s + 1)}],
        lr=0.05,
        **SETTINGS,
    )
    for s in range(3):
        _step(model, opt, s)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # numbers only: the callable stays here
    twin = copy.deepcopy(model)
    opt2 = SENG(
        twin,
        param_groups=[{"params": twin[0].parameters(), "lr": lambda s: 0.1 / (s + 1)}],
        lr=0.05,
        **SETTINGS,
    )
    opt2.load_state_dict(state)
    a = _moves(model, lambda: _step(model, opt, 3))
    b = _moves(twin, lambda: _step(twin, opt2, 3))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 / 4)


def _grouped(rank: int, world: int) -> str:
    model = _mlp()
    lr = 0.1 if rank == 0 else 0.2
    try:
        SENG(model, param_groups=[{"params": model[2].parameters(), "lr": lr}], comm="torch")
    except ValueError as err:
        return str(err)
    return ""


def test_the_ranks_agree_on_the_groups():
    for message in run_ranks(_grouped, 2, timeout=120):
        assert "param group 0" in message and "rank 0: {'lr': 0.1" in message


def test_a_refused_add_param_group_leaves_the_optimizer_as_it_was():
    model = _mlp()
    opt = SENG(model, **SETTINGS)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight]})  # already in a group
    _step(model, opt)
    assert opt.step_count == 1 and len(opt.param_groups) == 1


def test_a_group_schedule_that_does_not_take_the_step_is_refused_by_name():
    model = nn.Linear(3, 2)
    with pytest.raises(
        ValueError,
        match=r"param group 0's lr must be a number or a callable "
        r"of the step",
    ):
        SENG(model, param_groups=[{"params": [model.weight], "lr": lambda: 0.1}])
