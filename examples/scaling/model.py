"""The analytic cost model: public interconnect and paper figures, alpha-beta allreduce (ring,
tree, hierarchical), overlap of buckets with backward, step time, and predictions per setup
and GPU count. No measuring here: ``calibrate`` supplies the counted collectives and compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

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
            return replace(
                link, bandwidth=link.bandwidth * bandwidth, latency=link.latency * latency
            )

        return replace(
            self, intra=s(self.intra), inter=s(self.inter), base_latency=self.base_latency * latency
        )


# Public figures, not measured here (no GPU, no network on this machine). Latencies are the
# per-step figures of NCCL's own cost model for the "Simple" protocol that large allreduces use.
_NCCL_TUNING = "NCCL src/graph/tuning.cc (NVIDIA/nccl, hwLat/baseLat tables, Simple protocol)"
LINKS = {
    "nvlink2": Link(
        "NVLink 2.0 (V100 SXM2)",
        150e9,
        3.4e-6,
        "NVIDIA Tesla V100 datasheet: NVLink 300 GB/s per GPU (6 links, 25 GB/s "
        "each way) = 150 GB/s per direction; ring-step latency 3.4 µs: " + _NCCL_TUNING,
    ),
    "edr": Link(
        "EDR InfiniBand",
        12.5e9,
        9.6e-6,
        "Mellanox EDR InfiniBand (ConnectX-5): 100 Gb/s = 12.5 GB/s per port and "
        "direction; ring-step latency over the network 9.6 µs: " + _NCCL_TUNING,
    ),
}
NCCL_BASE_LATENCY = 8.4e-6  # per collective, ring/Simple baseLat of the same table
CLUSTERS = {
    "dgx1": Cluster(
        "DGX-1 (8× V100, 4× EDR)",
        8,
        4,
        LINKS["nvlink2"],
        LINKS["edr"],
        NCCL_BASE_LATENCY,
        "NVIDIA DGX-1 with V100 datasheet: 8 V100 SXM2 on NVLink (hybrid cube-mesh), "
        "4× 100 Gb/s EDR InfiniBand",
    ),
    "dgx2": Cluster(
        "DGX-2 (16× V100, 8× EDR)",
        16,
        8,
        LINKS["nvlink2"],
        LINKS["edr"],
        NCCL_BASE_LATENCY,
        "NVIDIA DGX-2 datasheet: 16 V100 SXM3 on NVSwitch (each GPU 6 NVLinks, "
        "2.4 TB/s bisection), 8× 100 Gb/s EDR InfiniBand / 100 GbE",
    ),
}

# The paper (Yang et al., 2021, Tables 3 and 5), ResNet50 on ImageNet-1k.
PAPER: dict[str, Any] = {
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


def steps_per_epoch(gpus: int) -> int:
    """Steps of one ImageNet epoch at the paper's per-GPU batch on ``gpus`` GPUs."""
    return math.ceil(PAPER["imagenet_train_images"] / (PAPER["per_gpu_batch"] * gpus))


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
        t += min(
            ring_allreduce(nbytes, nodes, cluster.inter.latency, beta),
            tree_allreduce(nbytes, nodes, cluster.inter.latency, beta),
        )
    return t


def fit_alpha_beta(sizes: Sequence[float], seconds: Sequence[float], p: int) -> tuple[float, float]:
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


def exposed_seconds(
    early: Sequence[Message], backward_s: float, collective: Callable[[int], float]
) -> float:
    """Communication left after backward ends: each message starts when its layers' backward
    is done and the link is free (one collective at a time), and runs ``collective(bytes)``."""
    free = 0.0
    for m in early:
        free = max(m.ready * backward_s, free) + collective(m.nbytes)
    return max(0.0, free - backward_s)


def step_seconds(comm: StepComm, compute: Compute, collective: Callable[[int], float]) -> float:
    """Compute (SENG's extra after backward, hiding nothing) plus exposed communication."""
    backward = compute.sgd_s * compute.backward_fraction
    return (
        compute.sgd_s * compute.ratio
        + exposed_seconds(comm.early, backward, collective)
        + sum(collective(b) for b in comm.late)
    )


def amortised_step(
    plain: StepComm, curvature: StepComm, compute: Compute, collective: Callable[[int], float]
) -> float:
    """Mean step over a curvature interval: T-1 plain steps and one curvature step."""
    t = compute.curvature_interval
    return (
        (t - 1) * step_seconds(plain, compute, collective)
        + step_seconds(curvature, compute, collective)
    ) / t


# ----------------------------------------------------------------------------- setups


@dataclass(frozen=True)
class Setup:
    """One way to train: ``method`` "sgd" (DDP) or SENG's "blockdiag"/"lagged"."""

    method: str
    overlap: bool = True
    comm_dtype: str | None = None
    uc: str = "exact"

    @property
    def label(self) -> str:
        """The setup as the tables name it, e.g. "SENG lagged, uc=exact, overlap, fp32"."""
        name = "DDP SGD" if self.method == "sgd" else f"SENG {self.method}"
        if self.method != "sgd":
            name += f", uc={self.uc}"
        return (
            f"{name}, {'overlap' if self.overlap else 'no overlap'}, "
            f"{'bf16' if self.comm_dtype else 'fp32'}"
        )


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


# ----------------------------------------------------------------------------- predictions


def predict(
    counted: list[Counted],
    compute_sgd: Compute,
    seng_ratio: float,
    cluster: Cluster,
    gpus: Sequence[int] = GPUS,
) -> list[dict[str, Any]]:
    """Step time (ms) and efficiency (one GPU's compute-only step over the step at P) per
    setup and GPU count."""
    rows = []
    for c in counted:
        compute = compute_sgd if c.setup.method == "sgd" else replace(compute_sgd, ratio=seng_ratio)
        one = compute.sgd_s * compute.ratio
        row: dict[str, Any] = {"setup": c.setup.label, **asdict(c.setup), "one_gpu_ms": 1e3 * one}
        for p in gpus:
            t = amortised_step(
                c.plain, c.curvature, compute, lambda b, p=p: cluster.allreduce(b, p)
            )
            row[str(p)] = {"ms": 1e3 * t, "efficiency": one / t}
        rows.append(row)
    return rows


def _at(rows: list[dict[str, Any]], p: int, **match: object) -> dict[str, Any]:
    r = next(r for r in rows if all(r[k] == v for k, v in match.items()))
    return {"setup": r["setup"], "efficiency": r[str(p)]["efficiency"], "ms": r[str(p)]["ms"]}


def headline(rows: list[dict[str, Any]], p: int = 256) -> list[dict[str, Any]]:
    """SENG lagged next to DDP SGD at ``p`` GPUs (fp32 and bf16 buffers, both ``uc``,
    overlap)."""
    out = []
    for dtype in (None, "bfloat16"):
        sgd = _at(rows, p, method="sgd", overlap=True, comm_dtype=dtype)
        for uc in ("exact", "factored"):
            lag = _at(rows, p, method="lagged", overlap=True, comm_dtype=dtype, uc=uc)
            out.append(
                {
                    "dtype": dtype or "float32",
                    "uc": uc,
                    "sgd": sgd,
                    "lagged": lag,
                    "lagged_over_sgd_time": lag["ms"] / sgd["ms"],
                }
            )
    return out


def sensitivity(
    counted: list[Counted], compute: Compute, ratio: float, cluster: Cluster, p: int = 256
) -> list[dict[str, Any]]:
    """DDP SGD's and SENG lagged's efficiency at ``p`` (fp32, overlap, uc=exact) with links
    slower than the datasheets (achieved bandwidth is below peak; latency above NCCL's
    model)."""
    out = []
    for bw, lat in ((1.0, 1.0), (0.5, 1.0), (0.5, 2.0)):
        rows = predict(counted, compute, ratio, cluster.scaled(bw, lat), gpus=(p,))
        out.append(
            {
                "bandwidth_x": bw,
                "latency_x": lat,
                "sgd": _at(rows, p, method="sgd", overlap=True, comm_dtype=None)["efficiency"],
                "lagged": _at(rows, p, method="lagged", overlap=True, comm_dtype=None, uc="exact")[
                    "efficiency"
                ],
            }
        )
    return out
