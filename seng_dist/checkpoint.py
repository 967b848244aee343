"""What must match: between the ranks of a job, and between a checkpoint and the optimizer
that loads it; and the counters a checkpoint carries.

The settings come from :class:`~seng_dist.config.SENGConfig` (its ``fingerprint`` and the
settings marked ``curvature``); the structure is the list of preconditioned layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from .comm import Communicator
from .config import SENGConfig
from .curvature import BlockCurvature
from .layers import Block


@dataclass
class Counters:
    """The step counter and what the steps so far did (kept in the checkpoint)."""

    step: int = 0
    curvature_updates: int = 0
    curvature_skips: int = 0
    nonfinite_steps: int = 0

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Counters:
        """The counters in ``saved`` (a checkpoint from before a counter existed: 0)."""
        return cls(**{k: saved.get(k, 0) for k in asdict(cls())})


def block_signature(blocks: list[Block]) -> list[tuple[str, int, int, str]]:
    """The preconditioned layers as ``(name, n_G, n_A, path)``."""
    return [(b.name, b.n_G, b.n_A, b.path) for b in blocks]


def check_compatible(saved: dict[str, Any], config: SENGConfig, blocks: list[Block]) -> None:
    """Raise ``ValueError`` if a checkpoint's SENG entry (``saved``) was written for other
    layers or with other settings that shape the curvature."""
    mine = block_signature(blocks)
    if saved["blocks"] != mine:
        raise ValueError("state_dict was saved for another model: its preconditioned "
                         f"layers {saved['blocks']} differ from this model's {mine}")
    here, then = config.fingerprint(), saved["config"]
    diff = [k for k in SENGConfig.curvature_settings() if then.get(k) != here[k]]
    if diff:
        raise ValueError("state_dict was saved with other SENG settings: " + ", ".join(
            f"{k}={then.get(k)!r} (here {here[k]!r})" for k in diff))


def structure_settings(config: SENGConfig, comm: Communicator, grads_averaged: bool,
                       model: nn.Module, blocks: list[Block]) -> dict[str, str]:
    """What every rank must agree on: settings, engine and model structure."""
    out = {f"setting {k}": repr(v) for k, v in config.fingerprint().items()}
    out["engine"] = comm.name
    out["gradients averaged by the engine"] = repr(grads_averaged)
    out["number of preconditioned layers"] = repr(len(blocks))
    for i, b in enumerate(blocks):
        out[f"preconditioned layer {i}"] = f"{b.name} ({b.n_G}x{b.n_A}, {b.path})"
    shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()
              if p.requires_grad]
    out["number of trainable parameters"] = repr(len(shapes))
    for i, s in enumerate(shapes):
        out[f"trainable parameter {i}"] = repr(s)
    return out


def split_curvature(state: dict[int, dict[str, Any]],
                    indexed: list[tuple[int, BlockCurvature]]
                    ) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Tensor]]]:
    """A ``state_dict``'s per-parameter state split into the rest (new dicts) and, per block
    weight index in ``indexed``, the curvature tensors its path keeps."""
    rest = {i: dict(st) for i, st in state.items()}
    curvature = {i: {k: rest[i].pop(k) for k in c.KEYS if k in rest.get(i, {})}
                 for i, c in indexed}
    return rest, curvature
