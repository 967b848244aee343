"""The model's inputs, measured here or fitted to the paper: the collectives SENG and DDP send
(counted on real Gloo ranks) and the step plans made from them, backward's progress by layer
(FLOPs), SENG's compute ratio on this CPU, Gloo allreduce timings, and SGD's V100 compute from
the paper's ResNet50 timings.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from examples.lm import ByteLM
from examples.models import SmallCNN, resnet50
from seng_dist import SENG
from seng_dist.buckets import BucketPlan, first_positions
from seng_dist.comm import CountingCommunicator, round_of
from seng_dist.comm.torch_dist import TorchCommunicator

# The Gloo rank launcher lives with the tests, out of the seng_dist wheel; this tool runs from
# the repository root (python -m examples.scaling), where tests/ is importable.
from tests.launch import run_ranks

from .model import (
    PAPER,
    Cluster,
    Compute,
    Counted,
    Message,
    Setup,
    StepComm,
    amortised_step,
    steps_per_epoch,
)

# ----------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class ModelSpec:
    """A model to count and predict: how to build it, a tiny batch to count bytes with (bytes
    do not depend on batch or image size), one full-size sample to count FLOPs with, and the
    per-GPU batch and curvature interval of the predictions."""

    name: str
    build: Callable[[], nn.Module]
    count_batch: Callable[[int], tuple[Tensor, Tensor]]
    flop_sample: Callable[[], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    per_gpu_batch: int
    curvature_interval: int
    seng: dict[str, Any] = field(default_factory=dict)


def _images(shape: tuple[int, ...], classes: int, batch: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, *shape, generator=g),
        torch.randint(0, classes, (batch,), generator=g),
    )


def _tokens(batch: int, seed: int, context: int = 128) -> tuple[Tensor, Tensor]:
    w = torch.randint(0, 256, (batch, context + 1), generator=torch.Generator().manual_seed(seed))
    return w[:, :-1], w[:, 1:]


def _lm_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


SPECS = {
    # ResNet50 as in the paper's Table 3: per-GPU batch 128, SENG-800.
    "resnet50": ModelSpec(
        "resnet50",
        resnet50,
        lambda s: _images((3, 32, 32), 1000, 2, s),
        lambda: _images((3, 224, 224), 1000, 1, 0),
        F.cross_entropy,
        PAPER["per_gpu_batch"],
        PAPER["curvature_interval"],
    ),
    # examples/lm.py's defaults (width 128, 4 layers, context 128, T=50) and Adam's diagonal,
    # the damping README recommends for Transformers; lm.py's global batch 32 per GPU here.
    "bytelm": ModelSpec(
        "bytelm",
        ByteLM,
        lambda s: _tokens(2, s),
        lambda: _tokens(1, 0),
        _lm_loss,
        32,
        50,
        {"damping_diagonal": "adam", "damping_beta2": 0.95},
    ),
    # for the tests: small and fast
    "cnn": ModelSpec(
        "cnn",
        SmallCNN,
        lambda s: _images((1, 28, 28), 10, 2, s),
        lambda: _images((1, 28, 28), 10, 1, 0),
        F.cross_entropy,
        32,
        200,
    ),
}

# ----------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class Unit:
    """One payload of SENG's gradient-carrying round (a block, or a parameter outside the
    blocks): the registration index of its first parameter and its bytes in the buffer."""

    first: int
    nbytes: int


def seng_units(opt: SENG, model: nn.Module) -> list[Unit]:
    """The units of ``opt``'s round (a block's gradient, plus, lagged, its correction slot; a
    fallback gradient) with their bytes, in the order backward makes them ready
    (latest-registered first), as the round itself orders them."""
    first = first_positions(opt.round.units, list(model.parameters()))
    units = [Unit(f, n) for f, n in zip(first, opt.round.unit_bytes(), strict=True)]
    return sorted(units, key=lambda u: -u.first)


def _ddp_hook(
    calls: list[tuple[int, int]], index: dict[int, int], itemsize: int
) -> Callable[..., Any]:
    """A DDP communication hook that records each bucket's bytes and earliest parameter in
    ``calls``, then allreduces it as DDP's default hook does."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    # unannotated: DDP rejects annotations it cannot compare (postponed ones are strings)
    def hook(process_group, bucket):  # type: ignore[no-untyped-def]
        # bytes as DDP would send them in the buffer dtype (bf16: what bf16_compress_hook
        # sends); the bucket's earliest-registered parameter says when it is ready
        calls.append(
            (bucket.buffer().numel() * itemsize, min(index[id(p)] for p in bucket.parameters()))
        )
        return default_hooks.allreduce_hook(process_group, bucket)

    return hook


def _count_rank(
    rank: int, world: int, spec_name: str, setups: list[Setup], bucket_mb: float
) -> list[dict[str, Any]]:
    """On each rank: three steps per setup (0: curvature, 1: plain, 2: curvature with
    ``curvature_update_interval=2``); returns each step's collectives."""
    from torch.nn.parallel import DistributedDataParallel

    spec = SPECS[spec_name]
    torch.manual_seed(0)
    base = spec.build()  # copied per setup: building ResNet50 costs more than copying it
    out = []
    for s in setups:
        model = copy.deepcopy(base)
        index = {id(p): i for i, p in enumerate(model.parameters())}
        itemsize = 2 if s.comm_dtype else 4
        ddp_calls: list[tuple[int, int]] = []
        comm = None
        if s.method == "sgd":
            net: nn.Module = DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
            net.register_comm_hook(None, _ddp_hook(ddp_calls, index, itemsize))
            opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
        else:
            net = model
            comm = CountingCommunicator(TorchCommunicator())
            opt = SENG(
                model,
                lr=1e-3,
                comm=comm,
                variant=s.method,
                uc=s.uc,
                overlap=s.overlap,
                comm_dtype=s.comm_dtype,
                bucket_size_mb=bucket_mb,
                curvature_update_interval=2,
                **spec.seng,
            )
        steps = []
        for k in range(3):
            ddp_calls.clear()
            if comm is not None:
                comm.reset()
            x, y = spec.count_batch(1000 * rank + k)
            opt.zero_grad()
            spec.loss(net(x), y).backward()
            opt.step()
            steps.append(
                [{"name": "ddp", "bytes": b, "first": f} for b, f in ddp_calls]
                if comm is None
                else [{"name": c.name, "bytes": c.bytes} for c in comm.calls]
            )
        row: dict[str, Any] = {"setup": asdict(s), "steps": steps}
        if isinstance(opt, SENG):
            row["units"] = [asdict(u) for u in seng_units(opt, model)]
        out.append(row)
    return out


def count_collectives(
    spec_name: str,
    setups: list[Setup],
    world: int = 2,
    bucket_mb: float = 25.0,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Each setup's collectives per step on ``world`` real Gloo ranks (rank 0's record)."""
    return run_ranks(_count_rank, world, spec_name, setups, bucket_mb, timeout=timeout)[0]


def backward_progress(spec: ModelSpec) -> tuple[list[float], float]:
    """Per parameter (registration order): the share of backward done when its gradient is
    ready (backward runs from the last layer to the first; each layer's share is its FLOPs),
    and the model's FLOPs (forward + backward) for one sample."""
    model = spec.build()
    x, y = spec.flop_sample()
    with FlopCounterMode(display=False) as counter:
        spec.loss(model(x), y).backward()
    # keys are "<RootClass>.<path>"; the root's is "<RootClass>"
    counts = {
        k.split(".", 1)[1] if "." in k else "": sum(v.values())
        for k, v in counter.get_flop_counts().items()
        if k != "Global"
    }
    weights = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        children = sum(
            counts.get(f"{name}.{c}" if name else c, 0) for c, _ in module.named_children()
        )
        flops = max(0, counts.get(name, 0) - children)  # this module's own layer work
        weights += [flops] + [0] * (len(own) - 1)
    # named_modules() lists a module's own parameters in registration order, as parameters()
    assert len(weights) == sum(1 for _ in model.parameters())
    total = float(sum(weights)) or 1.0
    done, acc = [], 0.0
    for w in reversed(weights):
        acc += w
        done.append(acc / total)
    return done[::-1], float(sum(counter.get_flop_counts()["Global"].values()))


# ----------------------------------------------------------------------------- plans


def _bucket_of(name: str) -> str:
    """``"seng.step/b3/0"`` → ``"seng.step/b3"``: the bucket (dtype parts are one bucket)."""
    head, _, last = name.rpartition("/")
    return head if head and last.isdigit() else name


def _ready_by_bytes(buckets: list[int], units: list[Unit], progress: list[float]) -> list[float]:
    """Each bucket's ready share: buckets hold whole units in ready order, so bucket j ends at
    the unit where the units' cumulative bytes reach the buckets' cumulative bytes."""
    cum = np.cumsum([u.nbytes for u in units])
    ready, total = [], 0
    for j, b in enumerate(buckets):
        total += b
        k = min(int(np.searchsorted(cum, total - 0.5)), len(units) - 1)
        ready.append(1.0 if j == len(buckets) - 1 else progress[units[k].first])
    return ready


def derived_buckets(units: list[Unit], cap_bytes: int) -> list[int]:
    """Bucket bytes by seng_dist's rule (``BucketPlan.build`` over the units in ready order),
    without the flags the last bucket also carries."""
    plan = BucketPlan.build([u.nbytes for u in units], list(range(len(units))), cap_bytes)
    return [sum(units[u].nbytes for u in b) for b in plan.buckets]


def plans(row: dict[str, Any], progress: list[float], bucket_mb: float) -> Counted:
    """Step plans of a counted setup: which collectives may start during backward, when."""
    s = Setup(**row["setup"])
    plain_calls, curv_calls = row["steps"][1], row["steps"][2]
    stats = dict(
        bytes=sum(c["bytes"] for c in plain_calls),
        calls=len(plain_calls),
        rounds=len({round_of(c["name"]) for c in plain_calls}),
    )
    if s.method == "sgd":
        early = [
            Message(c["bytes"], progress[c["first"]] if s.overlap else 1.0) for c in plain_calls
        ]
        comm = StepComm(early)
        return Counted(s, comm, comm, buckets_from="-", derived_matches=None, **stats)
    units = [Unit(**u) for u in row["units"]]
    main = "seng.step" if s.method == "lagged" else "seng.grad"

    def plan(calls: list[dict[str, Any]], overlapped: bool) -> tuple[StepComm, str, bool | None]:
        sizes: dict[str, int] = {}
        late = []
        for c in calls:
            if round_of(c["name"]) == main:
                key = _bucket_of(c["name"])
                sizes[key] = sizes.get(key, 0) + c["bytes"]
            else:
                late.append(c["bytes"])
        buckets = list(sizes.values())
        derived = derived_buckets(units, int(bucket_mb * 2**20))
        flags = 32 * len(units) + 1024  # the flags (and their complements) ride in the last
        matches = len(buckets) == len(derived) and all(
            abs(a - b) < flags for a, b in zip(buckets, derived, strict=False)
        )
        source = "counted"
        if overlapped and len(buckets) == 1 and len(derived) > 1:
            # the counted run sent the round as one collective: split it by the rule
            derived[-1] += buckets[0] - sum(derived)  # the flags go in the last bucket
            buckets, source = derived, "derived"
        ready = _ready_by_bytes(buckets, units, progress) if overlapped else [1.0] * len(buckets)
        return (
            StepComm([Message(b, r) for b, r in zip(buckets, ready, strict=True)], late),
            source,
            matches,
        )

    plain, source, matches = plan(plain_calls, s.overlap)
    # lagged curvature steps start nothing before step(): the corrections need the new curvature
    curvature, _, _ = plan(curv_calls, s.overlap and s.method != "lagged")
    return Counted(
        s,
        plain,
        curvature,
        buckets_from=source if s.overlap else "-",
        derived_matches=matches if s.overlap else None,
        **stats,
    )


# ----------------------------------------------------------------------------- compute


def seng_ratio_cpu(spec: ModelSpec, steps: int = 5) -> dict[str, Any]:
    """SENG's step time over SGD's on this CPU, one process, amortised over the spec's
    curvature interval. Every SENG step alternates with a step of an SGD twin and is divided
    by it: this machine's speed drifts (other jobs share its 2 cores), a pair's ratio less."""
    torch.manual_seed(0)
    model = spec.build()
    twin = copy.deepcopy(model)
    interval = steps + 1
    opt = SENG(model, lr=1e-3, comm="local", curvature_update_interval=interval, **spec.seng)
    sgd = torch.optim.SGD(twin.parameters(), lr=1e-3, momentum=0.9)
    x, y = spec.count_batch(0)
    x = x.repeat(spec.per_gpu_batch // x.shape[0], *[1] * (x.dim() - 1))
    y = y.repeat(spec.per_gpu_batch // y.shape[0], *[1] * (y.dim() - 1))
    seng_t: list[float] = []
    sgd_t: list[float] = []
    for o, m, out in ((opt, model, seng_t), (sgd, twin, sgd_t)) * (2 * interval + 1):
        t0 = time.perf_counter()
        o.zero_grad()
        spec.loss(m(x), y).backward()
        o.step()
        out.append(time.perf_counter() - t0)
    pairs = [a / b for a, b in zip(seng_t, sgd_t, strict=True)]
    curv = statistics.median([pairs[interval], pairs[2 * interval]])  # step 0 warms up
    plain = statistics.median([r for i, r in enumerate(pairs) if i % interval])
    t = spec.curvature_interval
    return {
        "sgd_ms": 1e3 * statistics.median(sgd_t[1:]),
        "plain_ratio": plain,
        "curvature_ratio": curv,
        "ratio": ((t - 1) * plain + curv) / t,
        "interval": t,
        "batch": spec.per_gpu_batch,
    }


def calibrate_resnet50(counted: Counted, cluster: Cluster) -> Compute:
    """SGD's compute per step (s) on a V100 at per-GPU batch 128: Table 3's 4-GPU time per
    step, less the model's communication for ``counted`` at 4 GPUs, over SENG's compute ratio
    (Table 5: SENG-800 / SGD per epoch)."""
    p = PAPER
    ratio = p["table5_tpe"]["SENG-800"] / p["table5_tpe"]["SGD"]
    t4 = p["table3_tpe"][4] / steps_per_epoch(4)
    sgd = t4 / ratio
    for _ in range(50):  # exposure depends on the backward time: a fixed point
        c = Compute(sgd, ratio, curvature_interval=p["curvature_interval"])
        comm = (
            amortised_step(counted.plain, counted.curvature, c, lambda b: cluster.allreduce(b, 4))
            - sgd * ratio
        )
        sgd = (t4 - comm) / ratio
    return Compute(sgd, ratio, curvature_interval=p["curvature_interval"])


# ----------------------------------------------------------------------------- Gloo timings

SWEEP_SIZES = [4096 * 4**k for k in range(8)]  # 4 KiB … 64 MiB


def _sweep_rank(rank: int, world: int, sizes: list[int]) -> list[float]:
    """Seconds per float32 Gloo allreduce of each size (bytes) on this rank: back-to-back
    calls timed together (no barrier skew inside), the median of 5 trials."""
    import torch.distributed as dist

    out = []
    for n in sizes:
        buf = torch.ones(n // 4)
        dist.all_reduce(buf)  # warm-up: connections, allocation
        reps = 20 if n <= 2**18 else 5 if n <= 2**22 else 2
        trials = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                dist.all_reduce(buf)
            trials.append((time.perf_counter() - t0) / reps)
        out.append(statistics.median(trials))
    return out


def gloo_sweep(world: int, sizes: list[int]) -> list[float]:
    """Allreduce seconds per size on ``world`` Gloo ranks here (the slowest rank's median)."""
    per_rank = run_ranks(_sweep_rank, world, sizes, timeout=300)
    return [max(ts) for ts in zip(*per_rank, strict=True)]
