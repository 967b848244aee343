"""SENG built from a ds_config by seng_dist.deepspeed.initialize, on 2 real Gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import displacement_error, make_mixed, python_output, requires_engine
from launch import run_ranks
from test_distributed import CONFIGS, STEPS, emulated, shard, train_jobs

from seng_dist.deepspeed import SENG_PARAMS, seng_params

needs_ds = requires_engine("deepspeed", "ci/install_deepspeed.sh")

BASE = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 0},
}


def ds_config(**seng) -> dict:
    return dict(BASE, optimizer={"type": "SENG", "params": seng})


def _ds_train(rank: int, world: int, configs: dict) -> dict:
    import deepspeed

    import seng_dist.deepspeed as plugin

    deepspeed.init_distributed(dist_backend="gloo")
    out: dict[str, Any] = {}
    for name, cfg in configs.items():
        engine, opt, _, _ = plugin.initialize(model=make_mixed(), config=cfg)
        params = []
        gas = cfg["gradient_accumulation_steps"]
        for k in range(STEPS):
            x, y = shard(k, rank)
            # Micro-batches last-first, so the last one (the curvature's) is the shard's head.
            for xm, ym in reversed(list(zip(x.chunk(gas), y.chunk(gas), strict=True))):
                loss = F.cross_entropy(engine(xm), ym)
                engine.backward(loss)
                engine.step()
            params.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
        out[name] = {
            "params": params,
            "backward_allreduce": engine.enable_backward_allreduce,
            "type": type(opt).__name__,
        }
    # A config whose optimizer is not SENG goes to deepspeed.initialize untouched.
    engine, opt, _, _ = plugin.initialize(
        model=make_mixed(), config=dict(BASE, optimizer={"type": "SGD", "params": {"lr": 0.1}})
    )
    out["passthrough"] = type(opt).__name__
    return out


# test_distributed's configs but the Adam-diagonal ones: those run in float64 there, and this
# engine trains in float32 (the plugin builds the same SENG whatever its damping).
PLAIN = [
    f"{path}-{variant}"
    for path in ("explicit", "factored", "sketched")
    for variant in ("blockdiag", "lagged", "lagged-overlap")
]
JOBS = {name: ds_config(**CONFIGS[name]) for name in PLAIN}


def _accumulated(variant: str) -> tuple[dict, dict]:
    seng = dict(CONFIGS[f"factored-{variant}"], curvature_batch_size=4)  # variant-overlap too
    return (
        dict(ds_config(**seng), train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2),
        seng,
    )


ACCUMULATED = ("blockdiag", "lagged", "lagged-overlap")
JOBS.update({f"accumulated-{v}": _accumulated(v)[0] for v in ACCUMULATED})
# A norm the averaged gradient exceeds, so every step is clipped.
JOBS.update(
    {
        f"clipped-{v}": dict(ds_config(**CONFIGS[f"factored-{v}"]), gradient_clipping=0.05)
        for v in ("blockdiag", "lagged")
    }
)
EMULATED = dict(
    CONFIGS,
    **{f"accumulated-{v}": _accumulated(v)[1] for v in ACCUMULATED},
    **{
        f"clipped-{v}": dict(CONFIGS[f"factored-{v}"], max_grad_norm=0.05)
        for v in ("blockdiag", "lagged")
    },
)


@needs_ds
def test_plugin_built_seng_equals_the_emulation_and_the_torch_run_for_both_variants():
    start = {n: p.detach() for n, p in make_mixed().named_parameters()}
    ranks = run_ranks(_ds_train, 2, JOBS, timeout=300)
    torch_runs = run_ranks(train_jobs, 2, {n: {"config": CONFIGS[n]} for n in PLAIN}, timeout=300)
    for rank, res in enumerate(ranks):
        assert res["passthrough"] != "SENG"
        for name in PLAIN:
            assert (
                displacement_error(res[name]["params"], torch_runs[rank][name]["params"], start)
                <= 1e-6
            ), name
    for name in JOBS:
        ref = emulated(2, EMULATED[name])
        for res in ranks:
            run = res[name]
            assert run["type"] == "SENG"
            # lagged: the engine's backward allreduce is off, SENG's one round carries g
            assert run["backward_allreduce"] == ("lagged" not in name)
            assert displacement_error(run["params"], ref, start) <= 1e-6, name


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ds_config(damping=1.0, dampening=0.1), "unknown params \\['dampening'\\]; valid params"),
        (
            dict(ds_config(), zero_optimization={"stage": 1}),
            'stage=1: SENG needs stage 0.* Set "zero_optimization": {"stage": 0}',
        ),
        (
            dict(ds_config(), fp16={"enabled": True}),
            "fp16.enabled=true is not supported.*Replace "
            'the "fp16" section by "torch_autocast": {"enabled": true, "dtype": "float16"}',
        ),
        (
            dict(ds_config(), bf16={"enabled": True}),
            'bf16.enabled=true is not supported.*"dtype": "bfloat16"',
        ),
        (
            dict(ds_config(gradient_accumulation_steps=2), gradient_accumulation_steps=4),
            "gradient_accumulation_steps=2 differs from the config's gradient_accumulation_steps=4",
        ),
        (dict(ds_config(max_grad_norm=2.0), gradient_clipping=1.0), "give the clipping norm once"),
    ],
)
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ValueError, match=message):
        seng_params(cfg)


def test_other_optimizers_pass_through_and_valid_params_are_listed():
    assert seng_params(dict(BASE, optimizer={"type": "Adam", "params": {"lr": 1e-3}})) is None
    assert seng_params(BASE) is None
    assert seng_params(ds_config(lr=0.1, variant="lagged")) == {
        "lr": 0.1,
        "variant": "lagged",
        "gradient_accumulation_steps": 1,
    }
    assert "curvature_update_interval" in SENG_PARAMS and "comm" not in SENG_PARAMS


AUTOCAST = {
    f"{dtype}-{variant}": dict(
        ds_config(**CONFIGS[f"factored-{variant}"]),
        torch_autocast={"enabled": True, "dtype": dtype},
    )
    for dtype, variant in (("bfloat16", "blockdiag"), ("bfloat16", "lagged"))
}


@needs_ds
def test_torch_autocast_trains_close_to_the_float32_emulation():
    start = {n: p.detach() for n, p in make_mixed().named_parameters()}
    ranks = run_ranks(_ds_train, 2, AUTOCAST, timeout=300)
    for name in AUTOCAST:
        ref = emulated(2, CONFIGS["factored-" + name.split("-")[1]])
        for res in ranks:
            # low-precision forward: close to, not equal to, the fp32 formulas
            assert displacement_error(res[name]["params"], ref, start) < 5e-2, name
        for a, b in zip(ranks[0][name]["params"], ranks[1][name]["params"], strict=True):
            assert all(torch.equal(a[n], b[n]) for n in a), name  # ranks stay in step


def _ds_fp16(rank: int, world: int, cfg: dict, steps: int) -> dict:
    import deepspeed

    import seng_dist.deepspeed as plugin

    deepspeed.init_distributed(dist_backend="gloo")
    engine, opt, _, _ = plugin.initialize(model=make_mixed(), config=cfg)
    scales = []
    for k in range(steps):
        x, y = shard(k % STEPS, rank)
        engine.backward(F.cross_entropy(engine(x), y))
        scales.append(engine.torch_autocast_z0_gradscaler.get_scale())
        engine.step()
    curvature = [
        t
        for b in opt.blocks
        for t in opt.state[b.weight].values()
        if torch.is_tensor(t) and t.is_floating_point()
    ]
    return {
        "scales": scales,
        "step_count": opt.step_count,
        "updates": opt.curvature_updates,
        "finite": all(bool(torch.isfinite(t).all()) for t in curvature)
        and all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()),
        "params": [p.detach().clone() for p in engine.module.parameters()],
    }


@needs_ds
@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_fp16_autocast_skips_overflow_steps_and_keeps_the_curvature_finite(variant):
    cfg = dict(
        ds_config(**CONFIGS[f"factored-{variant}"]),
        torch_autocast={"enabled": True, "dtype": "float16"},
    )
    steps = 24
    ranks = run_ranks(_ds_fp16, 2, cfg, steps, timeout=300)
    for res in ranks:
        # every halving of the loss scale is one skipped step; SENG stepped on all the others
        skipped = sum(1 for a, b in pairwise(res["scales"]) if b < a)
        assert skipped >= 1 and res["step_count"] == steps - skipped
        assert res["updates"] >= 1 and res["finite"]
    assert all(
        torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True)
    )


def _ds_resume(rank: int, world: int, cfg: dict, ckpt: str) -> dict:
    import deepspeed

    import seng_dist.deepspeed as plugin

    deepspeed.init_distributed(dist_backend="gloo")

    def train(engine, ks):
        for k in ks:
            x, y = shard(k, rank)
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()

    engine, _, _, _ = plugin.initialize(model=make_mixed(), config=cfg)
    train(engine, range(2))
    engine.save_checkpoint(ckpt, tag="step2")
    train(engine, range(2, STEPS))
    straight = {n: p.detach().clone() for n, p in engine.module.named_parameters()}

    engine, opt, _, _ = plugin.initialize(model=make_mixed(seed=5), config=cfg)
    engine.load_checkpoint(ckpt, tag="step2")
    resumed_step = opt.step_count
    train(engine, range(2, STEPS))
    return {
        "straight": straight,
        "step": resumed_step,
        "resumed": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
    }


@needs_ds
@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_engine_checkpoint_resumes_bit_exactly(tmp_path, variant):
    # T = 200: steps 2 and 3 use the curvature built at step 0 and carried by the checkpoint.
    seng = dict(CONFIGS[f"sketched-{variant}"], curvature_update_interval=200)
    cfg = ds_config(**seng)
    for res in run_ranks(_ds_resume, 2, cfg, str(tmp_path), timeout=300):
        assert res["step"] == 2
        for name, p in res["straight"].items():
            assert torch.equal(res["resumed"][name], p), name


@needs_ds
def test_train_script_under_the_deepspeed_launcher_with_the_json_config(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cfg = json.loads((root / "integrations" / "deepspeed" / "ds_config_seng.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 32
    cfg["scheduler"]["params"].update(total_num_steps=48, warmup_num_steps=4)
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        str(root / "examples" / "train.py"),
        "--deepspeed_config",
        str(tmp_path / "ds.json"),
        "--train-limit",
        "3072",
    ]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if "test accuracy:" in ln]
    assert len(lines) == 1 and "(seng, cnn, 1 epoch(s), 2 rank(s))" in lines[0], done.stdout
    assert float(lines[0].split("test accuracy:")[1].split()[0]) > 0.6


def test_missing_deepspeed_says_how_to_install_and_import_still_works():
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import seng_dist, seng_dist.deepspeed as p\n"
        "from conftest import make_mixed, python_output, requires_engine\n"
        "for call in (lambda: seng_dist.SENG(make_mixed(), comm='deepspeed'),\n"
        "             lambda: p.initialize(model=make_mixed(), config={})):\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
    )
    out = python_output(code)
    assert out.count("ci/install_deepspeed.sh") == 2, out


@needs_ds
def test_deepspeed_engine_without_init_says_to_initialise():
    from seng_dist import SENG

    with pytest.raises(ValueError, match="deepspeed.init_distributed"):
        SENG(make_mixed(), comm="deepspeed")


CLIENT = Path(__file__).resolve().parent / "clients" / "ds_cifar10.py"


def _ds_client(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """DeepSpeedExamples' CIFAR example with the SENG diff, under the deepspeed launcher on 2
    CPU ranks (``tests/clients/ds_cifar10.py``)."""
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        str(CLIENT),
        "--out",
        str(tmp_path),
        *flags,
    ]
    env = dict(os.environ, PYTHONPATH=str(CLIENT.parents[2]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@needs_ds
def test_the_official_cifar_example_with_seng_trains_and_says_where_lr_comes_from(tmp_path):
    done = _ds_client(tmp_path, "--max-steps", "60")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    output = done.stdout + done.stderr
    assert (
        output.count('the learning rate comes from the ds_config "scheduler" section (WarmupLR')
        == 1
    ), output[-3000:]  # rank 0, once
    for rank in range(2):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["after_first_step"] == 1  # curvature from step 0
        losses = report["losses"]
        assert len(losses) == 60 and sum(losses[-15:]) < 0.8 * sum(losses[:15]), losses


@needs_ds
def test_the_official_cifar_example_with_zero_stage_1_is_refused_naming_the_change(tmp_path):
    done = _ds_client(tmp_path, "--max-steps", "2", "--stage", "1")
    assert done.returncode != 0
    assert 'Set "zero_optimization": {"stage": 0}' in done.stdout + done.stderr
