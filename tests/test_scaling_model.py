"""The scaling model (examples/scaling_model.py): its alpha-beta formulas, the limits of its
overlap model, and the bytes and rounds it counts on a small model on 2 real Gloo ranks."""

from __future__ import annotations

import math

import pytest

from examples import scaling_model as sm

DGX1 = sm.CLUSTERS["dgx1"]


def test_ring_and_tree_allreduce():
    alpha, beta, n = 1e-5, 1e-9, 1e6
    assert sm.ring_allreduce(n, 1, alpha, beta) == 0.0
    assert sm.tree_allreduce(n, 1, alpha, beta) == 0.0
    assert sm.ring_allreduce(n, 4, alpha, beta) == pytest.approx(6 * alpha + 1.5 * n * beta)
    assert sm.tree_allreduce(n, 8, alpha, beta) == pytest.approx(6 * alpha + 2 * n * beta)
    # many ranks: the ring's latency grows linearly, the tree's logarithmically
    assert sm.tree_allreduce(1e3, 1024, alpha, beta) < sm.ring_allreduce(1e3, 1024, alpha, beta)
    assert DGX1.allreduce(n, 1) == 0.0


def test_hierarchical_is_the_flat_nvlink_ring_inside_one_node():
    nv = DGX1.intra
    for p in range(2, DGX1.gpus_per_node + 1):
        assert sm.hierarchical_allreduce(5e7, p, DGX1) == pytest.approx(
            sm.ring_allreduce(5e7, p, nv.latency, 1 / nv.bandwidth))
        assert DGX1.allreduce(5e7, p) == pytest.approx(
            DGX1.base_latency + sm.ring_allreduce(5e7, p, nv.latency, 1 / nv.bandwidth))
    # two nodes add the slower network: the nodes' NICs move the whole buffer
    inside = sm.hierarchical_allreduce(5e7, 8, DGX1)
    beta = 1 / (DGX1.nics_per_node * DGX1.inter.bandwidth)
    assert sm.hierarchical_allreduce(5e7, 16, DGX1) == pytest.approx(
        inside + min(sm.ring_allreduce(5e7, 2, DGX1.inter.latency, beta),
                     sm.tree_allreduce(5e7, 2, DGX1.inter.latency, beta)))
    times = [DGX1.allreduce(5e7, p) for p in sm.GPUS]
    assert times == sorted(times)
    assert DGX1.scaled(bandwidth=0.5).allreduce(5e7, 64) > DGX1.allreduce(5e7, 64)


def test_fit_recovers_alpha_and_beta_from_exact_timings():
    sizes = [4096 * 4**k for k in range(8)]
    for p in (2, 3, 8):
        times = [sm.ring_allreduce(n, p, 37e-6, 1 / 2.5e9) for n in sizes]
        alpha, beta = sm.fit_alpha_beta(sizes, times, p)
        assert alpha == pytest.approx(37e-6, rel=1e-9)
        assert beta == pytest.approx(1 / 2.5e9, rel=1e-9)


def _ms(nbytes: int) -> float:
    return nbytes * 1e-3  # 1 ms per byte: easy sums


def test_exposure_without_overlap_is_all_the_communication():
    msgs = [sm.Message(3), sm.Message(5), sm.Message(2)]
    assert sm.exposed_seconds(msgs, backward_s=100.0, collective=_ms) == pytest.approx(0.010)
    compute = sm.Compute(sgd_s=1.0, ratio=1.2, backward_fraction=0.5)
    plan = sm.StepComm(msgs, late=[4])
    assert sm.step_seconds(plan, compute, _ms) == pytest.approx(1.2 + 0.010 + 0.004)


def test_exposure_with_an_endless_backward_is_the_last_bucket():
    msgs = [sm.Message(30, 0.1), sm.Message(50, 0.6), sm.Message(2, 1.0)]
    assert sm.exposed_seconds(msgs, backward_s=1e6, collective=_ms) == pytest.approx(0.002)
    # the link runs one bucket at a time: ready together at the start, they queue
    queued = [sm.Message(400, 0.0), sm.Message(400, 0.0)]
    assert sm.exposed_seconds(queued, backward_s=0.5, collective=_ms) == pytest.approx(0.3)
    # a bucket ready late waits for its layers, not for the link
    assert sm.exposed_seconds([sm.Message(100, 0.9)], backward_s=1.0,
                              collective=_ms) == pytest.approx(0.0)
    # curvature steps every T: the mean step weighs them 1/T
    compute = sm.Compute(sgd_s=1.0, curvature_interval=4)
    assert sm.amortised_step(sm.StepComm(), sm.StepComm(late=[400]), compute,
                             _ms) == pytest.approx(1.0 + 0.1)


def test_free_communication_reproduces_ideal_scaling_of_table3():
    free = sm.Counted(sm.Setup("lagged"), sm.StepComm(), sm.StepComm(), 0, 0, 0, "-", None)
    compute = sm.calibrate_resnet50(free, DGX1)
    t4 = sm.PAPER["table3_tpe"][4] / math.ceil(1_281_167 / 512)
    assert compute.sgd_s * compute.ratio == pytest.approx(t4)
    assert compute.ratio == pytest.approx(663.17 / 575.09)


def test_counted_bytes_and_rounds_on_two_gloo_ranks():
    spec = sm.SPECS["cnn"]
    progress, flops = sm.backward_progress(spec)
    assert progress[0] == pytest.approx(1.0) and flops > 0
    assert all(a >= b for a, b in zip(progress, progress[1:], strict=False))
    setups = [sm.Setup("sgd"), sm.Setup("blockdiag"), sm.Setup("lagged")]
    rows = sm.count_collectives("cnn", setups, bucket_mb=0.25, timeout=120)
    sgd, bd, lag = (sm.plans(r, progress, 0.25) for r in rows)
    assert sgd.bytes == 4 * sum(p.numel() for p in spec.build().parameters())
    assert (bd.rounds, lag.rounds) == (2, 1)
    # uc="exact": every block's correction is gradient-sized; the flags are a few floats
    assert 0 < lag.bytes - 2 * sgd.bytes < 1024 and bd.bytes == lag.bytes
    # blockdiag: gradient buckets during backward, the correction round after the solve
    assert len(bd.plain.late) == 1 and len(bd.plain.early) > 1
    for c in (bd, lag):
        assert c.buckets_from == "counted" and c.derived_matches
        assert c.plain.early[-1].ready == 1.0 and c.plain.early[0].ready < 1.0
    # lagged curvature steps start nothing before step()
    assert all(m.ready == 1.0 for m in lag.curvature.early)
