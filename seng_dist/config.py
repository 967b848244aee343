"""Validated SENG settings.

Every setting is checked once, at construction, and a bad value raises ``ValueError`` naming the
setting and what is allowed. Hyper-parameters that may change during training (``lr``,
``damping``, ``momentum``, ``weight_decay``, ``curvature_update_interval``) accept either a value
or a callable of the optimizer step; callables are checked by calling them at step 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Union

Schedule = Union[float, Callable[[int], float]]
IntSchedule = Union[int, Callable[[int], int]]

SKETCH_METHODS = ("uniform", "leverage")
UC_MODES = ("factored", "exact")
VARIANTS = ("blockdiag", "lagged")
LOSS_REDUCTIONS = ("mean", "sum")
COMM_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def resolve(value: Any, step: int) -> Any:
    """The value of a hyper-parameter at ``step``: call it if it is a schedule."""
    return value(step) if callable(value) else value


def _check_number(name: str, value: Any, *, positive: bool, upper: float | None = None,
                  integer: bool = False) -> None:
    """Check a value or a schedule's value at step 0 against its allowed range."""
    probe = resolve(value, 0)
    kind = "an int" if integer else "a number"
    if isinstance(probe, bool) or not isinstance(probe, (int, float)) or (
            integer and not isinstance(probe, int)):
        raise ValueError(f"{name} must be {kind} or a callable of the step returning one, "
                         f"got {probe!r}")
    if not math.isfinite(probe):
        raise ValueError(f"{name} must be finite, got {probe!r}")
    if positive and probe <= 0:
        raise ValueError(f"{name} must be > 0, got {probe!r}")
    if not positive and probe < 0:
        raise ValueError(f"{name} must be >= 0, got {probe!r}")
    if upper is not None and probe >= upper:
        raise ValueError(f"{name} must be < {upper}, got {probe!r}")


def _check_optional_int(name: str, value: Any, minimum: int = 1) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass(frozen=True)
class SENGConfig:
    """All SENG settings; see :class:`seng_dist.SENG` for their meaning."""

    lr: Schedule = 0.1
    damping: Schedule = 1.0
    momentum: Schedule = 0.9
    weight_decay: Schedule = 0.0
    decoupled_weight_decay: bool = False
    curvature_update_interval: IntSchedule = 200
    curvature_batch_size: int | None = 32
    explicit_threshold: int = 65_536
    sketch_size: int | None = 4096
    sketch_method: str = "uniform"
    sketch_replacement: bool = False
    rank: int | None = 4
    factor_sketch_size: int | None = 1024
    uc: str = "factored"
    variant: str = "blockdiag"
    loss_reduction: str = "mean"
    comm_dtype: str | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    skip_nonfinite: bool = False

    def __post_init__(self) -> None:
        _check_number("lr", self.lr, positive=True)
        _check_number("damping", self.damping, positive=True)
        _check_number("momentum", self.momentum, positive=False, upper=1.0)
        _check_number("weight_decay", self.weight_decay, positive=False)
        _check_number("curvature_update_interval", self.curvature_update_interval,
                      positive=True, integer=True)
        for name in ("decoupled_weight_decay", "sketch_replacement", "skip_nonfinite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_optional_int("curvature_batch_size", self.curvature_batch_size)
        if isinstance(self.explicit_threshold, bool) or not isinstance(
                self.explicit_threshold, int) or self.explicit_threshold < 0:
            raise ValueError("explicit_threshold must be an int >= 0 (0 sends every layer to "
                             f"the implicit path), got {self.explicit_threshold!r}")
        _check_optional_int("sketch_size", self.sketch_size)
        if self.sketch_size is not None and self.sketch_size >= max(self.explicit_threshold, 1):
            raise ValueError(
                f"sketch_size must be None or smaller than explicit_threshold "
                f"({self.explicit_threshold}): explicit blocks have fewer than "
                f"explicit_threshold rows, so a sketch of {self.sketch_size} rows never "
                f"sketches anything")
        _check_choice("sketch_method", self.sketch_method, SKETCH_METHODS)
        _check_optional_int("rank", self.rank)
        _check_optional_int("factor_sketch_size", self.factor_sketch_size)
        _check_choice("uc", self.uc, UC_MODES)
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _check_optional_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.gradient_accumulation_steps is None:
            raise ValueError("gradient_accumulation_steps must be an int >= 1, got None")
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, positive=True)
        if self.comm_dtype is not None and self.comm_dtype not in COMM_DTYPE_NAMES:
            raise ValueError("comm_dtype must be None (the gradients' dtype) or one of "
                             f"{', '.join(map(repr, COMM_DTYPE_NAMES))} (or the torch dtype), "
                             f"got {self.comm_dtype!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape the curvature state, for checkpoint and rank checks.

        Schedules are represented by their kind only: a callable cannot be compared.
        """
        out = {}
        for key, value in asdict(self).items():
            out[key] = "<callable>" if callable(value) else value
        return out
