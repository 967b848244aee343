"""SENG in a HuggingFace Accelerate loop: the small CNN on Fashion-MNIST.

    python integrations/accelerate/train.py                        # one process
    accelerate launch --multi_gpu --num_processes 2 integrations/accelerate/train.py
    torchrun --standalone --nproc_per_node 2 integrations/accelerate/train.py
    python integrations/accelerate/train.py --checkpoint ckpt      # save_state: ckpt/epoch-K
    python integrations/accelerate/train.py --resume ckpt/epoch-1  # load_state, go on

SENG is built on the bare model, then ``accelerator.prepare`` wraps model, optimizer, data and
scheduler; ``accelerator.accumulate`` and SENG count the same ``--accumulation`` micro-batches
per step. ``--batch-size`` is per process. Prints one line per epoch from the main process and
ends with the test accuracy. Why ``accelerate launch --cpu --num_processes 2`` starts one
process, and which commands start two: ``integrations/accelerate/README.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: seng_dist, examples
from examples.data import load_fashion_mnist  # noqa: E402
from examples.models import SmallCNN  # noqa: E402
from seng_dist import SENG, schedules  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="micro-batch, per process")
    ap.add_argument("--accumulation", type=int, default=2, help="micro-batches per step")
    ap.add_argument("--train-limit", type=int, default=4096, help="the first N train images")
    ap.add_argument("--test-limit", type=int, default=10_000, help="the first N test images")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--curvature-interval", type=int, default=50, help="T, in steps")
    ap.add_argument("--clip", type=float, default=None, help="accelerator.clip_grad_norm_ max")
    ap.add_argument("--checkpoint", default=None, help="save_state to DIR/epoch-K per epoch")
    ap.add_argument("--resume", default=None, help="accelerator.load_state from here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for flag in ("epochs", "batch_size", "accumulation", "train_limit", "test_limit"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def loaders(args: argparse.Namespace, processes: int) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders over the first ``--train-limit``/``--test-limit`` images, the
    train images cut to whole steps on ``processes`` processes."""
    x, y = load_fashion_mnist(train=True)
    xt, yt = load_fashion_mnist(train=False)
    # Whole steps only: Accelerate steps a short last window too, with each loss still divided
    # by N, while SENG scales that step's curvature by the passes it saw.
    per_step = args.batch_size * args.accumulation * processes
    n = args.train_limit // per_step * per_step
    if n == 0:
        sys.exit(f"--train-limit {args.train_limit} is less than one step ({per_step} images)")
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=args.batch_size, shuffle=True)
    test = TensorDataset(xt[: args.test_limit], yt[: args.test_limit])
    return train, DataLoader(test, batch_size=1000)


def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> float:
    """Test accuracy over every process's share of ``loader``."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            # gather_for_metrics drops the samples Accelerate repeated to even the shards out
            pred, y = accelerator.gather_for_metrics((model(x).argmax(1), y))
            correct += int((pred == y).sum())
            total += len(y)
    model.train()
    return correct / total


def main(argv: list[str] | None = None) -> float:
    """Train, print each epoch, save and resume as asked; return the test accuracy."""
    args = parse_args(argv)
    # cpu=True where torch sees no accelerator: otherwise Accelerate ignores the ranks that
    # torchrun (or accelerate launch --multi_gpu) started on a CPU-only machine, and every
    # process trains alone on all of the data (DistributedType.NO).
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.accumulation,
        # The shuffle as a function of the seed and the epoch (set_epoch below): by default
        # the sharded loader's generator is seeded once at prepare() and not checkpointed, so
        # a resumed run on several processes would repeat the first epoch's order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    train, test = loaders(args, accelerator.num_processes)
    model = SmallCNN()
    # Steps per epoch of a one-process run: Accelerate's prepared scheduler steps once per
    # process at every optimizer step, so this one schedule fits any number of processes.
    steps_per_epoch = len(train) // args.accumulation
    seng = SENG(
        model,
        lr=args.lr,
        damping=args.damping,
        momentum=0.9,
        weight_decay=5e-4,
        curvature_update_interval=args.curvature_interval,
        # The same N as the Accelerator's: SENG averages the gradients once, after the N-th
        # backward, and scales the curvature batch's gradients by N.
        gradient_accumulation_steps=args.accumulation,
        # prepare() wraps the model in DistributedDataParallel on several processes; saying
        # so here spares the first step's second averaging and SENG's warning about it.
        grads_averaged=accelerator.num_processes > 1,
    )
    # Every rank's curvature in the main process's checkpoint: a bit-exact resume on any rank.
    seng.state_dict_all_ranks = True
    cosine = schedules.cosine(args.lr, args.epochs, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(seng, lambda s: cosine(s) / args.lr)
    model, opt, train, test, scheduler = accelerator.prepare(model, seng, train, test, scheduler)
    first = 0
    if args.resume:
        accelerator.load_state(args.resume)
        # SENG's step count is in the checkpoint; every epoch has the same number of steps.
        first = seng.step_count // (len(train) // args.accumulation)
    start = time.perf_counter()
    for epoch in range(first, args.epochs):
        train.set_epoch(epoch)  # the epoch's shuffle, also after a resume
        for x, y in train:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))  # divides the loss by N
                if args.clip is not None and accelerator.sync_gradients:
                    # After the N-th backward .grad holds the gradient averaged over ranks.
                    accelerator.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()  # Accelerate steps SENG after the N-th micro-batch only
                scheduler.step()
                opt.zero_grad()
        if args.checkpoint:
            accelerator.save_state(str(Path(args.checkpoint, f"epoch-{epoch + 1}")))
        accelerator.print(
            f"epoch {epoch + 1}: {seng.step_count} steps, "
            f"{seng.curvature_updates} curvature updates, "
            f"{time.perf_counter() - start:.1f} s"
        )
    accuracy = evaluate(accelerator, model, test)
    accelerator.print(
        f"test accuracy: {accuracy:.4f} (seng, accelerate, {args.epochs} epoch(s), "
        f"{accelerator.num_processes} process(es))"
    )
    return accuracy


if __name__ == "__main__":
    main()
