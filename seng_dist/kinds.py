"""Layer kinds: how one type of layer turns a captured call into per-sample gradients.

A call is the layer's input ``x`` and output gradient ``gy``, both with the batch first. A kind
gives, per sample, either the factors ``(Â_i, Ĝ_i)`` with ``∇ψ_i = Σ_κ Ĝ_iκᵀ Â_iκ`` (what the
implicit path needs) or the per-sample gradient itself as an ``(n_G, n_A)`` matrix (all the
explicit path needs). A kind that has no cheap factors (a grouped convolution: its factors
would be zero everywhere outside one group) is :attr:`~LayerKind.factorable` ``False`` and its
blocks take the explicit path whatever their size.

:data:`REGISTRY` maps the supported layer types to their kinds: the single list of what SENG
preconditions. :func:`register_layer_kind` adds a user's type.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import solver


class LayerKind:
    """``nn.Linear`` (on ``(B, d)`` and on ``(B, *, d)``, κ the product of the middle dims),
    and the base of the other kinds."""

    #: whether :meth:`factors` is available (else the block is explicit only)
    factorable: ClassVar[bool] = True
    #: whether the batch may sit second in a sequence input (``batch_first=False``, or a torch.nn
    #: module around the layer that declares it), as in a Linear's; else it is always first
    follows_batch_first: ClassVar[bool] = True

    def for_module(self, module: nn.Module) -> LayerKind:
        """The kind of this module of the registered type (a kind may depend on the module's
        settings, as a convolution's does on its groups)."""
        return self

    def refusal(self, module: nn.Module) -> str | None:
        """Why this module of the registered type cannot be a block (None: it can)."""
        return None

    def weight_matrix(self, weight: Tensor) -> Tensor:
        """The weight as the block's columns before the bias's: ``(n_G, n_A - 1)`` with a bias,
        ``(n_G, n_A)`` without (the rows are the output features)."""
        return weight.reshape(weight.shape[0], -1)

    def weight_like(self, matrix: Tensor, weight: Tensor) -> Tensor:
        """:meth:`weight_matrix`'s inverse: a ``(n_G, ·)`` matrix in the weight's shape."""
        return matrix.reshape(weight.shape)

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


class TransposedLinearKind(LayerKind):
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored transposed, ``(nx, nf)``,
    and used as ``x @ W + b``; its block is ``[Wᵀ | b]`` ``(nf, nx + 1)``. Recognised by its
    class name and this shape contract, without importing transformers."""

    def refusal(self, module: nn.Module) -> str | None:
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        nf = getattr(module, "nf", None)
        if not (
            isinstance(weight, Tensor)
            and weight.dim() == 2
            and weight.shape[1] == nf
            and (bias is None or (isinstance(bias, Tensor) and bias.shape == (nf,)))
        ):
            return (
                f"{type(module).__name__} lacks transformers' Conv1D contract (a weight "
                "(nx, nf), a bias (nf,) and nf)"
            )
        return None

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.t()

    def weight_like(self, matrix: Tensor, weight: Tensor) -> Tensor:
        return matrix.t()


class ConvKind(LayerKind):
    """``nn.Conv1d``/``nn.Conv2d`` with one group: ``Â_i = unfold(x_i)``, κ the output
    positions (a Conv1d is a Conv2d of height one)."""

    follows_batch_first = False

    def for_module(self, module: nn.Module) -> LayerKind:
        return self if cast(nn.Conv2d, module).groups == 1 else GroupedConvKind()

    def refusal(self, module: nn.Module) -> str | None:
        mode = cast(nn.Conv2d, module).padding_mode
        return None if mode == "zeros" else f"padding_mode={mode!r}"

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

    def for_module(self, module: nn.Module) -> LayerKind:
        return self

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


class AffineRowsKind(LayerKind):
    """The base of the affine normalisations: block ``[γ | β]`` ``(n, 2)`` (``(n, 1)`` without
    β), one row per normalised element, per sample ``[Σ x̂·gy | Σ gy]`` over the positions
    (:meth:`keep_input` keeps ``x̂``). The two columns are κ = 2 positions: ``Ĝ`` ``(2, n)``
    holds them and ``Â`` is the 2×2 identity, so both solver paths take the block unchanged."""

    def factors(
        self, module: nn.Module, x: Tensor, gy: Tensor, bias: bool
    ) -> tuple[Tensor, Tensor]:
        b, n = x.shape[0], self.weight_matrix(cast(Tensor, module.weight)).shape[0]
        x, gy = self._positions(x, b, n), self._positions(gy, b, n)
        rows = [(x * gy).sum(2)] + ([gy.sum(2)] if bias else [])
        eye = torch.eye(len(rows), dtype=x.dtype, device=x.device)
        return eye.expand(b, len(rows), len(rows)), torch.stack(rows, dim=1)

    def _positions(self, t: Tensor, b: int, n: int) -> Tensor:
        """``t`` as ``(B, n, positions)``."""
        raise NotImplementedError


class BatchNormKind(AffineRowsKind):
    """Affine BatchNorm: block ``[γ | β]`` ``(C, 2)``, per sample ``[Σ x̂·gy | Σ gy]`` over the
    positions. Its two columns are its κ = 2 positions: ``Ĝ`` ``(2, C)`` holds them and ``Â``
    is the 2×2 identity. In train mode ``x̂`` uses the batch statistics, taken as constants
    (the coupling of the samples through them reaches the input gradient, not γ's and β's)."""

    follows_batch_first = False

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

    def _positions(self, t: Tensor, b: int, n: int) -> Tensor:
        return t.reshape(b, n, -1)  # the channels second, the positions after


class LayerNormKind(AffineRowsKind):
    """An affine ``nn.LayerNorm`` (with or without its bias): the rows of
    :class:`AffineRowsKind`, one per element of the normalised shape (flattened), summed over
    the other positions of a sequence. Its statistics are each position's own, so these are
    exact per-sample gradients."""

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(-1, 1)

    def keep_input(self, module: nn.Module, x: Tensor, limit: int | None) -> Tensor:
        """``x̂`` of the first ``limit`` samples, normalised over the weight's (trailing) dims."""
        weight = cast(Tensor, module.weight)
        x = x[:limit].to(weight.dtype)
        dims = list(range(x.dim() - weight.dim(), x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps(module, x))

    def eps(self, module: nn.Module, x: Tensor) -> float:
        """The layer's ε."""
        return float(cast(float, module.eps))

    def _positions(self, t: Tensor, b: int, n: int) -> Tensor:
        return t.reshape(b, -1, n).transpose(1, 2)  # the normalised elements last


class RMSNormKind(LayerNormKind):
    """An affine RMS normalisation, ``y = γ · x / √(mean(x²) + ε)`` over the weight's (trailing)
    dims, called on one tensor: ``nn.RMSNorm``, transformers' ``*RMSNorm`` classes (registered
    by name), or a user's. ``eps_attributes`` name the module's ε, the first one it has is
    read (``"eps"``: torch's and Gemma's, ``"variance_epsilon"``: Llama's and most of HF's);
    None there means ``torch.finfo(dtype).eps``, as ``nn.RMSNorm``'s default. A β, if the
    layer has one, is the second column. A weight used as ``1 + γ`` (Gemma's) has the same
    gradient, so the same block."""

    def __init__(self, *eps_attributes: str) -> None:
        self.eps_attributes = eps_attributes or ("eps", "variance_epsilon")

    def refusal(self, module: nn.Module) -> str | None:
        own = dict(module.named_parameters(recurse=False))
        weight = own.pop("weight", None)
        own.pop("bias", None)
        if weight is None or own or not any(hasattr(module, a) for a in self.eps_attributes):
            return (
                f"{type(module).__name__} lacks the RMSNorm contract (parameters weight and "
                f"an optional bias, an ε attribute among {list(self.eps_attributes)})"
            )
        # self and the input, nothing else (a gate, even optional, changes the gradient)
        takes = list(inspect.signature(type(module).forward).parameters.values())
        if len(takes) != 2 or takes[1].kind not in (
            takes[1].POSITIONAL_ONLY,
            takes[1].POSITIONAL_OR_KEYWORD,
        ):
            return f"{type(module).__name__}.forward takes other arguments than one input"
        return super().refusal(module)

    def keep_input(self, module: nn.Module, x: Tensor, limit: int | None) -> Tensor:
        """``x / √(mean(x²) + ε)`` of the first ``limit`` samples."""
        weight = cast(Tensor, module.weight)
        x = x[:limit].to(weight.dtype)
        dims = list(range(x.dim() - weight.dim(), x.dim()))
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + self.eps(module, x))

    def eps(self, module: nn.Module, x: Tensor) -> float:
        name = next(a for a in self.eps_attributes if hasattr(module, a))
        eps = getattr(module, name)
        return torch.finfo(x.dtype).eps if eps is None else float(eps)


class EmbeddingKind(LayerKind):
    """``nn.Embedding``, opt-in (``register_layer_kind(nn.Embedding, EmbeddingKind())``): the
    weight ``(V, d)`` is the block, per sample ``Σ_t e_{x_t} gy_tᵀ`` over its positions, so
    ``Ĝ`` is the one-hot of the ids ``(κ, V)`` and ``Â`` the output gradient ``(κ, d)``. The
    one-hot is dense: the capture holds ``V`` numbers per position, fit for byte or character
    vocabularies, not for a 50k-token one. A padding id's rows are zero, as its gradient is.
    Every call must see the batch: an embedding called on ids shared by the batch (positions
    broadcast over it) makes SENG's batch-size check fail; name it in ``skip_layers``."""

    def refusal(self, module: nn.Module) -> str | None:
        emb = cast(nn.Embedding, module)
        if emb.max_norm is not None:
            return "max_norm renormalises the weight in forward"
        if emb.scale_grad_by_freq or emb.sparse:
            return "scale_grad_by_freq or sparse gradients"
        return None

    def batch_first(self, module: nn.Module, batch_dim: int) -> Callable[[Tensor], Tensor]:
        # The ids (T, B) move as the output gradient (T, B, d) does; (B,) ids give (B, d).
        if not batch_dim:
            return _same
        return lambda t: t.movedim(batch_dim, 0) if t.dim() > 1 + t.is_floating_point() else t

    def factors(
        self, module: nn.Module, x: Tensor, gy: Tensor, bias: bool
    ) -> tuple[Tensor, Tensor]:
        emb = cast(nn.Embedding, module)
        b = x.shape[0]
        ids = x.reshape(b, -1)
        onehot = F.one_hot(ids, emb.num_embeddings).to(gy.dtype)
        if emb.padding_idx is not None:
            onehot[ids == emb.padding_idx] = 0.0
        return gy.reshape(b, ids.shape[1], -1), onehot


def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Registration:
    """One supported layer type: what it matches, its kind and its name in messages."""

    #: a class (its subclasses match too), or a class name or a pattern of class names
    #: (``fnmatch``'s: ``"*RMSNorm"``) matched along a module's MRO
    match: type[nn.Module] | str
    kind: LayerKind
    name: str

    def owner(self, module: nn.Module) -> type[nn.Module] | None:
        """The class of ``module``'s MRO that this registration matches, if any: the class
        whose ``forward`` the kind expects."""
        for cls in type(module).__mro__:
            if cls is self.match or (
                isinstance(self.match, str) and fnmatchcase(cls.__name__, self.match)
            ):
                return cls
        return None


class LayerRegistry:
    """The layer types SENG preconditions and their kinds: the single source that
    :func:`~seng_dist.layers.find_blocks`, :func:`supported_layer_types` and the messages use.
    A module takes the entry of the latest registration that matches it."""

    def __init__(self) -> None:
        self._entries: list[Registration] = []

    def register(
        self, match: type[nn.Module] | str, kind: LayerKind, name: str | None = None
    ) -> None:
        """Add ``match`` with ``kind``; registering it again replaces its entry in place."""
        if name is None:
            name = match if isinstance(match, str) else _display_name(match)
        entry = Registration(match, kind, name)
        for i, old in enumerate(self._entries):
            if old.match == match:
                self._entries[i] = entry
                return
        self._entries.append(entry)

    def unregister(self, match: type[nn.Module] | str) -> None:
        """Remove ``match``'s entry (its modules then follow the fallback rule)."""
        self._entries = [e for e in self._entries if e.match != match]

    def lookup(self, module: nn.Module) -> Registration | None:
        """The registration ``module`` matches, or None."""
        for entry in reversed(self._entries):
            if entry.owner(module) is not None:
                return entry
        return None

    def names(self) -> tuple[str, ...]:
        """The registered types' names, in registration order."""
        return tuple(e.name for e in self._entries)


def _display_name(cls: type) -> str:
    """``nn.Linear`` for torch.nn's own classes, else the class's module and name."""
    if cls.__module__.startswith("torch.nn."):
        return f"nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


#: the layer types of this process (:func:`register_layer_kind` adds to it)
REGISTRY = LayerRegistry()
REGISTRY.register(nn.Linear, LayerKind())
REGISTRY.register(nn.Conv1d, ConvKind())
REGISTRY.register(nn.Conv2d, ConvKind())
REGISTRY.register(nn.BatchNorm1d, BatchNormKind())
REGISTRY.register(nn.BatchNorm2d, BatchNormKind())
REGISTRY.register(nn.BatchNorm3d, BatchNormKind())
#: its projections are blocks of the Linear kind: its forward calls ``F.linear`` on their
#: weights, which the capture reads (``layers.find_blocks``, ``capture.LinearTap``)
REGISTRY.register(nn.MultiheadAttention, LayerKind())
REGISTRY.register(nn.LayerNorm, LayerNormKind())
#: transformers' ~200 RMSNorm classes (LlamaRMSNorm, ...: one per model family, by name, with
#: RMSNormKind's contract checked), before nn.RMSNorm so that torch's own matches its own entry
REGISTRY.register("*RMSNorm", RMSNormKind(), "*RMSNorm (transformers' LlamaRMSNorm, ..., by name)")
REGISTRY.register(nn.RMSNorm, RMSNormKind())
REGISTRY.register("Conv1D", TransposedLinearKind(), "Conv1D (transformers, matched by name)")


def register_layer_kind(
    layer_type: type[nn.Module] | str, kind: LayerKind, name: str | None = None
) -> None:
    """Teach SENG a layer type: its modules (and its subclasses' that keep its ``forward``)
    become blocks of ``kind``, e.g. HF's T5 norm, an RMSNorm by another name::

        seng_dist.register_layer_kind(T5LayerNorm, seng_dist.kinds.RMSNormKind())

    ``layer_type`` is a class, or a class name or ``fnmatch`` pattern of class names matched
    along a module's MRO (a type that cannot be imported here); the module's ``weight`` (and
    ``bias``, if it has one) form the block. ``name`` is how messages and
    :func:`supported_layer_types` list it (default: ``nn.X`` for torch.nn's classes, else the
    class's module and name). Registering a type
    again replaces its kind. A SENG finds its blocks when it is built: a registration made
    afterwards affects only the SENGs built later."""
    REGISTRY.register(layer_type, kind, name)


def supported_layer_types() -> tuple[str, ...]:
    """The layer types SENG preconditions, as ``"nn.Linear"``, ..., in registration order: the
    one list that SENG's messages, its docstring and the README give. Every other trainable
    parameter follows the fallback rule."""
    return REGISTRY.names()


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
