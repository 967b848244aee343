"""Sharded SENG state (``shard_state``; the DeepSpeed plugin's ZeRO stages 1-2): per-rank
memory, bytes and collectives per step, and step time, on ResNet-20 and the byte LM.

Started as a plain script it launches itself with torchrun once per world size in
``--worlds`` (Gloo ranks on CPU). On every rank, for each model and method in turn: the model
and its optimizer are built, ``--warmup`` steps run (step 0 rebuilds SENG's curvature), then one
more forward and backward, after which every tensor alive in the process is counted (storages
deduplicated) against the count before the model was built: the parameters, the ``.grad``
tensors, and everything else the optimizer holds (SENG: its state and its curvature, reported
apart, and the rest: its cached inverses and the lagged round's whitened previous gradients;
DeepSpeed: its float32 partitions, Adam's moments and its gradient partitions). Methods: SENG
unsharded, SENG ZeRO-1 (``shard_state="optimizer"``), SENG ZeRO-2 (``"gradients"``), DeepSpeed
ZeRO-1 and ZeRO-2 with its own (torch) AdamW, and AdamW under DDP.
SENG runs the README's recommended setting (Adam's diagonal) with ``variant="lagged"``, whose
state is the largest (its previous averaged gradient).

On 2 or more ranks the SENG methods and DDP are then timed: ``--reps`` interleaved repetitions
of ``--steps`` plain steps each (a step's time is the slowest rank's, from a barrier), with
SENG's collectives counted (CountingCommunicator) and DDP's buckets counted by a
communication hook.

    python examples/bench_shard.py --out examples/results/shard      # 1, 2 and 3 ranks
    python examples/bench_shard.py --worlds 2 --reps 2 --steps 2      # quicker
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_comm import counting_hook, on_ranks, rep_medians  # noqa: E402
from data import load_fashion_mnist  # noqa: E402
from lm import ByteLM, load_corpus  # noqa: E402
from models import resnet20  # noqa: E402

from seng_dist import SENG  # noqa: E402
from seng_dist.comm import CountingCommunicator  # noqa: E402
from seng_dist.comm.torch_dist import TorchCommunicator  # noqa: E402

#: SENG's settings in every SENG method (the recommended damping, the lagged variant)
SENG_SETTINGS: dict[str, Any] = dict(
    lr=1e-4, damping=1.0, damping_diagonal="adam", variant="lagged", curvature_update_interval=50
)
#: method -> SENG's shard_state, or DeepSpeed's ZeRO stage, or DDP
METHODS: dict[str, tuple[str, Any]] = {
    "SENG": ("seng", "none"),
    "SENG ZeRO-1": ("seng", "optimizer"),
    "SENG ZeRO-2": ("seng", "gradients"),
    "DeepSpeed ZeRO-1, AdamW": ("deepspeed", 1),
    "DeepSpeed ZeRO-2, AdamW": ("deepspeed", 2),
    "DDP, AdamW": ("ddp", None),
}
TIMED = ("SENG", "SENG ZeRO-1", "SENG ZeRO-2", "DDP, AdamW")


@dataclass
class Task:
    """A model and this rank's batches."""

    name: str
    make: Callable[[], nn.Module]
    batches: Callable[[int], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]


def resnet_task(batch: int, rank: int, world: int) -> Task:
    x, y = load_fashion_mnist(True, cifar_style=True)

    def batches(k: int) -> tuple[Tensor, Tensor]:
        lo = ((k * world + rank) * batch) % (len(x) - batch)
        return x[lo : lo + batch], y[lo : lo + batch]

    return Task("ResNet-20", lambda: resnet20(num_classes=10), batches, F.cross_entropy)


def lm_task(batch: int, rank: int, world: int, context: int = 128) -> Task:
    train, _, _ = load_corpus()
    gen = np.random.default_rng(rank)

    def batches(k: int) -> tuple[Tensor, Tensor]:
        starts = gen.integers(0, len(train) - context - 1, batch)
        w = torch.from_numpy(train[starts[:, None] + np.arange(context + 1)].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def loss(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    return Task("byte LM", lambda: ByteLM(context=context), batches, loss)


def alive() -> dict[int, int]:
    """Every tensor storage alive in the process: data pointer -> bytes."""
    gc.collect()
    out: dict[int, int] = {}
    for o in gc.get_objects():
        if torch.is_tensor(o) and o.device.type != "meta":
            storage = o.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def storages(tensors: list[Tensor]) -> int:
    return sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
    )


@dataclass
class Method:
    """One method's model, optimizer and step on this rank."""

    name: str
    model: nn.Module
    step: Callable[[Tensor, Tensor], None]
    backward: Callable[[Tensor, Tensor], None]
    opt: Any
    comm: CountingCommunicator | None = None
    ddp_bytes: list[int] = field(default_factory=list)
    times: list[list[float]] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    wire: list[float] = field(default_factory=list)


def build(name: str, task: Task, batch: int) -> Method:
    kind, what = METHODS[name]
    torch.manual_seed(0)
    model = task.make()
    if kind == "seng":
        comm = CountingCommunicator(TorchCommunicator())
        opt = SENG(model, comm=comm, shard_state=what, **SENG_SETTINGS)

        def backward(x: Tensor, y: Tensor) -> None:
            opt.zero_grad()
            task.loss(model(x), y).backward()

        def step(x: Tensor, y: Tensor) -> None:
            backward(x, y)
            opt.step()

        return Method(name, model, step, backward, opt, comm)
    if kind == "ddp":
        ddp = DistributedDataParallel(model)
        adamw = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        method = Method(name, model, lambda x, y: None, lambda x, y: None, adamw)
        ddp.register_comm_hook(None, counting_hook(method.ddp_bytes))

        def ddp_backward(x: Tensor, y: Tensor) -> None:
            adamw.zero_grad()
            task.loss(ddp(x), y).backward()

        def ddp_step(x: Tensor, y: Tensor) -> None:
            ddp_backward(x, y)
            adamw.step()

        method.backward, method.step = ddp_backward, ddp_step
        return method
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": batch,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": what},
    }
    engine, opt, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )

    def ds_backward(x: Tensor, y: Tensor) -> None:
        engine.backward(task.loss(engine(x), y))

    def ds_step(x: Tensor, y: Tensor) -> None:
        ds_backward(x, y)
        engine.step()

    return Method(name, model, ds_step, ds_backward, engine)


def memory(name: str, task: Task, batch: int, warmup: int) -> dict[str, Any]:
    """This rank's tensor bytes for ``name`` after a backward pass (see the module doc)."""
    before = alive()
    method = build(name, task, batch)
    for k in range(warmup):
        method.step(*task.batches(k))
    method.backward(*task.batches(warmup))
    now = alive()
    # .grad tensors made by autograd have no Python object until read: gc does not list them.
    known = [p.grad for p in method.model.parameters() if p.grad is not None]
    now.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in known})
    # The growth of the bytes alive (not the storages new since: the allocator reuses the
    # addresses of what was freed in between).
    added = sum(now.values()) - sum(before.values())
    params = storages(list(method.model.parameters()))
    grads = storages(known)
    buffers = storages(list(method.model.buffers()))
    row: dict[str, Any] = {
        "method": name,
        "params": params,
        "grads": grads,
        "optimizer": added - params - grads - buffers,
    }
    if isinstance(method.opt, SENG):
        keys = {k for c in method.opt.curvature.curvatures for k in c.KEYS}
        held = [(k, t) for st in method.opt.state.values() for k, t in st.items()]
        row["curvature"] = storages([t for k, t in held if torch.is_tensor(t) and k in keys])
        row["state"] = storages([t for k, t in held if torch.is_tensor(t) and k not in keys])
        method.opt.retire()
    del method
    gc.collect()
    return row


def timed(methods: list[Method], task: Task, args: argparse.Namespace) -> None:
    """Interleaved repetitions of plain steps; each step from a barrier."""
    for m in methods:
        for k in range(args.warmup):
            m.step(*task.batches(k))
    for _ in range(args.reps):
        for m in methods:
            rep = []
            for j in range(args.steps):
                xb, yb = task.batches(args.warmup + j)
                m.ddp_bytes.clear()
                if m.comm is not None:
                    m.comm.reset()
                dist.barrier()
                t0 = time.perf_counter()
                m.step(xb, yb)
                rep.append(time.perf_counter() - t0)
                world = dist.get_world_size()
                if m.comm is not None:
                    m.calls.append(m.comm.collectives)
                    m.sent.append(m.comm.bytes)
                    m.wire.append(sum(ring_bytes(c.kind, c.bytes, world) for c in m.comm.calls))
                else:
                    m.calls.append(len(m.ddp_bytes))
                    m.sent.append(sum(m.ddp_bytes))
                    m.wire.append(sum(ring_bytes("allreduce", b, world) for b in m.ddp_bytes))
            m.times.append(rep)


def ring_bytes(kind: str, counted: int, world: int) -> float:
    """Bytes a rank sends for a collective run as a ring, from the bytes it handed the engine
    (the whole buffer of an allreduce or a reduce-scatter; its own row of an all-gather)."""
    share = (world - 1) / world
    return {
        "allreduce": 2 * share * counted,
        "reduce_scatter": share * counted,
        "allgather": (world - 1) * counted,
    }.get(kind, counted)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def rank_main(args: argparse.Namespace) -> None:
    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    tasks = [resnet_task(args.batch_size, rank, world), lm_task(args.lm_batch_size, rank, world)]
    report: dict[str, Any] = {"world": world, "args": vars(args), "memory": {}, "timing": {}}
    for task in tasks:
        batch = args.batch_size if task.name == "ResNet-20" else args.lm_batch_size
        rows = [memory(name, task, batch, args.warmup) for name in METHODS]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        report["memory"][task.name] = gathered
        if world > 1:
            methods = [build(name, task, batch) for name in TIMED]
            timed(methods, task, args)
            medians = [rep_medians(m.times) for m in methods]
            base = medians[0]
            report["timing"][task.name] = [
                {
                    "method": m.name,
                    "ms": statistics.median(ms),
                    "ratio": statistics.median(a / b for a, b in zip(ms, base, strict=True)),
                    "ratio_low": min(a / b for a, b in zip(ms, base, strict=True)),
                    "ratio_high": max(a / b for a, b in zip(ms, base, strict=True)),
                    "collectives": statistics.median(m.calls),
                    "bytes": statistics.median(m.sent),
                    "wire": statistics.median(m.wire),
                }
                for m, ms in zip(methods, medians, strict=True)
            ]
            for m in methods:
                if isinstance(m.opt, SENG):
                    m.opt.retire()
    if rank == 0:
        text = tables(report)
        print("\n" + text, flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"shard_{world}ranks.md").write_text(text + "\n")
            (out / f"shard_{world}ranks.json").write_text(json.dumps(report, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def tables(report: dict[str, Any]) -> str:
    world = report["world"]
    args = report["args"]
    lines = [
        f"{world} Gloo rank(s) on {os.cpu_count()} cores, torch {torch.__version__}; "
        f"batch {args['batch_size']} (ResNet-20) and {args['lm_batch_size']} windows of 128 "
        "bytes (byte LM) per rank; SENG: damping_diagonal='adam', variant='lagged'.",
        "",
        "Per-rank tensor bytes after a backward pass (MiB; rank 0 / the largest rank):",
        "",
        "| model | method | parameters | .grad | optimizer-held | of which SENG's state "
        "(momentum, moments, lagged z, masters) | of which SENG's curvature |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, per_rank in report["memory"].items():
        for i, row in enumerate(per_rank[0]):
            rows = [r[i] for r in per_rank]

            def both(key: str, rows: list[dict[str, Any]] = rows) -> str:
                if key not in rows[0]:
                    return "—"
                values = [r[key] for r in rows]
                return f"{mib(values[0])} / {mib(max(values))}"

            lines.append(
                f"| {model} | {row['method']} | {both('params')} | {both('grads')} | "
                f"{both('optimizer')} | {both('state')} | {both('curvature')} |"
            )
    if report["timing"]:
        lines += [
            "",
            f"Plain steps on {world} ranks: {args['reps']} interleaved repetitions of "
            f"{args['steps']} steps; the slowest rank's time; ratio to unsharded SENG (median "
            "of the repetitions, low-high).",
            "",
            "| model | method | collectives/step | MiB handed to the engine/step | "
            "MiB sent/step per rank, as a ring | ms/step | × SENG (low-high) |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, rows in report["timing"].items():
            for r in rows:
                lines.append(
                    f"| {model} | {r['method']} | {r['collectives']:g} | {mib(r['bytes'])} | "
                    f"{mib(r['wire'])} | {r['ms']:.0f} | {r['ratio']:.3f} ({r['ratio_low']:.2f}-"
                    f"{r['ratio_high']:.2f}) |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2,3", help="world sizes to launch (plain start)")
    ap.add_argument("--batch-size", type=int, default=32, help="ResNet-20 images per rank")
    ap.add_argument("--lm-batch-size", type=int, default=8, help="LM windows per rank")
    ap.add_argument("--warmup", type=int, default=2, help="steps before measuring (incl. 0)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per repetition")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--out", default="", help="folder for the tables and JSON (optional)")
    args = ap.parse_args()
    on_ranks(lambda: rank_main(args), __file__, args.worlds)


if __name__ == "__main__":
    main()
