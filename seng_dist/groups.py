"""Parameter groups as SENG reads them: each group's hyper-parameters, checked and scheduled.

A group may set any of :data:`~seng_dist.config.GROUP_SETTINGS` (``lr``, ``damping``,
``momentum``, ``weight_decay``) to a value or to a callable of the step; what it leaves out
comes from the config (a callable there schedules every group that does not set its own).
Callables are kept here, never in ``param_groups``, so that ``state_dict()`` holds only
numbers. At each step :meth:`GroupSchedules.resolve` writes the scheduled values and checks
every group's values, whoever set them (a ``torch.optim.lr_scheduler``, a DeepSpeed scheduler).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .config import GROUP_SETTINGS, SENGConfig
from .layers import Block

#: keys a param group may hold besides the hyper-parameters
_OTHER_KEYS = ("params", "name")


@dataclass(frozen=True)
class StepSettings:
    """Each parameter's damping and L2 weight decay for one step, by ``id`` of the tensor."""

    damping: dict[int, float]
    l2: dict[int, float]


class GroupSchedules:
    """The callables that schedule each param group's hyper-parameters, and the checks."""

    def __init__(self, config: SENGConfig) -> None:
        self.config = config
        self.schedules: list[dict[str, Callable[[int], float]]] = []

    def prepare(
        self, group: dict[str, Any], step: int
    ) -> tuple[dict[str, Any], dict[str, Callable[[int], float]]]:
        """Check a new group (keys, values) and take its callables out: the group for torch
        holds their value at ``step``; the config's callables schedule what it leaves out.
        Returns that group and its schedules, for :meth:`add` once torch has taken it."""
        index = len(self.schedules)
        check_shape(group, index)
        unknown = sorted(set(group) - set(GROUP_SETTINGS) - set(_OTHER_KEYS))
        if unknown:
            raise ValueError(
                f"param group {index} has unknown key(s) {', '.join(unknown)}; a "
                f"SENG param group may hold {', '.join(_OTHER_KEYS)} and "
                f"{', '.join(GROUP_SETTINGS)}"
            )
        out = dict(group)
        scheduled: dict[str, Callable[[int], float]] = {}
        for key, allowed in GROUP_SETTINGS.items():
            value = group.get(key, getattr(self.config, key))
            if callable(value):
                scheduled[key] = value
            out[key] = allowed.at(f"param group {index}'s {key}", value, step)
        return out, scheduled

    def add(self, scheduled: dict[str, Callable[[int], float]]) -> None:
        """Keep the schedules of the group torch has just added."""
        self.schedules.append(scheduled)

    def resolve(self, groups: list[dict[str, Any]], step: int) -> None:
        """Write every scheduled value for ``step`` into ``groups`` and check all values."""
        for index, (group, scheduled) in enumerate(zip(groups, self.schedules, strict=True)):
            for key, allowed in GROUP_SETTINGS.items():
                name = f"param group {index}'s {key}"
                group[key] = float(
                    allowed.at(name, scheduled[key], step)
                    if key in scheduled
                    else allowed.at(name, group[key], step)
                )

    @staticmethod
    def step_settings(groups: list[dict[str, Any]], decoupled: bool) -> StepSettings:
        """Each parameter's damping and L2 (0 under decoupled weight decay) from ``groups``."""
        damping, l2 = {}, {}
        for group in groups:
            for p in group["params"]:
                damping[id(p)] = group["damping"]
                l2[id(p)] = 0.0 if decoupled else group["weight_decay"]
        return StepSettings(damping, l2)

    @staticmethod
    def check_blocks(blocks: Iterable[Block], groups: list[dict[str, Any]]) -> None:
        """Raise ``ValueError`` for a block whose weight and bias sit in groups with different
        ``lr`` or ``damping``: they form one preconditioned block, solved with one damping and
        stepped together."""
        index = group_index(groups)
        for b in blocks:
            if b.bias is None:
                continue
            gw, gb = index.get(id(b.weight)), index.get(id(b.bias))
            if gw is None or gb is None or gw == gb:
                continue
            for key in ("lr", "damping"):
                if groups[gw][key] != groups[gb][key]:
                    raise ValueError(
                        f"layer {b.name!r} has its weight in param group {gw} and its bias in "
                        f"param group {gb} with a different {key} ({groups[gw][key]} vs "
                        f"{groups[gb][key]}): weight and bias form one preconditioned block, "
                        "so they need the same lr and damping. Put them in one group, or give "
                        "both groups the same lr and damping (weight_decay and momentum may "
                        "differ)"
                    )


def check_shape(group: Any, index: int) -> None:
    """Raise ``ValueError`` unless ``group`` is a dict with a ``"params"`` entry."""
    if not isinstance(group, dict) or "params" not in group:
        raise ValueError(
            f"param group {index} must be a dict with a 'params' entry (as torch "
            f"optimizers take), got {group!r}"
        )


def group_index(groups: list[dict[str, Any]]) -> dict[int, int]:
    """Each parameter's group, by ``id`` of the tensor."""
    return {id(p): i for i, g in enumerate(groups) for p in g["params"]}


def group_params(groups: list[dict[str, Any]]) -> list[Tensor]:
    """Every parameter of ``groups``, in order."""
    return [p for g in groups for p in g["params"]]
