"""SENG in HuggingFace's ``Trainer`` (``integrations/transformers/``): a tiny GPT-2 built from
its config trains through ``optimizers=(SENG, scheduler)``, resumes from the Trainer's own
checkpoint bit-exactly, and runs on 2 ranks under the Trainer's DDP and under its DeepSpeed
set-up (through ``SENGTrainer``)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import displacement_error, requires_engine
from launch import run_ranks

from seng_dist import SENG

pytestmark = requires_engine("transformers", "ci/install_frameworks.sh")

INTEGRATION = Path(__file__).resolve().parents[1] / "integrations" / "transformers"
SEEN_ONCE = ("momentum_buffer", "damping_sq", "damping_steps")


def _integration() -> Any:
    """``integrations/transformers/train.py`` as a module (by path: ``train`` is also the name
    of the other integrations' and the examples' scripts)."""
    name = "seng_transformers_integration"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, INTEGRATION / "train.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def _trainer_args(out: Path, steps: int, batch: int, **extra: Any) -> Any:
    from transformers import TrainingArguments

    settings: dict[str, Any] = dict(
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(str(out), **{**settings, **extra})


def _without_curvature(opt: SENG) -> list[str]:
    """The blocks whose weight has no curvature state (only momentum and damping moments)."""
    return [b.name for b in opt.blocks if not set(opt.state[b.weight]) - set(SEEN_ONCE)]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_trainer_steps_seng_and_its_scheduler_on_every_block(tmp_path):
    from transformers import Trainer

    train = _integration()
    model = train.make_model("gpt2")
    opt = SENG(model, lr=0.05, curvature_update_interval=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    trainer = Trainer(
        model=model,
        args=_trainer_args(tmp_path, 7, 8),
        train_dataset=train.DocWindows("train", 56),
        optimizers=(opt, sched),
    )
    assert {b.name.rpartition(".")[2] for b in opt.blocks} >= {"c_attn", "c_fc", "ln_1", "score"}
    trainer.train()
    assert opt.step_count == 7 and opt.curvature_updates == 3
    assert _without_curvature(opt) == []
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 8)  # the scheduler's 7th step


def _resume_run(out: Path, resume: bool) -> dict[str, torch.Tensor]:
    """6 Trainer steps saving a checkpoint at step 3; with ``resume`` a fresh model and SENG
    load that checkpoint and run steps 4-6."""
    from transformers import Trainer

    train = _integration()
    model = train.make_model("gpt2", seed=1 if resume else 0)  # the checkpoint's must win
    opt = SENG(model, lr=0.05, curvature_update_interval=2, momentum=0.9)
    args = _trainer_args(out, 6, 4, save_strategy="steps", save_steps=3)
    trainer = Trainer(
        model=model, args=args, train_dataset=train.DocWindows("train", 24), optimizers=(opt, None)
    )
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-3") if resume else None)
    assert opt.step_count == 6
    return _params(model)


def test_a_run_resumed_from_the_trainers_checkpoint_is_bit_exact(tmp_path):
    whole = _resume_run(tmp_path, resume=False)
    resumed = _resume_run(tmp_path, resume=True)
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


#: large damping: SENG's step is then SGD's within ~‖UUᵀ‖/λ, whatever samples each rank's
#: curvature saw, so 2 ranks must match 1 process on the same global batch; a gradient summed
#: over the ranks instead of averaged (or left local) would be off by far more.
NEAR_SGD: dict[str, Any] = dict(
    lr=0.1 * 1e6, damping=1e6, curvature_update_interval=2, momentum=0.0
)
GLOBAL = 8  # the dataset is one global batch: every step sees all of it, in any order


def _trainer_job(rank: int, world: int, job: str, out: str) -> dict[str, Any]:
    """Two Trainer steps on ``GLOBAL`` windows: plain (DDP when ``world`` is 2) or through
    ``SENGTrainer`` with a stage-0 ds_config."""
    from transformers import Trainer

    train = _integration()
    model = train.make_model("gpt2")
    for m in model.modules():  # each process would draw its own dropout masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    data = train.DocWindows("train", GLOBAL)
    extra: dict[str, Any] = {}
    if job == "deepspeed":
        extra["deepspeed"] = str(INTEGRATION / "ds_config_zero0.json")
    # No clipping: the Trainer's default (1.0) would hide a gradient scaled by the ranks.
    args = _trainer_args(
        Path(out) / f"{job}-{rank}", 2, GLOBAL // world, max_grad_norm=0.0, **extra
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if job == "deepspeed":
            trainer: Trainer = train.SENGTrainer(
                model=model, args=args, train_dataset=data, seng_settings=NEAR_SGD
            )
        else:
            opt = SENG(model, **NEAR_SGD)
            trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
        trainer.train()
    # DeepSpeed's wrapper holds the SENG that SENGTrainer built
    seng = getattr(trainer.optimizer, "optimizer", None) if job == "deepspeed" else opt
    assert isinstance(seng, SENG)
    return {
        "params": _params(model),
        "steps": seng.step_count,
        "curvature": _without_curvature(seng),
        "warnings": [str(w.message) for w in seen if "SENG" in str(w.message)],
    }


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Any]:
    """The 2-step run on one process, the global batch whole."""
    return _trainer_job(0, 1, "plain", str(tmp_path_factory.mktemp("trainer")))


@pytest.mark.parametrize(
    "job",
    [
        "ddp",
        pytest.param("deepspeed", marks=requires_engine("deepspeed", "ci/install_deepspeed.sh")),
    ],
)
def test_two_ranks_average_once_and_agree(one_process, tmp_path, job):
    """Measured margin: the ranks are 3e-7 from one process here (λ = 1e6); the Trainer's
    own scaling of a sequence classifier's loss by the ranks (train.py's make_model turns it
    off) put them 1.03 away."""
    runs = run_ranks(_trainer_job, 2, job, str(tmp_path), timeout=240)
    start = _params(_integration().make_model("gpt2"))
    for res in runs:
        assert res["steps"] == 2 and res["curvature"] == []
        assert torch.equal(
            torch.cat([p.reshape(-1) for p in res["params"].values()]),
            torch.cat([p.reshape(-1) for p in runs[0]["params"].values()]),
        )
        assert displacement_error([res["params"]], [one_process["params"]], start) < 1e-3
    told = [w for w in runs[0]["warnings"] if "DistributedDataParallel wraps" in w]
    assert len(told) == (job == "ddp")  # DeepSpeed's SENG was told grads_averaged=True


def _resume_on_ranks(rank: int, world: int, out: str, callback: bool) -> dict[str, Any]:
    """4 Trainer steps on 2 ranks saving at step 2, then a fresh model and SENG resumed from
    that checkpoint; with ``callback`` the Trainer has ``SENGCheckpoints``."""
    from transformers import Trainer

    train = _integration()
    finals = []
    for resume in (False, True):
        model = train.make_model("gpt2", seed=1 if resume else 0)  # the checkpoint's must win
        for m in model.modules():  # each process would draw its own dropout masks
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        opt = SENG(model, lr=0.05, momentum=0.9, curvature_update_interval=3, grads_averaged=True)
        folder = Path(out) / f"resume-{callback}"
        args = _trainer_args(folder, 4, 4, save_strategy="steps", save_steps=2)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train.DocWindows("train", 32),
            optimizers=(opt, None),
            callbacks=[train.SENGCheckpoints()] if callback else [],
        )
        trainer.train(resume_from_checkpoint=str(folder / "checkpoint-2") if resume else None)
        finals.append(_params(model))
    return {"whole": finals[0], "resumed": finals[1]}


@pytest.mark.parametrize("callback", [True, False], ids=["SENGCheckpoints", "plain"])
def test_a_two_rank_resume_is_bit_exact_with_sengs_checkpoint_callback(tmp_path, callback):
    """The Trainer saves SENG's state on rank 0 only: without the callback rank 1 rebuilds its
    curvature and the resumed run differs; with it every rank resumes its own, bit for bit.
    (The plain case checks that the callback is what makes the difference: it fails if
    transformers ever saves the optimizer's state on every rank.)"""
    runs = run_ranks(_resume_on_ranks, 2, str(tmp_path), callback, timeout=240)
    for res in runs:
        same = all(torch.equal(res["whole"][n], res["resumed"][n]) for n in res["whole"])
        assert same == callback
