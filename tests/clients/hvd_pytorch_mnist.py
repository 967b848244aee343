"""Horovod's ``examples/pytorch/pytorch_mnist.py`` as a client writes it, with the SENG change of
``integrations/horovod/pytorch_mnist.diff`` applied.

Shaped like the official example (its flags, ``hvd.init()``, one thread per rank, a
``DistributedSampler``, the lr scaled by ``hvd.size()``, ``hvd.broadcast_parameters`` and
``hvd.broadcast_optimizer_state`` on the bare optimizer, then ``hvd.DistributedOptimizer``,
``nll_loss`` on ``log_softmax``). Differences, for a test: Fashion-MNIST from Debian's package
instead of torchvision's MNIST download, ``--max-steps`` for a short run, ``--pattern
standalone`` (SENG alone, no wrapper) for comparison, and a JSON report per rank in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import horovod.torch as hvd
import torch
import torch.nn.functional as F
import torch.utils.data.distributed
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from examples.data import load_fashion_mnist  # noqa: E402
from seng_dist import SENG  # noqa: E402

parser = argparse.ArgumentParser(description="PyTorch MNIST Example (SENG)")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--momentum", type=float, default=0.5)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--log-interval", type=int, default=10)
parser.add_argument("--max-steps", type=int, default=300)
parser.add_argument("--pattern", choices=("wrapped", "standalone"), default="wrapped")
parser.add_argument("--out", required=True)


class Net(nn.Module):
    """The example's LeNet: two 5×5 convolutions and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(F.dropout(x, training=self.training)), dim=1)


def main(args: argparse.Namespace) -> None:
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y = load_fashion_mnist(train=True)
    train_dataset = torch.utils.data.TensorDataset(x, y)
    train_sampler: torch.utils.data.distributed.DistributedSampler = (
        torch.utils.data.distributed.DistributedSampler(
            train_dataset, num_replicas=hvd.size(), rank=hvd.rank()
        )
    )
    train_loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.batch_size, sampler=train_sampler
    )
    model = Net()
    optimizer = SENG(model, lr=args.lr * hvd.size(), momentum=args.momentum, comm="horovod")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if args.pattern == "wrapped":
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    losses: list[float] = []
    after_first_step = -1
    model.train()
    for epoch in range(1, args.epochs + 1):
        train_sampler.set_epoch(epoch)
        for batch_idx, (data, target) in enumerate(train_loader):
            optimizer.zero_grad()
            loss = F.nll_loss(model(data), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if after_first_step < 0 and optimizer.step_count == 1:  # the first step taken
                after_first_step = optimizer.curvature_updates
            if batch_idx % args.log_interval == 0 and hvd.rank() == 0:
                print(
                    f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_sampler)}]"
                    f"\tLoss: {loss.item():.6f}"
                )
            if len(losses) == args.max_steps:
                break
        if len(losses) == args.max_steps:
            break
    report = {
        "losses": losses,
        "curvature_updates": optimizer.curvature_updates,
        "after_first_step": after_first_step,
        "steps": optimizer.step_count,
    }
    with open(os.path.join(args.out, f"{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(parser.parse_args())
