"""The scaling model's analytic part (examples/scaling/model.py): its alpha-beta formulas, the
limits of its overlap model, and predictions from given collectives."""

from __future__ import annotations

from typing import Any

import pytest

from examples.scaling import model as sm

DGX1 = sm.CLUSTERS["dgx1"]


def test_ring_and_tree_allreduce() -> None:
    alpha, beta, n = 1e-5, 1e-9, 1e6
    assert sm.ring_allreduce(n, 1, alpha, beta) == 0.0
    assert sm.tree_allreduce(n, 1, alpha, beta) == 0.0
    assert sm.ring_allreduce(n, 4, alpha, beta) == pytest.approx(6 * alpha + 1.5 * n * beta)
    assert sm.tree_allreduce(n, 8, alpha, beta) == pytest.approx(6 * alpha + 2 * n * beta)
    # many ranks: the ring's latency grows linearly, the tree's logarithmically
    assert sm.tree_allreduce(1e3, 1024, alpha, beta) < sm.ring_allreduce(1e3, 1024, alpha, beta)
    assert DGX1.allreduce(n, 1) == 0.0


def test_hierarchical_is_the_flat_nvlink_ring_inside_one_node() -> None:
    nv = DGX1.intra
    for p in range(2, DGX1.gpus_per_node + 1):
        assert sm.hierarchical_allreduce(5e7, p, DGX1) == pytest.approx(
            sm.ring_allreduce(5e7, p, nv.latency, 1 / nv.bandwidth)
        )
        assert DGX1.allreduce(5e7, p) == pytest.approx(
            DGX1.base_latency + sm.ring_allreduce(5e7, p, nv.latency, 1 / nv.bandwidth)
        )
    # two nodes add the slower network: the nodes' NICs move the whole buffer
    inside = sm.hierarchical_allreduce(5e7, 8, DGX1)
    beta = 1 / (DGX1.nics_per_node * DGX1.inter.bandwidth)
    assert sm.hierarchical_allreduce(5e7, 16, DGX1) == pytest.approx(
        inside
        + min(
            sm.ring_allreduce(5e7, 2, DGX1.inter.latency, beta),
            sm.tree_allreduce(5e7, 2, DGX1.inter.latency, beta),
        )
    )
    times = [DGX1.allreduce(5e7, p) for p in sm.GPUS]
    assert times == sorted(times)
    assert DGX1.scaled(bandwidth=0.5).allreduce(5e7, 64) > DGX1.allreduce(5e7, 64)


def test_fit_recovers_alpha_and_beta_from_exact_timings() -> None:
    sizes = [4096 * 4**k for k in range(8)]
    for p in (2, 3, 8):
        times = [sm.ring_allreduce(n, p, 37e-6, 1 / 2.5e9) for n in sizes]
        alpha, beta = sm.fit_alpha_beta(sizes, times, p)
        assert alpha == pytest.approx(37e-6, rel=1e-9)
        assert beta == pytest.approx(1 / 2.5e9, rel=1e-9)


def _ms(nbytes: int) -> float:
    return nbytes * 1e-3  # 1 ms per byte: easy sums


def test_exposure_without_overlap_is_all_the_communication() -> None:
    msgs = [sm.Message(3), sm.Message(5), sm.Message(2)]
    assert sm.exposed_seconds(msgs, backward_s=100.0, collective=_ms) == pytest.approx(0.010)
    compute = sm.Compute(sgd_s=1.0, ratio=1.2, backward_fraction=0.5)
    plan = sm.StepComm(msgs, late=[4])
    assert sm.step_seconds(plan, compute, _ms) == pytest.approx(1.2 + 0.010 + 0.004)


def test_exposure_with_an_endless_backward_is_the_last_bucket() -> None:
    msgs = [sm.Message(30, 0.1), sm.Message(50, 0.6), sm.Message(2, 1.0)]
    assert sm.exposed_seconds(msgs, backward_s=1e6, collective=_ms) == pytest.approx(0.002)
    # the link runs one bucket at a time: ready together at the start, they queue
    queued = [sm.Message(400, 0.0), sm.Message(400, 0.0)]
    assert sm.exposed_seconds(queued, backward_s=0.5, collective=_ms) == pytest.approx(0.3)
    # a bucket ready late waits for its layers, not for the link
    assert sm.exposed_seconds(
        [sm.Message(100, 0.9)], backward_s=1.0, collective=_ms
    ) == pytest.approx(0.0)
    # curvature steps every T: the mean step weighs them 1/T
    compute = sm.Compute(sgd_s=1.0, curvature_interval=4)
    assert sm.amortised_step(sm.StepComm(), sm.StepComm(late=[400]), compute, _ms) == pytest.approx(
        1.0 + 0.1
    )


def _counted(setup: Any, plain: Any) -> Any:
    return sm.Counted(setup, plain, plain, 0, 0, 0, "-", None)


def test_predictions_headline_and_sensitivity_from_given_collectives() -> None:
    # SGD: one 100 MB bucket after backward; SENG lagged: nothing to send (ideal scaling)
    sgd = _counted(sm.Setup("sgd"), sm.StepComm([sm.Message(10**8)]))
    lag = _counted(sm.Setup("lagged"), sm.StepComm())
    sgd16 = _counted(sm.Setup("sgd", comm_dtype="bfloat16"), sm.StepComm([sm.Message(5 * 10**7)]))
    lag16 = _counted(sm.Setup("lagged", comm_dtype="bfloat16"), sm.StepComm())
    lagf = _counted(sm.Setup("lagged", uc="factored"), sm.StepComm())
    lagf16 = _counted(sm.Setup("lagged", comm_dtype="bfloat16", uc="factored"), sm.StepComm())
    counted = [sgd, lag, sgd16, lag16, lagf, lagf16]
    compute = sm.Compute(sgd_s=0.2)
    rows = sm.predict(counted, compute, 1.25, DGX1, gpus=(8, 256))
    assert [r["setup"] for r in rows][:2] == [
        "DDP SGD, overlap, fp32",
        "SENG lagged, uc=exact, overlap, fp32",
    ]
    assert rows[1]["256"] == {"ms": pytest.approx(250.0), "efficiency": pytest.approx(1.0)}
    assert rows[0]["256"]["ms"] == pytest.approx(1e3 * (0.2 + DGX1.allreduce(10**8, 256)))
    assert rows[0]["8"]["efficiency"] > rows[0]["256"]["efficiency"]
    head = sm.headline(rows)
    assert [(h["dtype"], h["uc"]) for h in head] == [
        ("float32", "exact"),
        ("float32", "factored"),
        ("bfloat16", "exact"),
        ("bfloat16", "factored"),
    ]
    assert head[0]["lagged_over_sgd_time"] == pytest.approx(250.0 / rows[0]["256"]["ms"])
    sens = sm.sensitivity(counted, compute, 1.25, DGX1)
    assert [s["lagged"] for s in sens] == pytest.approx([1.0, 1.0, 1.0])
    assert sens[0]["sgd"] == pytest.approx(rows[0]["256"]["efficiency"])
    assert sens[0]["sgd"] > sens[1]["sgd"] > sens[2]["sgd"]


def test_all_setups_cover_every_method_overlap_and_buffer() -> None:
    setups = sm.all_setups()
    assert len(setups) == len(set(setups)) == 2 * 2 * (1 + 2 * 2)
    assert (
        sm.Setup("blockdiag", False, "bfloat16", "factored").label
        == "SENG blockdiag, uc=factored, no overlap, bf16"
    )
