"""A small causal byte-level Transformer language model on real text: one training run.

    python examples/lm.py --optimizer adamw --lr 2e-3 --steps 600 --metrics adamw.jsonl
    torchrun --standalone --nproc_per_node 2 examples/lm.py --optimizer seng --variant lagged

The text is the Python documentation's reStructuredText sources shipped by Debian's
``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources``, 497 files, 11 MB): the files
in sorted order, every tenth held out for validation (a split by file), each file's bytes
followed by a zero byte. The model: byte embedding plus learned positions, pre-LN
``nn.TransformerEncoderLayer`` blocks with a causal mask, a final LayerNorm and a byte head.
Training: ``--batch-size`` windows of ``--context`` bytes drawn at random per step (every rank
its own), linear warm-up then cosine decay to 1% of the lr. The validation loss (mean
cross-entropy, nats per byte) is measured every ``--eval-every`` steps on fixed windows;
training time excludes it. With 2 ranks the global batch is ``--batch-size`` (split evenly).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seng_dist import SENG, kinds, register_layer_kind, schedules  # noqa: E402
from seng_dist.config import DampingDiagonal, Fisher, Variant  # noqa: E402

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
OPTIMIZERS = ("adamw", "sgd", "seng")
BETAS = (0.9, 0.95)  # AdamW's; SENG's Adam diagonal takes the same β₂


def load_corpus(root: Path = SOURCES) -> tuple[np.ndarray, np.ndarray, int]:
    """(train bytes, validation bytes, number of files): every tenth file (sorted) is held out."""
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no .rst.txt files under {root}: apt-get install python3.11-doc")
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    for i, f in enumerate(files):
        parts[i % 10 == 0].append(f.read_bytes() + b"\0")
    return (
        np.frombuffer(b"".join(parts[0]), dtype=np.uint8),
        np.frombuffer(b"".join(parts[1]), dtype=np.uint8),
        len(files),
    )


class ByteLM(nn.Module):
    """Pre-LN causal Transformer over bytes."""

    def __init__(
        self, width: int = 128, layers: int = 4, heads: int = 4, context: int = 128
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.embed(idx) + self.pos[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


def windows(data: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor, ...]:
    """Inputs and next-byte targets of the windows starting at ``starts``."""
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    w = torch.from_numpy(data[idx].astype(np.int64))
    return w[:, :-1], w[:, 1:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", default="seng", choices=OPTIMIZERS)
    ap.add_argument("--lr", type=float, default=None, help="peak lr (adamw 2e-3, else 0.3)")
    ap.add_argument("--damping", type=float, default=1.0, help="SENG's λ")
    ap.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="AdamW's decoupled decay; L2 for SGD and SENG (off by default: see bench_lm.py)",
    )
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    ap.add_argument("--batch-size", type=int, default=32, help="global, split over ranks")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--curvature-interval", type=int, default=50)
    ap.add_argument("--variant", default="blockdiag", choices=[v.value for v in Variant])
    ap.add_argument(
        "--damping-diagonal",
        default="identity",
        choices=[d.value for d in DampingDiagonal],
        help="SENG's damping λI or λ·diag(√v̂ + ε) (Adam's, β₂ as AdamW's)",
    )
    ap.add_argument(
        "--fisher",
        default="empirical",
        choices=[f.value for f in Fisher],
        help="SENG's Fisher: the empirical one, or 'mc' (next bytes drawn from the predictions)",
    )
    ap.add_argument(
        "--embedding",
        default="fallback",
        choices=("fallback", "block"),
        help="SENG's treatment of the byte embedding: the fallback rule (the default) or a "
        "block (seng_dist.kinds.EmbeddingKind, registered for this run)",
    )
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics", default=None, help="JSON lines, one row per evaluation")
    ap.add_argument("--label", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must split over {world} ranks")
    lr = args.lr if args.lr is not None else (2e-3 if args.optimizer == "adamw" else 0.3)
    train, val, files = load_corpus()
    torch.manual_seed(args.seed)
    model = ByteLM(args.width, args.layers, context=args.context)
    warmup = max(1, round(args.warmup * args.steps))
    lr_fn = schedules.linear_warmup(
        schedules.cosine(lr, 1, args.steps, final=lr * 0.01), warmup, lr * 0.01
    )
    opt: torch.optim.Optimizer
    if args.optimizer == "seng":
        if args.embedding == "block":
            register_layer_kind(nn.Embedding, kinds.EmbeddingKind())
        opt = SENG(
            model,
            lr=lr_fn,
            damping=args.damping,
            momentum=0.9,
            weight_decay=args.weight_decay,
            curvature_update_interval=args.curvature_interval,
            variant=args.variant,
            damping_diagonal=args.damping_diagonal,
            damping_beta2=BETAS[1],
            fisher=args.fisher,
            comm="torch" if world > 1 else "local",
        )
    elif args.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay
        )
    else:
        opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=BETAS, weight_decay=args.weight_decay
        )
    if args.optimizer != "seng" and world > 1:
        raise SystemExit("the baselines run on one process")
    local = args.batch_size // world
    rng = np.random.default_rng([args.seed, rank])
    val_starts = np.random.default_rng(12345).integers(
        0, len(val) - args.context - 1, args.eval_windows
    )
    rows, train_time = [], 0.0
    if rank == 0:
        print(
            f"corpus: {files} files, train {len(train):,} bytes, validation {len(val):,} "
            f"bytes; model {sum(p.numel() for p in model.parameters()):,} parameters",
            flush=True,
        )

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            losses = [
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                for x, y in (windows(val, s, args.context) for s in np.array_split(val_starts, 8))
            ]
        model.train()
        row = {
            "step": step,
            "tokens": step * args.batch_size * args.context,
            "val_loss": float(np.mean(losses)),
            "train_time_s": round(train_time, 2),
            "lr": lr_fn(max(step - 1, 0)),
            "world": world,
        }
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
            if args.metrics:
                Path(args.metrics).write_text("".join(json.dumps(r) + "\n" for r in rows))

    evaluate(0)
    for step in range(args.steps):
        t0 = time.perf_counter()
        if args.optimizer != "seng":
            for group in opt.param_groups:
                group["lr"] = lr_fn(step)
        x, y = windows(train, rng.integers(0, len(train) - args.context - 1, local), args.context)
        opt.zero_grad()
        logits = model(x)
        if args.optimizer == "seng" and args.fisher == "mc":
            opt.sample_fisher(logits)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"diverged at step {step}")
        train_time += time.perf_counter() - t0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
