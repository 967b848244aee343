"""The example training script and data loader on the real Fashion-MNIST files."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.data import DEFAULT_ROOT, load_fashion_mnist

pytestmark = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist; "
           "ci/install.sh does it)")


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
    assert acc > 0.6  # chance is 0.1; 24 SENG steps on real data


def test_train_script_under_torchrun_with_two_gloo_ranks():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(root / "examples" / "train.py"), "--train-limit", "3072", "--batch-size",
           "32", "--curvature-interval", "5", "--variant", "lagged"]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("test accuracy:")]
    assert len(lines) == 1, done.stdout  # rank 0 only
    assert "2 rank(s)" in lines[0]
    assert float(lines[0].split()[2]) > 0.6  # 48 steps of global batch 64
