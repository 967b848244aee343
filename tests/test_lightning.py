"""SENG under PyTorch Lightning: the example's ``SENGModule`` (integrations/lightning/train.py),
whose ``configure_optimizers`` returns SENG with a per-step scheduler, trained by a real
``pl.Trainer`` on conftest's MixedNet (Conv2d, BatchNorm2d, a sequence Linear, a Linear head)
for a few dozen steps: curvature on every block, the scheduler's lr, ``accumulate_grad_batches``,
``strategy="ddp"`` on 2 CPU ranks, and ``save_checkpoint`` then ``ckpt_path=``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYERS, SUM_ROUNDING, batch, displacement_error, make_mixed, requires_engine
from launch import run_ranks
from test_distributed import CONFIGS
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset

from seng_dist import SENG
from seng_dist.comm import CountingCommunicator, make_communicator
from seng_dist.reference import emulate_distributed

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from integrations.lightning.train import SENGModule

pytestmark = requires_engine("pytorch_lightning", "ci/install_frameworks.sh")

LR = 0.1
#: SENG's settings in these runs: a curvature rebuild every 3 steps, from the whole local batch
SETTINGS: dict[str, Any] = dict(
    lr=LR,
    damping=0.5,
    momentum=0.9,
    weight_decay=1e-3,
    curvature_update_interval=3,
    curvature_batch_size=None,
)
BATCH = 8


def decay(k: int) -> float:
    """The lr factor at SENG step ``k`` (module-level: the ranks' jobs are pickled)."""
    return 0.9**k


def data(batches: int, seed: int = 1) -> TensorDataset:
    """``batches`` batches of MixedNet's inputs, labelled by their brightest channel (a rule
    the net can learn, so that a falling loss means training works)."""
    x, _ = batch(batches * BATCH, seed=seed)
    return TensorDataset(x, x.mean((2, 3)).argmax(1))


def module(lr_lambda: Any = decay, settings: dict[str, Any] = SETTINGS, **seng: Any) -> SENGModule:
    """The example's LightningModule on MixedNet (seed 0), SENG built with ``settings`` and
    ``seng``."""
    from integrations.lightning.train import SENGModule

    kw = dict(settings, **seng)
    return SENGModule(make_mixed().train(), kw.pop("lr"), lr_lambda, **kw)


def trainer(**kw: Any) -> pl.Trainer:
    """A quiet CPU Trainer: no logger, no automatic checkpoints, no progress bar."""
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def loader(dataset: TensorDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=False)


def params(m: SENGModule) -> dict[str, torch.Tensor]:
    """The net's parameters by name, copied."""
    return {n: p.detach().clone() for n, p in m.net.named_parameters()}


def plain_loop(
    micro: list[tuple[torch.Tensor, torch.Tensor]], n: int, settings: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """MixedNet's parameters after a loop without Lightning on the micro-batches ``micro``:
    each loss divided by ``n``, ``n`` backward passes per SENG step (SENG told
    ``gradient_accumulation_steps=n``), the scheduler stepped after each SENG step."""
    net = make_mixed().train()
    opt = SENG(net, gradient_accumulation_steps=n, **settings)
    scheduler = LambdaLR(opt, decay)
    for k in range(len(micro) // n):
        opt.zero_grad()
        for x, y in micro[k * n : (k + 1) * n]:
            (F.cross_entropy(net(x), y) / n).backward()
        opt.step()
        scheduler.step()
    assert opt.curvature_updates == math.ceil(
        len(micro) // n / settings["curvature_update_interval"]
    )
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def optimizer(t: pl.Trainer) -> SENG:
    """The Trainer's SENG (``trainer.optimizers`` holds the optimizer itself, not Lightning's
    wrapper)."""
    opt = t.optimizers[0]
    assert isinstance(opt, SENG)
    return opt


# ---------------------------------------------------------------------------- one process


def test_a_scheduler_dict_drives_seng_and_every_block_gets_curvature() -> None:
    """16 steps; the schedule keeps lr for 10 steps, then sets it to 0: the lr SENG steps with
    is the scheduler's, so the parameters stop moving exactly there. The curvature is rebuilt
    every 3 steps on every block, and the loss falls."""
    import pytorch_lightning as pl

    stop = 10
    seen: dict[str, Any] = {"lr": [], "at_stop": None}

    class Watch(pl.Callback):
        def on_before_optimizer_step(self, t: pl.Trainer, m: Any, opt: Any) -> None:
            seen["lr"].append(opt.param_groups[0]["lr"])  # what this step will use

        def on_train_batch_end(self, t: pl.Trainer, m: Any, *args: Any) -> None:
            if t.global_step == stop:
                seen["at_stop"] = params(m)

    m = module(lr_lambda=lambda k: 1.0 if k < stop else 0.0)
    start = params(m)
    dataset = data(16)
    x, y = dataset.tensors
    with torch.no_grad():
        before = float(F.cross_entropy(m.net(x), y))
    t = trainer(max_epochs=1, callbacks=[Watch()])
    t.fit(m, loader(dataset))
    opt = optimizer(t)

    assert opt.step_count == t.global_step == 16
    assert seen["lr"] == [LR] * stop + [0.0] * (16 - stop)
    end = params(m)
    assert all(torch.equal(end[n], seen["at_stop"][n]) for n in end)  # lr 0: no step moved them
    assert all(not torch.equal(seen["at_stop"][n], start[n]) for n in start)
    # Curvature at steps 0, 3, 6, 9, 12, 15, on every block; no parameter on the fallback rule.
    assert opt.curvature_updates == 6
    assert {c.block.name for c in opt.curvature.curvatures} == {f"net.{n}" for n in LAYERS}
    assert all(c.ready for c in opt.curvature.curvatures)
    in_blocks = {id(p) for b in opt.blocks for p in b.params}
    assert in_blocks == {id(p) for p in m.parameters()}
    with torch.no_grad():
        after = float(F.cross_entropy(m.net(x), y))
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("n", [2, 3])
def test_accumulate_grad_batches_equals_a_plain_loop_with_the_same_accumulation(n: int) -> None:
    """``accumulate_grad_batches=n`` (the example passes it on as SENG's
    ``gradient_accumulation_steps``): 12 batches make 12/n SENG steps, and the parameters equal
    a plain loop's that divides each loss by n, calls backward n times and steps once (SENG's
    curvature from the last micro-batch, the scheduler stepped per SENG step)."""
    batches = 12
    dataset = data(batches)
    m = module()
    t = trainer(max_epochs=1, accumulate_grad_batches=n)
    t.fit(m, loader(dataset))
    opt = optimizer(t)
    assert opt.step_count == t.global_step == batches // n
    assert opt.config.gradient_accumulation_steps == n
    assert opt.curvature_updates == math.ceil(batches / n / 3)
    ref = plain_loop(list(loader(dataset)), n, SETTINGS)
    # The same float32 operations in the same order: equal up to a kernel that sums in
    # another order (float32's rounding of a sum), not bit for bit on every machine.
    start = {k: v.detach() for k, v in make_mixed().named_parameters()}
    assert displacement_error([params(m)], [ref], start) <= SUM_ROUNDING


def test_save_checkpoint_then_ckpt_path_resumes_bit_exactly(tmp_path: Path) -> None:
    """2 epochs, ``trainer.save_checkpoint``, then a new module and Trainer with
    ``ckpt_path=`` to epoch 4 equal 4 uninterrupted epochs bit for bit: the checkpoint holds
    SENG's state (curvature built at step 6 and used at steps 8 after the resume), the
    scheduler's and the loop's; the data order is fixed."""
    dataset = data(4)
    whole = module()
    t = trainer(max_epochs=4)
    t.fit(whole, loader(dataset))

    head = module()
    trainer(max_epochs=2).fit(head, loader(dataset))
    t_head = head.trainer
    t_head.save_checkpoint(tmp_path / "head.ckpt")
    tail = module()
    t_tail = trainer(max_epochs=4)
    t_tail.fit(tail, loader(dataset), ckpt_path=tmp_path / "head.ckpt")

    assert optimizer(t_tail).step_count == optimizer(t).step_count == 16
    assert optimizer(t_tail).curvature_updates == optimizer(t).curvature_updates == 6
    want, got = params(whole), params(tail)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert t_tail.lr_scheduler_configs[0].scheduler.get_last_lr() == [LR * decay(16)]


def test_the_example_trains_on_fashion_mnist(capsys: pytest.CaptureFixture[str]) -> None:
    """``integrations/lightning/train.py`` itself, on 1,024 images with accumulation: it
    trains (16 steps) and prints the accuracy on 1,000 test images."""
    from examples.data import DEFAULT_ROOT
    from integrations.lightning.train import main

    if not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    argv = "--train-limit 1024 --test-limit 1000 --batch-size 32 --accumulate 2"
    acc = main(argv.split())
    assert acc is not None and acc > 0.4  # 0.57 measured; chance is 0.1
    assert "test accuracy:" in capsys.readouterr().out


# ---------------------------------------------------------------------------- 2 ranks

DDP_STEPS = 6
#: SENG's rounds in a step once it leaves the gradients to DDP
CORRECTION = {"seng.correction"}
#: exact solves, overlapped with backward in ~200-byte buckets (several per round): the
#: configuration the other engines' tests check against the emulation
DDP_SETTINGS = {
    name: dict(CONFIGS[f"explicit-{name}-overlap"], curvature_update_interval=2)
    for name in ("blockdiag", "lagged")
}


def _ddp_job(rank: int, job: dict) -> dict:
    """One Lightning fit on this rank, as ``torchrun`` starts it: the process group is up and
    LOCAL_RANK is set, so Lightning's ddp strategy joins it instead of launching processes."""
    import pytorch_lightning as pl

    comm = CountingCommunicator(make_communicator("torch"))
    m = module(settings=job["settings"], comm=comm, **job.get("seng", {}))
    calls: list[set[str]] = []
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Record(pl.Callback):
        """The batches this rank trains on, and SENG's rounds per batch."""

        def on_train_start(self, *args: Any) -> None:
            comm.reset()  # SENG's construction: settings check and rank 0's parameters

        def on_train_batch_start(self, t: pl.Trainer, m: Any, batch: Any, i: int) -> None:
            batches.append(batch)

        def on_train_batch_end(self, *args: Any) -> None:
            calls.append({c.round for c in comm.calls})
            comm.reset()

    t = trainer(
        devices=2,
        strategy="ddp",
        max_epochs=job.get("epochs", 1),
        accumulate_grad_batches=job.get("accumulate", 1),
        callbacks=[Record()],
    )
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        t.fit(m, loader(data(2 * job["batches"])), ckpt_path=job.get("ckpt_path"))
    if "save" in job:
        t.save_checkpoint(job["save"])  # every rank calls it (SENG gathers), rank 0 writes
    opt = optimizer(t)
    return {
        "params": params(m),
        "batches": batches,
        "steps": opt.step_count,
        "calls": calls,
        "warnings": [str(w.message) for w in said if "SENG" in str(w.message)],
        # SENG alone (its own averaging, no DDP) on this rank's batches
        "plain": plain_loop(batches, job["accumulate"], job["settings"])
        if "accumulate" in job
        else None,
    }


def _ddp_jobs(rank: int, world: int, jobs: dict[str, dict]) -> dict[str, dict]:
    return {name: _ddp_job(rank, job) for name, job in jobs.items()}


def ddp_jobs(tmp: Path) -> dict[str, dict]:
    """The 2-rank runs: SENG finding DDP (blockdiag), SENG told (lagged), accumulation, and a
    2 + 2 epoch resume next to 4 uninterrupted epochs."""
    # 2 steps per epoch, a curvature every 3: the steps after the resume at step 4 use the
    # curvature built at step 3, which the checkpoint holds per rank.
    resume = dict(settings=dict(DDP_SETTINGS["blockdiag"], curvature_update_interval=3), batches=2)
    return {
        "detected": dict(settings=DDP_SETTINGS["blockdiag"], batches=DDP_STEPS),
        "told": dict(
            settings=DDP_SETTINGS["lagged"], batches=DDP_STEPS, seng={"grads_averaged": True}
        ),
        "accumulate": dict(settings=DDP_SETTINGS["blockdiag"], batches=8, accumulate=2),
        "whole": dict(resume, epochs=4),
        "head": dict(resume, epochs=2, save=str(tmp / "head.ckpt")),
        "tail": dict(resume, epochs=4, ckpt_path=str(tmp / "head.ckpt")),
    }


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    """Every 2-rank job, in one start of 2 Gloo ranks (:func:`launch.run_ranks`, bounded)."""
    return run_ranks(_ddp_jobs, 2, ddp_jobs(tmp_path_factory.mktemp("ddp")), timeout=240)


def emulated(settings: dict[str, Any], ranks: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Distributed SENG on the batches the ``ranks`` trained on (Lightning's
    DistributedSampler: disjoint halves of a seeded permutation), written out in one process
    with plain means over the ranks."""
    shards = [list(step) for step in zip(*(r["batches"] for r in ranks), strict=True)]
    base = settings["lr"]
    return emulate_distributed(
        make_mixed().train(), shards, **dict(settings, lr=lambda k: base * decay(k))
    )


@pytest.mark.parametrize("job", ["detected", "told"])
def test_ddp_ranks_are_equal_and_average_the_gradient_once(
    ddp: list[dict[str, dict]], job: str
) -> None:
    """``strategy="ddp"`` on 2 CPU ranks. Lightning's own launcher re-runs the command that
    started it (here: pytest), so the ranks are started as torchrun would
    (:func:`launch.run_ranks`) and Lightning joins them. The ranks end equal, and equal the
    one-process emulation of distributed SENG (``seng_dist.reference.emulate_distributed``):
    the ranks' mean gradient, each rank's curvature from its own half of the batch. A missing
    average, a sum instead of a mean, or a correction averaged twice over moves the result off
    it; DDP and SENG both averaging the gradient at the first step (before SENG has found DDP)
    is a mean of equal values, which it must stay."""
    ranks = [r[job] for r in ddp]
    ref = emulated(DDP_SETTINGS["blockdiag" if job == "detected" else "lagged"], ranks)
    start = {k: v.detach() for k, v in make_mixed().named_parameters()}
    # Each rank trained on its own half of the data set: together, every sample once.
    seen = torch.cat([x for r in ranks for x, _ in r["batches"]]).flatten(1)
    every = data(2 * DDP_STEPS).tensors[0].flatten(1)
    assert len(seen) == len(every)
    assert torch.equal(torch.unique(seen, dim=0), torch.unique(every, dim=0))
    assert ranks[0]["steps"] == ranks[1]["steps"] == DDP_STEPS
    assert all(torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in start)
    # As in tests/test_distributed.py: the ranks' sums in another order than the emulation's
    # (DDP sums halves, the emulation takes means) differ by float32 rounding (8e-8 measured).
    assert displacement_error([ranks[0]["params"]], [ref[-1]], start) <= 1e-6


def test_ddp_is_found_and_seng_then_sends_only_its_corrections(ddp: list[dict[str, dict]]) -> None:
    """SENG built on the LightningModule inside Lightning's DDP wrapper finds DDP after its
    first step (one warning), then leaves the gradients to DDP: its only round is the
    corrections'. Told with ``grads_averaged=True``, it does so from the start, unwarned."""
    for rank in ddp:
        detected, told = rank["detected"], rank["told"]
        found = [w for w in detected["warnings"] if "DistributedDataParallel wraps" in w]
        assert len(found) == 1
        # Step 0: SENG averaged the gradients too (a mean of means), then found DDP.
        assert detected["calls"] == [{"seng.grad", "seng.correction"}] + [CORRECTION] * 5
        assert not [w for w in told["warnings"] if "DistributedDataParallel wraps" in w]
        assert told["calls"] == [CORRECTION] * DDP_STEPS


def test_ddp_with_accumulation_steps_once_per_window_on_equal_ranks(
    ddp: list[dict[str, dict]],
) -> None:
    """``accumulate_grad_batches=2`` under ddp: 8 batches per rank make 4 SENG steps; neither
    DDP (Lightning's no_sync) nor SENG averages after the first micro-batch of a step; the
    ranks stay equal, and equal SENG alone (its own averaging, no DDP, no Lightning) with
    ``gradient_accumulation_steps=2`` on the same ranks and batches."""
    start = {k: v.detach() for k, v in make_mixed().named_parameters()}
    for rank in ddp:
        run = rank["accumulate"]
        assert run["steps"] == 4
        assert run["calls"] == [set(), {"seng.grad", "seng.correction"}] + [set(), CORRECTION] * 3
        assert all(torch.equal(run["params"][n], ddp[0]["accumulate"]["params"][n]) for n in start)
        # DDP's sum of halves against SENG's mean: float32 rounding, as against the emulation
        assert displacement_error([run["params"]], [run["plain"]], start) <= 1e-6


def test_ddp_resume_from_one_checkpoint_is_bit_exact_on_every_rank(
    ddp: list[dict[str, dict]],
) -> None:
    """``state_dict_all_ranks`` (the example sets it): rank 0's one file holds both ranks'
    curvature, and each rank resumes with its own: 2 + 2 epochs equal 4, on both ranks."""
    for rank in ddp:
        whole, tail = rank["whole"], rank["tail"]
        assert whole["steps"] == tail["steps"] == 8
        assert all(torch.equal(whole["params"][n], tail["params"][n]) for n in whole["params"])
