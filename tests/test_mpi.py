"""SENG on mpi4py collectives under a real ``mpirun -np 2`` / ``-np 3``, started by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import displacement_error, launch_jobs, make_mixed, python_output, requires_engine
from launch import run_ranks
from test_distributed import (
    CONFIGS,
    ENGINE_SHARDED,
    EXTRAS,
    SHARDED,
    assert_rounds,
    check_grad_edit,
    check_overflow,
    check_sharded,
    emulated,
    train_jobs,
)

needs_mpi = requires_engine("mpi4py", "ci/install_mpi.sh")
HERE = Path(__file__).resolve().parent
START = {n: p.detach() for n, p in make_mixed().named_parameters()}
# Running as root and more ranks than cores are both normal on CI machines.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def mpirun(jobs: dict, tmp: Path, np: int) -> list[dict]:
    return launch_jobs(
        [shutil.which("mpirun") or "mpirun", "-np", str(np)],
        "mpi_worker.py",
        jobs,
        tmp,
        np,
        extra_env=MPI_ENV,
    )


# Clipping and a GradScaler between backward and step, and one rank's overflow.
EDITS = ("clip-blockdiag-overlap", "scaler-clip-lagged", "scaler-blockdiag")
OVERFLOWS = ("overflow-lagged", "overflow-blockdiag-overlap")


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def mpi_runs(request, tmp_path_factory):
    jobs = {name: {"config": cfg, "engine": "mpi"} for name, cfg in CONFIGS.items()}
    jobs["bf16"] = {
        "config": dict(CONFIGS["explicit-lagged"], comm_dtype="bfloat16"),
        "engine": "mpi",
    }
    jobs.update({name: dict(EXTRAS[name], engine="mpi") for name in EDITS + OVERFLOWS})
    jobs.update(
        {
            name: {"config": SHARDED[name], "engine": "mpi", "spread": True}
            for name in ENGINE_SHARDED
        }
    )
    return request.param, mpirun(jobs, tmp_path_factory.mktemp("mpi"), request.param)


@pytest.fixture(scope="module")
def torch_runs():
    return {
        world: run_ranks(
            train_jobs, world, {n: {"config": c} for n, c in CONFIGS.items()}, timeout=300
        )
        for world in (2, 3)
    }


@needs_mpi
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mpi_equals_the_emulation_and_the_torch_distributed_run(mpi_runs, torch_runs, name):
    world, ranks = mpi_runs
    ref = emulated(world, CONFIGS[name])
    for rank, res in enumerate(ranks):
        assert displacement_error(res[name]["params"], ref, START) <= 1e-6
        assert (
            displacement_error(res[name]["params"], torch_runs[world][rank][name]["params"], START)
            <= 1e-6
        )
    assert_rounds(ranks[0][name], name)


@needs_mpi
@pytest.mark.parametrize("name", ENGINE_SHARDED)
def test_mpi_sharded_state_equals_the_unsharded_emulation(mpi_runs, name):
    check_sharded(name, mpi_runs[1], START)


@needs_mpi
@pytest.mark.parametrize("name", EDITS)
def test_mpi_edits_of_grad_act_on_the_averaged_gradient(mpi_runs, name):
    check_grad_edit(name, mpi_runs[1])


@needs_mpi
@pytest.mark.parametrize("name", OVERFLOWS)
def test_mpi_overflow_on_one_rank_skips_the_step_on_every_rank(mpi_runs, name):
    check_overflow(name, mpi_runs[1])


@needs_mpi
def test_mpi_refuses_16_bit_buffers_up_front(mpi_runs):
    for res in mpi_runs[1]:
        assert (
            "comm_dtype='bfloat16' is not supported by the MPICommunicator" in res["bf16"]["error"]
        )


def test_missing_mpi4py_says_how_to_install():
    out = python_output(
        "import sys; sys.modules['mpi4py'] = None\n"
        "import seng_dist\n"
        "from conftest import make_mixed\n"
        "try:\n"
        "    seng_dist.SENG(make_mixed(), comm='mpi')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    assert "ci/install_mpi.sh" in out and "mpi4py" in out


def _can_make_namespaces() -> str:
    """'' if network namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (bash ci/install_mpi.sh)"
    done = subprocess.run(["ip", "netns", "add", "seng-probe"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"network namespaces cannot be made here: {done.stderr.strip()}"
    entered = subprocess.run(
        ["ip", "netns", "exec", "seng-probe", "true"], capture_output=True, text=True
    )
    subprocess.run(["ip", "netns", "del", "seng-probe"], capture_output=True)
    if entered.returncode != 0:
        return f"a network namespace cannot be entered here: {entered.stderr.strip()}"
    return ""


@needs_mpi
def test_two_hosts_in_network_namespaces_train_over_tcp():
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    root = HERE.parent
    done = subprocess.run(
        [
            "bash",
            str(root / "integrations" / "mpi" / "two_hosts_netns.sh"),
            "--variant",
            "lagged",
            "--train-limit",
            "3072",
            "--batch-size",
            "32",
            "--curvature-interval",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # os.environ, not the process's C environment: a test that imported mpi4py in this
        # process (Lightning's MPI detection does) left Open MPI's singleton variables there,
        # and an mpirun that inherits them takes itself for a rank and exits 1 without a word.
        env=dict(os.environ),
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("test accuracy:")]
    assert len(lines) == 1 and "2 rank(s)" in lines[0], done.stdout
    assert float(lines[0].split()[2]) > 0.6
    assert (
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count(
            "seng-host"
        )
        == 0
    )  # cleaned up
