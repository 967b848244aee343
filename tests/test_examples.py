"""The example training script and data loader on the real Fashion-MNIST files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.data import DEFAULT_ROOT, load_fashion_mnist
from examples.plot import read_metrics

pytestmark = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist; "
    "ci/install.sh does it)",
)


def test_loader_shapes_and_cifar_style_padding():
    x, y = load_fashion_mnist(False)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,) and int(y.max()) == 9
    x3, _ = load_fashion_mnist(False, cifar_style=True)
    assert x3.shape == (10000, 3, 32, 32)


def test_missing_data_says_how_to_install(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(True, root=tmp_path)


def test_train_script_learns_with_seng(capsys):
    from examples.train import main

    acc = main(["--train-limit", "1536", "--batch-size", "64", "--curvature-interval", "5"])
    out = capsys.readouterr().out
    assert '"epoch": 1' in out and "test accuracy:" in out
    # chance is 0.1; 24 SENG steps on real data end at 0.52-0.65 over seeds 0-2 and both uc
    # modes (SGD: 0.68), a spread this short run cannot narrow
    assert acc > 0.45


ROOT = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], cwd: Path) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "examples" / "train.py"),
        "--no-progress",
    ] + args
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("test accuracy:")]
    assert len(lines) == 1 and "2 rank(s)" in lines[0], done.stdout  # rank 0 only
    return lines[0]


def test_train_script_under_torchrun_writes_metrics_checkpoint_and_plot(tmp_path: Path):
    args = [
        "--train-limit",
        "2048",
        "--test-limit",
        "2000",
        "--batch-size",
        "32",
        "--curvature-interval",
        "5",
        "--variant",
        "lagged",
        "--epochs",
        "2",
    ]
    line = _torchrun(
        args + ["--metrics", "m.csv", "--checkpoint", "c.pt", "--plot", "p.png"], tmp_path
    )
    assert float(line.split()[2]) > 0.6  # 64 steps of global batch 64; chance is 0.1

    rows = read_metrics(tmp_path / "m.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["step"] == 64
    for key in (
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "damping",
        "train_time_s",
        "wall_s",
    ):
        assert key in rows[0]
    assert rows[1]["test_acc"] == float(line.split()[2])
    assert rows[1]["train_time_s"] > rows[0]["train_time_s"] > 0

    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert len(ckpt["optimizer"]["seng"]["curvature_by_rank"]) == 2  # both ranks' curvature
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_two_rank_resume_matches_the_uninterrupted_run(tmp_path: Path):
    args = [
        "--train-limit",
        "1024",
        "--test-limit",
        "1000",
        "--batch-size",
        "32",
        "--curvature-interval",
        "3",
        "--schedule",
        "constant",
        "--no-overlap",
        "--epochs",
    ]
    _torchrun(args + ["2", "--checkpoint", "straight.pt", "--metrics", "straight.jsonl"], tmp_path)
    _torchrun(args + ["1", "--checkpoint", "first.pt"], tmp_path)
    _torchrun(
        args
        + ["2", "--resume", "first.pt", "--checkpoint", "resumed.pt", "--metrics", "resumed.jsonl"],
        tmp_path,
    )
    straight, resumed = (read_metrics(tmp_path / f"{n}.jsonl") for n in ("straight", "resumed"))
    drop = ("epoch_time_s", "train_time_s", "wall_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in straight] == [
        {k: v for k, v in r.items() if k not in drop} for r in resumed
    ]
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("straight", "resumed"))
    for name, p in a["model"].items():
        assert torch.equal(p, b["model"][name]), name


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "kfac", "asdl-seng"])
def test_train_script_runs_the_baselines(optimizer: str, capsys):
    from examples.train import main

    acc = main(
        [
            "--optimizer",
            optimizer,
            "--train-limit",
            "1024",
            "--test-limit",
            "1000",
            "--batch-size",
            "64",
            "--curvature-interval",
            "5",
            "--no-progress",
        ]
    )
    assert f"({optimizer}, cnn, 1 epoch(s), 1 rank(s))" in capsys.readouterr().out
    assert acc > 0.45  # 16 steps; chance is 0.1


def test_augment_is_a_shifted_crop_or_its_mirror():
    from examples.data import MEAN, STD, augment

    x = torch.randn(64, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), value=-MEAN / STD)
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)
    assert not torch.equal(out, x)


def test_benchmark_interpolates_the_time_to_target_and_picks_the_soonest_point():
    from examples.bench_converge import best, to_target

    def rows(*accs):
        return [
            {"epoch": e + 1, "test_acc": a, "train_time_s": 10.0 * (e + 1)}
            for e, a in enumerate(accs)
        ]

    # between the evaluation at 80% (epoch 1, 10 s) and the one at 91% (epoch 2, 20 s)
    assert to_target(rows(0.8, 0.91, 0.93), 0.9) == pytest.approx((1 + 1 / 1.1, 10 + 10 / 1.1))
    assert to_target(rows(0.92), 0.9) == (1.0, 10.0)  # the first evaluation: its own point
    assert to_target(rows(0.8, 0.85), 0.9) is None
    grid = {
        "slow": rows(0.8, 0.91, 0.95),
        "fast": rows(0.92, 0.93, 0.94),
        "never": rows(0.5, 0.6, 0.89),
    }
    assert best(grid, 0.9)[0] == "fast"
    assert best({"a": rows(0.5, 0.7), "b": rows(0.8, 0.6)}, 0.9)[0] == "b"  # most accurate
    # a loss is reached from above: between 3.0 (step 50, 10 s) and 2.0 (step 100, 20 s)
    losses = [
        {"step": 50 * (i + 1), "val_loss": v, "train_time_s": 10.0 * (i + 1)}
        for i, v in enumerate((3.0, 2.0, 1.5))
    ]
    assert to_target(losses, 2.5, "val_loss", "step") == pytest.approx((75.0, 15.0))
    assert to_target(losses, 1.0, "val_loss", "step") is None


@pytest.mark.parametrize(
    "flags",
    [
        ("--lr", "0.1"),
        ("--lr", "4e-4", "--damping-diagonal", "adam"),
        ("--lr", "4e-4", "--damping-diagonal", "adam", "--fisher", "mc"),
    ],
    ids=["identity", "adam-diagonal", "adam-diagonal-mc"],
)
def test_language_model_example_reads_the_python_docs_and_learns(tmp_path: Path, flags):
    # 40 steps of lm.py: the corpus split by file, a loss that falls from ln 256 (2.9 after
    # 40 steps here with λI, 2.8 with Adam's diagonal).
    out = tmp_path / "lm.jsonl"
    subprocess.run(
        [
            sys.executable,
            "examples/lm.py",
            "--optimizer",
            "seng",
            *flags,
            "--steps",
            "40",
            "--eval-every",
            "20",
            "--eval-windows",
            "64",
            "--curvature-interval",
            "10",
            "--metrics",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert rows[0]["val_loss"] > 5.0 and rows[-1]["val_loss"] < 4.0  # ln 256 = 5.55


def test_benchmark_names_runs_by_every_flag_that_differs():
    from examples.bench_converge import METHODS, REGIMES, Method, points, run_name

    seng = Method("SENG", ("--optimizer", "seng", "--variant", "blockdiag"), ())
    lagged = Method("SENG", ("--optimizer", "seng", "--variant", "lagged"), ())
    flags = {"--lr": "0.05", "--epochs": "3"}
    # a blockdiag and a lagged run of one point must not share (and reuse) one metrics file
    assert run_name(REGIMES[0], seng, flags, 0) != run_name(REGIMES[0], lagged, flags, 0)
    assert run_name(REGIMES[0], seng, flags, 0) != run_name(REGIMES[0], seng, flags, 1)
    runs = [(r, m, p) for r in REGIMES for m in METHODS for p in points(r, m.grid)]
    assert len({run_name(r, m, dict(p), 0) for r, m, p in runs}) == len(runs)
    # every point at every lr scale and epoch budget, the lr scaled as the flag says
    sgd, large = METHODS[0], REGIMES[1]
    tried = points(large, sgd.grid[:1])
    assert len(tried) == len(large.lr_scales) * len(large.epochs)
    assert [float(dict(p)["--lr"]) for p in tried[:: len(large.epochs)]] == pytest.approx(
        [float(dict(sgd.grid[0])["--lr"]) * x for x in large.lr_scales]
    )
    assert dict(tried[0])["--epochs"] == str(large.epochs[0])


def test_resnet20_is_he_et_al_s_size_and_seng_preconditions_every_layer():
    from examples.models import resnet20
    from examples.train import skip_layers
    from seng_dist import SENG

    model = resnet20(in_channels=1)
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(convs) == 1 + 18 + 2 + 1  # stem, 9 blocks × 2, two 1×1 shortcuts, head
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == len(convs) - 1  # one after every convolution
    opt = SENG(model)
    assert {b.weight for b in opt.blocks} == {m.weight for m in convs + bns}
    assert all(b.path == "explicit" for b in opt.blocks if b.module in bns)
    # train.py --skip-layers BatchNorm2d: the class, by its torch.nn name
    opt = SENG(model, skip_layers=skip_layers("BatchNorm2d, fc"))
    assert {b.weight for b in opt.blocks} == {m.weight for m in convs[:-1]}


def test_two_rank_checkpoint_resumes_on_one_rank_rebuilding_the_curvature(tmp_path: Path):
    common = [
        "--train-limit",
        "1024",
        "--test-limit",
        "1000",
        "--curvature-interval",
        "5",
        "--no-progress",
    ]
    _torchrun(common + ["--batch-size", "32", "--epochs", "1", "--checkpoint", "c.pt"], tmp_path)
    # One rank with twice the per-rank batch keeps the global batch of 64.
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py")]
        + common
        + ["--batch-size", "64", "--epochs", "2", "--resume", "c.pt", "--checkpoint", "c.pt"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "holds the curvature of 2 ranks and this job has 1" in done.stderr
    assert "(seng, cnn, 2 epoch(s), 1 rank(s))" in done.stdout
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    assert [r["world"] for r in ckpt["history"]] == [2, 1]
    assert ckpt["history"][1]["test_acc"] > 0.6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--epochs", "-1"], "--epochs must be a positive integer"),
        (["--timeout", "0"], "--timeout must be a positive number of seconds"),
        (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
        (["--engine", "nccl"], "invalid choice: 'nccl'"),
        (
            ["--train-limit", "100", "--batch-size", "128"],
            "--batch-size 128 on 1 rank(s) needs at least 128 training images, got 100",
        ),
        (
            ["--optimizer", "sgd", "--lr", "1e12", "--train-limit", "256"],
            "training diverged in epoch 1: ",
        ),
    ],
)
def test_train_script_rejects_bad_arguments_naming_them(argv, message, capsys):
    from examples.train import main

    with pytest.raises(SystemExit) as exc:
        main(argv + ["--no-progress"])
    assert message in str(exc.value.code) + capsys.readouterr().err


def test_resume_with_other_seng_settings_names_them(tmp_path: Path):
    from examples.train import main

    args = ["--train-limit", "256", "--test-limit", "200", "--no-progress"]
    main(args + ["--checkpoint", str(tmp_path / "c.pt")])
    with pytest.raises(
        ValueError, match="saved with other SENG settings: explicit_threshold=65536 \\(here 0\\)"
    ):
        main(
            args
            + ["--resume", str(tmp_path / "c.pt"), "--explicit-threshold", "0", "--epochs", "2"]
        )
    # the variant does not shape the curvature: a blockdiag run resumes as lagged
    main(args + ["--resume", str(tmp_path / "c.pt"), "--variant", "lagged", "--epochs", "2"])


def test_direction_diagnostic_compares_every_layer_with_its_gradient(tmp_path: Path):
    import json

    from examples.diagnose_direction import main

    main(["--damping", "1", "--train-limit", "512", "--every", "2", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "direction.jsonl").read_text().splitlines()]
    layers = {r["layer"] for r in rows}
    assert len(layers) == 4 and len(rows) == 4 * 2  # 4 steps of 128, measured on steps 0 and 2
    # an exact (explicit, unsketched: n < sketch_size) SENG step is never longer than the damped
    # gradient step, and points downhill
    exact = [r for r in rows if r["layer"].split()[0] in ("features.0", "classifier.3")]
    assert len(exact) == 4
    assert all(0.0 < r["step_kept"] <= 1.0 + 1e-5 and r["cosine"] > 0.0 for r in exact)
    assert "| 1 | features.0 (explicit) |" in (tmp_path / "direction.md").read_text()


def test_communication_benchmark_counts_overlapped_rounds_and_writes_its_table(tmp_path: Path):
    import json

    done = subprocess.run(
        [
            sys.executable,
            "examples/bench_comm.py",
            "--worlds",
            "2",
            "--reps",
            "1",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--width",
            "8",
            "--batch-size",
            "8",
            "--bucket-size-mb",
            "0.05",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        r["setup"]: r for r in json.loads((tmp_path / "bench_comm_2ranks.json").read_text())["rows"]
    }
    assert (rows["SENG lagged"]["rounds"], rows["SENG lagged"]["collectives"]) == (1, 1)
    overlapped = rows["SENG lagged, overlap"]
    assert overlapped["rounds"] == 1 and overlapped["collectives"] > 1
    # The same payload, in buckets.
    assert overlapped["bytes"] == rows["SENG lagged"]["bytes"]
    assert rows["SENG blockdiag, overlap"]["rounds"] == 2
    assert rows["SENG lagged, overlap, bf16 buffer"]["bytes"] * 2 == overlapped["bytes"]
    assert "| SENG lagged, overlap |" in (tmp_path / "bench_comm_2ranks.md").read_text()


def test_shard_benchmark_counts_halved_state_and_gradients_on_two_ranks(tmp_path: Path):
    """bench_shard.py's tables on 2 ranks: ZeRO-1 halves SENG's state (whole layers per owner:
    within a tenth of half), ZeRO-2 its .grad too, and ZeRO-2's lagged step sends the ring bytes
    of the unsharded one (its flags ride in every segment: within 2%)."""
    import json

    done = subprocess.run(
        [sys.executable, "examples/bench_shard.py", "--worlds", "2", "--reps", "1"]
        + ["--steps", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "shard_2ranks.json").read_text())
    for model in ("ResNet-20", "byte LM"):
        rows = {r["method"]: r for r in report["memory"][model][0]}
        plain, zero1, zero2 = rows["SENG"], rows["SENG ZeRO-1"], rows["SENG ZeRO-2"]
        assert 0.4 < zero1["state"] / plain["state"] < 0.6, (zero1, plain)
        assert zero1["grads"] == plain["grads"] and 0.4 < zero2["grads"] / plain["grads"] < 0.6
        assert zero2["curvature"] == plain["curvature"]  # per rank, never sharded
        timing = {r["method"]: r for r in report["timing"][model]}
        assert timing["SENG ZeRO-2"]["wire"] <= 1.02 * timing["SENG"]["wire"]
        assert timing["SENG ZeRO-1"]["collectives"] == timing["SENG"]["collectives"] + 1
    assert "| ResNet-20 | SENG ZeRO-2 |" in (tmp_path / "shard_2ranks.md").read_text()


def test_qkv_diagnostic_compares_one_block_with_three(tmp_path: Path):
    import json

    from examples.diagnose_qkv import main

    main(
        [
            "--at",
            "0",
            "--steps",
            "10",
            "--context",
            "16",
            "--eval-windows",
            "8",
            "--dampings",
            "1",
            "--adam-dampings",
            "1",
            "--steps-grid",
            "1",
            "10",
            "--adam-steps-grid",
            "1e-3",
            "1e-2",
            "--out",
            str(tmp_path),
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "qkv.jsonl").read_text().splitlines()]
    assert [(r["step"], r["D"]) for r in rows] == [(0, "I"), (0, "Adam's")]
    for r in rows:
        assert r["relative difference"] > 0.0  # the Q-K-V cross terms change the direction
        # at initialisation each direction, at its best step, lowers the held-out loss
        assert all(r[w]["loss"] < r["loss"] for w in ("one block", "three blocks", "gradient"))
    assert "| 0 | Adam's | 1 |" in (tmp_path / "qkv.md").read_text()


def test_the_language_model_has_every_linear_and_projection_preconditioned(recwarn):
    import torch.nn.functional as F

    from examples.lm import ByteLM
    from seng_dist import SENG

    torch.manual_seed(0)
    model = ByteLM(width=32, layers=2, context=16)
    opt = SENG(model, curvature_update_interval=1)
    x, y = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    opt.step()
    table = opt.describe().split("\n\n")[0]  # the parameters' table
    rows = [line.split() for line in table.splitlines()[2:]]
    kinds = {r[1]: {x[3] for x in rows if x[1] == r[1]} for r in rows}
    assert kinds["MultiheadAttention"] <= {"explicit", "implicit"}
    assert kinds["Linear"] <= {"explicit", "implicit"}  # linear1, linear2, head
    assert kinds["NonDynamicallyQuantizableLinear"] <= {"explicit", "implicit"}  # out_proj
    assert kinds["LayerNorm"] <= {"explicit", "implicit"}  # norm1, norm2, the final norm
    assert kinds["Embedding"] == {"fallback"}
    # per layer in_proj, out_proj, linear1, linear2, norm1, norm2; the final norm, the head
    assert len(opt.blocks) == 2 * 6 + 2 and all(c.ready for c in opt.curvature.curvatures)
    assert not [w for w in recwarn if "no curvature" in str(w.message)]


def test_autoencoder_benchmark_tunes_every_method_and_reads_targets_off_the_first_order_ones(
    tmp_path: Path,
):
    from examples import bench_autoencoder

    bench_autoencoder.main(
        ["--smoke", "--out", str(tmp_path), "--methods", "SGD", "Adam", "SENG mc adam-diag"]
    )
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 12  # 4 points per method, the tuning seed only under --smoke
    best = min(
        read_metrics(p)[-1]["test_loss"] for p in runs if p.name.startswith(("SGD_", "Adam_"))
    )
    table = (tmp_path / "results.md").read_text()
    assert f"Targets: {best * 1.02:.2f} and {best * 1.10:.2f}" in table
    assert table.count("\n| SENG mc adam-diag |") == 1


def test_plain_step_benchmark_times_every_optimizer_interleaved():
    from examples import bench_plain_step

    res = bench_plain_step.measure("mlp", reps=2)
    assert set(res) == {"sgd", "adam", "seng", "seng-adam"}
    assert all(0 < r["step_only"] < r["step"] for r in res.values())
    assert "| mlp | seng |" in bench_plain_step.table({"mlp": res}, 2)
