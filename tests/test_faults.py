"""Faults: non-finite steps, bad input, ranks that die or hang. Every test is bounded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TESTS, requires_engine
from launch import free_port, run_ranks
from torch import nn

from seng_dist import SENG

ROOT = TESTS.parent


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _poison(x: torch.Tensor, kind: str) -> torch.Tensor:
    bad = x.clone()
    bad[0, 0] = float(kind)
    return bad


def _train(model: nn.Module, opt: SENG, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------- non-finite steps
@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_skipped_non_finite_step_leaves_the_run_as_if_it_never_happened(variant, kind):
    good = _batches(6)
    bad = [(_poison(x, kind), y) for x, y in good[:1]]
    runs = []
    for batches in (good, good[:2] + bad + good[2:]):
        model = _mlp()
        opt = SENG(model, lr=0.1, curvature_update_interval=3, variant=variant, skip_nonfinite=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(model, opt, batches)
        runs.append((model, opt, [str(w.message) for w in caught]))
    (clean, opt_a, _), (skipped, opt_b, messages) = runs
    for a, b in zip(clean.parameters(), skipped.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt_a.nonfinite_steps == 0 and opt_b.nonfinite_steps == 1
    assert opt_b.step_count == opt_a.step_count == 6
    assert any("step 2 skipped: the averaged gradient holds NaN or Inf" in m for m in messages)
    state = opt_b.state_dict()
    assert state["seng"]["nonfinite_steps"] == 1
    fresh = SENG(_mlp(), variant=variant, skip_nonfinite=True)
    fresh.load_state_dict(state)
    assert fresh.nonfinite_steps == 1


def test_a_non_finite_curvature_step_keeps_the_old_curvature_and_retries():
    model = _mlp()
    opt = SENG(model, lr=0.1, curvature_update_interval=1, sketch_size=None, skip_nonfinite=True)
    (x, y), (x2, y2) = _batches(2)
    _train(model, opt, [(x, y)])
    kept = opt.state[model[0].weight]["U"]
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="step 1 skipped"):
        _train(model, opt, [(_poison(x2, "nan"), y2)])
    assert opt.state[model[0].weight]["U"] is kept and opt.curvature_skips == 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    _train(model, opt, [(x2, y2)])  # step 1 again, with a rebuilt curvature
    assert opt.step_count == 2 and opt.curvature_updates == 2
    assert opt.state[model[0].weight]["U"] is not kept


def test_without_skip_the_update_follows_the_gradient_but_curvature_stays_finite():
    model = _mlp()
    opt = SENG(model, lr=0.1, curvature_update_interval=1)
    (x, y), (x2, y2) = _batches(2)
    _train(model, opt, [(x, y), (_poison(x2, "nan"), y2)])
    assert opt.nonfinite_steps == 0 and opt.curvature_skips == 2
    assert all(torch.isfinite(opt.state[b.weight]["K"]).all() for b in opt.blocks)


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target)


@pytest.mark.parametrize("bf16", [False, True])
def test_training_with_poisoned_batches_reaches_the_clean_accuracy(bf16):
    x, y = _digits()
    xt, yt, xe, ye = x[:1400], y[:1400], x[1400:], y[1400:]
    accs = []
    for poison in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = SENG(
            model,
            lr=0.1,
            damping=0.5,
            curvature_update_interval=5,
            sketch_size=None,
            skip_nonfinite=True,
        )
        order = torch.randperm(1400, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, idx in enumerate(order.split(50) * 3):
                xb = xt[idx]
                if poison and i % 7 == 3:  # every 7th batch carries a NaN or an Inf
                    xb = _poison(xb, "nan" if i % 2 else "inf")
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        F.cross_entropy(model(xb), yt[idx]).backward()
                    opt.step()
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
        with torch.no_grad():
            accs.append((model(xe).argmax(1) == ye).float().mean().item())
        if poison:
            assert opt.nonfinite_steps == 12  # 84 batches, every 7th poisoned
    # Equal, not close: a poisoned step changes nothing and is retried with the clean batch
    # (sketch_size=None: no sketch is drawn on the refused curvature step).
    assert accs[1] == accs[0] > 0.85  # 84 steps of batch 50; chance is 0.1


def _skip_together(rank: int, world: int, variant: str) -> list[torch.Tensor]:
    out = []
    for poison in (False, True):
        model = _mlp()
        opt = SENG(model, lr=0.1, curvature_update_interval=3, variant=variant, skip_nonfinite=True)
        batches = _batches(5, seed=10 + rank)
        if poison and rank == 1:  # one rank's bad batch: every rank must skip the step
            batches.insert(2, (_poison(batches[2][0], "nan"), batches[2][1]))
        elif poison:
            batches.insert(2, batches[2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _train(model, opt, batches)
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        out.append(torch.tensor([opt.nonfinite_steps, opt.step_count]))
    return out


@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_ranks_skip_a_non_finite_step_together(variant):
    ranks = run_ranks(_skip_together, 2, variant, timeout=120)
    for clean, counts_clean, skipped, counts in ranks:
        assert torch.equal(clean, skipped)
        assert counts_clean.tolist() == [0, 5] and counts.tolist() == [1, 5]
    assert torch.equal(ranks[0][0], ranks[1][0])


# ---------------------------------------------------------------- bad input
def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(ValueError, match="skip_nonfinite must be True or False, got 1"):
        SENG(_mlp(), skip_nonfinite=1)


def test_a_model_without_preconditionable_layers_warns_and_still_trains():
    model = nn.Sequential(nn.PReLU(6))  # a layer type SENG does not precondition
    with pytest.warns(UserWarning, match=r"100.0% .* \(SENG preconditions no layer\)"):
        opt = SENG(model, lr=0.1)
    before = model[0].weight.detach().clone()
    x = torch.randn(8, 6)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight)


def test_layers_frozen_after_construction_warn_once_and_stay_put():
    model = _mlp()
    opt = SENG(model, lr=0.1, curvature_update_interval=1)
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    head = model[2].weight.detach().clone()
    with pytest.warns(UserWarning, match="frozen .requires_grad=False. after the optimizer"):
        _train(model, opt, _batches(3))
    assert torch.equal(frozen, model[0].weight) and not torch.equal(head, model[2].weight)
    with warnings.catch_warnings(record=True) as caught:  # said once, not at every step
        warnings.simplefilter("always")
        _train(model, opt, _batches(2))
    assert not [w for w in caught if "frozen" in str(w.message)]


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_local_batches_train(n):
    model = _mlp()
    opt = SENG(model, lr=0.1, curvature_update_interval=1)
    _train(model, opt, [(x[:n], y[:n]) for x, y in _batches(3)])
    assert opt.curvature_updates == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_empty_local_batch_on_a_curvature_step_is_an_error():
    model = _mlp()
    opt = SENG(model, curvature_update_interval=1)
    opt.zero_grad()
    model(torch.randn(0, 6)).sum().backward()
    with pytest.raises(ValueError, match="local batch on rank 0 is empty on a curvature step"):
        opt.step()


# ---------------------------------------------------------------- lost and hung ranks
def _launch(launcher: str, fault: str, timeout_s: float = 600.0) -> tuple[int, str, float]:
    """Start fault_worker.py on 2 ranks under ``launcher`` and wait for the job to end: its
    exit code, combined output and seconds from start to end."""
    worker = [sys.executable, str(TESTS / "fault_worker.py"), fault, str(timeout_s)]
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
    )
    start = time.monotonic()
    if launcher == "no agent":
        # Two bare processes joined by Gloo, nothing watching them: the survivor itself has
        # to notice and fail.
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
        procs = [
            subprocess.Popen(
                worker,
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(2)
        ]
        try:
            out, _ = procs[0].communicate(timeout=120)
            return procs[0].returncode, out, time.monotonic() - start
        finally:
            for p in procs:
                p.kill()
                p.communicate()
    cmd = {
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
        ],
        "horovodrun": [
            shutil.which("horovodrun") or "horovodrun",
            "-np",
            "2",
            "-H",
            "localhost:2",
            "--gloo",
        ],
        "mpirun": ["mpirun", "-np", "2", "--oversubscribe"],
    }[launcher]
    if launcher == "torchrun":
        worker = worker[1:]  # torchrun starts the Python script itself
    done = subprocess.run(cmd + worker, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


# What the job says when rank 1 is killed (SIGKILL) at step 5.
LOST_RANK = [
    pytest.param(
        "no agent",
        r"CommunicationError: SENG: allreduce 'seng\.[\w/]+' failed on rank "
        r"0 of 2 \(TorchCommunicator\).*another rank died",
        id="no agent",
    ),
    pytest.param("torchrun", r"exitcode\s*: -9 \(pid: \d+\)|Signal 9 \(SIGKILL\)", id="torchrun"),
    pytest.param(
        "horovodrun",
        r"Process name: 1.*Exit code: 137|exit code 137|signal 9",
        marks=requires_engine("horovod", "ci/install_horovod.sh"),
        id="horovodrun",
    ),
    pytest.param(
        "mpirun",
        r"rank 1 with PID \d+ on node \S+ exited on signal 9",
        marks=requires_engine("mpi4py", "ci/install_mpi.sh"),
        id="mpirun",
    ),
]


@pytest.mark.parametrize("launcher, expected", LOST_RANK)
def test_a_lost_rank_ends_the_job_with_an_error_naming_the_cause(launcher, expected):
    code, out, seconds = _launch(launcher, "kill")
    assert code != 0, out[-3000:]
    assert re.search(expected, out, re.S), out[-3000:]
    assert seconds < 60, f"{launcher}: the job took {seconds:.0f} s to fail"


def test_a_hung_rank_fails_the_others_after_the_timeout():
    code, out, seconds = _launch("no agent", "stop", timeout_s=5)
    assert code != 0
    assert re.search(r"CommunicationError: SENG: allreduce .* failed on rank 0 of 2", out), out[
        -3000:
    ]
    assert 5 <= seconds < 60, seconds


# ---------------------------------------------------------------- soak
def test_soak_keeps_resident_memory_flat():
    done = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "soak.py"), "--steps", "600"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(
        r"resident memory after warm-up: [\d.]+ MiB -> [\d.]+ MiB "
        r"\([-+][\d.]+%, limit \+5%\)",
        done.stdout,
    ), done.stdout
