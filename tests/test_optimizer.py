"""Optimizer behaviour: settings, schedules, variants, state and resume."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYERS, MixedNet, batch, make_mixed, seng_directions
from launch import run_ranks
from torch import nn

from seng_dist import SENG, SENGWarning, schedules
from seng_dist.reference import block_matrix, per_sample_gradients, relative_error


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=-1), "lr must be > 0"),
        (dict(lr=float("nan")), "lr must be finite"),
        (dict(lr="fast"), "lr must be a number"),
        (dict(damping=0), "damping must be > 0"),
        (dict(damping=lambda s: -1.0), "damping schedule returned -1.0 at step 0; it must be > 0"),
        (
            dict(lr=lambda: 0.1),
            "lr must be a number or a callable of the step .*which does not take one argument",
        ),
        (
            dict(momentum=lambda s, total: 0.9),
            "momentum must be a number or a callable of the step",
        ),
        (dict(momentum=1.0), "momentum must be < 1"),
        (dict(momentum=-0.1), "momentum must be >= 0"),
        (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
        (dict(curvature_update_interval=0), "curvature_update_interval must be > 0"),
        (dict(curvature_update_interval=2.5), "curvature_update_interval must be an int"),
        (dict(curvature_batch_size=0), "curvature_batch_size must be None or an int >= 1"),
        (dict(explicit_threshold=-1), "explicit_threshold must be an int >= 0"),
        (dict(sketch_size=0), "sketch_size must be None or an int >= 1"),
        (dict(sketch_size=10**6, explicit_threshold=1000), "sketch_size must be None or smaller"),
        (dict(sketch_method="gaussian"), "sketch_method must be one of 'uniform', 'leverage'"),
        (dict(factor_rank=0), "factor_rank must be None or an int >= 1"),
        (dict(factor_sketch_size=-3), "factor_sketch_size must be None or an int >= 1"),
        (dict(uc="approx"), "uc must be one of 'factored', 'exact'"),
        (dict(variant="async"), "variant must be one of 'blockdiag', 'lagged'"),
        (dict(loss_reduction="none"), "loss_reduction must be one of 'mean', 'sum'"),
        (dict(decoupled_weight_decay="yes"), "decoupled_weight_decay must be True or False"),
        (dict(sketch_replacement=1), "sketch_replacement must be True or False"),
        (dict(comm="nccl"), "comm must be None, one of 'local', 'torch', 'horovod', 'deepspeed'"),
        (dict(seed=1.5), "seed must be an int"),
        (
            dict(seed=2**64),
            "seed must be an int from 0 to 18446744073709551615, got 18446744073709551616",
        ),
        # torch would wrap it to 2**64 - 1: two settings for one generator
        (dict(seed=-1), "seed must be an int from 0 to 18446744073709551615, got -1"),
        (dict(skip_layers=[""]), "skip_layers holds an empty module name ''"),
        (dict(skip_layers=""), "skip_layers holds an empty module name ''"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
        (
            dict(gradient_accumulation_steps=0),
            "gradient_accumulation_steps must be an int from 1 to 65536, got 0",
        ),
        (
            dict(gradient_accumulation_steps=10**9),
            "gradient_accumulation_steps must be an int from 1 to 65536, got 1000000000",
        ),
        (
            dict(gradient_accumulation_steps=None),
            "gradient_accumulation_steps must be an int from 1",
        ),
        (dict(comm_dtype="int8"), "comm_dtype must be None .* or one of 'float32', 'bfloat16'"),
        (dict(comm_dtype=torch.float64), "comm_dtype must be None"),
        (dict(overlap="yes"), "overlap must be True or False, got 'yes'"),
        (dict(bucket_size_mb=0), "bucket_size_mb must be a finite number > 0 .MiB., got 0"),
        (dict(bucket_size_mb=float("inf")), "bucket_size_mb must be a finite number > 0"),
    ],
)
def test_bad_settings_raise_naming_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SENG(_net(), **kwargs)


def test_the_ends_of_the_seed_and_accumulation_ranges_are_accepted():
    opt = SENG(_net(), seed=2**64 - 1, gradient_accumulation_steps=2**16)
    assert opt.curvature.generator.initial_seed() == 2**64 - 1


def test_a_type_error_inside_a_schedule_is_the_schedules_own():
    # The schedule takes the step: its own bug is not reported as a wrong signature.
    with pytest.raises(TypeError, match="unsupported operand"):
        SENG(_net(), lr=lambda step: step + "0.1")


def test_model_without_trainable_parameters_is_rejected():
    model = _net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SENG(model)
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        SENG([torch.zeros(2, requires_grad=True)])


def _train(model, opt, batches, scheduler=None):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def _batches(n, size=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 5, (size,), generator=g))
        for _ in range(n)
    ]


RESUME_SETTINGS = dict(
    lr=0.05,
    damping=0.5,
    momentum=0.9,
    weight_decay=1e-3,
    curvature_update_interval=3,
    explicit_threshold=40,
    sketch_size=24,
    sketch_method="leverage",
    factor_rank=2,
    factor_sketch_size=4,
    curvature_batch_size=10,
)


@pytest.mark.parametrize("diagonal", ["identity", "adam"])
@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_resume_is_bit_exact(variant, diagonal):
    batches = _batches(10)
    model = make_mixed().train()
    opt = SENG(model, variant=variant, damping_diagonal=diagonal, **RESUME_SETTINGS)
    assert {b.path for b in opt.blocks} == {"explicit", "implicit"}
    head = _train(model, opt, batches[:4])  # stops right after a curvature update (step 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    tail = _train(model, opt, batches[4:])
    final = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = MixedNet()
    model2.load_state_dict(ckpt["model"])
    opt2 = SENG(model2.train(), variant=variant, damping_diagonal=diagonal, **RESUME_SETTINGS)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.step_count == 4
    tail2 = _train(model2, opt2, batches[4:])
    assert head and tail == tail2
    for a, b in zip(final, model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_of_another_model_or_setting_is_rejected():
    model = make_mixed()
    opt = SENG(model, **RESUME_SETTINGS)
    _train(model, opt, _batches(1))
    sd = opt.state_dict()
    other = SENG(nn.Sequential(nn.Flatten(), nn.Linear(192, 5)))
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(sd)
    changed = SENG(make_mixed(), **{**RESUME_SETTINGS, "factor_rank": 3})
    with pytest.raises(ValueError, match="factor_rank=2 \\(here 3\\)"):
        changed.load_state_dict(sd)
    with pytest.raises(ValueError, match="not saved by SENG"):
        changed.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_lagged_uses_previous_gradient_for_coefficients():
    model = make_mixed()
    lam = 0.5
    opt = SENG(
        model,
        lr=1.0,
        damping=lam,
        momentum=0.0,
        variant="lagged",
        curvature_update_interval=1,
        explicit_threshold=10**9,
        sketch_size=None,
    )
    (x1, y1), (x2, y2) = batch(seed=1), batch(seed=2)
    seng_directions(opt, model, x1, y1)  # step 0 (blockdiag rule), parameters restored
    d = seng_directions(opt, model, x2, y2)
    g1, g2 = per_sample_gradients(model, x1, y1), per_sample_gradients(model, x2, y2)
    for layer in LAYERS:
        u2 = block_matrix(g2, layer)
        shape = u2.shape[1:]
        U = u2.reshape(u2.shape[0], -1).T / u2.shape[0] ** 0.5
        prev = block_matrix(g1, layer).mean(0).reshape(-1)
        cur = u2.mean(0).reshape(-1)
        b = torch.linalg.solve(lam * torch.eye(U.shape[1], dtype=U.dtype) + U.T @ U, U.T @ prev)
        expected = (-(cur - U @ b) / lam).reshape(shape)
        assert relative_error(d[layer], expected) < 1e-5, layer


def test_momentum_weight_decay_and_scheduler():
    model = _net()
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    opt = SENG(model, lr=0.1, momentum=0.5, weight_decay=0.1, sketch_size=None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s >= 1 else 1.0)
    _train(model, opt, [(x, y)], sched)
    frozen = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, [(x, y)], sched)  # lr 0 from the scheduler: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters(), strict=True))
    # Every parameter, preconditioned or fallback, carries a momentum buffer.
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_decoupled_weight_decay_shrinks_parameters_without_gradient_term():
    model = nn.Sequential(nn.Linear(4, 2))
    opt = SENG(model, lr=0.5, momentum=0.0, weight_decay=0.2, decoupled_weight_decay=True)
    before = [p.detach().clone() for p in model.parameters()]
    F.mse_loss(model(torch.randn(3, 4)), torch.zeros(3, 2)).backward()  # a real pass ...
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # ... whose gradient is zero: the direction is zero
    opt.step()
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.allclose(b, a * (1 - 0.5 * 0.2))


def test_callable_hyper_parameters_follow_the_step():
    model = _net()
    opt = SENG(
        model,
        lr=lambda s: 0.1 / (s + 1),
        damping=schedules.damping_decay(2.0, 0.5, 1),
        momentum=0.0,
    )
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    _train(model, opt, [(x, y)] * 3)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.1 / 3)
    assert group["damping"] == pytest.approx(2.0 * 0.5**0.2)


def test_schedule_turning_invalid_mid_run_raises():
    model = _net()
    opt = SENG(model, damping=lambda s: 1.0 if s < 1 else 0.0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    _train(model, opt, [(x, y)])
    with pytest.raises(ValueError, match="damping schedule returned 0.0 at step 1"):
        _train(model, opt, [(x, y)])


def test_schedules_match_the_paper():
    cos = schedules.cosine(0.1, max_epochs=10, steps_per_epoch=5)
    assert cos(0) == pytest.approx(0.1)
    assert cos(25) == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * 0.5)))
    assert cos(10**6) == pytest.approx(0.001)
    exp = schedules.exponential(0.2, max_epochs=10, steps_per_epoch=2, decay_rate=6)
    assert exp(4) == pytest.approx(0.2 * 0.8**6)
    warm = schedules.linear_warmup(exp, warmup_steps=4, start=0.01)
    assert warm(0) == pytest.approx(0.01)
    assert warm(2) == pytest.approx(0.01 + (exp(4) - 0.01) / 2)
    assert warm(6) == exp(6)
    damp = schedules.damping_decay(0.17, 0.9, steps_per_epoch=3)
    assert damp(30 * 3) == pytest.approx(0.17 * 0.9**3)
    with pytest.raises(ValueError, match="max_epochs"):
        schedules.cosine(0.1, max_epochs=0, steps_per_epoch=5)


def test_non_finite_factors_never_enter_curvature():
    model = _net()
    opt = SENG(model, lr=0.1, curvature_update_interval=1, sketch_size=None)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    _train(model, opt, [(x, y)])
    kept = opt.state[model[0].weight]["U"]
    opt.zero_grad()
    bad = x.clone()
    bad[0, 0] = float("inf")
    F.cross_entropy(model(bad), y).backward()
    for p in model.parameters():  # as a loss scaler would, the update itself is neutralised
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.curvature_skips == 2  # both layers refused the non-finite factors
    assert opt.state[model[0].weight]["U"] is kept
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sum_reduction_matches_mean_reduction_curvature():
    x, y = batch()
    curvature = []
    for reduction in ("mean", "sum"):
        model = make_mixed()
        opt = SENG(
            model,
            lr=1.0,
            damping=0.5,
            momentum=0.0,
            loss_reduction=reduction,
            explicit_threshold=10**9,
            sketch_size=None,
        )
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction=reduction)
        loss.backward()
        opt.step()
        st = opt.state[model.head.weight]
        curvature.append(st["U"])
    assert torch.allclose(curvature[0], curvature[1], rtol=1e-5, atol=1e-6)


def _scaled_run(
    init_scale: float | None, steps: int = 3, fp16: bool = False
) -> tuple[SENG, list[torch.Tensor]]:
    """SENG driven by torch.amp.GradScaler (None: no scaler) on fixed batches, with an fp16
    autocast forward if asked."""
    from conftest import batch, make_mixed

    model = make_mixed()
    opt = SENG(model, lr=0.1, damping=0.5, curvature_update_interval=2)
    scaler = None
    if init_scale is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)
        opt.grad_scaler = scaler
    for k in range(steps):
        x, y = batch(8, seed=k)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return opt, [p.detach().clone() for p in model.parameters()]


def test_grad_scaler_loss_scale_is_divided_out_of_the_curvature():
    plain_opt, plain = _scaled_run(None)
    scaled_opt, scaled = _scaled_run(2.0**10)  # a power of two: unscaling is exact
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled, strict=True))
    for b, c in zip(plain_opt.blocks, scaled_opt.blocks, strict=True):
        assert torch.equal(plain_opt.state[b.weight]["K"], scaled_opt.state[c.weight]["K"])


def test_overflow_steps_are_skipped_and_never_enter_the_curvature():
    # A loss scale of 2^30 overflows the fp16 backward: GradScaler skips steps (halving its
    # scale) until the gradients fit.
    opt, params = _scaled_run(2.0**30, steps=30, fp16=True)
    assert 0 < opt.step_count < 30
    assert opt.curvature_updates >= 1 and opt.curvature_skips == 0
    assert all(torch.isfinite(p).all() for p in params)
    for b in opt.blocks:
        assert all(
            torch.isfinite(t).all()
            for t in opt.state[b.weight].values()
            if torch.is_tensor(t) and t.is_floating_point()
        )


def test_bf16_autocast_keeps_float32_curvature_close_to_the_float32_run():
    from conftest import batch, make_mixed

    runs = []
    for autocast in (False, True):
        model = make_mixed()
        opt = SENG(model, lr=0.1, damping=0.5)
        x, y = batch(8)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        runs.append((opt, [p.detach().clone() for p in model.parameters()]))
    (fp32_opt, fp32), (bf16_opt, bf16) = runs
    for b, c in zip(fp32_opt.blocks, bf16_opt.blocks, strict=True):
        K32, K16 = fp32_opt.state[b.weight]["K"], bf16_opt.state[c.weight]["K"]
        assert K16.dtype == torch.float32
        assert float((K16 - K32).norm() / K32.norm()) < 5e-2
    start = [p.detach() for p in make_mixed().parameters()]
    d32 = torch.cat([(a - s).reshape(-1) for a, s in zip(fp32, start, strict=True)])
    d16 = torch.cat([(a - s).reshape(-1) for a, s in zip(bf16, start, strict=True)])
    assert float((d16 - d32).norm() / d32.norm()) < 5e-2


def test_max_grad_norm_clips_the_gradient_like_clip_grad_norm():
    from conftest import batch, make_mixed

    runs = []
    for own in (True, False):
        model = make_mixed()
        opt = SENG(model, lr=0.1, damping=0.5, max_grad_norm=0.05 if own else None)
        for k in range(3):
            x, y = batch(8, seed=k)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if not own:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_step_without_gradients_changes_nothing_and_keeps_the_curvature_step():
    """A step() before any backward, then Horovod's broadcast_optimizer_state dummy step
    (zero gradients, no forward since the last step): nothing moves, no state is created, the
    step is not counted, and the curvature still comes from the first real step."""
    model = _net()
    opt = SENG(
        model, lr=0.1, curvature_update_interval=200, decoupled_weight_decay=True, weight_decay=0.1
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="hvd.broadcast_optimizer_state"):
        opt.step()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.step_count == 0 and not opt.state_dict()["state"]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    _train(model, opt, [(x, y)] * 3)
    assert opt.step_count == 3 and opt.curvature_updates == 1


def test_defaults_adapt_and_only_given_settings_are_checked_against_each_other():
    opt = SENG(_net(), explicit_threshold=0)  # the default sketch_size never applies: fine
    assert {b.path for b in opt.blocks} == {"implicit"}
    with pytest.raises(ValueError, match="sketch_size must be None or smaller"):
        SENG(_net(), explicit_threshold=0, sketch_size=16)


def _one_rank_without_gradients(rank: int, world: int) -> tuple[int, int]:
    model = _net()
    opt = SENG(model, lr=0.1, comm="torch")
    opt.step()  # before any backward, on every rank: nothing happens, nothing is exchanged
    if rank == 0:  # then only rank 0 has gradients: both ranks still take the step together
        F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    return opt.step_count, opt.curvature_updates


def test_an_empty_step_is_decided_by_all_ranks_together():
    results = run_ranks(_one_rank_without_gradients, 2, timeout=120)
    assert results == [(1, 1), (1, 0)]  # rank 1 had no curvature pass of its own


def test_sparse_gradients_are_refused_naming_the_fix():
    torch.manual_seed(0)
    # The Linear holds most elements: no "mostly first-order" warning at construction.
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 8))
    opt = SENG(model, lr=0.1)
    model(torch.randint(0, 10, (5, 2))).sum().backward()
    with pytest.raises(ValueError, match=r"sparse gradients \(use nn.Embedding\(sparse=False\)\)"):
        opt.step()


def test_seng_warnings_have_their_own_category_to_filter_by():
    model = nn.Linear(3, 2)
    opt = SENG(model)
    with pytest.warns(SENGWarning, match="step\\(\\) with no gradients"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=SENGWarning)
        SENG(nn.Sequential(nn.Flatten(), nn.Identity(), nn.PReLU(3)))  # "no supported layer"


def _train_step(opt: SENG, model: nn.Module) -> None:
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_a_second_seng_on_the_same_model_retires_the_first():
    model = make_mixed()
    old = SENG(model, curvature_update_interval=1)
    _train_step(old, model)
    saved = old.state_dict()
    new = SENG(model, curvature_update_interval=1)
    assert not old.passes.watching and not old.curvature.armed  # its hooks are off the model
    for use in (old.step, old.zero_grad, old.state_dict, lambda: old.load_state_dict(saved)):
        with pytest.raises(RuntimeError, match="retired when a newer SENG was built on the same"):
            use()
    new.load_state_dict(saved)
    _train_step(new, model)
    assert new.step_count == 2


def test_only_a_live_sengs_own_param_groups_stand_in_for_a_model():
    model = make_mixed()
    opt = SENG(model)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got list"):
        SENG([dict(g) for g in opt.param_groups])


@pytest.mark.parametrize("key", ["lr", "damping"])
def test_an_edit_of_a_param_group_takes_effect_at_the_next_step(key):
    def direction(value: float | None) -> torch.Tensor:
        torch.manual_seed(0)
        model = make_mixed()
        opt = SENG(model, lr=0.1, damping=1.0)
        if value is not None:
            opt.param_groups[0][key] = value
        before = [p.detach().clone() for p in model.parameters()]
        _train_step(opt, model)
        return torch.cat(
            [(p.detach() - q).flatten() for p, q in zip(model.parameters(), before, strict=True)]
        )

    assert not torch.allclose(direction(None), direction(0.5))
    assert torch.equal(direction(0.1 if key == "lr" else 1.0), direction(None))
