"""Train a model on Fashion-MNIST with SENG (or SGD / Adam for comparison).

    python examples/train.py                                  # small CNN, 1 epoch, SENG
    python examples/train.py --optimizer sgd --lr 0.05 --epochs 3
    python examples/train.py --model resnet18 --batch-size 128 --train-limit 5000
    torchrun --nproc_per_node 2 examples/train.py --variant lagged   # 2 Gloo ranks on CPU
    horovodrun -np 2 -H localhost:2 --gloo python examples/train.py   # Horovod
    deepspeed --num_gpus 2 examples/train.py \
        --deepspeed_config integrations/deepspeed/ds_config_seng.json     # DeepSpeed

Distributed, every rank trains on its own shard of each global batch (``--batch-size`` per
rank), SENG averages the gradients itself (SGD and Adam use the engine's data parallelism:
DistributedDataParallel or hvd.DistributedOptimizer), and rank 0 prints one JSON line of
metrics per epoch and ends with the test accuracy. The engine comes from the launcher's
environment, or ``--engine``. With ``--deepspeed_config`` the optimizer, its settings, the
per-rank micro-batch and the accumulation come from the DeepSpeed JSON config
(``"optimizer": {"type": "SENG", ...}`` builds SENG through ``seng_dist.deepspeed``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import load_fashion_mnist  # noqa: E402
import engines  # noqa: E402
from models import MODELS  # noqa: E402

from seng_dist import SENG, schedules  # noqa: E402


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000
             ) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return correct / len(x)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn", choices=list(MODELS))
    ap.add_argument("--optimizer", default="seng", choices=["seng", "sgd", "adam"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: 0.05 (SENG, SGD), 1e-3 Adam")
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--curvature-interval", type=int, default=50)
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "exp", "constant"])
    ap.add_argument("--train-limit", type=int, default=None, help="use the first N images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", default="blockdiag", choices=["blockdiag", "lagged"],
                    help="distributed SENG variant (eq. 26 or eq. 27)")
    ap.add_argument("--comm-dtype", default=None, choices=["bfloat16", "float16"],
                    help="dtype of SENG's communication buffer (default: the gradients')")
    ap.add_argument("--engine", default="auto", choices=engines.ENGINES,
                    help="distributed engine (auto: from the launcher's environment)")
    ap.add_argument("--deepspeed_config", default=None,
                    help="DeepSpeed JSON config: train with the DeepSpeed engine")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = ap.parse_args(argv)

    engine = engines.start("deepspeed" if args.deepspeed_config else args.engine)
    rank, world = engine.rank, engine.world
    torch.manual_seed(args.seed)
    cifar = args.model != "cnn"
    x_train, y_train = load_fashion_mnist(True, cifar_style=cifar)
    x_test, y_test = load_fashion_mnist(False, cifar_style=cifar)
    if args.train_limit:
        x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
    model = MODELS[args.model](num_classes=10, in_channels=x_train.shape[1])
    ds_engine, accumulation = None, 1
    if args.deepspeed_config:
        from seng_dist.deepspeed import initialize
        ds_engine, opt, _, _ = initialize(args=args, model=model)
        accumulation = ds_engine.gradient_accumulation_steps()
        args.batch_size = ds_engine.train_micro_batch_size_per_gpu() * accumulation
        args.optimizer = type(opt).__name__.lower()
    steps_per_epoch = len(x_train) // (args.batch_size * world)
    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 0.05)
    if args.schedule == "cosine":
        lr_fn = schedules.cosine(lr, args.epochs, steps_per_epoch, final=lr * 0.01)
    elif args.schedule == "exp":
        lr_fn = schedules.exponential(lr, args.epochs + 1, steps_per_epoch)
    else:
        lr_fn = lambda _s: lr  # noqa: E731
    scheduler = None
    if ds_engine is not None:
        pass  # the optimizer and any scheduler come from the DeepSpeed config
    elif args.optimizer == "seng":
        opt = SENG(model, lr=lr_fn, damping=args.damping, momentum=0.9,
                   weight_decay=args.weight_decay,
                   curvature_update_interval=args.curvature_interval,
                   variant=args.variant, comm_dtype=args.comm_dtype, comm=engine.name)
    else:
        opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                               weight_decay=args.weight_decay)
               if args.optimizer == "sgd" else
               torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay))
        model, opt = engine.data_parallel(model, opt)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_fn(s) / lr)

    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    acc = 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for i in range(steps_per_epoch):
            first = (i * world + rank) * args.batch_size  # this rank's shard of the batch
            idx = order[first:first + args.batch_size]
            if ds_engine is not None:
                for micro in idx.chunk(accumulation):
                    loss = F.cross_entropy(ds_engine(x_train[micro]), y_train[micro])
                    ds_engine.backward(loss)
                    ds_engine.step()
                    total += loss.item() * len(micro)
            else:
                opt.zero_grad()
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                total += loss.item() * len(idx)
            seen += len(idx)
        sums = engine.sum_(torch.tensor([total, seen], dtype=torch.float64))
        acc = evaluate(model, x_test, y_test)  # the ranks hold the same parameters
        if rank == 0:
            print(json.dumps({"epoch": epoch + 1, "train_loss": round(float(sums[0] / sums[1]), 4),
                              "test_acc": round(acc, 4), "lr": opt.param_groups[0]["lr"],
                              "wall_s": round(time.perf_counter() - start, 1)}), flush=True)
    if rank == 0:
        print(f"test accuracy: {acc:.4f} ({args.optimizer}, {args.model}, {args.epochs} "
              f"epoch(s), {world} rank(s))")
    engine.finish()
    return acc


if __name__ == "__main__":
    main()
