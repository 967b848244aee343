"""Checkpoints and agreement: SENG's part of a ``state_dict`` (:class:`StateCodec`), what must
match between a checkpoint and the optimizer that loads it, and between the ranks of a job.

The settings come from :class:`~seng_dist.config.SENGConfig` (its ``fingerprint`` and the
settings marked ``curvature``); the structure is the list of preconditioned layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from .builder import CurvatureBuilder
from .comm import Communicator
from .config import SENGConfig, Variant, saved_names
from .curvature import BlockCurvature
from .layers import Block, module_name
from .rounds import LaggedRound
from .warn import warn

#: ``(index of a block's weight in the state_dict, its curvature)`` per block
Indexed = list[tuple[int, BlockCurvature]]


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


@dataclass
class Saved:
    """What :meth:`StateCodec.unpack` keeps for :meth:`StateCodec.restore`."""

    extra: dict[str, Any]
    curvature: dict[int, dict[str, Tensor]]


class StateCodec:
    """SENG's part of a ``state_dict``: the counters, the sketch generator, the settings'
    fingerprint, the preconditioned layers, the rank and world size that wrote it and
    (all-ranks checkpoints) every rank's curvature under ``"seng"``; on load, the checks and
    each block's curvature back to its object."""

    def __init__(
        self, config: SENGConfig, blocks: list[Block], builder: CurvatureBuilder, comm: Communicator
    ) -> None:
        self.config, self.blocks, self.builder, self.comm = config, blocks, builder, comm

    def pack(
        self, sd: dict[str, Any], counters: Counters, indexed: Indexed, all_ranks: bool
    ) -> dict[str, Any]:
        """torch's ``state_dict`` with SENG's entry added (a collective when ``all_ranks``)."""
        extra = dict(
            asdict(counters),
            rng=self.builder.generator.get_state(),
            config=self.config.fingerprint(),
            blocks=block_signature(self.blocks),
            saved_by_rank=self.comm.rank,
            saved_world_size=self.comm.world_size,
        )
        if all_ranks and self.comm.world_size > 1:
            sd["state"], mine = split_curvature(sd["state"], indexed)
            extra["curvature_by_rank"] = self.comm.allgather_object(mine, name="seng.state_dict")
        sd["seng"] = extra
        return sd

    def gather(
        self, state: dict[int, dict[str, Any]], indexed: Indexed
    ) -> dict[int, dict[str, Any]]:
        """A sharded state made whole (a collective): every rank's own entries (momentum, the
        damping diagonal's moments, the lagged gradient of the units it owns) merged, with
        this rank's curvature. Loaded with sharded state again, each rank keeps its own part
        (on any number of ranks); loaded without, it is the unsharded state."""
        rest, curvature = split_curvature(state, indexed)
        whole: dict[int, dict[str, Any]] = {}
        for shard in self.comm.allgather_object(rest, name="seng.state_dict/shards"):
            for i, entries in shard.items():
                whole.setdefault(i, {}).update(entries)
        for i, entries in curvature.items():
            if entries:
                whole.setdefault(i, {}).update(entries)
        return dict(sorted(whole.items()))

    def unpack(self, state_dict: dict[str, Any], indexed: Indexed) -> tuple[dict[str, Any], Saved]:
        """The part for torch's ``load_state_dict`` (no curvature: the curvature objects load
        their own tensors, since torch would cast the sketches' integer row indices to the
        parameters' dtype) and what :meth:`restore` needs; checks the checkpoint first."""
        torch_part = dict(state_dict)
        extra = torch_part.pop("seng", None)
        if extra is None:
            raise ValueError("state_dict has no 'seng' entry: it was not saved by SENG")
        check_compatible(extra, self.config, self.blocks)
        state = {i: dict(st) for i, st in torch_part["state"].items()}
        by_rank = extra.get("curvature_by_rank")
        if by_rank is not None and len(by_rank) == self.comm.world_size:
            for i, entries in by_rank[self.comm.rank].items():
                state.setdefault(i, {}).update(entries)
        if self.config.distributed.variant is not Variant.LAGGED:
            # A lagged checkpoint resumed under another variant: its previous gradient would
            # be kept unused and come back stale if the state were resumed as lagged again.
            for entries in state.values():
                entries.pop(LaggedRound.PREVIOUS, None)
        torch_part["state"], curvature = split_curvature(state, indexed)
        return torch_part, Saved(extra, curvature)

    def restore(self, saved: Saved, indexed: Indexed) -> Counters:
        """Give each block its curvature and the generator its state; return the counters.
        The curvature is dropped (rebuilt at the next step) when it is not this rank's: a
        checkpoint of every rank of another number of ranks, or one rank's checkpoint loaded
        on another rank of a multi-rank job."""
        for i, c in indexed:
            c.load_state_dict(saved.curvature.get(i, {}))
        self.builder.generator.set_state(saved.extra["rng"])
        by_rank = saved.extra.get("curvature_by_rank")
        if by_rank is not None and len(by_rank) != self.comm.world_size:
            warn(
                f"SENG: the checkpoint holds the curvature of {len(by_rank)} ranks and this "
                f"job has {self.comm.world_size}; every rank rebuilds its curvature at the "
                "next step"
            )
            self.builder.drop(everywhere=True)
        elif by_rank is None and self._another_ranks(saved):
            rank = self.comm.rank
            warn(
                f"SENG: this state_dict holds the curvature of rank "
                f"{saved.extra['saved_by_rank']} of a {saved.extra['saved_world_size']}-rank "
                f"job, loaded on rank {rank} of {self.comm.world_size}. Each rank's curvature "
                f"comes from its own batch, so rank {rank} drops it and rebuilds its own at "
                "the next step. To resume every rank exactly, load on each rank the "
                "state_dict() that rank saved, or set opt.state_dict_all_ranks = True before "
                "saving (one checkpoint then holds every rank's curvature)"
            )
            self.builder.drop(everywhere=False)
        return Counters.from_dict(saved.extra)

    def _another_ranks(self, saved: Saved) -> bool:
        """Whether ``saved`` holds one rank's curvature and that rank is not this one, in a
        multi-rank job (a checkpoint from before the writer was recorded: unknown, kept)."""
        writer = saved.extra.get("saved_by_rank")
        return (
            self.comm.world_size > 1
            and writer is not None
            and writer != self.comm.rank
            and any(saved.curvature.values())
        )


def block_signature(blocks: list[Block]) -> list[tuple[str, int, int, str]]:
    """The preconditioned layers as ``(name, n_G, n_A, path)``."""
    return [(b.name, b.n_G, b.n_A, b.path) for b in blocks]


def check_compatible(saved: dict[str, Any], config: SENGConfig, blocks: list[Block]) -> None:
    """Raise ``ValueError`` if a checkpoint's SENG entry (``saved``) was written for other
    layers or with other settings that shape the curvature."""
    mine = block_signature(blocks)
    # The layers first, then the settings, then the layers' paths: a different
    # explicit_threshold moves layers to another path, and the setting is the cause to name.
    if [s[:3] for s in saved["blocks"]] != [s[:3] for s in mine]:
        _another_model(saved["blocks"], mine)
    # A setting newer than the checkpoint was its default then (damping_diagonal: 0.2.0); a
    # renamed one is read under its new name (rank: factor_rank after 0.2.0).
    here = config.fingerprint()
    written = {**SENGConfig().fingerprint(), **saved_names(saved["config"])}
    diff = [k for k in SENGConfig.curvature_settings() if written.get(k) != here[k]]
    if diff:
        raise ValueError(
            "state_dict was saved with other SENG settings: "
            + ", ".join(f"{k}={written.get(k)!r} (here {here[k]!r})" for k in diff)
        )
    if saved["blocks"] != mine:
        _another_model(saved["blocks"], mine)


def _another_model(then: list[Any], mine: list[tuple[str, int, int, str]]) -> None:
    names = {s[0] for s in then}
    extra = [s[0] for s in mine if s[0] not in names]
    # e.g. BatchNorm, which releases up to 0.2.0 left to the fallback rule
    hint = (
        f"; layers {extra} are preconditioned here but were not when it was saved: "
        f"build SENG with skip_layers={extra} to resume it as saved"
        if [s for s in mine if s[0] in names] == then
        else ""
    )
    raise ValueError(
        "state_dict was saved for another model: its preconditioned "
        f"layers {then} differ from this model's {mine}{hint}"
    )


def structure_settings(
    config: SENGConfig,
    comm: Communicator,
    grads_averaged: bool,
    model: nn.Module,
    blocks: list[Block],
    groups: list[dict[str, Any]],
) -> dict[str, str]:
    """What every rank must agree on: settings, engine, model structure and param groups."""
    out = {f"setting {k}": repr(v) for k, v in config.fingerprint().items()}
    out["engine"] = comm.name
    out["gradients averaged by the engine"] = repr(grads_averaged)
    out["number of preconditioned layers"] = repr(len(blocks))
    for i, b in enumerate(blocks):
        out[f"preconditioned layer {i}"] = f"{b.name} ({b.n_G}x{b.n_A}, {b.path})"
    shapes = [
        (module_name(n), tuple(p.shape), str(p.dtype))
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    out["number of trainable parameters"] = repr(len(shapes))
    for i, s in enumerate(shapes):
        out[f"trainable parameter {i}"] = repr(s)
    names = {id(p): module_name(n) for n, p in model.named_parameters()}
    out["number of param groups"] = repr(len(groups))
    for i, g in enumerate(groups):
        values = {k: v for k, v in g.items() if k != "params"}
        params = [names.get(id(p), f"<outside the model: {tuple(p.shape)}>") for p in g["params"]]
        out[f"param group {i}"] = f"{values} {params}"
    return out


def split_curvature(
    state: dict[int, dict[str, Any]], indexed: Indexed
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Tensor]]]:
    """A ``state_dict``'s per-parameter state split into the rest (new dicts) and, per block
    weight index in ``indexed``, the curvature tensors its path keeps."""
    rest = {i: dict(st) for i, st in state.items()}
    curvature = {i: {k: rest[i].pop(k) for k in c.KEYS if k in rest.get(i, {})} for i, c in indexed}
    return rest, curvature
