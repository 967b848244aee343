"""Shared models and helpers for the tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seng_dist import SENG


class MixedNet(nn.Module):
    """Conv2d (stride 2, padding) + BatchNorm + a Linear on a token sequence + a Linear head."""

    def __init__(self, channels: int = 4, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)
        self.seq = nn.Linear(channels, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x)))  # (B, C, 4, 4)
        tokens = h.flatten(2).transpose(1, 2)  # (B, 16, C): a sequence of 16 tokens
        t = torch.relu(self.seq(tokens))  # sequence Linear, κ = 16
        return self.head(t.mean(1))


LAYERS = ["conv", "bn", "seq", "head"]


def make_mixed(seed: int = 0) -> MixedNet:
    torch.manual_seed(seed)
    m = MixedNet()
    with torch.no_grad():  # non-trivial running statistics for eval-mode BatchNorm
        for stat, low, high in ((m.bn.running_mean, -0.2, 0.2), (m.bn.running_var, 0.5, 1.5)):
            assert stat is not None  # BatchNorm2d tracks running statistics by default
            stat.uniform_(low, high)
    return m.eval()


class TinyEncoder(nn.Module):
    """Two nn.TransformerEncoderLayer (pre-LN, no dropout) in either batch layout."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(5, 8)
        layer = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x[..., :-1])
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        if self.batch_first:
            return self.head(self.encoder(h, mask=mask, is_causal=True).mean(1))
        out = self.encoder(h.transpose(0, 1), mask=mask, is_causal=True)
        return self.head(out.mean(0))


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` (``transformers.pytorch_utils``), reproduced exactly: a Linear
    whose weight is stored transposed, ``(nx, nf)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


class GPT2Block(nn.Module):
    """GPT-2's pre-LN block: ``Conv1D`` projections (a fused query-key-value one), causal
    attention through ``scaled_dot_product_attention``, a GELU feed-forward."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = Conv1D(3 * width, width)
        self.attn_proj = Conv1D(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = Conv1D(2 * width, width)
        self.mlp_proj = Conv1D(width, 2 * width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.c_attn(self.ln_1(h)).split(w, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.attn_proj(a.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(h))))


class TinyGPT2(nn.Module):
    """GPT-2's layout from the pieces above, a final ``nn.RMSNorm``; batch first, on the
    tokens of :func:`tokens`."""

    def __init__(self, width: int = 8, heads: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.blocks = nn.Sequential(*(GPT2Block(width, heads) for _ in range(layers)))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x[..., :-1]))).mean(1))


def tokens(n: int = 6, t: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, 6)`` tokens, the last channel a padding flag (set on every other sample's last
    two tokens), and labels of 3 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 6, generator=g)
    x[..., -1] = 0.0
    x[::2, -2:, -1] = 1.0  # every other sample: its last two keys are padding
    return x, torch.randint(0, 3, (n,), generator=g)


def batch(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s 8 samples at step ``step`` (MixedNet's inputs)."""
    return batch(8, seed=1000 * step + rank)


def train_steps(model: nn.Module, opt: SENG, ks: range, rank: int) -> None:
    """Steps ``ks`` of plain training on rank ``rank``'s shards."""
    for k in ks:
        x, y = shard(k, rank)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def seng_directions(
    opt: SENG,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    backward: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The direction SENG takes on (x, y), per block, read off an update with lr=1 from θ=0.

    ``backward`` runs the forward and backward pass (default: cross-entropy on (x, y)). The
    parameters are zeroed after it so that θ_new = 0 + d holds d exactly in fp32, and
    restored afterwards.
    """
    opt.zero_grad()
    if backward is None:
        F.cross_entropy(model(x), y).backward()
    else:
        backward()
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt.step()
    out = {b.name: b.param_matrix() for b in opt.blocks}
    out.update(
        {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if n.rsplit(".", 1)[0] not in out
        }
    )
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved, strict=True):
            p.copy_(s)
    return out


#: exact solves on one path, as the reference computes them (damping 0.3, one step of lr 1)
EXACT_EXPLICIT = dict(explicit_threshold=10**9, sketch_size=None, lr=1.0, damping=0.3, momentum=0.0)
EXACT_IMPLICIT = dict(
    explicit_threshold=0,
    sketch_size=None,
    factor_rank=None,
    factor_sketch_size=None,
    uc="exact",
    lr=1.0,
    damping=0.3,
    momentum=0.0,
)


#: float32's unit roundoff
U32 = 2.0**-24
#: The relative rounding of a float32 sum of up to 1,024 terms, as long as these tests' sums
#: get (a weight gradient over a batch's positions, a Gram matrix over a block's entries):
#: rounding errors of random sign grow like √n·u (Higham & Mary, 2019), 32u at n = 1,024.
SUM_ROUNDING = 32 * U32


def solve_bound(u: torch.Tensor, damping: float, diagonal: torch.Tensor | None = None) -> float:
    """How far SENG's float32 direction ``-(UUᵀ + λD)⁻¹g`` of a block can be from the float64
    reference, relatively: ``u`` the block's float64 per-sample gradients (B, ...), every
    sample in the curvature; ``diagonal`` D (a sample's shape), or I.

    With W = D^-½, Ũ = U W and K̃ = ŨŨᵀ, d = W x where (ŨᵀŨ + λI) x = W g. To first order
    the relative error is cond(K̃ + λI) = 1 + ‖K̃‖/λ times the system's relative rounding: Ũ
    twice and W g once, a float32 gradient's rounding each, and the solver's own sums once
    more, each within SUM_ROUNDING. A λ small against ‖K̃‖ (or a D small where |g| is) makes
    cond large, up to 250 in these tests, and a fixed bound such as 1e-5 then holds on some
    machines and not others (0.4-17 u·cond measured on an AVX2 machine under the kernels
    ci/portability.sh varies, the most where cond is near 1).
    """
    rows = u.reshape(u.shape[0], -1)
    if diagonal is not None:
        rows = rows / diagonal.reshape(1, -1).sqrt()
    gram = rows @ rows.T / rows.shape[0]
    return 4 * SUM_ROUNDING * (1 + float(torch.linalg.eigvalsh(gram).max()) / damping)


def check_exact(
    model: nn.Module, layers: list[str], x: torch.Tensor, y: torch.Tensor, **settings: object
) -> SENG:
    """SENG built with ``settings`` (default: :data:`EXACT_EXPLICIT`) takes the float64
    reference's direction on every named block, to float32's rounding (:func:`solve_bound`);
    returns the optimizer."""
    from seng_dist.reference import (
        block_matrix,
        per_sample_gradients,
        reference_directions,
        relative_error,
    )

    opt = SENG(model, **(settings or EXACT_EXPLICIT))
    assert {b.name for b in opt.blocks} >= set(layers)
    ref = reference_directions(model, x, y, layers, 0.3)
    grads = per_sample_gradients(model, x, y)
    d = seng_directions(opt, model, x, y)
    for layer in layers:
        bound = solve_bound(block_matrix(grads, layer), 0.3)
        assert relative_error(d[layer], ref[layer]) < bound, layer
    return opt


@pytest.fixture
def mixed():
    return make_mixed()


def displacement_error(run: list[dict], ref: list[dict], start: dict) -> float:
    """The largest relative distance between ``run``'s and ``ref``'s parameters (one dict per
    step), measured from ``start``: ``‖(run - start) - (ref - start)‖ / ‖ref - start‖``."""
    worst = 0.0
    for got, want in zip(run, ref, strict=True):
        a = torch.cat([(got[n] - start[n]).reshape(-1) for n in start])
        b = torch.cat([(want[n] - start[n]).reshape(-1) for n in start])
        worst = max(worst, float((a - b).norm() / b.norm()))
    return worst


TESTS = Path(__file__).resolve().parent


def requires_engine(module: str, install: str) -> pytest.MarkDecorator:
    """Skip (saying how to install it) when an engine package is missing; ci/test.sh sets
    SENG_REQUIRE_ENGINES=1, and there a missing engine fails instead."""
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(
        missing and os.environ.get("SENG_REQUIRE_ENGINES") != "1",
        reason=f"{module} is not installed (bash {install})",
    )


def python_output(code: str) -> str:
    """Standard output of ``code`` run by a fresh interpreter that sees tests/ and the repo."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    ).stdout


def launch_jobs(
    launcher: list[str],
    worker: str,
    jobs: dict,
    tmp: Path,
    np: int,
    extra_env: dict | None = None,
    timeout: float = 300,
) -> list[dict]:
    """Run ``launcher + [python, tests/<worker>, jobs.pt, tmp]`` (an engine's own launcher
    starting ``np`` ranks that each save ``tmp/<rank>.pt``), bounded by ``timeout``; return
    every rank's result. A failure shows the launcher's output."""
    torch.save(jobs, tmp / "jobs.pt")
    cmd = launcher + [sys.executable, str(TESTS / worker), str(tmp / "jobs.pt"), str(tmp)]
    env = dict(
        os.environ, **(extra_env or {}), PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)])
    )
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{launcher[0]} did not finish in {timeout} s") from err
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(np)]
