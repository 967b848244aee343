"""How SENG treats each parameter: ``SENG.describe()``'s table (one row per parameter, then
the share of the elements on each path) and the construction's warning when most of the
trainable elements follow the first-order fallback rule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .curvature import BlockCurvature, ImplicitCurvature
from .groups import group_index
from .layers import Block, Layout, module_name

#: the paths a parameter can take, in the order the summary lists them
PATHS = ("explicit", "implicit", "fallback")

#: SENG warns at construction when more than this share of the trainable elements (those
#: skip_layers did not leave out on purpose) follows the fallback rule. Past half, most of
#: the model moves by a first-order step (SGD with momentum, or Adam's diagonal) while SENG
#: still spends its curvature capture and solves on the rest: calling that run "SENG" would
#: mislead. Below it a model's usual first-order remainder (norms, embeddings, biases of
#: unsupported layers) stays quiet.
MOSTLY_FIRST_ORDER = 0.5

#: how many of the largest fallback layer types the warning names
_TOP_TYPES = 3

_COLUMNS = (
    "parameter",
    "layer type",
    "block",
    "path",
    "why",
    "group",
    "factor rank",
    "curvature bytes",
)
_SUMMARY_COLUMNS = ("path", "parameters", "elements", "share")


@dataclass(frozen=True)
class Placement:
    """How SENG treats one parameter it updates: its block, or why it has none."""

    param: Tensor
    name: str
    #: its layer's type ("-" for a parameter outside the model)
    layer_type: str
    group: int
    #: its block; None: it follows the fallback rule
    block: Block | None
    #: why it follows the fallback rule ("" for a block's parameter)
    why: str
    #: whether ``skip_layers`` put it on the fallback rule (the user's choice)
    skipped: bool = False

    @property
    def path(self) -> str:
        """``"explicit"``, ``"implicit"`` or ``"fallback"``."""
        return "fallback" if self.block is None else self.block.path


def placements(model: nn.Module, layout: Layout, groups: list[dict[str, Any]]) -> list[Placement]:
    """Every parameter of ``groups``, in group order, placed by ``layout``."""
    block_of = {id(p): b for b in layout.blocks for p in b.params}
    group_of = group_index(groups)
    modules = {module_name(n): m for n, m in model.named_modules()}
    named = {id(p): module_name(n) for n, p in model.named_parameters()}
    found = []
    for group in groups:
        for p in group["params"]:
            name = named.get(id(p), f"<outside the model: {tuple(p.shape)}>")
            layer = name.rpartition(".")[0] if id(p) in named else None
            block = block_of.get(id(p))
            why = "" if block is not None else _fallback_why(layout, layer, id(p) in named)
            layer_type = type(modules[layer]).__name__ if layer in modules else "-"
            skipped = block is None and layer in layout.skipped
            found.append(Placement(p, name, layer_type, group_of[id(p)], block, why, skipped))
    return found


def describe_table(
    places: list[Placement], curvatures: list[BlockCurvature], explicit_threshold: int
) -> str:
    """A text table: every parameter SENG updates, its layer's type, its block shape, its path
    (explicit/implicit/fallback) and why, its param group, the factor rank of an implicit
    block, and the bytes its curvature holds now (on the weight's row); then per path the
    parameters, elements and share of the elements, and their total."""
    curvature_of = {id(c.block): c for c in curvatures}
    rows: list[tuple[str, ...]] = []
    for place in places:
        p, b, group = place.param, place.block, str(place.group)
        if b is None:
            shape = "x".join(map(str, p.shape))
            rows.append(
                (place.name, place.layer_type, shape, "fallback", place.why, group, "-", "-")
            )
            continue
        c = curvature_of[id(b)]
        sign = "<" if b.path == "explicit" else ">="
        rank = str(c.slot_rank) if isinstance(c, ImplicitCurvature) else "-"
        nbytes = f"{c.nbytes():,}" if p is b.weight else "(with the weight)"
        why = b.path_note or f"n = {b.n:,} {sign} explicit_threshold {explicit_threshold:,}"
        rows.append(
            (place.name, place.layer_type, f"{b.n_G}x{b.n_A}", b.path, why, group, rank, nbytes)
        )
    return _table(_COLUMNS, rows) + "\n\n" + _table(_SUMMARY_COLUMNS, _summary(places))


def first_order_warning(places: list[Placement], adam_diagonal: bool) -> str | None:
    """The construction's warning when more than :data:`MOSTLY_FIRST_ORDER` of the
    trainable elements that ``skip_layers`` did not leave out follow the fallback rule
    (the share, the largest fallback layer types, the fixes), else None."""
    considered = [p for p in places if not p.skipped]
    total = _elements(considered)
    fallback = [p for p in considered if p.block is None]
    if not total or _elements(fallback) <= MOSTLY_FIRST_ORDER * total:
        return None
    sizes: Counter[str] = Counter()
    for p in fallback:
        sizes[p.layer_type if p.layer_type != "-" else "outside the model"] += p.param.numel()
    largest = ", ".join(f"{t} ({n:,})" for t, n in sizes.most_common(_TOP_TYPES))
    scope = "" if len(considered) == len(places) else " outside skip_layers"
    nothing = "" if any(p.block for p in places) else " (SENG preconditions no layer)"
    adam = (
        ""
        if adam_diagonal
        else "; to give them at least Adam's per-coordinate step, set damping_diagonal='adam'"
    )
    return (
        f"SENG: {_percent(_elements(fallback), total)} of the trainable elements{scope} "
        f"({_elements(fallback):,} of {total:,}) follow the first-order fallback rule, not "
        f"SENG's preconditioner{nothing}. Largest fallback layer types: {largest}. To "
        "precondition them, register their type with seng_dist.register_layer_kind "
        f"(seng_dist.supported_layer_types() lists the supported ones){adam}; to leave "
        "layers to it on purpose (and silence this), name "
        "them in skip_layers. opt.describe() gives each parameter's path and why"
    )


def _fallback_why(layout: Layout, layer: str | None, in_model: bool) -> str:
    if layer in layout.fallback:
        return layout.fallback[layer]
    if in_model:
        return "its layer was frozen when SENG was built (trainable only since)"
    return "not a parameter of the model"


def _summary(places: list[Placement]) -> list[tuple[str, ...]]:
    """Per path, then in total: parameters, elements, share of the elements."""
    total = _elements(places)
    rows: list[tuple[str, ...]] = []
    for path in PATHS:
        on = [p for p in places if p.path == path]
        rows.append((path, f"{len(on):,}", f"{_elements(on):,}", _percent(_elements(on), total)))
    rows.append(("total", f"{len(places):,}", f"{total:,}", _percent(total, total)))
    return rows


def _elements(places: Sequence[Placement]) -> int:
    return sum(p.param.numel() for p in places)


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """``rows`` under ``columns`` and a rule, each column as wide as its widest cell."""
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [columns, tuple("-" * w for w in widths), *rows]
    ]
    return "\n".join(lines)
