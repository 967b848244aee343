"""DeepSpeedExamples' ``training/cifar/cifar10_deepspeed.py`` as a client writes it, with the
SENG change of ``integrations/deepspeed/cifar10_deepspeed.diff`` applied.

Shaped like the official example (its ``--dtype`` (default fp16: its ``fp16`` section; ``bf16``
its ``bf16`` section) and ``--stage`` flags, the in-code ds_config with ``WarmupLR``, gradient
clipping and the ZeRO section, the inputs cast by what the engine reports,
``deepspeed.init_distributed()``, ``initialize(args=..., model=..., model_parameters=...,
training_data=..., config=...)`` and its data loader, ``model_engine.backward``/``step``).
Differences, for a test: Fashion-MNIST padded to 32×32×3 from Debian's package instead of
torchvision's CIFAR-10 download, ``--max-steps`` for a short run, and a JSON report per rank in
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import seng_dist.deepspeed  # noqa: E402
from examples.data import load_fashion_mnist  # noqa: E402


def add_argument() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CIFAR (SENG)")
    parser.add_argument("-e", "--epochs", default=30, type=int)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--log-interval", type=int, default=2000)
    parser.add_argument("--dtype", default="fp16", type=str, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--stage", default=0, type=int, choices=[0, 1, 2, 3])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--out", required=True)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def get_ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """The example's in-code config with SENG in place of Adam (see the diff)."""
    return {
        "train_batch_size": 16,
        "steps_per_print": 2000,
        "optimizer": {
            "type": "SENG",
            "params": {
                "damping": 1.0,
                "momentum": 0.9,
                "weight_decay": 3e-7,
                "curvature_update_interval": 50,
            },
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.05, "warmup_num_steps": 1000},
        },
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {
            "enabled": args.dtype == "fp16",
            "fp16_master_weights_and_grads": False,
            "loss_scale": 0,
            "loss_scale_window": 500,
            "hysteresis": 2,
            "min_loss_scale": 1,
            "initial_scale_power": 15,
        },
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": args.stage,
            "allgather_partitions": True,
            "reduce_scatter": True,
            "allgather_bucket_size": 50000000,
            "reduce_bucket_size": 50000000,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "cpu_offload": False,
        },
    }


class Net(nn.Module):
    """The example's LeNet for 32×32×3 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def main(args: argparse.Namespace) -> None:
    deepspeed.init_distributed()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = load_fashion_mnist(train=True, cifar_style=True)
    trainset = torch.utils.data.TensorDataset(x, y)
    net = Net()
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    model_engine, optimizer, trainloader, __ = seng_dist.deepspeed.initialize(
        args=args,
        model=net,
        model_parameters=parameters,
        training_data=trainset,
        config=get_ds_config(args),
    )
    # For float32, target_dtype will be None so no datatype conversion needed.
    target_dtype = None
    if model_engine.bfloat16_enabled():
        target_dtype = torch.bfloat16
    elif model_engine.fp16_enabled():
        target_dtype = torch.half
    criterion = nn.CrossEntropyLoss()
    losses: list[float] = []
    after_first_step = -1
    for _epoch in range(args.epochs):
        for data in trainloader:
            inputs, labels = data[0], data[1]
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            loss = criterion(model_engine(inputs), labels)
            model_engine.backward(loss)
            model_engine.step()
            losses.append(loss.item())
            if after_first_step < 0 and optimizer.step_count == 1:  # the first step taken
                after_first_step = optimizer.curvature_updates
            if len(losses) == args.max_steps:
                break
        if len(losses) == args.max_steps:
            break
    report = {
        "losses": losses,
        "curvature_updates": optimizer.curvature_updates,
        "after_first_step": after_first_step,
        "lr": [g["lr"] for g in optimizer.param_groups],
        "dtype": str(next(model_engine.module.parameters()).dtype),
        "shard_state": str(optimizer.config.distributed.shard_state),
        "owned": sum(
            "momentum_buffer" in optimizer.state.get(p, {})
            for p in model_engine.module.parameters()
        ),
    }
    with open(os.path.join(args.out, f"{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(add_argument())
