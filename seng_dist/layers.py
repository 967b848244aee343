"""Per-layer helpers: which modules SENG preconditions, and their per-sample factors.

A supported layer's weight and bias form one block ``W̄ = [W | b]`` of shape ``(n_G, n_A)``
(bias as the last input column). For each sample ``i`` the layer gives ``Â_i`` (inputs at its κ
positions, plus a ones column for the bias) and ``Ĝ_i`` (output gradients at those positions);
the per-sample gradient of the block is ``Ĝ_iᵀ Â_i`` in the ``(κ, n)``-major layout used here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(eq=False)
class Block:
    """One preconditioned layer: its parameters, sizes and solver path (``"explicit"`` or
    ``"implicit"``, chosen once by :func:`find_blocks` from its size)."""

    name: str
    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    n_G: int
    n_A: int
    path: str
    params: tuple[Tensor, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.params = (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def n(self) -> int:
        return self.n_G * self.n_A

    def grad_matrix(self) -> Tensor:
        """The block's gradient as an ``(n_G, n_A)`` matrix (a new tensor); a missing
        (None) weight or bias gradient counts as zero."""
        w, b = self.weight, self.bias
        g = torch.zeros_like(w) if w.grad is None else w.grad
        g = g.reshape(self.n_G, -1)
        if b is None:
            return g.clone()
        gb = torch.zeros_like(b) if b.grad is None else b.grad
        return torch.cat([g, gb.reshape(self.n_G, 1)], dim=1)

    def param_matrix(self) -> Tensor:
        """The block's parameters as an ``(n_G, n_A)`` matrix (a new tensor)."""
        w = self.weight.detach().reshape(self.n_G, -1)
        if self.bias is None:
            return w.clone()
        return torch.cat([w, self.bias.detach().reshape(self.n_G, 1)], dim=1)

    def split(self, mat: Tensor) -> list[Tensor]:
        """Views of an ``(n_G, n_A)`` matrix shaped like the block's parameters."""
        if self.bias is None:
            return [mat.view_as(self.weight)]
        w = mat[:, :-1].reshape(self.weight.shape)
        return [w, mat[:, -1]]

    def per_sample_factors(self, inputs: list[Tensor], grads: list[Tensor],
                           scale: float) -> tuple[Tensor, Tensor]:
        """``(Ĝ, Â)`` of shapes ``(ϱ, κ, n_G)`` and ``(ϱ, κ, n_A)`` from captured calls.

        A module called several times in one forward contributes each call's positions: the
        per-sample gradient is the sum over calls, so the positions are concatenated.
        ``scale`` multiplies the output gradients (the batch size under a mean-reduced loss).
        """
        gs, As = [], []
        dtype = self.weight.dtype
        for x, gy in zip(inputs, grads, strict=True):
            # Under autocast the layer sees and returns bf16/fp16; curvature is kept in the
            # parameters' dtype.
            a, g = _factor(self.module, x.to(dtype), gy.to(dtype), self.bias is not None)
            gs.append(g)
            As.append(a)
        g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
        a = torch.cat(As, dim=1) if len(As) > 1 else As[0]
        if scale != 1.0:
            g = g * scale
        return g, a


def _factor(module: nn.Module, x: Tensor, gy: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """``(Â, Ĝ)`` for one call: shapes ``(B, κ, n_A)`` and ``(B, κ, n_G)``.

    For a convolution both are transposed views of ``(B, ·, κ)`` tensors: the ones row of the
    bias is appended in unfold's own layout, where it is a plain block copy.
    """
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        a = x.reshape(b, -1, x.shape[-1])
        if bias:
            a = torch.cat([a, a.new_ones(b, a.shape[1], 1)], dim=2)
        return a, gy.reshape(b, -1, gy.shape[-1])
    conv = cast(nn.Conv2d, module)  # only Linear and Conv2d are ever blocks
    padding: int | tuple[int, ...] = 0
    if isinstance(conv.padding, str):
        # 'same'/'valid': the exact (possibly asymmetric) padding the layer applies.
        x = F.pad(x, _string_padding(conv))
    else:
        padding = conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding,
                    stride=conv.stride)  # (B, C·kh·kw, κ)
    if bias:
        cols = torch.cat([cols, cols.new_ones(b, 1, cols.shape[2])], dim=1)
    return cols.transpose(1, 2), gy.reshape(b, gy.shape[1], -1).transpose(1, 2)


def _string_padding(conv: nn.Conv2d) -> list[int]:
    """``F.pad``'s (last dim first) padding for ``padding='same'``/``'valid'``: for 'same' the
    total ``dilation·(k-1)`` per dim, its odd unit on the right, as the layer itself pads."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    pad: list[int] = []
    for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size), strict=True):
        total = d * (k - 1)
        pad += [total // 2, total - total // 2]
    return pad


def _matches(name: str, module: nn.Module, skip: tuple[str | type, ...]) -> bool:
    for s in skip:
        if isinstance(s, str):
            if name == s or name.startswith(s + "."):
                return True
        elif isinstance(s, type) and isinstance(module, s):
            return True
    return False


def find_blocks(model: nn.Module, skip_layers: tuple[str | type, ...] = (),
                explicit_threshold: int = 0) -> list[Block]:
    """The model's supported, trainable layers as blocks, in module order.

    A block of fewer than ``explicit_threshold`` entries takes the explicit path, any other
    the implicit one. Supported: ``nn.Linear`` and ``nn.Conv2d`` with ``groups == 1`` and zero
    padding mode. A grouped or non-zero-padded convolution is left to the fallback rule with a
    warning; so is any layer named (or whose class is listed) in ``skip_layers``.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    blocks = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        weight = module.weight
        if weight is None or not weight.requires_grad:
            continue
        if type(module).forward not in (nn.Linear.forward, nn.Conv2d.forward):
            # A subclass with its own forward: its per-sample factors are unknown.
            warnings.warn(f"SENG: layer {name!r} ({type(module).__name__}) overrides forward; "
                          f"its parameters follow the fallback rule d = -g/(1+damping)",
                          stacklevel=3)
            continue
        if owners[id(weight)] > 1:
            warnings.warn(f"SENG: layer {name!r} shares its weight with another module; "
                          f"its parameters follow the fallback rule d = -g/(1+damping)",
                          stacklevel=3)
            continue
        if _matches(name, module, skip_layers):
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1
                                              or module.padding_mode != "zeros"):
            warnings.warn(f"SENG: layer {name!r} ({module.groups} groups, padding_mode="
                          f"{module.padding_mode!r}) is not preconditioned; its parameters "
                          "follow the fallback rule d = -g/(1+damping)", stacklevel=3)
            continue
        bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        n_g = weight.shape[0]
        n_a = weight[0].numel() + (1 if bias is not None else 0)
        path = "explicit" if n_g * n_a < explicit_threshold else "implicit"
        blocks.append(Block(name or type(module).__name__, module, weight, bias, n_g, n_a,
                            path))
    return blocks
