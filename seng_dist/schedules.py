"""The paper's schedules as callables of the optimizer step (appendix A of the paper).

Each returns a function ``f(step) -> value`` that SENG accepts for ``lr``, ``damping``,
``momentum`` or ``weight_decay``; the epoch of a step is ``step // steps_per_epoch``, as the
paper changes these once per epoch. For another optimizer, wrap one in
``torch.optim.lr_scheduler.LambdaLR(opt, lambda s: f(s) / base_lr)`` stepped once per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

StepFn = Callable[[int], float]


def _check(name: str, value: float, *, positive: bool = True) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (value <= 0 if positive else value < 0)
    ):
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
        )


def cosine(base: float, max_epochs: int, steps_per_epoch: int, final: float = 0.001) -> StepFn:
    """``final + (base - final)/2 · (1 + cos(π · epoch / max_epochs))``."""
    _check("base", base)
    _check("final", final, positive=False)
    _check("max_epochs", max_epochs)
    _check("steps_per_epoch", steps_per_epoch)

    def f(step: int) -> float:
        epoch = min(step // steps_per_epoch, max_epochs)
        return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * epoch / max_epochs))

    return f


def exponential(
    base: float, max_epochs: int, steps_per_epoch: int, decay_rate: float = 6.0
) -> StepFn:
    """The paper's "exp" schedule: ``base · (1 - epoch / max_epochs)^decay_rate``."""
    _check("base", base)
    _check("max_epochs", max_epochs)
    _check("steps_per_epoch", steps_per_epoch)
    _check("decay_rate", decay_rate)

    def f(step: int) -> float:
        epoch = min(step // steps_per_epoch, max_epochs)
        return base * (1.0 - epoch / max_epochs) ** decay_rate

    return f


def linear_warmup(schedule: StepFn | float, warmup_steps: int, start: float) -> StepFn:
    """Linear ramp from ``start`` to ``schedule(warmup_steps)`` over ``warmup_steps`` steps,
    then ``schedule`` (Goyal et al., 2017)."""
    _check("warmup_steps", warmup_steps, positive=False)
    _check("start", start, positive=False)
    target: StepFn = schedule if callable(schedule) else (lambda _s: schedule)

    def f(step: int) -> float:
        if step >= warmup_steps:
            return target(step)
        return start + (target(warmup_steps) - start) * step / warmup_steps

    return f


def damping_decay(initial: float, rho: float, steps_per_epoch: int) -> StepFn:
    """The paper's damping schedule ``λ0 · ρ^(epoch / 10)`` (Table 7)."""
    _check("initial", initial)
    _check("rho", rho)
    _check("steps_per_epoch", steps_per_epoch)

    def f(step: int) -> float:
        return initial * rho ** ((step // steps_per_epoch) / 10.0)

    return f
