"""Scaling model: predicted step time and scaling efficiency of DDP SGD and distributed SENG.

Per-step time = compute + exposed communication. Communication is an alpha-beta model of
allreduce (ring or tree; hierarchical: NVLink inside a node, InfiniBand across nodes) applied
to the collectives that ``CountingCommunicator`` (SENG) and a DDP communication hook (SGD)
count on the real model on 2 Gloo ranks here: bytes, calls and rounds are measured, not typed
in. Overlap: a bucket can start when the backward of its layers is done (backward progress from
the FLOPs ``torch.utils.flop_counter`` counts per layer), one bucket after another on the link;
what runs past the end of backward is exposed. Compute: ResNet50 from the paper's V100 timings
(Table 3, Table 5); ByteLM from its FLOPs at the V100 rate those timings imply, and SENG's
overhead measured on this CPU. Validation: (a) α, β fitted to this machine's Gloo loopback at 2
ranks predict 3 ranks (and back); (b) the paper's Table 3 (4 → 8/16/32 V100s). Formulas,
figures and assumptions: ``docs/scaling.md``.

    python examples/scaling_model.py --out examples/results/scaling       # 1.5-5 min, 2 cores
    python examples/scaling_model.py --out /tmp/scaling --skip-sweep --models resnet50
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm import ByteLM  # noqa: E402
from models import SmallCNN, resnet50  # noqa: E402

from seng_dist import SENG  # noqa: E402
from seng_dist.buckets import BucketPlan, first_positions  # noqa: E402
from seng_dist.comm import CountingCommunicator, round_of  # noqa: E402
from seng_dist.comm.torch_dist import TorchCommunicator  # noqa: E402
from seng_dist.testing import run_ranks  # noqa: E402

# ----------------------------------------------------------------------------- public figures


@dataclass(frozen=True)
class Link:
    """One kind of link: bandwidth per direction (bytes/s, per GPU or per NIC port) and the
    latency of one ring step (s)."""

    name: str
    bandwidth: float
    latency: float
    source: str


@dataclass(frozen=True)
class Cluster:
    """Nodes of ``gpus_per_node`` GPUs on ``intra`` links, joined by ``nics_per_node`` ports of
    ``inter``; ``base_latency`` is paid once per collective."""

    name: str
    gpus_per_node: int
    nics_per_node: int
    intra: Link
    inter: Link
    base_latency: float
    source: str

    def allreduce(self, nbytes: float, p: int) -> float:
        """Seconds for one allreduce of ``nbytes`` per rank over ``p`` GPUs (hierarchical)."""
        if p <= 1:
            return 0.0
        return self.base_latency + hierarchical_allreduce(nbytes, p, self)

    def scaled(self, bandwidth: float = 1.0, latency: float = 1.0) -> Cluster:
        """This cluster with every link's bandwidth and latency multiplied (sensitivity)."""
        def s(link: Link) -> Link:
            return replace(link, bandwidth=link.bandwidth * bandwidth,
                           latency=link.latency * latency)
        return replace(self, intra=s(self.intra), inter=s(self.inter),
                       base_latency=self.base_latency * latency)


# Public figures, not measured here (no GPU, no network on this machine). Latencies are the
# per-step figures of NCCL's own cost model for the "Simple" protocol that large allreduces use.
_NCCL_TUNING = "NCCL src/graph/tuning.cc (NVIDIA/nccl, hwLat/baseLat tables, Simple protocol)"
LINKS = {
    "nvlink2": Link("NVLink 2.0 (V100 SXM2)", 150e9, 3.4e-6,
                    "NVIDIA Tesla V100 datasheet: NVLink 300 GB/s per GPU (6 links, 25 GB/s "
                    "each way) = 150 GB/s per direction; ring-step latency 3.4 µs: "
                    + _NCCL_TUNING),
    "edr": Link("EDR InfiniBand", 12.5e9, 9.6e-6,
                "Mellanox EDR InfiniBand (ConnectX-5): 100 Gb/s = 12.5 GB/s per port and "
                "direction; ring-step latency over the network 9.6 µs: " + _NCCL_TUNING),
}
NCCL_BASE_LATENCY = 8.4e-6  # per collective, ring/Simple baseLat of the same table
CLUSTERS = {
    "dgx1": Cluster("DGX-1 (8× V100, 4× EDR)", 8, 4, LINKS["nvlink2"], LINKS["edr"],
                    NCCL_BASE_LATENCY,
                    "NVIDIA DGX-1 with V100 datasheet: 8 V100 SXM2 on NVLink (hybrid cube-mesh), "
                    "4× 100 Gb/s EDR InfiniBand"),
    "dgx2": Cluster("DGX-2 (16× V100, 8× EDR)", 16, 8, LINKS["nvlink2"], LINKS["edr"],
                    NCCL_BASE_LATENCY,
                    "NVIDIA DGX-2 datasheet: 16 V100 SXM3 on NVSwitch (each GPU 6 NVLinks, "
                    "2.4 TB/s bisection), 8× 100 Gb/s EDR InfiniBand / 100 GbE"),
}

# The paper (Yang et al., 2021, Tables 3 and 5), ResNet50 on ImageNet-1k.
PAPER = {
    "imagenet_train_images": 1_281_167,
    "per_gpu_batch": 128,
    # Table 3: time per epoch (s) by GPUs; 4, 8, 16 on one node, 32 across 2 nodes.
    "table3_tpe": {4: 542.22, 8: 296.12, 16: 151.07, 32: 72.66},
    "table3_se": {4: 1.0, 8: 0.92, 16: 0.90, 32: 0.93},
    # Table 5: time per epoch (s), batch 256; SENG-800 rebuilds its curvature every 800 steps.
    "table5_tpe": {"SENG-800": 663.17, "SGD": 575.09},
    "curvature_interval": 800,
}

#: Weak scaling over these GPU counts (per-GPU batch fixed).
GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)
#: Backward's share of a step's compute: a layer's backward computes two products (input and
#: weight gradients) for its forward's one.
BACKWARD_FRACTION = 2 / 3

# ----------------------------------------------------------------------------- alpha-beta


def ring_allreduce(nbytes: float, p: int, alpha: float, beta: float) -> float:
    """Ring allreduce (reduce-scatter + allgather): ``2(p-1)α + 2(p-1)/p · n·β``."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes * beta


def tree_allreduce(nbytes: float, p: int, alpha: float, beta: float) -> float:
    """Pipelined (double binary) tree allreduce: ``2⌈log2 p⌉α + 2n·β`` (reduce up, broadcast
    down; NCCL's algorithm bandwidth for trees is half the bus bandwidth)."""
    if p <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * alpha + 2 * nbytes * beta


def hierarchical_allreduce(nbytes: float, p: int, cluster: Cluster) -> float:
    """Reduce-scatter inside each node (NVLink ring), allreduce of each GPU's ``n/g`` share
    across the nodes (ring or tree, the faster; the node's ``g`` GPUs share its NICs), allgather
    inside the node. Without the per-collective base latency."""
    g = min(p, cluster.gpus_per_node)
    nodes = math.ceil(p / g)
    # reduce-scatter + allgather over g GPUs is a ring allreduce's two halves
    t = ring_allreduce(nbytes, g, cluster.intra.latency, 1 / cluster.intra.bandwidth)
    if nodes > 1:
        # each of g lanes moves n/g bytes at (nics·B)/g: the node moves n at nics·B
        beta = 1 / (cluster.nics_per_node * cluster.inter.bandwidth)
        t += min(ring_allreduce(nbytes, nodes, cluster.inter.latency, beta),
                 tree_allreduce(nbytes, nodes, cluster.inter.latency, beta))
    return t


def fit_alpha_beta(sizes: Sequence[float], seconds: Sequence[float], p: int
                   ) -> tuple[float, float]:
    """α, β of the ring model from allreduce timings at ``p`` ranks, least squares in relative
    error (so small and large messages count alike)."""
    n = np.asarray(sizes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    a = np.stack([np.full_like(n, 2 * (p - 1)), 2 * (p - 1) / p * n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)


# ----------------------------------------------------------------------------- overlap


@dataclass(frozen=True)
class Message:
    """One collective: its bytes per rank, and the share of backward done when it can start
    (1.0: at the end of backward or later, in ``step()``)."""

    nbytes: int
    ready: float = 1.0


@dataclass
class StepComm:
    """A step's collectives: ``early`` in launch order (they may start during backward),
    ``late`` after SENG's solve (block-diagonal's corrections: always exposed)."""

    early: list[Message] = field(default_factory=list)
    late: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Compute:
    """Compute per step of one GPU: SGD's seconds, SENG's ratio to it (1 for SGD, amortised
    over curvature steps), backward's share of SGD's compute, the curvature interval."""

    sgd_s: float
    ratio: float = 1.0
    backward_fraction: float = BACKWARD_FRACTION
    curvature_interval: int = 1


def exposed_seconds(early: Sequence[Message], backward_s: float,
                    collective: Callable[[int], float]) -> float:
    """Communication left after backward ends: each message starts when its layers' backward
    is done and the link is free (one collective at a time), and runs ``collective(bytes)``."""
    free = 0.0
    for m in early:
        free = max(m.ready * backward_s, free) + collective(m.nbytes)
    return max(0.0, free - backward_s)


def step_seconds(comm: StepComm, compute: Compute, collective: Callable[[int], float]) -> float:
    """Compute (SENG's extra after backward, hiding nothing) plus exposed communication."""
    backward = compute.sgd_s * compute.backward_fraction
    return (compute.sgd_s * compute.ratio + exposed_seconds(comm.early, backward, collective)
            + sum(collective(b) for b in comm.late))


def amortised_step(plain: StepComm, curvature: StepComm, compute: Compute,
                   collective: Callable[[int], float]) -> float:
    """Mean step over a curvature interval: T-1 plain steps and one curvature step."""
    t = compute.curvature_interval
    return ((t - 1) * step_seconds(plain, compute, collective)
            + step_seconds(curvature, compute, collective)) / t


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
    seng: dict = field(default_factory=dict)


def _images(shape: tuple[int, ...], classes: int, batch: int, seed: int
            ) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *shape, generator=g),
            torch.randint(0, classes, (batch,), generator=g))


def _tokens(batch: int, seed: int, context: int = 128) -> tuple[Tensor, Tensor]:
    w = torch.randint(0, 256, (batch, context + 1), generator=torch.Generator().manual_seed(seed))
    return w[:, :-1], w[:, 1:]


def _lm_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


SPECS = {
    # ResNet50 as in the paper's Table 3: per-GPU batch 128, SENG-800.
    "resnet50": ModelSpec("resnet50", resnet50, lambda s: _images((3, 32, 32), 1000, 2, s),
                          lambda: _images((3, 224, 224), 1000, 1, 0), F.cross_entropy,
                          PAPER["per_gpu_batch"], PAPER["curvature_interval"]),
    # examples/lm.py's defaults (width 128, 4 layers, context 128, T=50) and Adam's diagonal,
    # the damping README recommends for Transformers; lm.py's global batch 32 per GPU here.
    "bytelm": ModelSpec("bytelm", ByteLM, lambda s: _tokens(2, s), lambda: _tokens(1, 0),
                        _lm_loss, 32, 50, {"damping_diagonal": "adam", "damping_beta2": 0.95}),
    # for the tests: small and fast
    "cnn": ModelSpec("cnn", SmallCNN, lambda s: _images((1, 28, 28), 10, 2, s),
                     lambda: _images((1, 28, 28), 10, 1, 0), F.cross_entropy, 32, 200),
}


@dataclass(frozen=True)
class Setup:
    """One way to train: ``method`` "sgd" (DDP) or SENG's "blockdiag"/"lagged"."""

    method: str
    overlap: bool = True
    comm_dtype: str | None = None
    uc: str = "exact"

    @property
    def label(self) -> str:
        name = "DDP SGD" if self.method == "sgd" else f"SENG {self.method}"
        if self.method != "sgd":
            name += f", uc={self.uc}"
        return (f"{name}, {'overlap' if self.overlap else 'no overlap'}, "
                f"{'bf16' if self.comm_dtype else 'fp32'}")


def all_setups() -> list[Setup]:
    """DDP SGD and SENG blockdiag/lagged (both ``uc``), with and without overlap, fp32/bf16."""
    out = []
    for dtype in (None, "bfloat16"):
        for overlap in (True, False):
            out.append(Setup("sgd", overlap, dtype))
            for method in ("blockdiag", "lagged"):
                for uc in ("exact", "factored"):
                    out.append(Setup(method, overlap, dtype, uc))
    return out


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


def _ddp_hook(calls: list, index: dict[int, int], itemsize: int) -> Callable:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    # unannotated: DDP rejects annotations it cannot compare (postponed ones are strings)
    def hook(process_group, bucket):  # type: ignore[no-untyped-def]
        # bytes as DDP would send them in the buffer dtype (bf16: what bf16_compress_hook
        # sends); the bucket's earliest-registered parameter says when it is ready
        calls.append((bucket.buffer().numel() * itemsize,
                      min(index[id(p)] for p in bucket.parameters())))
        return default_hooks.allreduce_hook(process_group, bucket)
    return hook


def _count_rank(rank: int, world: int, spec_name: str, setups: list[Setup],
                bucket_mb: float) -> list[dict]:
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
            opt = SENG(model, lr=1e-3, comm=comm, variant=s.method, uc=s.uc,
                       overlap=s.overlap, comm_dtype=s.comm_dtype, bucket_size_mb=bucket_mb,
                       curvature_update_interval=2, **spec.seng)
        steps = []
        for k in range(3):
            ddp_calls.clear()
            if comm is not None:
                comm.reset()
            x, y = spec.count_batch(1000 * rank + k)
            opt.zero_grad()
            spec.loss(net(x), y).backward()
            opt.step()
            steps.append([{"name": "ddp", "bytes": b, "first": f} for b, f in ddp_calls]
                         if comm is None else
                         [{"name": c.name, "bytes": c.bytes} for c in comm.calls])
        row = {"setup": asdict(s), "steps": steps}
        if isinstance(opt, SENG):
            row["units"] = [asdict(u) for u in seng_units(opt, model)]
        out.append(row)
    return out


def count_collectives(spec_name: str, setups: list[Setup], world: int = 2,
                      bucket_mb: float = 25.0, timeout: float = 600.0) -> list[dict]:
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
    counts = {k.split(".", 1)[1] if "." in k else "": sum(v.values())
              for k, v in counter.get_flop_counts().items() if k != "Global"}
    weights = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        children = sum(counts.get(f"{name}.{c}" if name else c, 0)
                       for c, _ in module.named_children())
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


def _ready_by_bytes(buckets: list[int], units: list[Unit], progress: list[float]
                    ) -> list[float]:
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


@dataclass
class Counted:
    """One setup's counted collectives and the step plans made from them."""

    setup: Setup
    plain: StepComm
    curvature: StepComm
    bytes: int
    calls: int
    rounds: int
    buckets_from: str  # "counted", "derived" (overlap not in the counted run) or "-"
    derived_matches: bool | None


def plans(row: dict, progress: list[float], bucket_mb: float) -> Counted:
    """Step plans of a counted setup: which collectives may start during backward, when."""
    s = Setup(**row["setup"])
    plain_calls, curv_calls = row["steps"][1], row["steps"][2]
    stats = dict(bytes=sum(c["bytes"] for c in plain_calls), calls=len(plain_calls),
                 rounds=len({round_of(c["name"]) for c in plain_calls}))
    if s.method == "sgd":
        early = [Message(c["bytes"], progress[c["first"]] if s.overlap else 1.0)
                 for c in plain_calls]
        comm = StepComm(early)
        return Counted(s, comm, comm, buckets_from="-", derived_matches=None, **stats)
    units = [Unit(**u) for u in row["units"]]
    main = "seng.step" if s.method == "lagged" else "seng.grad"

    def plan(calls: list[dict], overlapped: bool) -> tuple[StepComm, str, bool | None]:
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
            abs(a - b) < flags for a, b in zip(buckets, derived, strict=False))
        source = "counted"
        if overlapped and len(buckets) == 1 and len(derived) > 1:
            # the counted run sent the round as one collective: split it by the rule
            derived[-1] += buckets[0] - sum(derived)  # the flags go in the last bucket
            buckets, source = derived, "derived"
        ready = (_ready_by_bytes(buckets, units, progress) if overlapped
                 else [1.0] * len(buckets))
        return StepComm([Message(b, r) for b, r in zip(buckets, ready, strict=True)],
                        late), source, matches

    plain, source, matches = plan(plain_calls, s.overlap)
    # lagged curvature steps start nothing before step(): the corrections need the new curvature
    curvature, _, _ = plan(curv_calls, s.overlap and s.method != "lagged")
    return Counted(s, plain, curvature, buckets_from=source if s.overlap else "-",
                   derived_matches=matches if s.overlap else None, **stats)


# ----------------------------------------------------------------------------- compute


def seng_ratio_cpu(spec: ModelSpec, steps: int = 5) -> dict:
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
    seng_t, sgd_t = [], []
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
    return {"sgd_ms": 1e3 * statistics.median(sgd_t[1:]), "plain_ratio": plain,
            "curvature_ratio": curv, "ratio": ((t - 1) * plain + curv) / t, "interval": t,
            "batch": spec.per_gpu_batch}


def calibrate_resnet50(counted: Counted, cluster: Cluster) -> Compute:
    """SGD's compute per step (s) on a V100 at per-GPU batch 128: Table 3's 4-GPU time per
    step, less the model's communication for ``counted`` at 4 GPUs, over SENG's compute ratio
    (Table 5: SENG-800 / SGD per epoch)."""
    p = PAPER
    ratio = p["table5_tpe"]["SENG-800"] / p["table5_tpe"]["SGD"]
    t4 = p["table3_tpe"][4] / _steps_per_epoch(4)
    sgd = t4 / ratio
    for _ in range(50):  # exposure depends on the backward time: a fixed point
        c = Compute(sgd, ratio, curvature_interval=p["curvature_interval"])
        comm = amortised_step(counted.plain, counted.curvature, c,
                              lambda b: cluster.allreduce(b, 4)) - sgd * ratio
        sgd = (t4 - comm) / ratio
    return Compute(sgd, ratio, curvature_interval=p["curvature_interval"])


def _steps_per_epoch(gpus: int) -> int:
    return math.ceil(PAPER["imagenet_train_images"] / (PAPER["per_gpu_batch"] * gpus))


# ----------------------------------------------------------------------------- validation


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


SWEEP_SIZES = [4096 * 4**k for k in range(8)]  # 4 KiB … 64 MiB


def validate_gloo(sizes: list[int], measured: dict[int, list[float]]) -> dict:
    """Fit α, β at each world size and predict the other: errors per size and overall."""
    out: dict = {"sizes": sizes, "measured_s": {str(w): t for w, t in measured.items()}}
    for fit_w, pred_w in ((2, 3), (3, 2)):
        alpha, beta = fit_alpha_beta(sizes, measured[fit_w], fit_w)
        pred = [ring_allreduce(n, pred_w, alpha, beta) for n in sizes]
        err = [100 * (p / m - 1) for p, m in zip(pred, measured[pred_w], strict=True)]
        out[f"fit{fit_w}_predict{pred_w}"] = {
            "alpha_us": 1e6 * alpha, "bandwidth_MBps": 1e-6 / beta if beta > 0 else math.inf,
            "predicted_s": pred, "error_pct": err,
            "median_abs_error_pct": statistics.median(abs(e) for e in err)}
    return out


def compare_bench_comm(folder: Path, alpha: float, beta: float) -> list[dict] | None:
    """If ``bench_comm_{2,3}ranks.json`` exist: per SENG row, the measured ms rank 0 waited
    in SENG's collectives next to the model's ms for the row's calls (equal-sized, none
    hidden; the error only where nothing overlaps). None if the files are absent."""
    rows = []
    for world in (2, 3):
        path = folder / f"bench_comm_{world}ranks.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for r in data.get("rows", []):
            if r.get("waited_ms") is None or not r.get("collectives"):
                continue  # DDP's time in its collectives is not measured
            k = int(r["collectives"])
            model = 1e3 * k * ring_allreduce(float(r["bytes"]) / k, world, alpha, beta)
            label = str(r.get("setup"))
            label += "" if "uc=" in label else f", uc={r.get('uc')}"
            rows.append({"world": world, "setup": label, "ms": r.get("ms_median"),
                         "overlap": bool(r.get("overlap")), "waited_ms": r["waited_ms"],
                         "model_ms": model, "error_pct": None if r.get("overlap")
                         else 100 * (model / r["waited_ms"] - 1)})
    return rows or None


def validate_table3(counted: list[Counted], cluster: Cluster) -> list[dict]:
    """Table 3: from the 4-GPU time per epoch, predict 8/16/32 GPUs for each fp32 SENG
    setup; also the link bandwidth factor that would make the model hit the paper at 8."""
    rows = []
    for c in counted:
        if c.setup.method == "sgd" or c.setup.comm_dtype:
            continue
        compute = calibrate_resnet50(c, cluster)

        def tpe(p: int, cl: Cluster = cluster, c: Counted = c, compute: Compute = compute
                ) -> float:
            return _steps_per_epoch(p) * amortised_step(
                c.plain, c.curvature, compute, lambda b: cl.allreduce(b, p))

        row: dict = {"setup": c.setup.label, "sgd_compute_ms": 1e3 * compute.sgd_s}
        for p in (8, 16, 32):
            pred = tpe(p)
            row[p] = {"predicted_s": pred, "paper_s": PAPER["table3_tpe"][p],
                      "error_pct": 100 * (pred / PAPER["table3_tpe"][p] - 1),
                      "efficiency": tpe(4) * 4 / (pred * p)}
        # bisection on a bandwidth factor: how slow would links have to be to cost 8 GPUs
        # what the paper lost? (compute stays calibrated at 4 GPUs)
        lo, hi = 1e-4, 1.0
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            slow = cluster.scaled(bandwidth=mid)
            comp = calibrate_resnet50(c, slow)
            pred8 = _steps_per_epoch(8) * amortised_step(
                c.plain, c.curvature, comp, lambda b, s=slow: s.allreduce(b, 8))
            lo, hi = (mid, hi) if pred8 > PAPER["table3_tpe"][8] else (lo, mid)
        row["bandwidth_factor_to_match_8"] = math.sqrt(lo * hi)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- predictions


def predict(counted: list[Counted], compute_sgd: Compute, seng_ratio: float,
            cluster: Cluster, gpus: Sequence[int] = GPUS) -> list[dict]:
    """Step time (ms) and efficiency (one GPU's compute-only step over the step at P) per
    setup and GPU count."""
    rows = []
    for c in counted:
        compute = compute_sgd if c.setup.method == "sgd" else replace(compute_sgd,
                                                                      ratio=seng_ratio)
        one = compute.sgd_s * compute.ratio
        row: dict = {"setup": c.setup.label, **asdict(c.setup), "one_gpu_ms": 1e3 * one}
        for p in gpus:
            t = amortised_step(c.plain, c.curvature, compute,
                               lambda b, p=p: cluster.allreduce(b, p))
            row[str(p)] = {"ms": 1e3 * t, "efficiency": one / t}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- output


def _fmt_counts(model: str, counted: list[Counted]) -> list[str]:
    sgd = next(c for c in counted if c.setup.method == "sgd" and not c.setup.comm_dtype)
    lines = [f"| {model}: setup | calls/plain step | rounds | MiB/step per rank | × DDP fp32 "
             "bytes | buckets during backward | bucket sizes by the rule = counted |",
             "|---|---|---|---|---|---|---|"]
    for c in counted:
        early = sum(1 for m in c.plain.early if m.ready < 1.0)
        match = "-" if c.derived_matches is None else ("yes" if c.derived_matches else "no")
        lines.append(f"| {c.setup.label} | {c.calls} | {c.rounds} | {c.bytes / 2**20:.2f} | "
                     f"{c.bytes / sgd.bytes:.3f} | {early} ({c.buckets_from}) | {match} |")
    return lines


def _ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _fmt_predictions(rows: list[dict], gpus: Sequence[int]) -> list[str]:
    lines = ["| setup | " + " | ".join(f"P={p}" for p in gpus) + " |",
             "|---|" + "---|" * len(gpus)]
    for r in rows:
        lines.append(f"| {r['setup']} | " + " | ".join(
            f"{_ms(r[str(p)]['ms'])} ({100 * r[str(p)]['efficiency']:.0f}%)" for p in gpus)
            + " |")
    return lines


def _at(rows: list[dict], p: int, **match: object) -> dict:
    r = next(r for r in rows if all(r[k] == v for k, v in match.items()))
    return {"setup": r["setup"], "efficiency": r[str(p)]["efficiency"], "ms": r[str(p)]["ms"]}


def headline(rows: list[dict], p: int = 256) -> list[dict]:
    """SENG lagged next to DDP SGD at ``p`` GPUs (fp32 and bf16 buffers, both ``uc``,
    overlap)."""
    out = []
    for dtype in (None, "bfloat16"):
        sgd = _at(rows, p, method="sgd", overlap=True, comm_dtype=dtype)
        for uc in ("exact", "factored"):
            lag = _at(rows, p, method="lagged", overlap=True, comm_dtype=dtype, uc=uc)
            out.append({"dtype": dtype or "float32", "uc": uc, "sgd": sgd, "lagged": lag,
                        "lagged_over_sgd_time": lag["ms"] / sgd["ms"]})
    return out


def sensitivity(counted: list[Counted], compute: Compute, ratio: float, cluster: Cluster,
                p: int = 256) -> list[dict]:
    """DDP SGD's and SENG lagged's efficiency at ``p`` (fp32, overlap, uc=exact) with links
    slower than the datasheets (achieved bandwidth is below peak; latency above NCCL's
    model)."""
    out = []
    for bw, lat in ((1.0, 1.0), (0.5, 1.0), (0.5, 2.0)):
        rows = predict(counted, compute, ratio, cluster.scaled(bw, lat), gpus=(p,))
        out.append({"bandwidth_x": bw, "latency_x": lat,
                    "sgd": _at(rows, p, method="sgd", overlap=True,
                               comm_dtype=None)["efficiency"],
                    "lagged": _at(rows, p, method="lagged", overlap=True, comm_dtype=None,
                                  uc="exact")["efficiency"]})
    return out


def plot(predictions: dict[str, list[dict]], gpus: Sequence[int], cluster: Cluster,
         path: Path) -> None:
    """Step time and efficiency against GPUs, per model (uc=exact, SENG's default)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(predictions), 2, figsize=(12, 3.8 * len(predictions) + 1.2),
                             squeeze=False)
    colours = {"sgd": "tab:gray", "blockdiag": "tab:blue", "lagged": "tab:red"}
    for (model, rows), (ax_t, ax_e) in zip(predictions.items(), axes, strict=True):
        for r in rows:
            if r["method"] != "sgd" and r["uc"] != "exact":
                continue
            style = dict(color=colours[r["method"]], ls="-" if r["overlap"] else "--",
                         marker="o" if r["comm_dtype"] is None else "s", ms=3, lw=1.2)
            ax_t.plot(gpus, [r[str(p)]["ms"] for p in gpus], label=r["setup"], **style)
            ax_e.plot(gpus, [100 * r[str(p)]["efficiency"] for p in gpus], **style)
        for ax, what in ((ax_t, "step time (ms)"), (ax_e, "scaling efficiency (%)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(gpus), [str(p) for p in gpus])
            ax.set_xlabel(f"GPUs ({cluster.name} nodes)")
            ax.set_ylabel(what)
            ax.set_title(f"{model}: {what}")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 1.1 / (3.8 * len(predictions) + 1.2), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _gloo_section(bench_folder: Path, results: dict) -> list[str]:
    """Validation (a), and the optional comparison with bench_comm.py's runs."""
    measured = {w: gloo_sweep(w, SWEEP_SIZES) for w in (2, 3)}
    va = results["validation_gloo"] = validate_gloo(SWEEP_SIZES, measured)
    md = ["## Validation (a): Gloo loopback on this machine, 2 ⇄ 3 ranks", "",
          "Ring model fitted at one world size, predicting the other (float32 allreduce; "
          "2-20 back-to-back calls per trial, median of 5 trials, slowest rank). This "
          "machine has 2 cores: 3 ranks are oversubscribed, and whatever else runs on it "
          "shows up as noise.", "",
          "| size | 2 ranks (ms) | 3 ranks (ms) | 3 from the 2-rank fit (ms) | error | "
          "2 from the 3-rank fit (ms) | error |", "|---|---|---|---|---|---|---|"]
    f23, f32 = va["fit2_predict3"], va["fit3_predict2"]
    for i, n in enumerate(SWEEP_SIZES):
        md.append(f"| {n / 1024:,.0f} KiB | {1e3 * measured[2][i]:.3f} | "
                  f"{1e3 * measured[3][i]:.3f} | {1e3 * f23['predicted_s'][i]:.3f} | "
                  f"{f23['error_pct'][i]:+.0f}% | {1e3 * f32['predicted_s'][i]:.3f} | "
                  f"{f32['error_pct'][i]:+.0f}% |")
    md += ["", f"2-rank fit: α = {f23['alpha_us']:.1f} µs, 1/β = "
           f"{f23['bandwidth_MBps']:,.0f} MB/s; predicting 3 ranks: median |error| "
           f"{f23['median_abs_error_pct']:.0f}%. 3-rank fit: α = {f32['alpha_us']:.1f} µs, "
           f"1/β = {f32['bandwidth_MBps']:,.0f} MB/s; predicting 2 ranks: median |error| "
           f"{f32['median_abs_error_pct']:.0f}%.", ""]
    bench = compare_bench_comm(bench_folder, f23["alpha_us"] * 1e-6,
                               1e-6 / f23["bandwidth_MBps"])
    results["bench_comm"] = bench
    if bench:
        errs = [abs(r["error_pct"]) for r in bench if r["error_pct"] is not None]
        md += ["`bench_comm.py`'s runs (CIFAR-style ResNet18, batch 32 per rank): the ms rank 0 "
               "waited in SENG's collectives against the model's ms for the same calls (the "
               "2-rank fit; equal-sized calls; nothing hidden, so compared only without "
               "overlap). Waiting includes waiting for a slower rank.", "",
               "| ranks | setup | ms/step | ms waited in collectives | model: ms in "
               "collectives | error |", "|---|---|---|---|---|---|"]
        md += [f"| {r['world']} | {r['setup']} | {r['ms']:.0f} | {r['waited_ms']:.0f} | "
               f"{r['model_ms']:.0f} | "
               + ("-" if r["error_pct"] is None else f"{r['error_pct']:+.0f}%") + " |"
               for r in bench]
        if errs:
            md.append(f"\nWithout overlap: median |error| {statistics.median(errs):.0f}%.")
        md.append("")
    return md


def _table3_section(t3: list[dict], results: dict) -> list[str]:
    results["validation_table3"] = t3
    md = ["## Validation (b): the paper's Table 3 (ResNet50, 128 per V100)", "",
          "Compute calibrated on the 4-GPU time per epoch (542.22 s) for each setup; cluster "
          f"{CLUSTERS['dgx2'].name} (the paper ran 4-16 GPUs on one node, 32 on two).", "",
          "| setup | 8 GPUs: model / paper (error) | 16 GPUs | 32 GPUs | efficiency "
          "8/16/32 (paper 0.92/0.90/0.93) | link bandwidth × to match 8 GPUs |",
          "|---|---|---|---|---|---|"]
    for r in t3:
        cells = [f"{r[p]['predicted_s']:.2f} / {r[p]['paper_s']:.2f} s "
                 f"({r[p]['error_pct']:+.1f}%)" for p in (8, 16, 32)]
        eff = "/".join(f"{r[p]['efficiency']:.3f}" for p in (8, 16, 32))
        md.append(f"| {r['setup']} | " + " | ".join(cells) + f" | {eff} | "
                  f"{r['bandwidth_factor_to_match_8']:.4f} |")
    errs = [abs(r[p]["error_pct"]) for r in t3 for p in (8, 16, 32)]
    md += ["", f"|error| over setups and GPU counts: {min(errs):.1f}-{max(errs):.1f}%; the "
           "model's communication explains almost none of the paper's 7-10% loss.", ""]
    return md


def _prediction_sections(predictions: dict[str, list[dict]], results: dict,
                         cluster: Cluster) -> list[str]:
    md = [f"## Predictions on {cluster.name} nodes: ms per step (efficiency)", "",
          "Weak scaling (per-GPU batch fixed); efficiency = the method's one-GPU compute-only "
          "step over its step at P. Links: "
          + "; ".join(f"{k.name} {k.bandwidth / 1e9:g} GB/s, {1e6 * k.latency:g} µs/step"
                      for k in (cluster.intra, cluster.inter))
          + f"; {cluster.nics_per_node} NICs per node.", ""]
    for name, rows in predictions.items():
        c = results["compute"][name]
        md += [f"### {name} (per-GPU batch {SPECS[name].per_gpu_batch}; SGD compute "
               f"{_ms(1e3 * c['sgd_s'])} ms per step; SENG × {c['seng_ratio']:.3f}; "
               f"T = {c['curvature_interval']})", ""]
        md += _fmt_predictions(rows, GPUS) + [""]
    md += ["## At 256 GPUs: SENG lagged next to DDP SGD (overlap)", "",
           "| model | buffers | uc | DDP SGD efficiency | SENG lagged efficiency | SENG lagged "
           "step / DDP SGD step |", "|---|---|---|---|---|---|"]
    for name, head in results["headline_256"].items():
        md += [f"| {name} | {h['dtype']} | {h['uc']} | {100 * h['sgd']['efficiency']:.1f}% | "
               f"{100 * h['lagged']['efficiency']:.1f}% | {h['lagged_over_sgd_time']:.3f} |"
               for h in head]
    md.append("")
    for name, sens in results["sensitivity_256"].items():
        md.append(f"Sensitivity, {name} (fp32, overlap, uc=exact): " + "; ".join(
            f"links ×{s['bandwidth_x']:g} bandwidth ×{s['latency_x']:g} latency: DDP SGD "
            f"{100 * s['sgd']:.1f}%, SENG lagged {100 * s['lagged']:.1f}%" for s in sens) + ".")
    md.append("")
    return md


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="examples/results/scaling", help="folder for the results")
    ap.add_argument("--models", default="resnet50,bytelm")
    ap.add_argument("--cluster", default="dgx1", choices=list(CLUSTERS),
                    help="the cluster of the predictions (Table 3 always uses dgx2)")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="SENG's and DDP's buckets")
    ap.add_argument("--skip-sweep", action="store_true",
                    help="skip validation (a), the Gloo loopback sweep (~1 min)")
    ap.add_argument("--bench-comm", default="examples/results/comm",
                    help="folder of bench_comm_{2,3}ranks.json (optional comparison)")
    ap.add_argument("--lm-ratio", type=float, default=None,
                    help="SENG/SGD compute ratio for ByteLM (default: measured here)")
    ap.add_argument("--lm-compute-ms", type=float, default=None,
                    help="ByteLM's SGD compute per step on a V100 (default: its FLOPs at the "
                         "rate the paper's ResNet50 timings imply)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict = {"torch": torch.__version__, "paper": PAPER,
                     "links": {k: asdict(v) for k, v in LINKS.items()},
                     "clusters": {k: {**asdict(v), "intra": v.intra.name, "inter": v.inter.name}
                                  for k, v in CLUSTERS.items()},
                     "backward_fraction": BACKWARD_FRACTION, "gpus": list(GPUS)}
    md = [f"# Scaling model: predicted step time and efficiency (torch {torch.__version__})",
          "", "Made by `python examples/scaling_model.py " + " ".join(argv or sys.argv[1:])
          + "`; formulas, figures and assumptions in `docs/scaling.md`.", ""]

    if not args.skip_sweep:
        md += _gloo_section(Path(args.bench_comm), results)
    predictions: dict[str, list[dict]] = {}
    cluster = CLUSTERS[args.cluster]
    resnet: tuple[Compute, float] | None = None  # SGD's compute and its FLOPs per step
    for name in args.models.split(","):
        spec = SPECS[name]
        progress, flops = backward_progress(spec)
        rows = count_collectives(name, all_setups(), bucket_mb=args.bucket_mb)
        counted = [plans(r, progress, args.bucket_mb) for r in rows]
        results.setdefault("counted", {})[name] = [
            {"setup": c.setup.label, "bytes": c.bytes, "calls": c.calls, "rounds": c.rounds,
             "plain": asdict(c.plain), "curvature": asdict(c.curvature),
             "buckets_from": c.buckets_from, "derived_matches": c.derived_matches}
            for c in counted]
        md += [f"## What is sent: {name} (counted on 2 Gloo ranks, plain step)", ""]
        md += _fmt_counts(name, counted) + [""]
        step_flops = flops * spec.per_gpu_batch
        if name == "resnet50":
            ref = next(c for c in counted
                       if c.setup == Setup("blockdiag", False, None, "factored"))
            calibrated = calibrate_resnet50(ref, CLUSTERS["dgx2"])
            ratio = calibrated.ratio
            resnet = (replace(calibrated, ratio=1.0), step_flops)
            info = {"calibrated_with": ref.setup.label,
                    "effective_tflops": step_flops / calibrated.sgd_s / 1e12,
                    "source": "Table 3 (4 GPUs) and Table 5 (SENG-800 / SGD)"}
            md += _table3_section(validate_table3(counted, CLUSTERS["dgx2"]), results)
        else:
            if resnet is None:
                raise SystemExit("ByteLM's compute is scaled from ResNet50's: list resnet50 "
                                 "first in --models")
            measured = None if args.lm_ratio else seng_ratio_cpu(spec)
            ratio = args.lm_ratio or measured["ratio"]  # type: ignore[index]
            rate = resnet[1] / resnet[0].sgd_s
            info = {"seng_ratio_cpu": measured, "v100_rate_from_resnet50_tflops": rate / 1e12,
                    "source": "FLOPs at ResNet50's V100 rate; SENG ratio measured here"}
        seconds = step_flops / (resnet[1] / resnet[0].sgd_s)
        if name != "resnet50" and args.lm_compute_ms:
            seconds = args.lm_compute_ms / 1e3
        compute = Compute(seconds, 1.0, curvature_interval=spec.curvature_interval)
        results.setdefault("compute", {})[name] = {**asdict(compute), "seng_ratio": ratio,
                                                   "flops_per_step": step_flops, **info}
        predictions[name] = predict(counted, compute, ratio, cluster)
        results.setdefault("predictions", {})[name] = predictions[name]
        results.setdefault("headline_256", {})[name] = headline(predictions[name])
        results.setdefault("sensitivity_256", {})[name] = sensitivity(counted, compute, ratio,
                                                                      cluster)
    md += _prediction_sections(predictions, results, cluster)
    plot(predictions, GPUS, cluster, out / "scaling.png")
    md += ["![step time and efficiency](scaling.png)", "",
           f"({time.time() - started:.0f} s on this machine.)"]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("\n".join(md))
    return results


if __name__ == "__main__":
    main()
