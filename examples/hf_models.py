"""What SENG preconditions in small transformers models, and their loss after a few steps.

    python examples/hf_models.py                        # coverage, then the losses
    python examples/hf_models.py --coverage-only

Coverage: for tiny BERT, GPT-2 and Llama sequence classifiers and a Mixtral one (a sparse
mixture-of-experts layer) built from their configs (``integrations/transformers/train.py``)
and a ViT built from torch.nn modules (``examples/models.py``), and GPT-2 small and BERT-base at
their published sizes (random weights, coverage only), the share of trainable elements
on each path (a block solved explicitly or implicitly, or the fallback rule), and the largest
fallback layer types. Losses: each model trained for ``--steps`` steps by AdamW, SGD and SENG's
recommended setting for Transformers on one seed, without tuning — a few numbers, not a
benchmark: the language models on the Python documentation's windows, the ViT on
Fashion-MNIST; the held-out loss at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from data import load_fashion_mnist  # noqa: E402
from models import ViT  # noqa: E402

from seng_dist import SENG  # noqa: E402


def _integration() -> Any:
    """``integrations/transformers/train.py`` (loaded by path: ``train`` names other scripts)."""
    spec = importlib.util.spec_from_file_location(
        "seng_transformers_integration", ROOT / "integrations" / "transformers" / "train.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HF = _integration()


def mixtral(seed: int = 0) -> nn.Module:
    """A tiny ``MixtralForSequenceClassification``: 4 experts, 2 per token."""
    from transformers import MixtralConfig, MixtralForSequenceClassification

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=HF.PAD + 1,
        hidden_size=HF.WIDTH,
        intermediate_size=2 * HF.WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_labels=len(HF.PARTS) + 1,
        pad_token_id=HF.PAD,
    )
    return MixtralForSequenceClassification(config)


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ViT()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "BERT": lambda: HF.make_model("bert"),
    "GPT-2": lambda: HF.make_model("gpt2"),
    "Llama": lambda: HF.make_model("llama"),
    "Mixtral (MoE)": mixtral,
    "ViT (nn modules)": vit,
}


def full_size(name: str) -> nn.Module:
    """GPT-2 small (124M) or BERT-base at their published sizes, random weights: coverage only."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2ForSequenceClassification(GPT2Config(num_labels=4, pad_token_id=0))
    return BertForSequenceClassification(BertConfig(num_labels=4))


#: coverage only (too large to train here)
FULL_SIZE: dict[str, Callable[[], nn.Module]] = {
    "GPT-2 small, 124M": lambda: full_size("gpt2"),
    "BERT-base, 110M": lambda: full_size("bert"),
}


def coverage(model: nn.Module) -> tuple[dict[str, float], list[tuple[str, int]]]:
    """The share of trainable elements per path, and the fallback's elements per layer type."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SENG(model)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    total = sum(p.numel() for p in trainable.values())
    shares: Counter[str] = Counter()
    in_block = set()
    for b in opt.blocks:
        for p in b.params:
            shares[b.path] += p.numel()
            in_block.add(id(p))
    types: Counter[str] = Counter()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in in_block:
                types[type(module).__name__] += p.numel()
    shares["fallback"] = total - shares["explicit"] - shares["implicit"]
    opt.retire("coverage measured")
    return {k: shares[k] / total for k in ("explicit", "implicit", "fallback")}, types.most_common(
        3
    )


def text_batches(batch: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    data = HF.DocWindows("train", 10**9, seed)
    i = 0
    while True:
        yield torch.utils.data.default_collate([data[i + k] for k in range(batch)])
        i += batch


def image_batches(batch: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    x, y = load_fashion_mnist(train=True)
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(x), (batch,), generator=g)
        yield {"pixels": x[idx], "labels": y[idx]}


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "pixels" in batch:
        return F.cross_entropy(model(batch["pixels"]), batch["labels"])
    return model(**batch).loss


def held_out(model: nn.Module, name: str) -> float:
    """The loss on 1,000 held-out samples (test images, or windows of held-out files)."""
    if name.startswith("ViT"):
        x, y = load_fashion_mnist(train=False)
        batch = {"pixels": x[:1000], "labels": y[:1000]}
    else:
        data = HF.DocWindows("eval", 1000, seed=12345)
        batch = torch.utils.data.default_collate([data[i] for i in range(1000)])
    model.eval()
    with torch.no_grad():
        loss = float(loss_of(model, batch))
    model.train()
    return loss


#: one seed, no tuning: AdamW and SGD at usual learning rates, SENG at its recommended
#: setting for Transformers (README, "How to tune": Adam's diagonal, lr/λ a tenth of AdamW's)
ADAMW_LR, SGD_LR = 2e-3, 0.1


def optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=ADAMW_LR)
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mostly-first-order warning: coverage shows it
        return SENG(model, **HF.seng_settings(ADAMW_LR))


def train(name: str, method: str, steps: int, batch: int) -> tuple[float, float]:
    """Held-out loss after ``steps`` steps, and seconds per step."""
    model = MODELS[name]()
    opt = optimizer(method, model)
    batches = (image_batches if name.startswith("ViT") else text_batches)(batch, seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, next(batches)).backward()
        opt.step()
    per_step = (time.perf_counter() - start) / steps
    if isinstance(opt, SENG):
        opt.retire("run over")
    return held_out(model, name), per_step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coverage-only", action="store_true")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    print("| model | explicit | implicit | fallback | largest fallback types (elements) |")
    print("|---|---|---|---|---|")
    for name, make in {**MODELS, **FULL_SIZE}.items():
        shares, types = coverage(make())
        listed = ", ".join(f"{t} ({n:,})" for t, n in types) or "-"
        cells = " | ".join(f"{100 * shares[k]:.1f}%" for k in ("explicit", "implicit", "fallback"))
        print(f"| {name} | {cells} | {listed} |", flush=True)
    if args.coverage_only:
        return
    print(f"\nHeld-out loss after {args.steps} steps of batch {args.batch_size} (seconds/step)\n")
    methods = ("AdamW", "SGD", "SENG")
    print("| model | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for name in MODELS:
        cells = []
        for method in methods:
            loss, per_step = train(name, method, args.steps, args.batch_size)
            cells.append(f"{loss:.4f} ({per_step:.3f} s)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
