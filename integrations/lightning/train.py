"""Train the small CNN on Fashion-MNIST with SENG under PyTorch Lightning.

    python integrations/lightning/train.py                               # one process
    python integrations/lightning/train.py --devices 2 --strategy ddp    # 2 CPU ranks
    python integrations/lightning/train.py --accumulate 2                # accumulation
    python integrations/lightning/train.py --epochs 2 --stop-after 1 --save run.ckpt
    python integrations/lightning/train.py --epochs 2 --ckpt-path run.ckpt   # resumes it

:class:`SENGModule` is the part to copy: ``configure_optimizers`` builds ``SENG`` on the
LightningModule itself, with Lightning's ``accumulate_grad_batches`` as SENG's
``gradient_accumulation_steps``, and returns it with a per-step scheduler. Under
``strategy="ddp"`` Lightning wraps the module in DistributedDataParallel before it calls
``configure_optimizers``; SENG finds that wrapper after its first step and leaves the gradient
averaging to DDP from then on (a ``SENGWarning`` says so).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

# The data loader and the model come from examples/, which is in the repository, not in the
# installed package: the repository root must be importable.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.data import load_fashion_mnist  # noqa: E402
from examples.models import SmallCNN  # noqa: E402
from seng_dist import SENG  # noqa: E402


class SENGModule(pl.LightningModule):
    """A classifier ``net`` trained on ``(x, y)`` batches with cross-entropy and SENG.

    ``lr_lambda(k)`` scales ``lr`` at SENG step ``k`` (a ``LambdaLR`` that Lightning steps after
    every SENG step); ``seng`` holds SENG's other settings and constructor arguments
    (``damping=``, ``curvature_update_interval=``, ``grads_averaged=``, ``comm=``, ...).
    """

    def __init__(
        self, net: nn.Module, lr: float, lr_lambda: Callable[[int], float], **seng: Any
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.lr_lambda = lr_lambda
        self.seng = seng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits."""
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        """The mean cross-entropy of the batch (Lightning divides it by the accumulation)."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        """SENG on this module, and a scheduler stepped after every SENG step."""
        opt = SENG(
            self,
            lr=self.lr,
            # Lightning divides each micro-batch loss by N; SENG must know N to average the
            # gradients once, after the N-th backward, and to scale its curvature.
            gradient_accumulation_steps=self.trainer.accumulate_grad_batches,
            **self.seng,
        )
        # Lightning calls state_dict() on every rank and rank 0 writes the file: with this,
        # that one file holds every rank's curvature, so a resume is bit-exact on every rank.
        opt.state_dict_all_ranks = True
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": LambdaLR(opt, self.lr_lambda), "interval": "step"},
        }


def cosine(steps: int) -> Callable[[int], float]:
    """The factor of a cosine decay from 1 to 0 over ``steps`` steps."""
    return lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / steps))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=1, help="epochs the lr schedule spans")
    ap.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many epochs (to resume)"
    )
    ap.add_argument("--batch-size", type=int, default=64, help="per rank and micro-batch")
    ap.add_argument("--train-limit", type=int, default=8192, help="use the first N images")
    ap.add_argument("--test-limit", type=int, default=10000, help="score the first N")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--curvature-interval", type=int, default=20, help="SENG's T")
    ap.add_argument("--variant", default="blockdiag", choices=["blockdiag", "lagged"])
    ap.add_argument("--devices", type=int, default=1, help="CPU processes")
    ap.add_argument("--strategy", default="auto", help="e.g. ddp (with --devices 2)")
    ap.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    ap.add_argument("--save", default=None, help="write a checkpoint here when done")
    ap.add_argument("--ckpt-path", default=None, help="resume from this checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for flag in (
        "epochs",
        "stop_after",
        "batch_size",
        "train_limit",
        "test_limit",
        "devices",
        "accumulate",
    ):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """The share of ``x`` that ``net`` classifies as ``y``."""
    net.eval()
    with torch.no_grad():
        batches = zip(x.split(batch), y.split(batch), strict=True)
        correct = sum(int((net(xb).argmax(1) == yb).sum()) for xb, yb in batches)
    return correct / len(x)


def main(argv: list[str] | None = None) -> float | None:
    """Train, save ``--save``, and return (and print, on rank 0) the test accuracy."""
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=args.stop_after or args.epochs,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    x, y = load_fashion_mnist(True)
    data = TensorDataset(x[: args.train_limit], y[: args.train_limit])
    # An order that depends only on the seed and the epoch (Lightning calls set_epoch): a
    # resumed run then sees the batches an uninterrupted one would, on one process as on many.
    sampler: DistributedSampler[int] = DistributedSampler(
        data, num_replicas=trainer.world_size, rank=trainer.global_rank, seed=args.seed
    )
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler)
    # Lightning steps after every N-th batch and after an epoch's last one.
    steps = math.ceil(len(loader) / args.accumulate) * args.epochs
    module = SENGModule(
        SmallCNN(),
        lr=args.lr,
        lr_lambda=cosine(steps),
        damping=args.damping,
        momentum=0.9,
        weight_decay=5e-4,
        curvature_update_interval=args.curvature_interval,
        variant=args.variant,
    )
    trainer.fit(module, loader, ckpt_path=args.ckpt_path)
    if args.save:
        trainer.save_checkpoint(args.save)  # every rank calls it; rank 0 writes
    if not trainer.is_global_zero:
        return None
    x, y = (t[: args.test_limit] for t in load_fashion_mnist(False))
    acc = accuracy(module.net, x, y)
    print(
        f"test accuracy: {acc:.4f} on {len(x)} images (seng, {trainer.world_size} rank(s), "
        f"{trainer.global_step} steps, {trainer.current_epoch} epoch(s))"
    )
    return acc


if __name__ == "__main__":
    main()
