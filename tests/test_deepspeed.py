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
from test_distributed import BF16, CONFIGS, STEPS, emulated, shard, train_jobs

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
        # as DeepSpeedExamples' scripts cast their inputs
        dtype = (
            torch.bfloat16
            if engine.bfloat16_enabled()
            else torch.float16
            if engine.fp16_enabled()
            else None
        )
        for k in range(STEPS):
            x, y = shard(k, rank)
            x = x if dtype is None else x.to(dtype)
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
            "owned": [
                n
                for n, p in engine.module.named_parameters()
                if "momentum_buffer" in opt.state.get(p, {})
            ],
            "masters": sorted(
                n for n, p in engine.module.named_parameters() if "master" in opt.state.get(p, {})
            ),
            "dtype": str(next(engine.module.parameters()).dtype),
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


# ZeRO stages 1 and 2 from the config, on 2 and 3 ranks: SENG's shard_state, equal to the
# unsharded emulation.
ZERO = {
    f"zero{stage}-{name}": dict(
        ds_config(**CONFIGS[name]),
        zero_optimization={"stage": stage, "overlap_comm": True, "reduce_bucket_size": 5e8},
    )
    for stage in (1, 2)
    for name in ("explicit-blockdiag", "factored-lagged-overlap", "sketched-blockdiag-overlap")
}
# The bf16 section, at stages 0 and 2 (test_distributed's BF16 runs, through the plugin).
BF16_SECTION = {
    f"bf16-zero{stage}-{name}": dict(
        ds_config(**CONFIGS[name]), zero_optimization={"stage": stage}, bf16={"enabled": True}
    )
    for stage, name in ((0, "explicit-blockdiag"), (2, "factored-lagged-overlap"))
}


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def zero_runs(request):
    return request.param, run_ranks(_ds_train, request.param, ZERO, timeout=300)


@pytest.fixture(scope="module")
def bf16_runs():
    return run_ranks(_ds_train, 2, BF16_SECTION, timeout=300)


@needs_ds
@pytest.mark.parametrize("name", list(ZERO))
def test_zero_stages_1_and_2_run_as_sharded_seng_equal_to_the_emulation(zero_runs, name):
    world, ranks = zero_runs
    start = {n: p.detach() for n, p in make_mixed().named_parameters()}
    ref = emulated(world, CONFIGS[name.split("-", 1)[1]])
    owned = [set(res[name]["owned"]) for res in ranks]
    for res in ranks:
        run = res[name]
        assert displacement_error(run["params"], ref, start) <= 1e-6
        assert not run["backward_allreduce"]  # SENG's round carries (or scatters) g
    assert set().union(*owned) == set(start) and sum(map(len, owned)) == len(start)


@needs_ds
@pytest.mark.parametrize("name", list(BF16_SECTION))
def test_the_bf16_section_casts_the_model_and_keeps_float32_masters(bf16_runs, name):
    """The engine reports bf16 (scripts cast their inputs by it), the model is bf16, each
    parameter's float32 master lives with its owner, and the run is the torch.distributed
    run of the same bf16 model (test_distributed's BF16 jobs)."""
    ranks = bf16_runs
    stage = name.split("-")[1].removeprefix("zero")
    base = name.split("-", 2)[2]
    torch_name = f"bf16-{base}|{'gradients' if stage == '2' else 'none'}"
    torch_run = run_ranks(train_jobs, 2, {torch_name: BF16[torch_name]}, timeout=300)
    start = {n: p.detach().float() for n, p in make_mixed().named_parameters()}
    for rank, res in enumerate(ranks):
        run = res[name]
        assert run["dtype"] == "torch.bfloat16" and run["masters"] == sorted(run["owned"])
        want = [
            {n: p.float() for n, p in step.items()}
            for step in torch_run[rank][torch_name]["params"]
        ]
        got = [{n: p.float() for n, p in step.items()} for step in run["params"]]
        assert displacement_error(got, want, start) <= 1e-6


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ds_config(damping=1.0, dampening=0.1), "unknown params \\['dampening'\\]; valid params"),
        (
            dict(ds_config(), zero_optimization={"stage": 3}),
            "stage=3 is not supported with SENG: ZeRO-3 partitions the parameters.*Use stage 2",
        ),
        (
            dict(
                ds_config(), zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}
            ),
            "offload_optimizer=.*not supported with SENG.*Remove the key",
        ),
        (
            dict(ds_config(shard_state="optimizer"), zero_optimization={"stage": 2}),
            "shard_state='optimizer' differs from zero_optimization.stage=2, which means "
            "shard_state='gradients'",
        ),
        (
            dict(ds_config(), fp16={"enabled": True, "loss_scale": 128}),
            "fp16.loss_scale=128: a static loss scale is not supported.*set loss_scale to 0",
        ),
        (
            dict(ds_config(), bf16={"enabled": "auto"}),
            'bf16.enabled="auto": resolve "auto" by hand',
        ),
        (
            dict(ds_config(), fp16={"enabled": True, "initial_scale_power": "auto"}),
            'fp16.initial_scale_power="auto": resolve "auto" by hand',
        ),
        (
            dict(ds_config(), fp16={"enabled": True}, bf16={"enabled": True}),
            "enables both fp16 and bf16",
        ),
        (
            dict(ds_config(), bf16={"enabled": True}, torch_autocast={"enabled": True}),
            "enables bf16 and torch_autocast: give one",
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
        "shard_state": "none",
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
        x = x.half() if engine.fp16_enabled() else x  # fp16 parameters: fp16 inputs
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
        "state_dtypes": sorted(
            {
                str(t.dtype)
                for st in opt.state.values()
                for t in st.values()
                if torch.is_tensor(t) and t.is_floating_point()
            }
        ),
    }


@needs_ds
@pytest.mark.parametrize(
    "variant, section",
    [
        ("blockdiag", "torch_autocast"),
        ("lagged", "torch_autocast"),
        ("blockdiag", "fp16"),
        ("lagged-overlap", "fp16-zero2"),
    ],
)
def test_fp16_skips_overflow_steps_on_every_rank_and_keeps_the_curvature_finite(variant, section):
    """fp16 autocast (float32 parameters), or the fp16 section (fp16 parameters with float32
    masters; at ZeRO-2 each rank's GradScaler reads only its own shard of the gradients)."""
    precision = (
        {"torch_autocast": {"enabled": True, "dtype": "float16"}}
        if section == "torch_autocast"
        else {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    )
    zero = {"stage": 2} if section.endswith("zero2") else {"stage": 0}
    cfg = dict(ds_config(**CONFIGS[f"factored-{variant}"]), zero_optimization=zero, **precision)
    steps = 24
    ranks = run_ranks(_ds_fp16, 2, cfg, steps, timeout=300)
    for res in ranks:
        # every halving of the loss scale is one skipped step; SENG stepped on all the others
        skipped = sum(1 for a, b in pairwise(res["scales"]) if b < a)
        assert skipped >= 1 and res["step_count"] == steps - skipped
        assert res["updates"] >= 1 and res["finite"]
        assert res["state_dtypes"] == ["torch.float32"]
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
@pytest.mark.parametrize("variant, stage", [("blockdiag", 0), ("lagged", 0), ("lagged", 2)])
def test_engine_checkpoint_resumes_bit_exactly(tmp_path, variant, stage):
    # T = 200: steps 2 and 3 use the curvature built at step 0 and carried by the checkpoint.
    seng = dict(CONFIGS[f"sketched-{variant}"], curvature_update_interval=200)
    cfg = dict(ds_config(**seng), zero_optimization={"stage": stage})
    for res in run_ranks(_ds_resume, 2, cfg, str(tmp_path), timeout=300):
        assert res["step"] == 2
        for name, p in res["straight"].items():
            assert torch.equal(res["resumed"][name], p), name


@needs_ds
@pytest.mark.parametrize("config", ["ds_config_seng.json", "ds_config_hf_zero2_bf16.json"])
def test_train_script_under_the_deepspeed_launcher_with_the_json_config(tmp_path, config):
    """The repository's config (float32, stage 0, lagged), and a HuggingFace-style one (bf16,
    ZeRO-2 with its bucket keys, clipping; the "auto" values resolved by hand)."""
    root = Path(__file__).resolve().parents[1]
    cfg = json.loads((root / "integrations" / "deepspeed" / config).read_text())
    cfg["train_micro_batch_size_per_gpu"] = 32
    if "train_batch_size" in cfg:
        cfg["train_batch_size"] = 64
    if "total_num_steps" in cfg["scheduler"]["params"]:
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
    """Its defaults: the fp16 section (an fp16 model, GradScaler loss scaling), ZeRO stage 0."""
    done = _ds_client(tmp_path, "--max-steps", "60")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    output = done.stdout + done.stderr
    assert (
        output.count('the learning rate comes from the ds_config "scheduler" section (WarmupLR')
        == 1
    ), output[-3000:]  # rank 0, once
    for rank in range(2):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["dtype"] == "torch.float16"
        assert report["after_first_step"] == 1  # curvature from the first step taken
        losses = report["losses"]
        assert len(losses) == 60 and sum(losses[-15:]) < 0.8 * sum(losses[:15]), losses


@needs_ds
@pytest.mark.parametrize("stage", [1, 2])
def test_the_official_cifar_example_in_bf16_with_zero_stages_1_and_2(tmp_path, stage):
    """The example's own --dtype bf16 and --stage flags: its bf16 section and ZeRO section run
    as SENG's float32 masters in a bf16 model and its shard_state; rank 0 says so once."""
    done = _ds_client(tmp_path, "--max-steps", "60", "--dtype", "bf16", "--stage", str(stage))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    output = done.stdout + done.stderr
    said = f"zero_optimization.stage={stage} runs as SENG's shard_state="
    assert output.count(said) == 1 and "bf16: the model is cast to bfloat16" in output
    owned = 0
    for rank in range(2):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["dtype"] == "torch.bfloat16"
        assert report["shard_state"] == ("optimizer" if stage == 1 else "gradients")
        losses = report["losses"]
        assert len(losses) == 60 and sum(losses[-15:]) < 0.8 * sum(losses[:15]), losses
        owned += report["owned"]
    assert owned == 10  # the LeNet's 10 parameters, each on one rank


@needs_ds
def test_the_official_cifar_example_with_zero_stage_3_is_refused_naming_the_reason(tmp_path):
    done = _ds_client(tmp_path, "--max-steps", "2", "--stage", "3")
    assert done.returncode != 0
    assert "stage=3 is not supported with SENG: ZeRO-3 partitions the parameters" in (
        done.stdout + done.stderr
    )


def _ds_reshard(rank: int, world: int, cfg: dict, ckpt: str, save: bool) -> dict:
    """Train 2 steps and save (``save``), or load the checkpoint, gather SENG's state again and
    train 2 more steps."""
    import deepspeed

    import seng_dist.deepspeed as plugin

    deepspeed.init_distributed(dist_backend="gloo")
    engine, opt, _, _ = plugin.initialize(model=make_mixed(seed=0 if save else 5), config=cfg)
    if save:
        for k in range(2):
            x, y = shard(k, rank)
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
        engine.save_checkpoint(ckpt, tag="step2")
        return {"state": opt.state_dict()}
    engine.load_checkpoint(ckpt, tag="step2")
    state = opt.state_dict()
    step = opt.step_count
    for k in range(2, STEPS):
        x, y = shard(k, rank)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
    return {
        "state": state,
        "step": step,
        "finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()),
        "owned": [
            n
            for n, p in engine.module.named_parameters()
            if "momentum_buffer" in opt.state.get(p, {})
        ],
    }


@needs_ds
def test_engine_checkpoint_of_zero_2_reshards_on_another_number_of_ranks(tmp_path):
    """Saved by 2 ranks at stage 2 with Adam's diagonal, loaded by 3 at stage 2 and by 2 at
    stage 1: each rank keeps its own shard of the same state (gathered again it is the saved
    one, bit for bit) and training goes on."""
    seng = dict(CONFIGS["sketched-lagged-overlap"], damping_diagonal="adam")
    cfg = dict(ds_config(**seng), zero_optimization={"stage": 2})
    saved = run_ranks(_ds_reshard, 2, cfg, str(tmp_path), True, timeout=300)[0]["state"]
    curvature = (
        "U",
        "Xz",
        "sketch_idx",
        "Gf",
        "Af",
        "K",
        "YG",
        "YA",
        "sketch_g_idx",
        "sketch_a_idx",
    )

    def rest(state: dict) -> dict:
        return {
            i: {k: v for k, v in e.items() if k not in curvature} for i, e in state["state"].items()
        }

    for world, stage in ((3, 2), (2, 1)):
        loaded = dict(cfg, zero_optimization={"stage": stage})
        ranks = run_ranks(_ds_reshard, world, loaded, str(tmp_path), False, timeout=300)
        owned = [set(res["owned"]) for res in ranks]
        for res in ranks:
            assert res["step"] == 2 and res["finite"]
            again, want = rest(res["state"]), rest(saved)
            assert again.keys() == want.keys()
            for i, entries in want.items():
                for key, value in entries.items():
                    got = again[i][key]
                    assert torch.equal(got, value) if torch.is_tensor(value) else got == value
        names = {n for n, _ in make_mixed().named_parameters()}
        assert set().union(*owned) == names and sum(map(len, owned)) == len(names)
