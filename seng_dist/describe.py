"""``SENG.describe()``: one row per parameter saying how SENG treats it, and why."""

from __future__ import annotations

from typing import Any

from torch import nn

from .curvature import BlockCurvature, ImplicitCurvature
from .groups import group_index
from .layers import Layout, module_name

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


def describe_table(
    model: nn.Module,
    layout: Layout,
    curvatures: list[BlockCurvature],
    groups: list[dict[str, Any]],
    explicit_threshold: int,
) -> str:
    """A text table: every parameter SENG updates, its layer's type, its block shape, its path
    (explicit/implicit/fallback) and why, its param group, the factor rank of an implicit
    block, and the bytes its curvature holds now (on the weight's row)."""
    curvature_of = {id(p): c for c in curvatures for p in c.block.params}
    group_of = group_index(groups)
    modules = {module_name(n): m for n, m in model.named_modules()}
    named = {id(p): module_name(n) for n, p in model.named_parameters()}
    rows = []
    for group in groups:
        for p in group["params"]:
            name = named.get(id(p), f"<outside the model: {tuple(p.shape)}>")
            layer = name.rpartition(".")[0] if id(p) in named else None
            kind = type(modules[layer]).__name__ if layer in modules else "-"
            c = curvature_of.get(id(p))
            if c is None:
                why = (
                    layout.fallback[layer]
                    if layer in layout.fallback
                    else _outside_why(id(p) in named)
                )
                rows.append(
                    (
                        name,
                        kind,
                        "x".join(map(str, p.shape)),
                        "fallback",
                        why,
                        str(group_of[id(p)]),
                        "-",
                        "-",
                    )
                )
                continue
            b = c.block
            sign = "<" if b.path == "explicit" else ">="
            rank = str(c.slot_rank) if isinstance(c, ImplicitCurvature) else "-"
            nbytes = f"{c.nbytes():,}" if p is b.weight else "(with the weight)"
            why = b.path_note or f"n = {b.n:,} {sign} explicit_threshold {explicit_threshold:,}"
            rows.append(
                (name, kind, f"{b.n_G}x{b.n_A}", b.path, why, str(group_of[id(p)]), rank, nbytes)
            )
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [_COLUMNS, tuple("-" * w for w in widths), *rows]
    ]
    return "\n".join(lines)


def _outside_why(in_model: bool) -> str:
    if in_model:
        return "its layer was frozen when SENG was built (trainable only since)"
    return "not a parameter of the model"
