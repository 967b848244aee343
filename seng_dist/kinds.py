"""Layer kinds: how one type of layer turns a captured call into per-sample gradients.

A call is the layer's input ``x`` and output gradient ``gy``, both with the batch first. A kind
gives, per sample, either the factors ``(Â_i, Ĝ_i)`` with ``∇ψ_i = Σ_κ Ĝ_iκᵀ Â_iκ`` (what the
implicit path needs) or the per-sample gradient itself as an ``(n_G, n_A)`` matrix (all the
explicit path needs). A kind that has no cheap factors (a grouped convolution: its factors
would be zero everywhere outside one group) is :attr:`~LayerKind.factorable` ``False`` and its
blocks take the explicit path whatever their size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import solver

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d)
#: the attention module whose projections are blocks: its forward calls ``F.linear`` on their
#: weights, which the capture reads (``layers.find_blocks``, ``capture.LinearTap``)
ATTENTION = nn.MultiheadAttention
#: every layer type SENG preconditions: those :func:`kind_of` tells apart, ``nn.Linear`` (its
#: default kind, also the attention projections' kind) and the attention module
SUPPORTED: tuple[type[nn.Module], ...] = (nn.Linear, *CONVS, *BATCHNORMS, ATTENTION)


def supported_layer_types() -> tuple[str, ...]:
    """The layer types SENG preconditions, as ``"nn.Linear"``, ...: the one list that SENG's
    messages, its docstring and the README give. Every other trainable parameter follows the
    fallback rule."""
    return tuple(f"nn.{t.__name__}" for t in SUPPORTED)


class LayerKind:
    """``nn.Linear`` (on ``(B, d)`` and on ``(B, *, d)``, κ the product of the middle dims),
    and the base of the other kinds."""

    #: whether :meth:`factors` is available (else the block is explicit only)
    factorable: ClassVar[bool] = True

    def batch_first(self, module: nn.Module, batch_dim: int) -> Callable[[Tensor], Tensor]:
        """How a call's input and output gradient get the batch first (a Linear's batch sits
        at ``batch_dim`` of a sequence, and first in a ``(B, d)`` input)."""
        if not batch_dim:
            return _same
        return lambda t: t.movedim(batch_dim, 0) if t.dim() > 2 else t

    def keep_input(self, module: nn.Module, x: Tensor, limit: int | None) -> Tensor:
        """What the capture keeps of a call's (batch-first, detached) input."""
        # The input is saved by autograd for the weight gradient anyway, so autograd's
        # version check already forbids in-place edits of it: a view suffices.
        return x[:limit]

    def factors(
        self, module: nn.Module, x: Tensor, gy: Tensor, bias: bool
    ) -> tuple[Tensor, Tensor]:
        """``(Â, Ĝ)`` of one call: shapes ``(B, κ, n_A)`` and ``(B, κ, n_G)``."""
        b = x.shape[0]
        a = x.reshape(b, -1, x.shape[-1])
        if bias:
            a = torch.cat([a, a.new_ones(b, a.shape[1], 1)], dim=2)
        return a, gy.reshape(b, -1, gy.shape[-1])

    def grads(self, module: nn.Module, x: Tensor, gy: Tensor, bias: bool) -> Tensor:
        """The per-sample gradients of one call, ``(B, n_G, n_A)``."""
        a, g = self.factors(module, x, gy, bias)
        return solver.per_sample_grads(g, a).view(g.shape[0], g.shape[2], a.shape[2])


class ConvKind(LayerKind):
    """``nn.Conv1d``/``nn.Conv2d`` with one group: ``Â_i = unfold(x_i)``, κ the output
    positions (a Conv1d is a Conv2d of height one)."""

    def batch_first(self, module: nn.Module, batch_dim: int) -> Callable[[Tensor], Tensor]:
        # A convolution's batch is first, or absent (an unbatched call: one sample).
        dims = len(cast(nn.Conv2d, module).kernel_size) + 2
        return lambda t: t if t.dim() == dims else t.unsqueeze(0)

    def factors(
        self, module: nn.Module, x: Tensor, gy: Tensor, bias: bool
    ) -> tuple[Tensor, Tensor]:
        # Both are transposed views of (B, ·, κ) tensors: the ones row of the bias is appended
        # in unfold's own layout, where it is a plain block copy.
        b = x.shape[0]
        cols = columns(cast(nn.Conv1d | nn.Conv2d, module), x)  # (B, C·k, κ)
        if bias:
            cols = torch.cat([cols, cols.new_ones(b, 1, cols.shape[2])], dim=1)
        return cols.transpose(1, 2), gy.reshape(b, gy.shape[1], -1).transpose(1, 2)


class GroupedConvKind(ConvKind):
    """A grouped or depthwise ``nn.Conv1d``/``nn.Conv2d``: each group's rows of the weight see
    only its own input channels, so the per-sample gradient is computed group by group."""

    factorable = False

    def factors(
        self, module: nn.Module, x: Tensor, gy: Tensor, bias: bool
    ) -> tuple[Tensor, Tensor]:
        raise TypeError("a grouped convolution has no per-sample factors (explicit path only)")

    def grads(self, module: nn.Module, x: Tensor, gy: Tensor, bias: bool) -> Tensor:
        conv = cast(nn.Conv1d | nn.Conv2d, module)
        b, groups, out = x.shape[0], conv.groups, conv.out_channels
        cols = columns(conv, x)  # (B, C·k, κ), channel-major: each group's rows are contiguous
        cols = cols.reshape(b, groups, -1, cols.shape[2])
        g = gy.reshape(b, groups, out // groups, -1)
        w = torch.einsum("bgok,bgik->bgoi", g, cols).reshape(b, out, -1)
        if not bias:
            return w
        return torch.cat([w, g.sum(3).reshape(b, out, 1)], dim=2)


class BatchNormKind(LayerKind):
    """Affine BatchNorm: block ``[γ | β]`` ``(C, 2)``, per sample ``[Σ x̂·gy | Σ gy]`` over the
    positions. Its two columns are its κ = 2 positions: ``Ĝ`` ``(2, C)`` holds them and ``Â``
    is the 2×2 identity. In train mode ``x̂`` uses the batch statistics, taken as constants
    (the coupling of the samples through them reaches the input gradient, not γ's and β's)."""

    def keep_input(self, module: nn.Module, x: Tensor, limit: int | None) -> Tensor:
        """``x̂`` of the first ``limit`` samples as the layer computes it (``F.batch_norm``'s
        rule: batch statistics in train mode or without running statistics, else the running
        ones)."""
        bn = cast(nn.BatchNorm2d, module)
        x = x.to(bn.weight.dtype)  # BatchNorm's affine parameters stay float32 under autocast
        if bn.training or bn.running_mean is None or bn.running_var is None:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0)
        else:
            mean, var = bn.running_mean, bn.running_var
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x[:limit] - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)

    def factors(
        self, module: nn.Module, x: Tensor, gy: Tensor, bias: bool
    ) -> tuple[Tensor, Tensor]:
        b, c = x.shape[0], x.shape[1]
        gy = gy.reshape(b, c, -1)
        rows = [(x.reshape(b, c, -1) * gy).sum(2)] + ([gy.sum(2)] if bias else [])
        eye = torch.eye(len(rows), dtype=x.dtype, device=x.device)
        return eye.expand(b, len(rows), len(rows)), torch.stack(rows, dim=1)


def _same(t: Tensor) -> Tensor:
    return t


def kind_of(module: nn.Module) -> LayerKind:
    """The kind of a supported layer."""
    if isinstance(module, BATCHNORMS):
        return BatchNormKind()
    if isinstance(module, CONVS):
        return ConvKind() if module.groups == 1 else GroupedConvKind()
    return LayerKind()


def columns(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """``unfold`` of a convolution's input: ``(B, C·k, κ)`` (a Conv1d as height one)."""
    if isinstance(conv.padding, str):
        # 'same'/'valid': the exact (possibly asymmetric) padding the layer applies.
        x = F.pad(x, _string_padding(conv))
        padding: tuple[int, ...] = (0,) * len(conv.kernel_size)
    else:
        padding = conv.padding
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = ((1,) + t for t in (kernel, dilation, stride))
        padding = (0,) + padding
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def _string_padding(conv: nn.Conv1d | nn.Conv2d) -> list[int]:
    """``F.pad``'s (last dim first) padding for ``padding='same'``/``'valid'``: for 'same' the
    total ``dilation·(k-1)`` per dim, its odd unit on the right, as the layer itself pads."""
    if conv.padding == "valid":
        return [0, 0] * len(conv.kernel_size)
    pad: list[int] = []
    for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size), strict=True):
        total = d * (k - 1)
        pad += [total // 2, total - total // 2]
    return pad
