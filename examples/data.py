"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files, read locally).

Nothing is downloaded: a missing dataset raises an error that says how to install it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_ROOT = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
MEAN, STD = 0.2860, 0.3530  # training-set pixel statistics


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(
    train: bool, root: Path = DEFAULT_ROOT, cifar_style: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images ``(N, 1, 28, 28)`` and labels; ``cifar_style`` pads to 32×32 and
    repeats the channel to 3 for CIFAR-style networks."""
    prefix = "train" if train else "t10k"
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}: install it with "
            "'apt-get install -y dataset-fashion-mnist' or set FASHION_MNIST_DIR"
        )
    x = (_read_idx(images).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    y = _read_idx(labels).long()
    if cifar_style:
        x = F.pad(x, (2, 2, 2, 2), value=-MEAN / STD).expand(-1, 3, -1, -1).contiguous()
    return x, y


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation on a batch: a random ``pad``-pixel-shifted crop (the
    border filled with the background value) and a random horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-MEAN / STD)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)
