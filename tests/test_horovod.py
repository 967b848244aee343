"""SENG on Horovod's collectives under a real ``horovodrun -np 2 --gloo``, started by the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import displacement_error, launch_jobs, make_mixed, python_output, requires_engine
from launch import run_ranks
from test_distributed import (
    CONFIGS,
    ENGINE_SHARDED,
    EXTRAS,
    SHARDED,
    STEPS,
    assert_rounds,
    check_grad_edit,
    check_overflow,
    check_sharded,
    emulated,
    train_jobs,
)

from seng_dist import SENG

HERE = Path(__file__).resolve().parent
needs_hvd = requires_engine("horovod", "ci/install_horovod.sh")

JOBS: dict[str, dict[str, Any]] = {
    name: {"config": cfg, "engine": "horovod"} for name, cfg in CONFIGS.items()
}
JOBS.update(
    {
        "hvd-wrapped-blockdiag": {
            "config": CONFIGS["factored-blockdiag"],
            "engine": "horovod",
            "hvd_wrap": True,
        },
        "hvd-wrapped-lagged": {
            "config": CONFIGS["factored-lagged"],
            "engine": "horovod",
            "hvd_wrap": True,
        },
        "auto-engine": {"config": CONFIGS["explicit-lagged"], "engine": None},
        "damping-mismatch": dict(EXTRAS["damping-mismatch"], engine="horovod"),
        "bf16": {
            "config": dict(CONFIGS["factored-lagged"], comm_dtype="bfloat16"),
            "engine": "horovod",
        },
        "fp16": {
            "config": dict(CONFIGS["factored-lagged"], comm_dtype="float16"),
            "engine": "horovod",
        },
    }
)
# Clipping and a GradScaler between backward and step, and one rank's overflow.
EDITS = ("clip-lagged-overlap", "scaler-clip-blockdiag", "scaler-lagged-overlap")
OVERFLOWS = ("overflow-blockdiag", "overflow-lagged-overlap")
JOBS.update({name: dict(EXTRAS[name], engine="horovod") for name in EDITS + OVERFLOWS})


def horovodrun(jobs: dict, tmp: Path, np: int = 2) -> list[dict]:
    launcher = [
        shutil.which("horovodrun") or "horovodrun",
        "-np",
        str(np),
        "-H",
        f"localhost:{np}",
        "--gloo",
    ]
    return launch_jobs(launcher, "horovod_worker.py", jobs, tmp, np)


@pytest.fixture(scope="module")
def hvd_runs(tmp_path_factory):
    return horovodrun(JOBS, tmp_path_factory.mktemp("hvd"))


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def hvd_sharded(request, tmp_path_factory):
    jobs = {
        name: {"config": SHARDED[name], "engine": "horovod", "spread": True}
        for name in ENGINE_SHARDED
    }
    return horovodrun(jobs, tmp_path_factory.mktemp("hvd-sharded"), np=request.param)


@needs_hvd
@pytest.mark.parametrize("name", ENGINE_SHARDED)
def test_horovod_sharded_state_equals_the_unsharded_emulation(hvd_sharded, name):
    check_sharded(name, hvd_sharded, START)


@pytest.fixture(scope="module")
def torch_runs():
    return run_ranks(train_jobs, 2, {n: {"config": c} for n, c in CONFIGS.items()}, timeout=300)


START = {n: p.detach() for n, p in make_mixed().named_parameters()}


@needs_hvd
@pytest.mark.parametrize("name", list(CONFIGS))
def test_horovod_equals_the_emulation_and_the_torch_distributed_run(hvd_runs, torch_runs, name):
    ref = emulated(2, CONFIGS[name])
    for rank in range(2):
        run = hvd_runs[rank][name]
        assert displacement_error(run["params"], ref, START) <= 1e-6
        assert displacement_error(run["params"], torch_runs[rank][name]["params"], START) <= 1e-6
    assert_rounds(hvd_runs[0][name], name)


@needs_hvd
@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_hvd_distributed_optimizer_does_not_average_twice(hvd_runs, variant):
    ref = emulated(2, CONFIGS[f"factored-{variant}"])
    for rank in range(2):
        run = hvd_runs[rank][f"hvd-wrapped-{variant}"]
        assert displacement_error(run["params"], ref, START) <= 1e-6
        # Horovod's hooks averaged the gradients; SENG sent only its corrections.
        assert [len(c) for c in run["calls"]] == [1] * STEPS


@needs_hvd
def test_comm_none_picks_horovod_when_it_is_initialised(hvd_runs):
    ref = emulated(2, CONFIGS["explicit-lagged"])
    assert displacement_error(hvd_runs[0]["auto-engine"]["params"], ref, START) <= 1e-6


@needs_hvd
def test_mismatched_settings_raise_on_every_horovod_rank(hvd_runs):
    for res in hvd_runs:
        assert "setting damping: rank 0: 0.5, rank 1: 0.25" in res["damping-mismatch"]["error"]


@needs_hvd
def test_fp16_buffer_works_and_bf16_is_refused_up_front(hvd_runs):
    ref = emulated(2, CONFIGS["factored-lagged"])
    for res in hvd_runs:
        assert displacement_error(res["fp16"]["params"], ref, START) < 2e-2
        assert (
            "comm_dtype='bfloat16' is not supported by the HorovodCommunicator engine; "
            "use one of 'float32', 'float16'" in res["bf16"]["error"]
        )


@needs_hvd
def test_horovod_engine_without_init_says_to_call_it():
    with pytest.raises(ValueError, match=r"hvd.init|horovod.torch.init\(\)"):
        SENG(make_mixed(), comm="horovod")


def test_missing_horovod_says_how_to_install_and_import_still_works():
    code = (
        "import sys; sys.modules['horovod'] = None\n"
        "import seng_dist\n"
        "from conftest import launch_jobs, make_mixed, python_output, requires_engine\n"
        "try:\n"
        "    seng_dist.SENG(make_mixed(), comm='horovod')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = python_output(code)
    assert "ci/install_horovod.sh" in out and "--no-build-isolation" in out


@needs_hvd
def test_train_script_under_horovodrun_matches_torchrun(tmp_path):
    root = HERE.parent
    args = [
        "--train-limit",
        "3072",
        "--batch-size",
        "32",
        "--curvature-interval",
        "5",
        "--variant",
        "lagged",
    ]
    env = dict(os.environ, PYTHONPATH=str(root))
    hvd_cmd = [
        "horovodrun",
        "-np",
        "2",
        "-H",
        "localhost:2",
        "--gloo",
        sys.executable,
        str(root / "examples" / "train.py"),
    ] + args
    torch_cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(root / "examples" / "train.py"),
    ] + args
    outputs = []
    for cmd in (hvd_cmd, torch_cmd):
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        lines = [
            ln.split("test accuracy:")[1]
            for ln in done.stdout.splitlines()
            if "test accuracy:" in ln
        ]
        assert len(lines) == 1, done.stdout  # rank 0 only
        outputs.append(lines[0].strip())
    assert "2 rank(s)" in outputs[0]
    assert outputs[0] == outputs[1]  # same data and seed: the same training on both engines


CLIENT = HERE / "clients" / "hvd_pytorch_mnist.py"


def _hvd_client(tmp: Path, pattern: str) -> tuple[str, list[dict]]:
    """Horovod's MNIST example with the SENG diff (``tests/clients/hvd_pytorch_mnist.py``)
    under ``horovodrun -np 2 --gloo``, 300 steps; its output and each rank's report."""
    tmp.mkdir()
    cmd = [
        shutil.which("horovodrun") or "horovodrun",
        "-np",
        "2",
        "-H",
        "localhost:2",
        "--gloo",
        sys.executable,
        str(CLIENT),
        "--pattern",
        pattern,
        "--max-steps",
        "300",
        "--out",
        str(tmp),
    ]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr, [
        json.loads((tmp / f"{r}.json").read_text()) for r in range(2)
    ]


@needs_hvd
def test_the_official_mnist_example_gets_its_curvature_at_step_0_as_seng_alone_does(tmp_path):
    """The example's broadcast_optimizer_state dummy step (on the bare SENG, then wrapped in
    hvd.DistributedOptimizer) no longer uses up step 0's curvature: after 300 steps (T = 200)
    the curvature was built as often as with SENG alone, and the loss falls."""
    out, wrapped = _hvd_client(tmp_path / "wrapped", "wrapped")
    assert "hvd.broadcast_optimizer_state" in out  # said, once per rank
    _, alone = _hvd_client(tmp_path / "standalone", "standalone")
    for report in wrapped + alone:
        assert report["after_first_step"] == 1 and report["steps"] == 300
        assert report["curvature_updates"] == 2  # steps 0 and 200
        losses = report["losses"]
        assert sum(losses[-50:]) < 0.7 * sum(losses[:50])


@needs_hvd
@pytest.mark.parametrize("name", EDITS)
def test_horovod_edits_of_grad_act_on_the_averaged_gradient(hvd_runs, name):
    check_grad_edit(name, hvd_runs)


@needs_hvd
@pytest.mark.parametrize("name", OVERFLOWS)
def test_horovod_overflow_on_one_rank_skips_the_step_on_every_rank(hvd_runs, name):
    check_overflow(name, hvd_runs)


@needs_hvd
def test_hvd_distributed_optimizer_takes_seng_over_and_retires_the_original():
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import torch, torch.nn.functional as F, horovod.torch as hvd\n"
        "from seng_dist import SENG\n"
        "from conftest import batch, make_mixed\n"
        "hvd.init()\n"
        "model = make_mixed()\n"
        "opt = SENG(model, curvature_update_interval=1)\n"
        "# built before the wrap: it patches opt.step, which the wrapper must not inherit\n"
        "sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)\n"
        "wrapped = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())\n"
        "x, y = batch()\n"
        "def train():\n"
        "    wrapped.zero_grad()\n"
        "    F.cross_entropy(model(x), y).backward()\n"
        "    wrapped.step()\n"
        "train()\n"
        "sched.step()\n"
        "print('scheduled', wrapped.param_groups[0]['lr'])\n"
        "print('seng', isinstance(wrapped, SENG), wrapped.step_count, "
        "wrapped.curvature_updates, wrapped.round.grads_averaged)\n"
        "try:\n"
        "    opt.step()\n"
        "except RuntimeError as e:\n"
        "    print('retired', e)\n"
        "wrapped.param_groups[0]['lr'] = 0.0  # a param group edit on the wrapper\n"
        "before = [p.detach().clone() for p in model.parameters()]\n"
        "train()\n"
        "print('lr0', all(torch.equal(p, q) for p, q in zip(model.parameters(), before)),"
        " wrapped.step_count)\n"
    )
    out = python_output(code)
    assert "scheduled 0.05" in out  # the scheduler drives the wrapper's groups
    assert "seng True 1 1 True" in out
    assert (
        "retired SENG: this optimizer was taken over by the wrapper that "
        "horovod.torch.optimizer built" in out
    )
    assert "lr0 True 2" in out
