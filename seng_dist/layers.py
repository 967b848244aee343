"""Per-layer helpers: which modules SENG preconditions, and their per-sample factors.

A supported layer's weight and bias form one block ``W̄ = [W | b]`` of shape ``(n_G, n_A)``
(bias as the last input column). For each sample ``i`` the layer gives ``Â_i`` (inputs at its κ
positions, plus a ones column for the bias) and ``Ĝ_i`` (output gradients at those positions);
the per-sample gradient of the block is ``Ĝ_iᵀ Â_i`` in the ``(κ, n)``-major layout used here.

BatchNorm's block is ``[γ | β]`` of shape ``(C, 2)``: its per-sample gradient
``[Σ x̂·∂L/∂y | Σ ∂L/∂y]`` (sums over the spatial positions) is not one product of an output
gradient and an input per position, so its two columns are its positions: ``Ĝ_i`` holds the
columns and ``Â_i`` is the 2×2 identity. In train mode ``x̂`` uses the batch statistics,
taken as constants (the per-sample gradient of the authors' code; the coupling of the samples
through the statistics reaches the input gradient, not γ's and β's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .warn import warn

BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: the layer types that can be blocks
SUPPORTED = (nn.Linear, nn.Conv2d) + _BATCHNORMS
#: layers with a weight that SENG does not precondition and says so about (the rest, e.g.
#: other normalisations and embeddings, follow the fallback rule by design); SyncBatchNorm's
#: statistics span the ranks, which the per-sample gradients of one rank cannot see
_UNSUPPORTED_WARNED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                       nn.ConvTranspose3d, nn.SyncBatchNorm)
_FALLBACK = "its parameters follow the fallback rule d = -g/(1+damping)"


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

    def add_params_(self, mat: Tensor, weight_alpha: float, bias_alpha: float) -> None:
        """``mat += [α_w·W | α_b·b]`` in place on an ``(n_G, n_A)`` matrix (L2 weight decay,
        which the weight's and the bias's param groups may set apart)."""
        if self.bias is None or weight_alpha == bias_alpha:
            if weight_alpha:
                mat.add_(self.param_matrix(), alpha=weight_alpha)
            return
        if weight_alpha:
            mat[:, :-1].add_(self.weight.detach().reshape(self.n_G, -1), alpha=weight_alpha)
        if bias_alpha:
            mat[:, -1].add_(self.bias.detach(), alpha=bias_alpha)

    def split(self, mat: Tensor) -> list[Tensor]:
        """Views of an ``(n_G, n_A)`` matrix shaped like the block's parameters."""
        if self.bias is None:
            return [mat.view_as(self.weight)]
        w = mat[:, :-1].reshape(self.weight.shape)
        return [w, mat[:, -1]]

    def layer_input(self, x: Tensor, limit: int | None) -> Tensor:
        """What the capture keeps of one call's input ``x``: its first ``limit`` samples,
        normalised for BatchNorm (with the statistics of the whole call in train mode, as
        the layer normalises them). Detached."""
        x = x.detach()
        if not isinstance(self.module, _BATCHNORMS):
            # The input is saved by autograd for the weight gradient anyway, so autograd's
            # version check already forbids in-place edits of it: a view suffices.
            return x[:limit]
        return _normalised(self.module, x, limit)

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
    if isinstance(module, _BATCHNORMS):
        # x is already x̂ (Block.layer_input); one position per column of [γ | β], Â the
        # identity: Σ_κ Ĝ_κᵀ Â_κ = [Σ x̂·gy | Σ gy].
        c = x.shape[1]
        gy = gy.reshape(b, c, -1)
        rows = [(x.reshape(b, c, -1) * gy).sum(2)] + ([gy.sum(2)] if bias else [])
        eye = torch.eye(len(rows), dtype=x.dtype, device=x.device)
        return eye.expand(b, len(rows), len(rows)), torch.stack(rows, dim=1)
    if isinstance(module, nn.Linear):
        a = x.reshape(b, -1, x.shape[-1])
        if bias:
            a = torch.cat([a, a.new_ones(b, a.shape[1], 1)], dim=2)
        return a, gy.reshape(b, -1, gy.shape[-1])
    conv = cast(nn.Conv2d, module)  # the one other block type
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


def _normalised(bn: BatchNorm, x: Tensor, limit: int | None) -> Tensor:
    """``x̂`` of the first ``limit`` samples as ``bn`` computes it (``F.batch_norm``'s rule:
    batch statistics in train mode or without running statistics, else the running ones)."""
    x = x.to(bn.weight.dtype)  # BatchNorm's affine parameters stay float32 under autocast
    if bn.training or bn.running_mean is None or bn.running_var is None:
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
    else:
        mean, var = bn.running_mean, bn.running_var
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x[:limit] - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)


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


def module_name(name: str) -> str:
    """``name`` without ``torch.compile``'s ``_orig_mod`` segments, so that a compiled model and
    the plain one name their layers (and checkpoints) alike."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")




@dataclass
class Layout:
    """What :func:`find_blocks` decided: the blocks, and for every other module that owns
    trainable parameters the reason it follows the fallback rule (by module name)."""

    blocks: list[Block]
    fallback: dict[str, str]


def find_blocks(model: nn.Module, skip_layers: tuple[str | type, ...] = (),
                explicit_threshold: int = 0) -> Layout:
    """The model's supported, trainable layers as blocks, in module order.

    A block of fewer than ``explicit_threshold`` entries takes the explicit path, any other
    the implicit one. Supported: ``nn.Linear``, ``nn.Conv2d`` with ``groups == 1`` and zero
    padding mode, and affine ``nn.BatchNorm1d/2d/3d``. A grouped or non-zero-padded
    convolution, another convolution type, ``nn.SyncBatchNorm``, a layer that overrides
    ``forward`` or shares its weight is left to the fallback rule with a warning;
    so is, silently, any layer named (or whose class is listed) in ``skip_layers``. A name in
    ``skip_layers`` that matches no module raises ``ValueError``.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    blocks, fallback, skipped = [], {}, set()
    for raw, module in model.named_modules():
        name = module_name(raw)
        skip = _skip_reason(name, module, skip_layers)
        if skip is not None:
            skipped.add(skip[1])  # matched, even if frozen: the name was right
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if skip is not None:
            fallback[name] = skip[0]
            continue
        why = _unsupported(name, module, owners)
        if why is not None:
            fallback[name] = why
            continue
        weight = module.weight
        bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        n_g = weight.shape[0]
        n_a = weight[0].numel() + (1 if bias is not None else 0)
        path = "explicit" if n_g * n_a < explicit_threshold else "implicit"
        blocks.append(Block(name or type(module).__name__, module, weight, bias, n_g, n_a,
                            path))
    unmatched = [s for s in skip_layers if isinstance(s, str) and s not in skipped]
    if unmatched:
        names = [module_name(n) for n, m in model.named_modules()
                 if isinstance(m, SUPPORTED)]
        raise ValueError(f"skip_layers names {', '.join(map(repr, unmatched))}, which match no "
                         f"module of the model; its supported layers are "
                         f"{', '.join(map(repr, names[:20]))}{' ...' if len(names) > 20 else ''}")
    return Layout(blocks, fallback)


def _skip_reason(name: str, module: nn.Module, skip: tuple[str | type, ...]
                 ) -> tuple[str, str | type] | None:
    """``(reason, the skip_layers entry)`` if ``skip_layers`` leaves this module out."""
    for s in skip:
        if isinstance(s, str) and (name == s or name.startswith(s + ".")):
            return f"named in skip_layers ({s!r})", s
        if isinstance(s, type) and isinstance(module, s):
            return f"its class is in skip_layers ({s.__name__})", s
    return None


def _unsupported(name: str, module: nn.Module, owners: dict[int, int]) -> str | None:
    """Why a module with trainable parameters is not a block (warned where the user may not
    expect it), or None for a supported layer."""
    kind = type(module).__name__
    if not isinstance(module, SUPPORTED):
        why = (f"{kind} is not a supported layer type (nn.Linear, nn.Conv2d, "
               "nn.BatchNorm1d/2d/3d)")
        if isinstance(module, _UNSUPPORTED_WARNED):
            warn(f"SENG: layer {name!r} ({kind}) is not preconditioned; {_FALLBACK}")
        return why
    weight = module.weight
    if not weight.requires_grad:
        return "its weight is frozen (requires_grad=False)"
    if type(module).forward not in (nn.Linear.forward, nn.Conv2d.forward,
                                    nn.BatchNorm2d.forward):
        # A subclass with its own forward: its per-sample factors are unknown.
        why = f"{kind} overrides forward"
    elif owners[id(weight)] > 1:
        why = "it shares its weight with another module"
    elif isinstance(module, nn.Conv2d) and (module.groups != 1
                                            or module.padding_mode != "zeros"):
        why = f"{module.groups} groups, padding_mode={module.padding_mode!r}"
    else:
        return None
    warn(f"SENG: layer {name!r} ({why}) is not preconditioned; {_FALLBACK}")
    return why
