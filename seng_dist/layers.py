"""Which modules SENG preconditions (blocks), and each block's per-sample gradients.

A supported layer's weight and bias form one block ``W̄ = [W | b]`` of shape ``(n_G, n_A)``
(bias as the last input column). For each sample ``i`` the layer gives ``Â_i`` (inputs at its κ
positions, plus a ones column for the bias) and ``Ĝ_i`` (output gradients at those positions);
the per-sample gradient of the block is ``Ĝ_iᵀ Â_i`` in the ``(κ, n)``-major layout used here.
How each layer type gives them is its kind's (:mod:`seng_dist.kinds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from . import solver
from .kinds import REGISTRY, LayerKind
from .warn import warn

#: layers with a weight that SENG does not precondition and says so about (the rest, e.g.
#: other normalisations and embeddings, follow the fallback rule by design); SyncBatchNorm's
#: statistics span the ranks, which the per-sample gradients of one rank cannot see
_UNSUPPORTED_WARNED = (
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.SyncBatchNorm,
)
#: the fallback rule, as the warnings state it
FALLBACK_RULE = (
    "d = -g/(1+damping) (with damping_diagonal='adam': Adam's step over damping, "
    "-g/(damping·(√v̂+ε)))"
)
_FALLBACK = f"its parameters follow the fallback rule {FALLBACK_RULE}"


@dataclass
class CapturedCall:
    """One captured use of a block's weight: its input and output gradient with the batch
    first, and the rows of the weight it used (None: all of them)."""

    x: Tensor
    gy: Tensor
    rows: slice | None = None


@dataclass
class PerSample:
    """One block's captured calls and the factor on their output gradients (the batch size
    under a mean-reduced loss): ``U``'s columns ``∇ψ_i/√ϱ`` as factors or as gradients."""

    block: Block
    calls: list[CapturedCall]
    scale: float

    @property
    def _root(self) -> float:
        return 1.0 / math.sqrt(self.calls[0].x.shape[0])

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(Ĝ/√ϱ, Â)`` (:meth:`Block.per_sample_factors`)."""
        G_hat, A_hat = self.block.per_sample_factors(self.calls, self.scale)
        return G_hat * self._root, A_hat

    def grads(self) -> Tensor:
        """``Uᵀ`` ``(ϱ, n)``: from the factors where the kind has them (the same sums as the
        implicit path's), else :meth:`Block.per_sample_grads`."""
        if self.block.kind.factorable:
            return solver.per_sample_grads(*self.factors())
        return self.block.per_sample_grads(self.calls, self.scale) * self._root


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
    kind: LayerKind = field(default_factory=LayerKind)
    #: where the batch is in the inputs and outputs of the module's calls (0 or 1)
    batch_dim: int = 0
    #: the module whose forward uses the weight functionally (``nn.MultiheadAttention``), if
    #: the layer is not called itself
    via: nn.Module | None = None
    #: why the path is not the size rule's (empty: it is)
    path_note: str = ""
    params: tuple[Tensor, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.params = (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def n(self) -> int:
        return self.n_G * self.n_A

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the block's curvature and math (:func:`~seng_dist.solver.compute_dtype`
        of its weight's)."""
        return solver.compute_dtype(self.weight.dtype)

    def grad_matrix(self) -> Tensor:
        """The block's gradient as an ``(n_G, n_A)`` matrix (a new tensor, in
        :attr:`compute_dtype`); a missing (None) weight or bias gradient counts as zero."""
        w, b = self.weight, self.bias
        g = self.kind.weight_matrix(torch.zeros_like(w) if w.grad is None else w.grad)
        if b is None:
            return g.to(self.compute_dtype, copy=True)
        gb = torch.zeros_like(b) if b.grad is None else b.grad
        return torch.cat([g, gb.reshape(self.n_G, 1)], dim=1).to(self.compute_dtype)

    def param_matrix(self) -> Tensor:
        """The block's parameters as an ``(n_G, n_A)`` matrix (a new tensor)."""
        w = self.kind.weight_matrix(self.weight.detach())
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
            mat[:, :-1].add_(self.kind.weight_matrix(self.weight.detach()), alpha=weight_alpha)
        if bias_alpha:
            mat[:, -1].add_(self.bias.detach().reshape(-1), alpha=bias_alpha)

    def split(self, mat: Tensor) -> list[Tensor]:
        """Views of an ``(n_G, n_A)`` matrix shaped like the block's parameters."""
        if self.bias is None:
            return [self.kind.weight_like(mat, self.weight)]
        return [self.kind.weight_like(mat[:, :-1], self.weight), mat[:, -1].view_as(self.bias)]

    def per_sample_factors(self, calls: list[CapturedCall], scale: float) -> tuple[Tensor, Tensor]:
        """``(Ĝ, Â)`` of shapes ``(ϱ, κ, n_G)`` and ``(ϱ, κ, n_A)`` from captured calls.

        A weight used several times in one forward contributes each call's positions: the
        per-sample gradient is the sum over calls, so the positions are concatenated; a call
        on some rows of the weight (``CapturedCall.rows``) has zero output gradients on the others.
        ``scale`` multiplies the output gradients (the batch size under a mean-reduced loss).
        """
        gs, As = [], []
        for call in calls:
            x, gy = self._dtype(call)
            a, g = self.kind.factors(self.module, x, gy, self.bias is not None)
            if call.rows is not None:
                full = g.new_zeros(g.shape[0], g.shape[1], self.n_G)
                full[..., call.rows] = g
                g = full
            gs.append(g)
            As.append(a)
        g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
        a = torch.cat(As, dim=1) if len(As) > 1 else As[0]
        return (g * scale if scale != 1.0 else g), a

    def per_sample_grads(self, calls: list[CapturedCall], scale: float) -> Tensor:
        """``Uᵀ`` rows before normalisation: ``vec(∇ψ_i)`` of the block, ``(ϱ, n_G·n_A)``,
        times ``scale``."""
        total: Tensor | None = None
        for call in calls:
            x, gy = self._dtype(call)
            u = self.kind.grads(self.module, x, gy, self.bias is not None)
            if call.rows is not None:
                full = u.new_zeros(u.shape[0], self.n_G, self.n_A)
                full[:, call.rows] = u
                u = full
            total = u if total is None else total + u
        assert total is not None, "a block is rebuilt from one call at least"
        total = total.reshape(total.shape[0], -1)
        return total * scale if scale != 1.0 else total

    def _dtype(self, call: CapturedCall) -> tuple[Tensor, Tensor]:
        # Under autocast the layer sees and returns bf16/fp16, and bf16/fp16 parameters do too:
        # the curvature is computed and kept in float32 (at least). An embedding's ids stay
        # integers.
        dtype = self.compute_dtype
        x = call.x.to(dtype) if call.x.is_floating_point() else call.x
        return x, call.gy.to(dtype)


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
    #: the modules of ``fallback`` that ``skip_layers`` left out (the user's choice)
    skipped: frozenset[str] = frozenset()


def find_blocks(
    model: nn.Module,
    skip_layers: tuple[str | type, ...] = (),
    explicit_threshold: int = 0,
    batch_first: bool = True,
) -> Layout:
    """The model's supported, trainable layers as blocks, in module order, each of the kind its
    type is registered with.

    A block of fewer than ``explicit_threshold`` entries takes the explicit path, any other
    the implicit one (a grouped convolution: always explicit). Supported: the types of
    :data:`~seng_dist.kinds.REGISTRY` (:func:`~seng_dist.kinds.supported_layer_types`), built in
    ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (grouped and depthwise too) with zero padding
    mode, affine ``nn.BatchNorm1d/2d/3d``, ``nn.LayerNorm`` and ``nn.RMSNorm``, transformers'
    ``Conv1D`` (by name and shape) and ``nn.MultiheadAttention``: its packed ``in_proj_weight``
    (Q, K, V) is one block, or with ``kdim``/``vdim`` each of ``q/k/v_proj_weight`` is, and
    ``out_proj`` is one; the attention's forward uses them functionally, so the capture reads
    its calls (:mod:`seng_dist.capture`). Another layer type that is usually trained
    (``nn.Conv3d``, transposed convolutions, ``nn.SyncBatchNorm``), a layer that overrides
    ``forward``, shares its weight or pads other than with zeros is left to the fallback rule
    with a warning; so is, silently, any layer named (or whose class is listed) in
    ``skip_layers``. A name in ``skip_layers`` that matches no module raises ``ValueError``.

    ``batch_first`` says where the batch is in a Linear's (and a norm's, a Conv1D's: the kinds
    that follow it) input and output; a layer inside a
    torch.nn module that declares it (``nn.Transformer``, its encoder and decoder layers,
    ``nn.MultiheadAttention``, the RNNs) follows that module.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    attention_of = {
        id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)
    }
    declared = _declared_batch_first(model)
    blocks, fallback, skipped, left_out = [], {}, set(), set()
    for raw, module in model.named_modules():
        name = module_name(raw)
        skip = _skip_reason(name, module, skip_layers)
        if skip is not None:
            skipped.add(skip[1])  # matched, even if frozen: the name was right
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if skip is not None:
            fallback[name] = skip[0]
            left_out.add(name)
            continue
        entry = REGISTRY.lookup(module)
        if isinstance(module, nn.MultiheadAttention) and entry is not None:
            projections = entry.kind.for_module(module)
            found, left = _attention_blocks(name, projections, module, explicit_threshold)
            blocks += found
            if left:
                fallback[name] = left
            continue
        kind = _kind(name, module, owners)
        if isinstance(kind, str):
            fallback[name] = kind
            continue
        bias = getattr(module, "bias", None)
        bias = bias if isinstance(bias, Tensor) and bias.requires_grad else None
        follows = kind.follows_batch_first
        batch_dim = 1 if follows and not declared.get(id(module), batch_first) else 0
        blocks.append(
            _block(
                name or type(module).__name__,
                kind,
                module,
                cast(Tensor, module.weight),
                bias,
                explicit_threshold,
                attention_of.get(id(module)),
                batch_dim,
            )
        )
    unmatched = [s for s in skip_layers if isinstance(s, str) and s not in skipped]
    if unmatched:
        names = [module_name(n) for n, m in model.named_modules() if REGISTRY.lookup(m) is not None]
        raise ValueError(
            f"skip_layers names {', '.join(map(repr, unmatched))}, which match no "
            f"module of the model; its supported layers are "
            f"{', '.join(map(repr, names[:20]))}{' ...' if len(names) > 20 else ''}"
        )
    return Layout(blocks, fallback, frozenset(left_out))


def _block(
    name: str,
    kind: LayerKind,
    module: nn.Module,
    weight: Tensor,
    bias: Tensor | None,
    explicit_threshold: int,
    via: nn.Module | None = None,
    batch_dim: int = 0,
) -> Block:
    n_g, n_w = kind.weight_matrix(weight).shape
    n_a = n_w + (1 if bias is not None else 0)
    if not kind.factorable:
        path, note = "explicit", "grouped convolution: explicit path at any size"
    else:
        path = "explicit" if n_g * n_a < explicit_threshold else "implicit"
        note = ""
    return Block(name, module, weight, bias, n_g, n_a, path, kind, batch_dim, via, note)


def _attention_blocks(
    name: str, kind: LayerKind, mha: nn.MultiheadAttention, explicit_threshold: int
) -> tuple[list[Block], str]:
    """The input-projection blocks of an attention module (``out_proj`` is a child module and
    found as one), and why any of its own trainable parameters stays on the fallback rule."""
    blocks, left = [], []
    trainable = {id(p) for p in mha.parameters(recurse=False) if p.requires_grad}
    packed = mha.in_proj_weight
    if packed is not None:
        if id(packed) in trainable:
            bias = (
                mha.in_proj_bias
                if mha.in_proj_bias is not None and id(mha.in_proj_bias) in trainable
                else None
            )
            blocks.append(
                _block(f"{name}.in_proj", kind, mha, packed, bias, explicit_threshold, via=mha)
            )
        elif mha.in_proj_bias is not None and id(mha.in_proj_bias) in trainable:
            left.append("in_proj_bias (its weight is frozen)")
    else:
        for side in "qkv":
            w = getattr(mha, f"{side}_proj_weight")
            if id(w) in trainable:
                blocks.append(
                    _block(
                        f"{name}.{side}_proj",
                        kind,
                        mha,
                        w,
                        None,
                        explicit_threshold,
                        via=mha,
                    )
                )
        if mha.in_proj_bias is not None and id(mha.in_proj_bias) in trainable:
            left.append("in_proj_bias (shared by the q/k/v projections)")
    left += [
        b
        for b in ("bias_k", "bias_v")
        if getattr(mha, b) is not None and id(getattr(mha, b)) in trainable
    ]
    why = f"{', '.join(left)} of {type(mha).__name__}" if left else ""
    return blocks, why


def _declared_batch_first(model: nn.Module) -> dict[int, bool]:
    """For every module inside a torch.nn module that declares where its batch is, the nearest
    such declaration, by ``id``."""
    out: dict[int, bool] = {}

    def walk(module: nn.Module, inherited: bool | None) -> None:
        here = _declares(module)
        here = inherited if here is None else here
        for child in module.children():
            if here is not None:
                out[id(child)] = here
            walk(child, here)

    walk(model, None)
    return out


def _declares(module: nn.Module) -> bool | None:
    # torch.nn's own modules only: a user's module may keep a batch_first of its input's
    # layout and transpose inside.
    if isinstance(module, (nn.Transformer, nn.MultiheadAttention, nn.RNNBase)):
        return bool(module.batch_first)
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    return None


def _skip_reason(
    name: str, module: nn.Module, skip: tuple[str | type, ...]
) -> tuple[str, str | type] | None:
    """``(reason, the skip_layers entry)`` if ``skip_layers`` leaves this module out."""
    for s in skip:
        if isinstance(s, str) and (name == s or name.startswith(s + ".")):
            return f"named in skip_layers ({s!r})", s
        if isinstance(s, type) and isinstance(module, s):
            return f"its class is in skip_layers ({s.__name__})", s
    return None


def _kind(name: str, module: nn.Module, owners: dict[int, int]) -> LayerKind | str:
    """The kind of a module with trainable parameters, or why it is not a block (warned where
    the user may not expect it)."""
    cls = type(module).__name__
    entry = REGISTRY.lookup(module)
    if entry is None:
        # Short, for describe()'s column: the list itself is one call away.
        why = f"{cls} is not a supported layer type (seng_dist.supported_layer_types())"
        if isinstance(module, _UNSUPPORTED_WARNED):
            warn(f"SENG: layer {name!r} ({cls}) is not preconditioned; {_FALLBACK}")
        return why
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and not weight.requires_grad:
        return "its weight is frozen (requires_grad=False)"
    kind = entry.kind.for_module(module)
    refusal = kind.refusal(module)
    # The kind knows the calls of the registered class's forward: a subclass that overrides
    # it computes something else.
    owner = entry.owner(module)
    if owner is None or type(module).forward is not owner.forward:
        why = f"{cls} overrides forward"
    elif refusal is not None:
        why = refusal
    elif not isinstance(weight, Tensor):
        why = f"{cls} has no weight tensor"
    elif owners[id(weight)] > 1:
        why = "it shares its weight with another module"
    else:
        return kind
    warn(f"SENG: layer {name!r} ({why}) is not preconditioned; {_FALLBACK}")
    return why
