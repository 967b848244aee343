"""The scaling model's report (examples/scaling/tables.py): the Markdown tables of
results.md from given numbers."""

from __future__ import annotations

from examples.scaling import model as sm
from examples.scaling import tables as tb


def test_counts_and_predictions_tables() -> None:
    sgd = sm.Counted(
        sm.Setup("sgd"),
        sm.StepComm([sm.Message(2**20, 0.5)]),
        sm.StepComm(),
        2**20,
        1,
        1,
        "-",
        None,
    )
    lag = sm.Counted(
        sm.Setup("lagged", overlap=False),
        sm.StepComm([sm.Message(2**21)]),
        sm.StepComm(),
        2**21,
        2,
        1,
        "-",
        None,
    )
    lines = tb.counts_table("cnn", [sgd, lag])
    assert lines[0].startswith("| cnn: setup | calls/plain step |")
    assert lines[2] == "| DDP SGD, overlap, fp32 | 1 | 1 | 1.00 | 1.000 | 1 (-) | - |"
    assert lines[3] == (
        "| SENG lagged, uc=exact, no overlap, fp32 | 2 | 1 | 2.00 | 2.000 | 0 (-) | - |"
    )
    rows = [
        {
            "setup": "DDP SGD",
            "8": {"ms": 9.876, "efficiency": 0.994},
            "16": {"ms": 187.94, "efficiency": 0.5},
        }
    ]
    assert tb.predictions_table(rows, (8, 16)) == [
        "| setup | P=8 | P=16 |",
        "|---|---|---|",
        "| DDP SGD | 9.88 (99%) | 187.9 (50%) |",
    ]


def test_gloo_section_without_bench_comm() -> None:
    sizes = [4096, 16384]
    measured = {2: [1e-3, 2e-3], 3: [2e-3, 4e-3]}
    fit = {
        "predicted_s": [1e-3, 2e-3],
        "error_pct": [0.0, -50.0],
        "alpha_us": 500.0,
        "bandwidth_MBps": 800.0,
        "median_abs_error_pct": 25.0,
    }
    md = tb.gloo_section(sizes, measured, {"fit2_predict3": fit, "fit3_predict2": fit}, None)
    assert md[0].startswith("## Validation (a)")
    assert "| 16 KiB | 2.000 | 4.000 | 2.000 | -50% | 2.000 | -50% |" in md
    assert not any("bench_comm.py" in line for line in md)
