"""The scaling model's inputs (examples/scaling/calibrate.py): compute calibrated to the
paper's Table 3, and the bytes and rounds counted on a small model on 2 real Gloo ranks."""

from __future__ import annotations

import math

import pytest

from examples.scaling import calibrate as cal
from examples.scaling import model as sm


def test_free_communication_reproduces_ideal_scaling_of_table3() -> None:
    free = sm.Counted(sm.Setup("lagged"), sm.StepComm(), sm.StepComm(), 0, 0, 0, "-", None)
    compute = cal.calibrate_resnet50(free, sm.CLUSTERS["dgx1"])
    t4 = sm.PAPER["table3_tpe"][4] / math.ceil(1_281_167 / 512)
    assert compute.sgd_s * compute.ratio == pytest.approx(t4)
    assert compute.ratio == pytest.approx(663.17 / 575.09)


def test_counted_bytes_and_rounds_on_two_gloo_ranks() -> None:
    spec = cal.SPECS["cnn"]
    progress, flops = cal.backward_progress(spec)
    assert progress[0] == pytest.approx(1.0) and flops > 0
    assert all(a >= b for a, b in zip(progress, progress[1:], strict=False))
    setups = [sm.Setup("sgd"), sm.Setup("blockdiag"), sm.Setup("lagged")]
    rows = cal.count_collectives("cnn", setups, bucket_mb=0.25, timeout=120)
    sgd, bd, lag = (cal.plans(r, progress, 0.25) for r in rows)
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
