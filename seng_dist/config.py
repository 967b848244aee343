"""Validated SENG settings: the one place where a setting, its default and its range are written.

:class:`SENGConfig` holds every setting, with the solver's settings nested in
:class:`SketchConfig` and the distributed ones in :class:`DistributedConfig`. Each field's
metadata says what the rest of the package derives from it:

* ``schedule``: a :class:`Range`; the setting accepts a value or a callable of the optimizer
  step, and :func:`resolve` checks every value it returns against that range;
* ``group``: a :class:`Range`; the setting is a hyper-parameter kept in each ``param_groups``
  entry, as torch optimizers keep theirs, and a group may give it its own value in that range
  (:data:`GROUP_SETTINGS`);
* ``curvature``: the setting shapes the curvature state, so a checkpoint written with another
  value cannot be loaded (:meth:`SENGConfig.curvature_settings`).

``SENG``'s keyword arguments and the DeepSpeed plugin's list of valid params are
:meth:`SENGConfig.setting_names`; a renamed setting's old name (:data:`RENAMED_SETTINGS`) is
still taken there, with a :class:`~seng_dist.warn.SENGDeprecationWarning`. Every setting is
checked once, at construction, and a bad value raises ``ValueError`` naming the setting and
what is allowed. A setting with named choices is kept as its :class:`Choice` enum (a ``str``:
``config.distributed.variant == "lagged"`` holds), on which the code dispatches.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass, replace
from enum import Enum
from typing import Any, TypeVar

import torch

from .comm.base import COMM_DTYPES
from .warn import SENGDeprecationWarning, warn

Schedule = float | Callable[[int], float]
IntSchedule = int | Callable[[int], int]

SKETCH_METHODS = ("uniform", "leverage")
UC_MODES = ("factored", "exact")
LOSS_REDUCTIONS = ("mean", "sum")
COMM_DTYPE_NAMES = tuple(COMM_DTYPES)
#: ``seed`` is in ``[0, SEED_LIMIT)``: ``torch.Generator.manual_seed`` takes a 64-bit seed and
#: wraps a negative one to ``seed + 2**64`` (so ``-1`` and ``2**64 - 1`` would be one generator)
SEED_LIMIT = 2**64
#: ``gradient_accumulation_steps`` is at most this. The curvature comes from the last
#: micro-batch of a step alone (rescaled by the count), so beyond 2**16 micro-batches per step it
#: would see under 0.002% of the step's samples, and each step would take 65,536 backward
#: passes: a larger value is likelier a sample or token count than a micro-batch count.
MAX_ACCUMULATION_STEPS = 2**16

#: settings renamed since a release: old flat name -> new flat name. The old name is still
#: taken as a setting (with a deprecation warning) and read from checkpoints.
RENAMED_SETTINGS: dict[str, str] = {
    # "rank" read as a process's rank in a distributed library
    "rank": "factor_rank",
}


_C = TypeVar("_C", bound="Choice")


class Choice(str, Enum):
    """A setting with named choices: a ``str`` enum, so a user's string, a checkpoint's and
    the enum compare equal, and ``str()`` of a member is its name as the user writes it."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls: type[_C], name: str, value: Any) -> _C:
        """``value`` (a member or its string) as a member of ``cls``; ``ValueError`` naming
        the setting ``name`` and the allowed values otherwise."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(c.value) for c in cls)
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}") from None


class Variant(Choice):
    """How the ranks combine their corrections (:mod:`seng_dist.rounds`)."""

    #: eq. 26: the averaged gradient, then the corrections: two rounds
    BLOCKDIAG = "blockdiag"
    #: eq. 27: the corrections of the previous step's averaged gradient travel with the
    #: gradients: one round
    LAGGED = "lagged"


class ShardState(Choice):
    """Which per-parameter state one rank per shard holds (:mod:`seng_dist.shards`)."""

    #: every rank holds all of it (DDP's layout)
    NONE = "none"
    #: momentum, the damping diagonal's second moments and the lagged gradient: each on its
    #: owner rank, which updates its parameters and all-gathers them (ZeRO stage 1)
    OPTIMIZER = "optimizer"
    #: that, and the averaged gradients: reduce-scattered to their owners, the other ranks'
    #: ``.grad`` freed (ZeRO stage 2)
    GRADIENTS = "gradients"


class Fisher(Choice):
    """Which Fisher the per-sample gradients in ``U`` estimate (:mod:`seng_dist.fisher`)."""

    #: the paper's: gradients of the user's loss at the true targets
    EMPIRICAL = "empirical"
    #: Monte-Carlo: gradients at targets drawn from the model's predictive distribution
    MC = "mc"


class DampingDiagonal(Choice):
    """The diagonal ``D`` of the damping ``λD`` (:mod:`seng_dist.diagonal`)."""

    #: the paper's ``λI``
    IDENTITY = "identity"
    #: ``D = diag(√v̂ + ε)``, Adam's second moment
    ADAM = "adam"


@dataclass(frozen=True)
class Range:
    """The values a (scheduled) number setting may take."""

    positive: bool  # > 0, else >= 0
    upper: float | None = None  # exclusive
    integer: bool = False

    def check(self, name: str, value: Any, step: int | None = None) -> None:
        """Raise ``ValueError`` naming ``name`` (and the step, for a schedule's value at a
        step) if ``value`` is out of range."""

        def fail(requirement: str) -> None:
            if step is None:
                raise ValueError(f"{name} must be {requirement}, got {value!r}")
            raise ValueError(
                f"{name} schedule returned {value!r} at step {step}; it must be {requirement}"
            )

        if not _is_number(value) or (self.integer and not isinstance(value, int)):
            fail(
                f"{'an int' if self.integer else 'a number'} or a callable of the step "
                "returning one"
            )
        if not math.isfinite(value):
            fail("finite")
        if self.positive and value <= 0:
            fail("> 0")
        if not self.positive and value < 0:
            fail(">= 0")
        if self.upper is not None and value >= self.upper:
            fail(f"< {self.upper}")

    def at(self, name: str, value: Any, step: int) -> Any:
        """``value`` at ``step`` (a number, or a schedule called with the step), checked:
        ``ValueError`` naming ``name`` if it is out of range or a callable that cannot take
        the step."""
        if not callable(value):
            self.check(name, value)
            return value
        try:
            out = value(step)
        except TypeError:
            if _takes_the_step(value):
                raise  # the schedule's own error, raised inside it
            raise ValueError(
                f"{name} must be a number or a callable of the step (called as "
                f"{name}(step), with the 0-based step), got {value!r}, which does "
                "not take one argument"
            ) from None
        self.check(name, out, step)
        return out


def _takes_the_step(schedule: Callable[..., Any]) -> bool:
    """Whether ``schedule`` can be called with one positional argument (True when its
    signature cannot be read: then the call's own error is the best one)."""
    try:
        inspect.signature(schedule).bind(0)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def setting(
    default: Any,
    *,
    schedule: Range | None = None,
    group: Range | None = None,
    curvature: bool = False,
) -> Any:
    """A config field with its metadata (see the module docstring)."""
    return field(
        default=default, metadata={"schedule": schedule, "group": group, "curvature": curvature}
    )


def resolve(config: SENGConfig, name: str, step: int) -> Any:
    """The value of the scheduled setting ``name`` at ``step``, checked against its range."""
    value = getattr(config, name)
    return _SCHEDULES[name].at(name, value, step) if callable(value) else value


def _check_optional_int(name: str, value: Any, minimum: int = 1) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")


def _check_int_in(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int from {low} to {high}, got {value!r}")


def _set_choice(config: Any, name: str, kind: type[Choice]) -> None:
    """Replace the frozen ``config``'s string setting ``name`` by its ``kind`` member."""
    object.__setattr__(config, name, kind.parse(name, getattr(config, name)))


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """``ValueError`` naming the setting ``name`` and the ``allowed`` values."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SketchConfig:
    """How each block's curvature is kept and sketched (paper section 3)."""

    #: block size ``n`` below which ``U`` is kept explicitly (0: every block implicit)
    explicit_threshold: int = setting(65_536, curvature=True)
    #: rows ``q`` sampled from an explicit ``U`` (None: exact)
    sketch_size: int | None = setting(4096, curvature=True)
    #: ``"uniform"`` or ``"leverage"`` (``p_j ∝ ‖U_j,:‖²``), for both paths
    sketch_method: str = setting("uniform", curvature=True)
    #: sample rows with replacement
    sketch_replacement: bool = setting(False)
    #: rank of each per-sample gradient's factors on the implicit path (None: exact); the
    #: setting ``rank`` until 0.2.0
    factor_rank: int | None = setting(4, curvature=True)
    #: rows sampled from each factor matrix on the implicit path (None: exact)
    factor_sketch_size: int | None = setting(1024, curvature=True)
    #: ``"exact"`` ``U c = Σ c_i G_iᵀ A_i`` or ``"factored"`` (eq. 23, and eq. 28 between
    #: ranks: ``r(n_G + n_A)`` numbers sent per implicit block instead of ``n_G·n_A``). Not a
    #: curvature setting: both read the same stored factors, so a checkpoint resumes under
    #: either. Exact by default: eq. 23's product of factor means left the direction on the
    #: CNN's large Linear the gradient's (``examples/results/converge/direction.md``).
    uc: str = setting("exact")

    def __post_init__(self) -> None:
        if (
            isinstance(self.explicit_threshold, bool)
            or not isinstance(self.explicit_threshold, int)
            or self.explicit_threshold < 0
        ):
            raise ValueError(
                "explicit_threshold must be an int >= 0 (0 sends every layer to "
                f"the implicit path), got {self.explicit_threshold!r}"
            )
        _check_optional_int("sketch_size", self.sketch_size)
        check_choice("sketch_method", self.sketch_method, SKETCH_METHODS)
        _check_bool("sketch_replacement", self.sketch_replacement)
        _check_optional_int("factor_rank", self.factor_rank)
        _check_optional_int("factor_sketch_size", self.factor_sketch_size)
        check_choice("uc", self.uc, UC_MODES)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: an old setting name read as an attribute
        # (``config.sketch.rank``) gives today's value, warned.
        return _renamed_attribute(self, name)

    def check_sketch_fits(self) -> None:
        """Reject a ``sketch_size`` that can never sketch: explicit blocks have fewer than
        ``explicit_threshold`` rows. Checked only when the user gave ``sketch_size``: the
        default sketch simply never applies when the threshold is small (exact solves)."""
        if self.sketch_size is not None and self.sketch_size >= max(self.explicit_threshold, 1):
            raise ValueError(
                f"sketch_size must be None or smaller than explicit_threshold "
                f"({self.explicit_threshold}): explicit blocks have fewer than "
                f"explicit_threshold rows, so a sketch of {self.sketch_size} rows never "
                f"sketches anything"
            )


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How the ranks combine their gradients and corrections (paper section 4)."""

    #: ``"blockdiag"`` (eq. 26, two rounds) or ``"lagged"`` (eq. 27, one round). Not a
    #: curvature setting: both keep the same curvature, so a checkpoint resumes under either
    #: (the lagged round's previous gradient is dropped under blockdiag; its first step without
    #: one is block-diagonal)
    variant: Variant = setting(Variant.BLOCKDIAG)
    #: communication buffer dtype: None (the gradients'), a name of ``COMM_DTYPES`` or the
    #: torch dtype (kept as its name)
    comm_dtype: str | None = setting(None)
    #: start the round's collectives during backward, bucket by bucket as the gradients become
    #: ready (as DDP's reducer does), when SENG averages the gradients itself
    overlap: bool = setting(True)
    #: size of one bucket of an overlapped round, in MiB (DDP's ``bucket_cap_mb``)
    bucket_size_mb: float = setting(25.0)
    #: ``"none"``, ``"optimizer"`` (ZeRO stage 1: each layer's optimizer state on one owner
    #: rank) or ``"gradients"`` (stage 2: its averaged gradient too). Not a curvature setting:
    #: ``state_dict()`` gathers the shards, so a checkpoint resumes sharded or not, on any
    #: number of ranks
    shard_state: ShardState = setting(ShardState.NONE)

    def __post_init__(self) -> None:
        _set_choice(self, "variant", Variant)
        _set_choice(self, "shard_state", ShardState)
        _check_bool("overlap", self.overlap)
        size = self.bucket_size_mb
        if not _is_number(size) or not 0.0 < size < math.inf:
            raise ValueError(f"bucket_size_mb must be a finite number > 0 (MiB), got {size!r}")
        dtype: Any = self.comm_dtype
        if isinstance(dtype, torch.dtype):
            dtype = next((k for k, v in COMM_DTYPES.items() if v == dtype), str(dtype))
            object.__setattr__(self, "comm_dtype", dtype)
        if dtype is not None and dtype not in COMM_DTYPE_NAMES:
            raise ValueError(
                "comm_dtype must be None (the gradients' dtype) or one of "
                f"{', '.join(map(repr, COMM_DTYPE_NAMES))} (or the torch dtype), "
                f"got {dtype!r}"
            )

    @property
    def buffer_dtype(self) -> torch.dtype | None:
        """``comm_dtype`` as a torch dtype (None: the gradients' own)."""
        return COMM_DTYPES[self.comm_dtype] if self.comm_dtype else None


_POSITIVE, _NONNEGATIVE = Range(positive=True), Range(positive=False)
_MOMENTUM = Range(positive=False, upper=1.0)


@dataclass(frozen=True, kw_only=True)
class DiagonalConfig:
    """The diagonal ``D`` of the damping: ``d = -(U Uᵀ + λD)⁻¹ g`` (:mod:`seng_dist.diagonal`)."""

    #: ``"identity"`` (the paper's ``λI``) or ``"adam"``: ``D = diag(√v̂ + ε)`` with ``v̂`` the
    #: bias-corrected running mean of the averaged gradient's squares (Adam's second moment), so
    #: that every direction the curvature does not see takes Adam's step ``-g/(λ(√v̂ + ε))``
    #: instead of ``-g/λ`` — per coordinate, which Transformers need (``docs/design.md``); the
    #: parameters outside the blocks follow the same rule. Shapes the stored curvature (it is
    #: kept in ``D``'s coordinates), so a checkpoint resumes only with the same value.
    damping_diagonal: DampingDiagonal = setting(DampingDiagonal.IDENTITY, curvature=True)
    #: ``β₂`` of that second moment
    damping_beta2: float = setting(0.999)
    #: ``ε`` added to ``√v̂``
    damping_epsilon: float = setting(1e-8)

    def __post_init__(self) -> None:
        _set_choice(self, "damping_diagonal", DampingDiagonal)
        beta2, eps = self.damping_beta2, self.damping_epsilon
        if not _is_number(beta2) or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"damping_beta2 must be a number in [0, 1), got {beta2!r}")
        if not _is_number(eps) or not 0.0 < eps < math.inf:
            raise ValueError(f"damping_epsilon must be a finite number > 0, got {eps!r}")


@dataclass(frozen=True, kw_only=True)
class SENGConfig:
    """All SENG settings. Build it directly, or let ``SENG(model, **settings)`` build it from
    flat keyword arguments (any field of this class or of its nested configs)."""

    #: step size (scheduled: a value or a callable of the 0-based step)
    #: (a param group's lr may be 0: that group then stays as it is)
    lr: Schedule = setting(0.1, schedule=_POSITIVE, group=_NONNEGATIVE)
    #: ``λ`` (scheduled)
    damping: Schedule = setting(1.0, schedule=_POSITIVE, group=_POSITIVE)
    #: heavy-ball momentum on the direction (scheduled)
    momentum: Schedule = setting(0.9, schedule=_MOMENTUM, group=_MOMENTUM)
    #: L2 added to the gradient before preconditioning (scheduled)
    weight_decay: Schedule = setting(0.0, schedule=_NONNEGATIVE, group=_NONNEGATIVE)
    #: shrink the parameters by ``1 - lr·weight_decay`` instead of adding L2 to the gradient
    decoupled_weight_decay: bool = setting(False)
    #: ``T``: the curvature is rebuilt on steps ``k % T == 0`` (scheduled, int)
    curvature_update_interval: IntSchedule = setting(
        200, schedule=Range(positive=True, integer=True)
    )
    #: ``ϱ``: the first ϱ samples of the local batch build ``U`` (None: the whole batch)
    curvature_batch_size: int | None = setting(32)
    #: ``"mean"`` or ``"sum"``: the reduction of the loss whose gradient the user computes
    loss_reduction: str = setting("mean")
    #: ``"empirical"`` (the paper's: ``U`` from the gradients of the user's loss) or ``"mc"``:
    #: from gradients at targets drawn from the model's predictive distribution, which the
    #: loop names with ``opt.sample_fisher(output, distribution)`` before each ``backward()``
    #: (:mod:`seng_dist.fisher`). Either builds a valid curvature, so a checkpoint resumes
    #: under the other
    fisher: Fisher = setting(Fisher.EMPIRICAL)
    #: micro-batches whose gradients are summed before each ``step()``
    #: (1 to :data:`MAX_ACCUMULATION_STEPS`)
    gradient_accumulation_steps: int = setting(1)
    #: clip the averaged gradient to this global norm (None: no clipping)
    max_grad_norm: float | None = setting(None)
    #: skip (and count) a step whose averaged gradient is not finite
    skip_nonfinite: bool = setting(False)
    #: seed of the sketch generator (0 to ``SEED_LIMIT - 1``)
    seed: int = setting(0)
    #: module names (as ``model.named_modules()`` gives them; a name also leaves out the
    #: modules inside that one) or classes left to the fallback rule
    skip_layers: tuple[str | type, ...] = setting(())
    #: whether a Linear's input and output have the batch first (False: second, as in a
    #: sequence-first model); a layer inside a torch.nn module that declares ``batch_first``
    #: (``nn.Transformer``, its encoder/decoder layers, the RNNs) follows that module
    batch_first: bool = setting(True)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    diagonal: DiagonalConfig = field(default_factory=DiagonalConfig)

    def __post_init__(self) -> None:
        for name, rng in _SCHEDULES.items():
            rng.at(name, getattr(self, name), 0)
        for name in ("decoupled_weight_decay", "skip_nonfinite", "batch_first"):
            _check_bool(name, getattr(self, name))
        _check_optional_int("curvature_batch_size", self.curvature_batch_size)
        check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _set_choice(self, "fisher", Fisher)
        _check_int_in(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            1,
            MAX_ACCUMULATION_STEPS,
        )
        if self.max_grad_norm is not None:
            _POSITIVE.check("max_grad_norm", self.max_grad_norm)
        _check_int_in("seed", self.seed, 0, SEED_LIMIT - 1)
        object.__setattr__(self, "skip_layers", _as_skip_tuple(self.skip_layers))
        for s in self.skip_layers:
            if not isinstance(s, (str, type)):
                raise ValueError(
                    f"skip_layers must hold module names (str) or module classes, got {s!r}"
                )
            if s == "":
                # '' is the name of the model itself, which owns no parameter of its own
                # unless it is one layer: it would leave out nothing, silently.
                raise ValueError(
                    "skip_layers holds an empty module name ''; name the modules "
                    "as model.named_modules() does (e.g. 'head' or "
                    "'encoder.layers.0'), or give a module class"
                )

    # ------------------------------------------------------------------ flat settings
    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Every setting's flat name: ``SENG``'s keyword arguments and the ds_config params."""
        return tuple(f.name for f, _ in _leaf_fields(cls))

    @classmethod
    def from_settings(cls, **settings: Any) -> SENGConfig:
        """A config from flat settings (``factor_rank=2``, ``variant="lagged"``, ...)."""
        return cls().replace(**settings)

    def replace(self, **settings: Any) -> SENGConfig:
        """A copy with the given flat settings changed (and validated); a renamed setting's
        old name is taken with a warning (:func:`current_names`)."""
        settings = current_names(settings)
        owners = {f.name: owner for f, owner in _leaf_fields(type(self))}
        unknown = sorted(set(settings) - set(owners))
        if unknown:
            raise ValueError(
                f"unknown SENG setting(s) {', '.join(unknown)}; valid settings "
                f"are {', '.join(owners)}"
            )
        nested: dict[str, dict[str, Any]] = {}
        top = {}
        for name, value in settings.items():
            if owners[name]:
                nested.setdefault(owners[name], {})[name] = value
            else:
                top[name] = value
        for group, values in nested.items():
            top[group] = replace(getattr(self, group), **values)
        out = replace(self, **top)
        if "sketch_size" in settings:
            out.sketch.check_sketch_fits()
        return out

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name."""
        return {
            f.name: getattr(getattr(self, owner) if owner else self, f.name)
            for f, owner in _leaf_fields(type(self))
        }

    def fingerprint(self) -> dict[str, Any]:
        """:meth:`flat` with schedules represented by their kind (a callable cannot be
        compared), classes by name and choices by their string (a checkpoint loads with
        ``weights_only=True``): for checkpoints and the ranks' agreement check."""

        def show(value: Any) -> Any:
            if isinstance(value, tuple):
                return [show(v) for v in value]
            if isinstance(value, Choice):
                return value.value
            if isinstance(value, type):
                return f"<class {value.__qualname__}>"
            return "<callable>" if callable(value) else value

        return {k: show(v) for k, v in self.flat().items()}

    @classmethod
    def curvature_settings(cls) -> tuple[str, ...]:
        """The settings a checkpoint's curvature state was shaped by (must match on load)."""
        return tuple(f.name for f, _ in _leaf_fields(cls) if f.metadata.get("curvature"))


def current_names(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``settings`` with every renamed setting (:data:`RENAMED_SETTINGS`) under its new
    name, each old name used warned with a
    :class:`~seng_dist.warn.SENGDeprecationWarning`; ``ValueError`` when a setting is given
    under both names."""
    out = dict(settings)
    for old, new in RENAMED_SETTINGS.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(
                f"SENG settings {old!r} and {new!r} were both given: {old!r} is "
                f"the old name of {new!r}; give {new!r} only"
            )
        warn(
            f"SENG: the setting {old!r} was renamed {new!r}; {old}={out[old]!r} was taken "
            f"as {new}={out[old]!r}. The old name will be removed in a future release",
            SENGDeprecationWarning,
        )
        out[new] = out.pop(old)
    return out


def _renamed_attribute(config: Any, name: str) -> Any:
    """``config``'s setting whose old name is ``name``, warned; ``AttributeError`` for any
    other name."""
    new = RENAMED_SETTINGS.get(name)
    if new is None or new not in {f.name for f in fields(config)}:
        raise AttributeError(f"{type(config).__name__!r} object has no attribute {name!r}")
    warn(
        f"SENG: the setting {name!r} was renamed {new!r}: read it as .{new}. The old name "
        "will be removed in a future release",
        SENGDeprecationWarning,
    )
    return getattr(config, new)


def saved_names(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings (:meth:`SENGConfig.fingerprint`) under today's names: one
    written before a setting was renamed keeps it under the old name."""
    return {RENAMED_SETTINGS.get(k, k): v for k, v in fingerprint.items()}


def _as_skip_tuple(value: Any) -> tuple[Any, ...]:
    """``skip_layers`` as a tuple: one name or class, or an iterable of them."""
    if isinstance(value, (str, type)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(
            "skip_layers must be a module name (str), a module class, or an "
            f"iterable of them, got {value!r}"
        ) from None


def _nested(f: Field) -> type | None:
    """The nested config class that field ``f`` holds, if it holds one."""
    factory = f.default_factory
    return factory if isinstance(factory, type) and is_dataclass(factory) else None


def _leaf_fields(cls: type) -> list[tuple[Field, str]]:
    """Every setting of ``cls``: its field and the nested config holding it ("" for none)."""
    out: list[tuple[Field, str]] = []
    for f in fields(cls):
        sub = _nested(f)
        out.extend([(g, f.name) for g in fields(sub)] if sub is not None else [(f, "")])
    return out


#: the scheduled settings and their ranges
_SCHEDULES: dict[str, Range] = {
    f.name: f.metadata["schedule"]
    for f in fields(SENGConfig)
    if f.metadata.get("schedule") is not None
}

#: the settings kept in each ``param_groups`` entry (``torch.optim.lr_scheduler`` and friends
#: see them), and the values a group may give them
GROUP_SETTINGS: dict[str, Range] = {
    f.name: f.metadata["group"] for f in fields(SENGConfig) if f.metadata.get("group") is not None
}
