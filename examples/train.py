"""Train a model on Fashion-MNIST with SENG, or a baseline (SGD, Adam, ASDL's K-FAC and SENG).

    python examples/train.py                                  # small CNN, 1 epoch, SENG
    torchrun --nproc_per_node 2 examples/train.py --variant lagged   # 2 Gloo ranks on CPU
    horovodrun -np 2 -H localhost:2 --gloo python examples/train.py   # Horovod
    deepspeed --num_gpus 2 examples/train.py \\
        --deepspeed_config integrations/deepspeed/ds_config_seng.json     # DeepSpeed
    mpirun -np 2 python examples/train.py                    # mpi4py
    python examples/train.py --model resnet18 --epochs 10 --metrics r18.jsonl \\
        --checkpoint r18.pt --plot r18.png                    # then --resume r18.pt

The same script runs under every launcher; the engine comes from the launcher's environment,
or ``--engine``. Every rank trains on its own shard of each global batch (``--batch-size`` is
per rank; a ``DistributedSampler`` shards each epoch's permutation): SENG averages the gradients
itself, SGD and Adam use the engine's data parallelism (DistributedDataParallel or
hvd.DistributedOptimizer); ASDL's baselines run in one process. Rank 0 shows a progress bar,
prints one JSON line of metrics per epoch (also written to ``--metrics``, JSON lines or CSV),
saves ``--checkpoint`` after every epoch, and ends with the test accuracy. With
``--deepspeed_config`` the optimizer, its settings, the per-rank micro-batch and the
accumulation come from the DeepSpeed JSON config (``"optimizer": {"type": "SENG", ...}``
builds SENG through ``seng_dist.deepspeed``) and ``--checkpoint`` is the engine's checkpoint
directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engines  # noqa: E402
from data import augment, load_fashion_mnist  # noqa: E402
from models import MODELS, NATIVE_28  # noqa: E402
from plot import plot_runs, write_metrics  # noqa: E402

from seng_dist import SENG, SENGConfig, schedules  # noqa: E402
from seng_dist.config import UC_MODES, DampingDiagonal, Fisher, Variant  # noqa: E402

OPTIMIZERS = ("seng", "sgd", "adam", "kfac", "asdl-seng")
DEFAULT_LR = {"seng": 0.05, "sgd": 0.05, "adam": 1e-3, "kfac": 0.05, "asdl-seng": 0.05}
Step = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn", choices=list(MODELS))
    ap.add_argument("--optimizer", default="seng", choices=OPTIMIZERS)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="per rank")
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="initial learning rate (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
        + ")",
    )
    ap.add_argument(
        "--schedule",
        default="cosine",
        choices=["cosine", "exp", "constant"],
        help="learning-rate schedule over --epochs (the paper's cosine and exp)",
    )
    ap.add_argument("--decay-rate", type=float, default=6.0, help="exponent of the exp schedule")
    ap.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--damping", type=float, default=1.0, help="SENG / K-FAC damping λ0")
    ap.add_argument(
        "--damping-decay",
        type=float,
        default=1.0,
        help="ρ of the paper's damping schedule λ0·ρ^(epoch/10) (1: constant)",
    )
    ap.add_argument(
        "--fisher",
        default=str(SENGConfig().fisher),
        choices=[str(f) for f in Fisher],
        help="SENG's Fisher: the empirical one, or 'mc' (targets drawn from the predictions)",
    )
    ap.add_argument(
        "--damping-diagonal",
        default=str(SENGConfig().diagonal.damping_diagonal),
        choices=[str(d) for d in DampingDiagonal],
        help="SENG's damping λI ('identity') or λ·diag(√v̂ + ε) ('adam')",
    )
    ap.add_argument(
        "--curvature-interval",
        type=int,
        default=50,
        help="steps between curvature updates (SENG, K-FAC)",
    )
    ap.add_argument(
        "--curvature-batch-size",
        type=int,
        default=SENGConfig().curvature_batch_size,
        help="SENG's per-sample gradients per curvature update (0: the whole local batch)",
    )
    ap.add_argument(
        "--explicit-threshold",
        type=int,
        default=SENGConfig().sketch.explicit_threshold,
        help="SENG: layers with at most this many parameters keep U (explicit path)",
    )
    ap.add_argument(
        "--skip-layers",
        default="",
        help="SENG: comma-separated layers left to the fallback rule, by module "
        "name or torch.nn class name (e.g. BatchNorm2d)",
    )
    ap.add_argument(
        "--uc",
        default=SENGConfig().sketch.uc,
        choices=UC_MODES,
        help="SENG's U·b on the implicit path: eq. 23's product of the weighted "
        "factor means (factored, eq. 28's communication) or the exact sum",
    )
    ap.add_argument(
        "--variant",
        default="blockdiag",
        choices=[v.value for v in Variant],
        help="distributed SENG variant (eq. 26 or eq. 27)",
    )
    ap.add_argument(
        "--comm-dtype",
        default=None,
        choices=["bfloat16", "float16"],
        help="dtype of SENG's communication buffer (default: the gradients')",
    )
    ap.add_argument(
        "--no-overlap",
        action="store_true",
        help="send SENG's round in step() instead of bucket by bucket during backward",
    )
    ap.add_argument(
        "--augment",
        default="auto",
        choices=["auto", "on", "off"],
        help="random crop and flip (auto: on for the 32×32 CIFAR-style models)",
    )
    ap.add_argument("--train-limit", type=int, default=None, help="use the first N images")
    ap.add_argument(
        "--test-limit", type=int, default=None, help="evaluate on the first N test images"
    )
    ap.add_argument(
        "--evals-per-epoch",
        type=int,
        default=1,
        help="evaluate on the test set this many times per epoch, at evenly spaced "
        "steps (metrics rows get fractional epochs; times exclude evaluation)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics", default=None, help="per-epoch metrics file (.csv or .jsonl)")
    ap.add_argument("--checkpoint", default=None, help="save here after every epoch")
    ap.add_argument("--resume", default=None, help="continue from this checkpoint")
    ap.add_argument("--plot", default=None, help="PNG of test accuracy vs epochs and time")
    ap.add_argument("--label", default=None, help="name of the run in metrics and plots")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--engine",
        default="auto",
        choices=engines.ENGINES,
        help="distributed engine (auto: from the launcher's environment)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a collective waits for a hung rank before failing",
    )
    ap.add_argument(
        "--deepspeed_config",
        default=None,
        help="DeepSpeed JSON config: train with the DeepSpeed engine",
    )
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch_size", "curvature_interval", "evals_per_epoch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not args.timeout > 0:
        ap.error("--timeout must be a positive number of seconds")
    return args


def lr_schedule(args: argparse.Namespace, steps_per_epoch: int) -> Callable[[int], float]:
    lr = args.lr
    if args.schedule == "cosine":
        fn = schedules.cosine(lr, args.epochs, steps_per_epoch, final=lr * 0.01)
    elif args.schedule == "exp":
        # max_epoch one past the budget so the last epoch still moves.
        fn = schedules.exponential(lr, args.epochs + 1, steps_per_epoch, args.decay_rate)
    else:
        fn = lambda _s: lr  # noqa: E731
    warmup = round(args.warmup_epochs * steps_per_epoch)
    return schedules.linear_warmup(fn, warmup, lr * 0.1) if warmup else fn


def skip_layers(flag: str) -> tuple[str | type, ...]:
    """``--skip-layers``: a torch.nn class for each entry that names one, else a module name."""
    names = [s.strip() for s in flag.split(",") if s.strip()]
    return tuple(cls if isinstance(cls := getattr(torch.nn, s, None), type) else s for s in names)


def build_optimizer(
    args, model, engine, lr_fn, damping_fn, batch: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Step]:
    """The model as trained (maybe wrapped), the optimizer, and one training step
    ``step(x, y, global_step) -> (loss, logits)``."""
    if args.optimizer == "seng":
        opt = SENG(
            model,
            lr=lr_fn,
            damping=damping_fn,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            curvature_update_interval=args.curvature_interval,
            curvature_batch_size=args.curvature_batch_size or None,
            explicit_threshold=args.explicit_threshold,
            uc=args.uc,
            skip_layers=skip_layers(args.skip_layers),
            variant=args.variant,
            comm_dtype=args.comm_dtype,
            comm=engine.name,
            overlap=not args.no_overlap,
            skip_nonfinite=True,
            fisher=args.fisher,
            damping_diagonal=args.damping_diagonal,
        )
        # A checkpoint written by rank 0 then holds every rank's curvature (eq. 26 keeps one
        # per worker), so all ranks resume exactly.
        opt.state_dict_all_ranks = True
    elif args.optimizer in ("sgd", "kfac", "asdl-seng"):
        opt = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    if args.optimizer in ("kfac", "asdl-seng"):
        if engine.world > 1:
            raise SystemExit(
                f"--optimizer {args.optimizer}: ASDL's baselines run in one "
                "process; start train.py with plain python"
            )
        from asdl import KfacGradientMaker, PreconditioningConfig, SengGradientMaker
        from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

        config = PreconditioningConfig(
            # ASDL refuses attention's out_proj (a Linear subclass it does not know): it stays
            # first-order there, as attention's bare in_proj parameters do anyway.
            ignore_modules=[NonDynamicallyQuantizableLinear],
            data_size=batch,
            damping=args.damping,
            preconditioner_upd_interval=args.curvature_interval,
            curvature_upd_interval=args.curvature_interval,
        )
        maker = (KfacGradientMaker if args.optimizer == "kfac" else SengGradientMaker)(
            model, config
        )

        def step(x, y, t):
            for g in opt.param_groups:
                g["lr"] = lr_fn(t)
            maker.config.damping = damping_fn(t)  # read at each preconditioning
            opt.zero_grad()
            maker.setup_loss_call(F.cross_entropy, maker.setup_model_call(model, x), y)
            logits, loss = maker.forward_and_backward()
            opt.step()
            return loss, logits

        return model, opt, step

    if args.optimizer in ("sgd", "adam"):
        model, opt = engine.data_parallel(model, opt)

    def step(x, y, t):
        if args.optimizer != "seng":
            for g in opt.param_groups:
                g["lr"] = lr_fn(t)
        opt.zero_grad()
        logits = model(x)
        if args.optimizer == "seng" and args.fisher == "mc":
            opt.sample_fisher(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss, logits

    return model, opt, step


def _setting(
    opt: torch.optim.Optimizer, key: str, schedule: Callable[[int], float], step: int
) -> float:
    """The value of ``key`` at ``step``: the optimizer's own (a number or SENG's callable of
    the step, e.g. set by a DeepSpeed scheduler), else the script's schedule."""
    value = opt.param_groups[0].get(key)
    if callable(value):
        return float(value(step))
    return float(schedule(step) if value is None else value)


def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    engine: engines.Engine,
    batch: int = 1000,
) -> tuple[float, float]:
    """Test loss and accuracy, each rank scoring its share of the test set."""
    model.eval()
    loss = correct = 0.0
    mine = torch.arange(engine.rank, len(x), engine.world)
    with torch.no_grad():
        for idx in mine.split(batch):
            out = model(x[idx]).float()
            loss += F.cross_entropy(out, y[idx], reduction="sum").item()
            correct += (out.argmax(1) == y[idx]).sum().item()
    model.train()
    sums = engine.sum_(torch.tensor([loss, correct], dtype=torch.float64))
    return float(sums[0]) / len(x), float(sums[1]) / len(x)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    engine = engines.start("deepspeed" if args.deepspeed_config else args.engine, args.timeout)
    rank, world = engine.rank, engine.world
    torch.manual_seed(args.seed)
    cifar = args.model not in NATIVE_28
    x_train, y_train = load_fashion_mnist(True, cifar_style=cifar)
    x_test, y_test = load_fashion_mnist(False, cifar_style=cifar)
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    if args.test_limit:
        x_test, y_test = x_test[: args.test_limit], y_test[: args.test_limit]
    use_augment = args.augment == "on" or (args.augment == "auto" and cifar)
    model = MODELS[args.model](num_classes=10, in_channels=x_train.shape[1])
    net = model  # the bare module: what checkpoints hold
    ds_engine, accumulation = None, 1
    if args.deepspeed_config:
        from seng_dist.deepspeed import initialize

        ds_engine, opt, _, _ = initialize(args=args, model=model)
        accumulation = ds_engine.gradient_accumulation_steps()
        args.batch_size = ds_engine.train_micro_batch_size_per_gpu() * accumulation
        args.optimizer = type(opt).__name__.lower()
        # a bf16/fp16 section casts the model: its inputs follow, as DeepSpeed's examples do
        x_train, x_test = (t.to(next(model.parameters()).dtype) for t in (x_train, x_test))
    sampler = DistributedSampler(
        range(len(x_train)),
        num_replicas=world,
        rank=rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    batches = BatchSampler(sampler, args.batch_size, drop_last=True)
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise SystemExit(
            f"--batch-size {args.batch_size} on {world} rank(s) needs at least "
            f"{args.batch_size * world} training images, got {len(x_train)}"
        )
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    lr_fn = lr_schedule(args, steps_per_epoch)
    damping_fn = (
        schedules.damping_decay(args.damping, args.damping_decay, steps_per_epoch)
        if args.damping_decay != 1.0
        else (lambda _s: args.damping)
    )
    if ds_engine is None:
        model, opt, train_step = build_optimizer(
            args, model, engine, lr_fn, damping_fn, args.batch_size
        )
    label = args.label or (
        f"{args.optimizer}"
        + (f"-{args.variant}" if args.optimizer == "seng" else "")
        + f" ({world} rank(s))"
    )

    history: list[dict] = []
    start_epoch, train_time = 0, 0.0
    if args.resume:
        if ds_engine is not None:
            _, client = ds_engine.load_checkpoint(args.resume)
            if client is None:
                raise SystemExit(f"--resume {args.resume}: no DeepSpeed checkpoint there")
        else:
            client = torch.load(args.resume, map_location="cpu", weights_only=False)
            net.load_state_dict(client["model"])
            opt.load_state_dict(client["optimizer"])
        start_epoch, history, train_time = client["epoch"], client["history"], client["time"]

    from tqdm import tqdm

    aug_gen = torch.Generator()
    wall0 = time.perf_counter()
    test_acc = history[-1]["test_acc"] if history else 0.0
    evals = {
        round(j * steps_per_epoch / args.evals_per_epoch)
        for j in range(1, args.evals_per_epoch + 1)
    }

    def record(epoch: int, i: int, sums: torch.Tensor, epoch_time: float) -> None:
        """Evaluate after step ``i`` of ``epoch`` and add a metrics row (rank 0 prints it)."""
        nonlocal test_acc
        t_eval = time.perf_counter()
        engine.average_buffers(net)
        test_loss, test_acc = evaluate(net, x_test, y_test, engine)
        step = epoch * steps_per_epoch + i + 1
        row = {
            "run": label,
            "epoch": round(epoch + (i + 1) / steps_per_epoch, 4),
            "step": step,
            "train_loss": round(float(sums[0] / sums[2]), 5),
            "train_acc": round(float(sums[1] / sums[2]), 5),
            "test_loss": round(test_loss, 5),
            "test_acc": round(test_acc, 5),
            "lr": _setting(opt, "lr", lr_fn, step - 1),
            "damping": _setting(opt, "damping", damping_fn, step - 1),
            "epoch_time_s": round(epoch_time, 2),
            "train_time_s": round(train_time, 2),
            "wall_s": round(time.perf_counter() - wall0, 2),
            "world": world,
        }
        if row["epoch"] == int(row["epoch"]):
            row["epoch"] = int(row["epoch"])
        history.append(row)
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "run"}), flush=True)
            if args.metrics:
                write_metrics(args.metrics, history)
        evaluated[0] += time.perf_counter() - t_eval

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        aug_gen.manual_seed(args.seed * 1_000_003 + epoch * 1009 + rank)
        # loss·n, correct, n, batches with a non-finite loss, non-finite state: on this rank
        sums = torch.zeros(5, dtype=torch.float64)
        # Training time excludes evaluation: each segment between evaluations is timed alone.
        t0, evaluated, epoch_train0 = time.perf_counter(), [0.0], train_time
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            leave=False,
            disable=rank != 0 or args.no_progress,
            mininterval=1.0,
        )
        for i, idx in enumerate(bar):
            x, y = x_train[idx], y_train[idx]
            if use_augment:
                x = augment(x, aug_gen)
            if ds_engine is not None:
                for micro in torch.arange(len(idx)).chunk(accumulation):
                    logits = ds_engine(x[micro]).float()
                    loss = F.cross_entropy(logits, y[micro])
                    ds_engine.backward(loss)
                    ds_engine.step()
                    value = loss.item()
                    sums[:2] += torch.tensor(
                        [value * len(micro), (logits.argmax(1) == y[micro]).sum().item()],
                        dtype=torch.float64,
                    )
            else:
                loss, logits = train_step(x, y, epoch * steps_per_epoch + i)
                value = loss.item()
                sums[:2] += torch.tensor(
                    [value * len(idx), (logits.argmax(1) == y).sum().item()], dtype=torch.float64
                )
            sums[2] += len(idx)
            sums[3] += not math.isfinite(value)  # of the last micro-batch with DeepSpeed
            if i % 20 == 0:
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            if i + 1 in evals and i + 1 < steps_per_epoch:
                now = time.perf_counter()
                train_time += now - t0 - evaluated[0]
                t0, evaluated[0] = now, 0.0
                record(epoch, i, engine.sum_(sums.clone()), train_time - epoch_train0)
        bar.close()
        train_time += time.perf_counter() - t0 - evaluated[0]
        epoch_time = train_time - epoch_train0
        state = list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]
        sums[4] = not all(bool(torch.isfinite(t).all()) for t in state)
        engine.sum_(sums)  # every rank then takes the same decision below
        if sums[4] or sums[3] == world * steps_per_epoch:
            # Later gradients would all be NaN too (SENG would skip every step): stop now.
            raise SystemExit(
                f"training diverged in epoch {epoch + 1}: "
                + (
                    "the parameters or BatchNorm statistics are not finite"
                    if sums[4]
                    else "every batch had a non-finite loss"
                )
                + "; lower --lr or raise --damping"
            )
        record(epoch, steps_per_epoch - 1, sums, epoch_time)
        client = {"epoch": epoch + 1, "history": history, "time": train_time, "args": vars(args)}
        if args.checkpoint and ds_engine is not None:
            ds_engine.save_checkpoint(args.checkpoint, client_state=client)
        elif args.checkpoint:
            # Every rank builds the optimizer state: it is a collective with all-rank curvature.
            client.update(model=net.state_dict(), optimizer=opt.state_dict())
            if rank == 0:
                tmp = Path(args.checkpoint + ".tmp")
                torch.save(client, tmp)
                tmp.replace(args.checkpoint)  # a crash mid-save keeps the last checkpoint
    if rank == 0 and args.plot:
        plot_runs({label: history}, args.plot)
    if rank == 0:
        print(
            f"test accuracy: {test_acc:.4f} ({args.optimizer}, {args.model}, {args.epochs} "
            f"epoch(s), {world} rank(s))"
        )
    engine.finish()
    return test_acc


if __name__ == "__main__":
    main()
