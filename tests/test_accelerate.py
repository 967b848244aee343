"""SENG under HuggingFace Accelerate: ``accelerator.prepare`` (which wraps the model in
DistributedDataParallel on several processes), ``accumulate``, ``clip_grad_norm_`` and
``save_state``/``load_state``, on one process and on 2 real Gloo ranks, against the plain loop
and the one-process emulation; and ``integrations/accelerate/train.py`` under ``accelerate
launch``."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LAYERS,
    SUM_ROUNDING,
    TESTS,
    displacement_error,
    make_mixed,
    requires_engine,
    shard,
)
from launch import free_port, run_ranks
from test_distributed import CONFIGS, emulated
from torch.utils.data import DataLoader, TensorDataset

from seng_dist import SENG
from seng_dist.comm import CountingCommunicator, make_communicator

pytestmark = requires_engine("accelerate", "ci/install_frameworks.sh")

ROOT = TESTS.parent
#: micro-batches per optimizer step, for the Accelerator and SENG alike
N = 2
#: samples per micro-batch: shard(k, w) holds 8, N micro-batches of 4
MICRO = 4
#: optimizer steps of the runs on 2 ranks; the curvature is rebuilt every 2 (T = 2)
STEPS = 8
#: the step after which the resumed run saves: odd, so the step after the resume uses the
#: curvature from the checkpoint instead of rebuilding it
SAVED_AT = 3
#: a norm the averaged gradient exceeds, so every step is clipped
CLIP = 0.05
#: MixedNet's four blocks (conv, bn, seq, head) on both paths (conv and head implicit), the
#: curvature from the last micro-batch (the whole of it), overlapped with backward in buckets
SETTINGS: dict[str, Any] = dict(CONFIGS["factored-blockdiag-overlap"], curvature_batch_size=MICRO)


def micro_batches(world: int, steps: int) -> TensorDataset:
    """Data in the order Accelerate's sharded loader hands out (process ``w`` takes batches
    ``w, w + world, ...``): rank ``w`` gets, at step ``k``, the micro-batches of ``shard(k, w)``
    last first, so the last one, whose samples build the curvature, is the shard's head: the
    samples the emulation builds it from."""
    xs, ys = [], []
    for k in range(steps):
        chunks = [[t.chunk(N) for t in shard(k, w)] for w in range(world)]
        for m in reversed(range(N)):
            for x, y in chunks:
                xs.append(x[m])
                ys.append(y[m])
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s parameters by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def accelerate_run(world: int, job: dict[str, Any]) -> dict[str, Any]:
    """SENG built on MixedNet, then ``accelerator.prepare(model, opt, loader)`` and the
    ``accumulate`` loop over ``job["steps"]`` steps (default :data:`STEPS`), resumed from
    ``job["resume"]`` after ``job["skip"]`` steps and saved to ``job["save"]`` at the end,
    if given. Records the parameters, SENG's collectives and its warnings per step."""
    from accelerate import Accelerator

    steps = job.get("steps", STEPS)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=N)
    model = make_mixed()
    comm = CountingCommunicator(make_communicator(None))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        opt = SENG(
            model,
            comm=comm,
            gradient_accumulation_steps=N,
            grads_averaged=job.get("grads_averaged"),
            **SETTINGS,
        )
        opt.state_dict_all_ranks = job.get("all_ranks", True)
        loader = DataLoader(micro_batches(world, steps), batch_size=MICRO)
        net, prepared, loader = accelerator.prepare(model, opt, loader)
        if "resume" in job:
            accelerator.load_state(job["resume"])
            loader = accelerator.skip_first_batches(loader, job["skip"] * N)
        params, calls = [], []
        comm.reset()
        for x, y in loader:
            with accelerator.accumulate(net):
                accelerator.backward(F.cross_entropy(net(x), y))
                if "clip" in job and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(net.parameters(), job["clip"])
                prepared.step()
                prepared.zero_grad()
            if accelerator.sync_gradients:
                params.append(params_of(model))
                calls.append(list(comm.calls))
                comm.reset()
        if "save" in job:
            accelerator.save_state(job["save"])
    return {
        "distributed": str(accelerator.distributed_type),
        "processes": accelerator.num_processes,
        "wrapper": type(net).__name__,
        "params": params,
        "calls": calls,
        "warnings": [str(w.message) for w in said],
        "steps": opt.step_count,
        "curvature_updates": opt.curvature_updates,
        "curvature_skips": opt.curvature_skips,
        "blocks": [b.name for b in opt.blocks],
        "curvature_bytes": [c.nbytes() for c in opt.curvature.curvatures],
    }


def _ranks(rank: int, world: int, jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every job on this rank, in order (the resume reads what the job before it saved)."""
    return {name: accelerate_run(world, job) for name, job in jobs.items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The jobs on 2 Gloo ranks that run_ranks initialised before Accelerate starts."""
    tmp = tmp_path_factory.mktemp("accelerate")
    jobs: dict[str, dict[str, Any]] = {
        "detected": {},  # SENG finds the DDP wrapper prepare added, after its first step
        "declared": {"grads_averaged": True},
        "clipped": {"clip": CLIP},
    }
    for flag in (True, False):
        saved = str(tmp / f"all-ranks-{flag}")
        jobs[f"first-part-{flag}"] = {"all_ranks": flag, "steps": SAVED_AT, "save": saved}
        jobs[f"resumed-{flag}"] = {"all_ranks": flag, "resume": saved, "skip": SAVED_AT}
    return run_ranks(_ranks, 2, jobs, timeout=180)


@pytest.fixture
def accelerate_state() -> Iterator[None]:
    """Accelerate's process-wide state, fresh for the test and cleared after it: its
    Accelerator is a singleton per process, and other tests in this process build their own
    (transformers' Trainer) with other settings."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # noqa: SLF001  # accelerate's own tests reset it so
    yield
    AcceleratorState._reset_state(True)  # noqa: SLF001


def plain_loop(steps: int) -> tuple[list[dict[str, torch.Tensor]], SENG]:
    """The loop without Accelerate, on the same micro-batches: each loss divided by N."""
    model = make_mixed()
    opt = SENG(model, gradient_accumulation_steps=N, **SETTINGS)
    data = micro_batches(1, steps).tensors
    params = []
    for k in range(steps):
        opt.zero_grad()
        for m in range(N):
            rows = slice((k * N + m) * MICRO, (k * N + m + 1) * MICRO)
            (F.cross_entropy(model(data[0][rows]), data[1][rows]) / N).backward()
        opt.step()
        params.append(params_of(model))
    return params, opt


def test_one_process_equals_the_plain_loop_with_curvature_on_every_block(accelerate_state):
    steps = 24
    ran = accelerate_run(1, {"steps": steps})
    assert (ran["distributed"], ran["processes"]) == ("DistributedType.NO", 1)
    assert ran["steps"] == len(ran["params"]) == steps  # 48 micro-batches / N
    assert sorted(ran["blocks"]) == sorted(LAYERS)
    assert ran["curvature_updates"] == steps // 2 and ran["curvature_skips"] == 0
    assert all(n > 0 for n in ran["curvature_bytes"])
    want, opt = plain_loop(steps)
    assert ran["curvature_bytes"] == [c.nbytes() for c in opt.curvature.curvatures]
    start = params_of(make_mixed())
    # The same kernels on the same data in one process: only the order of float32 sums may
    # differ, within a sum's rounding per step.
    assert displacement_error(ran["params"], want, start) <= steps * SUM_ROUNDING
    assert not [w for w in ran["warnings"] if "SENG" in w]


@pytest.mark.parametrize("job", ["detected", "declared", "clipped"])
def test_two_ranks_equal_the_emulation_averaged_once(two_ranks, job):
    """Both ranks take the emulation's steps (a gradient summed instead of averaged, or not
    averaged, lands far from it); SENG averages the gradient itself on its first step at
    most, DDP's wrapper from then on, which SENG finds and says (or was told)."""
    settings = dict(SETTINGS, max_grad_norm=CLIP) if job == "clipped" else SETTINGS
    ref = emulated(2, settings, batches=range(STEPS))
    start = params_of(make_mixed())
    detected = job != "declared"
    for res in two_ranks:
        run = res[job]
        assert (run["distributed"], run["processes"]) == ("DistributedType.MULTI_CPU", 2)
        assert run["wrapper"] == "DistributedDataParallel"
        # The ranks sum in another order than the emulation: the gradient's mean, and the
        # clipping's norm, each within a float32 sum's rounding.
        assert displacement_error(run["params"], ref, start) <= 2 * SUM_ROUNDING
        assert sorted(run["blocks"]) == sorted(LAYERS) and all(run["curvature_bytes"])
        told = [w for w in run["warnings"] if "DistributedDataParallel wraps the model" in w]
        assert len(told) == detected
        rounds = [{c.round for c in step} for step in run["calls"]]
        assert rounds[0] == ({"seng.grad", "seng.correction"} if detected else {"seng.correction"})
        assert rounds[1:] == [{"seng.correction"}] * (STEPS - 1)
    for a, b in zip(two_ranks[0][job]["params"], two_ranks[1][job]["params"], strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_save_state_load_state_resumes_bit_exactly_with_every_ranks_curvature(two_ranks):
    """save_state calls SENG's state_dict() on every rank: with state_dict_all_ranks the main
    process's file holds both ranks' curvature and the resumed run is the uninterrupted one
    bit for bit. Without it the file holds rank 0's curvature, which rank 1 drops and rebuilds
    at the next step: the run goes on, but differs."""
    for res in two_ranks:
        whole = res["detected"]["params"]
        assert len(res["first-part-True"]["params"]) == SAVED_AT
        for flag in (True, False):
            resumed = res[f"resumed-{flag}"]
            assert resumed["steps"] == STEPS
            assert len(resumed["params"]) == STEPS - SAVED_AT
            same = [
                all(torch.equal(got[n], want[n]) for n in got)
                for got, want in zip(resumed["params"], whole[SAVED_AT:], strict=True)
            ]
            assert same == [flag] * len(same), flag


def launch_example(tmp: Path, *flags: str) -> str:
    """The standard output of ``integrations/accelerate/train.py`` on 2 processes under the
    accelerate launch command the README gives (``--cpu`` would start one), small."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    example = [str(ROOT / "integrations" / "accelerate" / "train.py"), "--epochs", "2"]
    example += ["--train-limit", "512", "--test-limit", "500", "--curvature-interval", "3"]
    done = subprocess.run(
        [*launch, *example, "--clip", "5", *flags],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_the_example_resumes_bit_exactly_on_two_processes_under_accelerate_launch(tmp_path):
    """Two epochs, then the second again from the first's save_state: both processes ran
    (2 process(es); 512 images are 4 steps of 2 micro-batches of 32 per process and epoch),
    and the resumed run ends with the same model and SENG state, bit for bit."""
    from safetensors.torch import load_file

    whole = launch_example(tmp_path, "--checkpoint", "whole")
    assert re.search(r"^epoch 2: 8 steps, 3 curvature updates", whole, re.M), whole
    accuracy = re.search(r"test accuracy: (0\.\d+) \(seng, accelerate, .* 2 process", whole)
    assert accuracy and float(accuracy[1]) > 0.3, whole
    resumed = launch_example(tmp_path, "--resume", "whole/epoch-1", "--checkpoint", "resumed")
    assert "epoch 1:" not in resumed and accuracy[0] in resumed, resumed
    # The checkpoints after the second epoch: a model or momentum off by one rounding (or
    # rank 1 rebuilding its curvature, as without state_dict_all_ranks) differs.
    a, b = tmp_path / "whole" / "epoch-2", tmp_path / "resumed" / "epoch-2"
    models = [load_file(d / "model.safetensors") for d in (a, b)]
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][n], models[1][n]) for n in models[0])
    states = [torch.load(d / "optimizer.bin", weights_only=False)["state"] for d in (a, b)]
    assert states[0].keys() == states[1].keys()
    for i, state in states[0].items():
        assert torch.equal(state["momentum_buffer"], states[1][i]["momentum_buffer"])
