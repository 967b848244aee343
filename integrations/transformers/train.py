"""SENG in HuggingFace's ``Trainer``: a small transformers model, built from its config (no
download), classifies 64-byte windows of the Python documentation by the part they come from.

    python integrations/transformers/train.py --model gpt2 --optimizer seng
    torchrun --standalone --nproc_per_node 2 integrations/transformers/train.py --model llama
    torchrun --standalone --nproc_per_node 2 integrations/transformers/train.py --model bert \\
        --deepspeed integrations/transformers/ds_config_zero0.json

The text is the reStructuredText sources of Debian's ``python3.11-doc`` (``examples/lm.py``'s
corpus); the label is the part of the documentation a window comes from (``library``, ``c-api``,
``whatsnew``, everything else), drawn evenly; every tenth file is held out for evaluation. The
bytes are the tokens (a vocabulary of 256 and a padding id).

SENG reaches the ``Trainer`` as ``optimizers=(SENG(model, ...), scheduler)``. With
``--deepspeed`` the ``Trainer`` drops an optimizer passed that way (transformers' DeepSpeed
set-up builds its own through ``Trainer.create_optimizer``), so :class:`SENGTrainer` builds
SENG there instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer import OPTIMIZER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from lm import SOURCES  # noqa: E402

from seng_dist import SENG  # noqa: E402

PARTS = ("library", "c-api", "whatsnew")  # and a fourth label: every other part
PAD = 256
WINDOW = 64
WIDTH = 64


def make_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny ``*ForSequenceClassification`` of 4 labels over bytes, from its config."""
    model = _build(name, seed)
    # The Trainer takes a forward with **kwargs for a loss normalised by the global item
    # count: it multiplies the loss by the number of processes and skips accumulation's 1/N.
    # A sequence classifier averages its own loss, so without this its gradient on 2 ranks
    # is twice the mean (measured against 1 process): AdamW hardly notices, SGD and SENG do.
    model.accepts_loss_kwargs = False
    return model


def _build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    common: dict[str, Any] = dict(vocab_size=PAD + 1, num_labels=len(PARTS) + 1, pad_token_id=PAD)
    if name == "gpt2":
        return GPT2ForSequenceClassification(
            GPT2Config(n_embd=WIDTH, n_layer=2, n_head=4, n_positions=WINDOW, **common)
        )
    layers = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4)
    if name == "bert":
        return BertForSequenceClassification(
            BertConfig(
                intermediate_size=4 * WIDTH, max_position_embeddings=WINDOW, **layers, **common
            )
        )
    return LlamaForSequenceClassification(
        LlamaConfig(intermediate_size=4 * WIDTH, num_key_value_heads=4, **layers, **common)
    )


class DocWindows(torch.utils.data.Dataset):
    """``n`` windows of ``WINDOW`` bytes, window ``i`` drawn with seed ``(seed, i)``: a part (4
    labels, evenly), a file of it, a start. ``split`` "train" or "eval" (every tenth file)."""

    def __init__(self, split: str, n: int, seed: int = 0, root: Path = SOURCES) -> None:
        files = sorted(root.rglob("*.rst.txt"))
        if not files:
            raise SystemExit(f"no .rst.txt files under {root}: apt-get install python3.11-doc")
        held = files[::10]
        chosen = held if split == "eval" else [f for f in files if f not in held]
        self.texts: list[list[bytes]] = [[] for _ in range(len(PARTS) + 1)]
        for f in chosen:
            part = f.relative_to(root).parts[0]
            data = f.read_bytes()
            if len(data) > WINDOW:
                self.texts[PARTS.index(part) if part in PARTS else len(PARTS)].append(data)
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = int(torch.randint(len(self.texts), (), generator=g))
        texts = self.texts[label]
        text = texts[int(torch.randint(len(texts), (), generator=g))]
        start = int(torch.randint(len(text) - WINDOW, (), generator=g))
        ids = torch.frombuffer(bytearray(text[start : start + WINDOW]), dtype=torch.uint8)
        return {"input_ids": ids.long(), "labels": label}


def seng_settings(adamw_lr: float, **extra: Any) -> dict[str, Any]:
    """SENG's recommended settings for a Transformer whose AdamW lr is ``adamw_lr`` (README,
    "How to tune"): damped by Adam's diagonal, lr/λ a tenth of AdamW's lr, AdamW's β₂."""
    return dict(
        lr=adamw_lr / 10,
        damping=1.0,
        momentum=0.9,
        damping_diagonal="adam",
        damping_beta2=0.999,
        **extra,
    )


class SENGTrainer(Trainer):
    """A ``Trainer`` that builds SENG in ``create_optimizer``, where transformers' DeepSpeed
    set-up asks for its optimizer: with a stage-0 ds_config without an ``optimizer`` section
    the engine averages the gradients in backward and SENG sends only its corrections
    (``comm="deepspeed"``, ``grads_averaged=True``)."""

    def __init__(self, *args: Any, seng_settings: dict[str, Any], **kwargs: Any) -> None:
        self.seng_settings = seng_settings
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            engine = self.is_deepspeed_enabled
            if engine:
                import deepspeed

                if not deepspeed.comm.is_initialized():  # over a torch group started earlier
                    deepspeed.init_distributed()
            seng = SENG(
                self.model if model is None else model,
                comm="deepspeed" if engine else None,
                grads_averaged=True if engine else None,
                **self.seng_settings,
            )
            # engine.save_checkpoint keeps rank 0's state: gather every rank's curvature.
            seng.state_dict_all_ranks = engine
            self.optimizer = seng
        return self.optimizer


class SENGCheckpoints(TrainerCallback):
    """Makes the ``Trainer``'s checkpoints hold every rank's SENG curvature, so that a run
    resumed on as many ranks continues bit for bit: the ``Trainer`` saves the optimizer's state
    on rank 0 only, whose curvature the other ranks would drop and rebuild. After each save,
    every rank joins one ``state_dict()`` with ``state_dict_all_ranks`` and rank 0 replaces the
    checkpoint's optimizer file with it (in ``args.output_dir``; a checkpoint pushed to the Hub
    during the save keeps rank 0's). Not needed under ``deepspeed=`` (the engine saves on
    every rank; :class:`SENGTrainer` turns ``state_dict_all_ranks`` on)."""

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        seng = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
        if (
            not isinstance(seng, SENG)
            or args.deepspeed
            or args.save_only_model  # the checkpoint holds no optimizer state
            or seng.communicator.world_size == 1
        ):
            return
        before = seng.state_dict_all_ranks
        seng.state_dict_all_ranks = True
        try:
            saved = seng.state_dict()  # a collective: every rank is here
        finally:
            seng.state_dict_all_ranks = before
        target = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        target = target / OPTIMIZER_NAME
        if args.should_save and target.exists():  # the Trainer's own file, replaced whole
            partial = target.with_suffix(".partial")
            torch.save(saved, partial)
            os.replace(partial, target)


def build_trainer(args: argparse.Namespace, model: nn.Module) -> Trainer:
    """The ``Trainer`` of ``args``: SENG (through ``optimizers=`` or :class:`SENGTrainer`),
    AdamW or SGD, a linear warm-up then cosine schedule."""
    settings = TrainingArguments(
        args.output_dir,
        per_device_train_batch_size=args.batch_size // int(os.environ.get("WORLD_SIZE", "1")),
        gradient_accumulation_steps=args.accumulate,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.steps // 20,
        logging_steps=args.steps // 5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        deepspeed=args.deepspeed,
    )
    data = DocWindows("train", args.steps * args.batch_size * args.accumulate, args.seed)
    common: dict[str, Any] = dict(model=model, args=settings, train_dataset=data)
    if args.optimizer == "seng":
        extra = dict(gradient_accumulation_steps=args.accumulate)
        if args.deepspeed:
            return SENGTrainer(**common, seng_settings=seng_settings(args.lr, **extra))
        # On several ranks the Trainer wraps the model in DDP, which averages the gradients.
        many = int(os.environ.get("WORLD_SIZE", "1")) > 1
        opt = SENG(model, grads_averaged=True if many else None, **seng_settings(args.lr, **extra))
        return Trainer(**common, optimizers=(opt, None), callbacks=[SENGCheckpoints()])
    if args.optimizer == "sgd":
        sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        return Trainer(**common, optimizers=(sgd, None))
    return Trainer(**common)  # AdamW, the Trainer's own


def evaluate(model: nn.Module, n: int = 512) -> tuple[float, float]:
    """Loss and accuracy on ``n`` held-out windows."""
    data = DocWindows("eval", n, seed=12345)
    batch = torch.utils.data.default_collate([data[i] for i in range(n)])
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    model.train()
    accuracy = (out.logits.argmax(-1) == batch["labels"]).float().mean()
    return float(out.loss), float(accuracy)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2", choices=("gpt2", "bert", "llama"))
    ap.add_argument("--optimizer", default="seng", choices=("seng", "adamw", "sgd"))
    ap.add_argument("--lr", type=float, default=None, help="AdamW's lr (SENG: a tenth)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32, help="global, split over ranks")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--deepspeed", default=None, help="a ds_config (stage 0, no optimizer)")
    ap.add_argument("--output-dir", default="/tmp/seng-trainer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = {"adamw": 2e-3, "seng": 2e-3, "sgd": 0.1}[args.optimizer]
    if args.deepspeed and args.optimizer != "seng":
        raise SystemExit("--deepspeed is for SENG here")
    model = make_model(args.model, args.seed)
    trainer = build_trainer(args, model)
    trainer.train()
    loss, accuracy = evaluate(model)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.model} {args.optimizer}: held-out loss {loss:.4f}, accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
