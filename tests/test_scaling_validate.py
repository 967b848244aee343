"""The scaling model's checks (examples/scaling/validate.py): a fit at one world size
predicting the other, bench_comm.py's waits set against the model, and the paper's Table 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.scaling import model as sm
from examples.scaling import validate as va


def test_gloo_validation_of_exact_ring_timings_has_no_error() -> None:
    sizes = [4096 * 4**k for k in range(8)]
    measured = {w: [sm.ring_allreduce(n, w, 1e-3, 1 / 8e8) for n in sizes] for w in (2, 3)}
    out = va.validate_gloo(sizes, measured)
    for key in ("fit2_predict3", "fit3_predict2"):
        assert out[key]["alpha_us"] == pytest.approx(1e3)
        assert out[key]["bandwidth_MBps"] == pytest.approx(800)
        assert out[key]["median_abs_error_pct"] == pytest.approx(0, abs=1e-6)
    assert out["measured_s"]["3"] == measured[3]


def test_bench_comm_rows_against_the_model(tmp_path: Path) -> None:
    assert va.compare_bench_comm(tmp_path, 1e-3, 1e-9) is None
    rows = [
        {"setup": "DDP SGD", "waited_ms": None, "collectives": 0, "bytes": 8},
        {
            "setup": "SENG lagged",
            "uc": "exact",
            "overlap": False,
            "waited_ms": 10.0,
            "collectives": 2,
            "bytes": 2e6,
            "ms_median": 50.0,
        },
        {
            "setup": "SENG lagged, uc=factored",
            "overlap": True,
            "waited_ms": 5.0,
            "collectives": 1,
            "bytes": 1e6,
            "ms_median": 40.0,
        },
    ]
    (tmp_path / "bench_comm_2ranks.json").write_text(json.dumps({"rows": rows}))
    out = va.compare_bench_comm(tmp_path, 1e-3, 1e-9)
    assert out is not None and [r["setup"] for r in out] == [
        "SENG lagged, uc=exact",
        "SENG lagged, uc=factored",
    ]
    # 2 calls of 1 MB at 2 ranks: 2 × (2α + nβ) = 2 × 3 ms; nothing hidden without overlap
    assert out[0]["model_ms"] == pytest.approx(6.0)
    assert out[0]["error_pct"] == pytest.approx(-40.0)
    assert out[1]["error_pct"] is None  # overlapped: its wait is not the whole collective


def test_table3_with_free_communication_is_ideal_scaling() -> None:
    setups = [
        sm.Setup("sgd"),
        sm.Setup("lagged", comm_dtype="bfloat16"),
        sm.Setup("lagged", uc="factored"),
    ]
    counted = [sm.Counted(s, sm.StepComm(), sm.StepComm(), 0, 0, 0, "-", None) for s in setups]
    rows = va.validate_table3(counted, sm.CLUSTERS["dgx2"])
    assert [r["setup"] for r in rows] == ["SENG lagged, uc=factored, overlap, fp32"]
    t4 = sm.PAPER["table3_tpe"][4]
    for p in (8, 16, 32):
        ideal = sm.steps_per_epoch(p) * t4 / sm.steps_per_epoch(4)
        assert rows[0][p]["predicted_s"] == pytest.approx(ideal)
        assert rows[0][p]["efficiency"] == pytest.approx(
            sm.steps_per_epoch(4) * 4 / (sm.steps_per_epoch(p) * p)
        )
    # no communication: no link is slow enough; the bisection ends at its lower bound
    assert rows[0]["bandwidth_factor_to_match_8"] < 1e-3
