"""Capture of per-sample layer inputs and output gradients on stock ``torch.nn`` modules.

Hooks are installed only while a curvature update is due (``arm``) and removed afterwards, so
plain steps pay nothing. A record is started afresh at the first call after a backward pass
ended (:class:`~seng_dist.passes.BackwardPasses`), so the capture holds the last micro-batch's
calls however the model is called (its forward, or its submodules directly) and calls within
one forward accumulate (weight sharing, several views of a batch). A call whose output gets no
gradient (an extra call on a detached or unused output, or the forward that activation
checkpointing recomputes without backpropagating through it) is left out: the recomputation
inside a checkpoint's backward is captured when it is the one backpropagated (reentrant
checkpointing), the original call when it is (non-reentrant).

The output gradient is taken with a tensor hook registered on the layer's output inside the
forward hook, not with a module backward hook: a tensor hook keeps working when a later
in-place op (``nn.ReLU(inplace=True)``) modifies that output, and it receives the gradient with
respect to the layer's own output.

``nn.MultiheadAttention`` does not call its projections as modules: its forward hands the
weights to ``F.multi_head_attention_forward``, which calls ``torch.nn.functional.linear`` on
them. For the length of an armed attention forward, :class:`LinearTap` puts a recording wrapper
in that function's place; the wrapper calls the original with the same arguments, so the
module computes exactly what it computes without SENG. (A ``__torch_function__`` mode cannot
see these calls: ``multi_head_attention_forward`` dispatches itself to the mode as one call and
runs its body with the mode off. Recomputing the projections' inputs and gradients instead
would draw other attention-dropout masks.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import Block, CapturedCall
from .passes import BackwardPasses

#: turns a captured tensor into the batch-first layout
BatchFirst = Callable[[Tensor], Tensor]


@dataclass
class Record:
    """One block's captured calls in the current micro-batch."""

    inputs: list[Tensor] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)
    rows: list[slice | None] = field(default_factory=list)
    #: each call's whole batch (the inputs and gradients keep its first ``limit`` samples)
    sizes: list[int] = field(default_factory=list)
    #: the gradients are those of a sampled loss (:meth:`Capture.sample`): backward leaves
    #: them be
    sampled: bool = False

    def complete(self) -> bool:
        """Whether some call got its output gradient."""
        return any(g is not None for g in self.grads)

    def calls(self) -> list[CapturedCall]:
        """The calls that got their output gradient."""
        return [
            CapturedCall(x, g, r)
            for x, g, r in zip(self.inputs, self.grads, self.rows, strict=True)
            if g is not None
        ]

    @property
    def batch_sizes(self) -> set[int]:
        """The batch sizes of the calls that got their output gradient."""
        return {n for n, g in zip(self.sizes, self.grads, strict=True) if g is not None}


class Capture:
    """Records ``(x, ∂L/∂y)`` for the first ``limit`` samples of each block's calls."""

    def __init__(self, blocks: list[Block], passes: BackwardPasses) -> None:
        self.blocks = blocks
        self.passes = passes
        self.limit: int | None = None
        self.records: dict[Block, Record] = {}
        self._epoch = passes.completed  # the passes ended when the records were started
        self._handles: list[RemovableHandle] = []

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, limit: int | None) -> None:
        """Install the hooks; ``limit`` caps the samples kept per call (None: all)."""
        self.limit = limit
        if self._handles:
            return
        attention: dict[nn.Module, list[Block]] = {}
        for block in self.blocks:
            if block.via is None:
                self._handles.append(block.module.register_forward_hook(self._forward_hook(block)))
            else:
                attention.setdefault(block.via, []).append(block)
        for module, blocks in attention.items():
            tap = _AttentionTap(self, blocks)
            self._handles.append(module.register_forward_pre_hook(tap.enter, with_kwargs=True))
            self._handles.append(module.register_forward_hook(tap.leave, always_call=True))

    def disarm(self) -> None:
        """Remove the hooks and drop what was recorded."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.records.clear()

    def record(
        self,
        block: Block,
        x: Tensor,
        output: Tensor,
        to_batch_first: BatchFirst,
        rows: slice | None = None,
    ) -> None:
        """Keep one call of ``block``: its input ``x`` and, once backward reaches it, the
        gradient of ``output``; ``to_batch_first`` puts the batch first in both."""
        if self._epoch != self.passes.completed:  # a pass ended: a new micro-batch
            self._epoch = self.passes.completed
            self.records.clear()
        x = to_batch_first(x.detach())
        rec = self.records.get(block)
        if rec is None:
            rec = self.records[block] = Record()
        k = self.limit
        rec.inputs.append(block.kind.keep_input(block.module, x, k))
        rec.grads.append(None)
        rec.rows.append(rows)
        rec.sizes.append(x.shape[0])
        slot = len(rec.grads) - 1

        def grad_hook(grad: Tensor) -> None:
            if not rec.sampled:
                rec.grads[slot] = to_batch_first(grad.detach())[:k].clone()

        output.register_hook(grad_hook)

    def sample(self, loss: Tensor) -> None:
        """Take the output gradients of this micro-batch's calls from ``loss`` (a sampled
        loss over the same forward, :mod:`seng_dist.fisher`) instead of from the coming
        backward, with the graph kept for that backward.

        One ``autograd.grad`` to the blocks' weights: their gradients are dropped, but on the
        way the hooks take each layer's output gradient (asking for the outputs' gradients
        instead would miss a layer whose output a later in-place op changed)."""
        if self._epoch != self.passes.completed:  # no call since the last pass ended
            return
        pending = [b for b, rec in self.records.items() if not rec.sampled]
        # A weight frozen after the optimizer was built gets no gradient, nor its layer's.
        weights = [b.weight for b in pending if b.weight.requires_grad]
        if not weights:
            return
        torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        for b in pending:
            self.records[b].sampled = True

    def _forward_hook(self, block: Block) -> Callable[[nn.Module, tuple, Tensor], None]:
        to_batch_first = block.kind.batch_first(block.module, block.batch_dim)

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            # A deep copy of the model (a reference, an EMA copy) carries this hook along.
            if module is not block.module or not (
                torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad
            ):
                return
            self.record(block, inputs[0], output, to_batch_first)

        return hook


class _AttentionTap:
    """One attention module's armed forwards: the projections' calls go to the capture."""

    def __init__(self, capture: Capture, blocks: list[Block]) -> None:
        self.capture = capture
        self.blocks = blocks
        self.active = False

    def enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if module is not self.blocks[0].via or not torch.is_grad_enabled():
            return
        query = args[0] if args else kwargs["query"]
        # Inside multi_head_attention_forward the projections' inputs are (L, N, E) and
        # out_proj's is (L·N, E), whatever the module's batch_first.
        batched = query.dim() == 3
        n = (
            (query.shape[0] if getattr(module, "batch_first", False) else query.shape[1])
            if batched
            else 1
        )

        def to_batch_first(t: Tensor) -> Tensor:
            if t.dim() == 2:
                t = t.reshape(-1, n, t.shape[-1])
            return t.transpose(0, 1)

        TAP.push(self._on_linear(to_batch_first))
        self.active = True

    def leave(self, *_: object) -> None:
        if self.active:
            self.active = False
            TAP.pop()

    def _on_linear(self, to_batch_first: BatchFirst) -> Callable[[Tensor, Tensor, Tensor], None]:
        def on_linear(x: Tensor, weight: Tensor, output: Tensor) -> None:
            if not output.requires_grad:
                return
            for block in self.blocks:
                uses, rows = _rows_of(weight, block.weight)
                if uses:
                    self.capture.record(block, x, output, to_batch_first, rows)
                    return

        return on_linear


def _rows_of(w: Tensor, param: Tensor) -> tuple[bool, slice | None]:
    """Whether ``w`` is ``param`` or a view of some of its rows (``split`` along dim 0), and
    which rows (None: all)."""
    if w is param:
        return True, None
    if w.dim() != 2 or w.stride() != param.stride():
        return False, None
    try:
        if w.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
            return False, None
    except (NotImplementedError, RuntimeError):  # no storage (a functorch or fake tensor)
        return False, None
    start, rest = divmod(
        int(w.storage_offset()) - int(param.storage_offset()), int(param.stride(0))
    )
    return rest == 0, slice(start, start + w.shape[0])


#: ``F.linear`` as this module found it at import (torch's, unless patched before)
_TORCH_LINEAR = F.linear


class LinearTap:
    """The recording wrapper of ``torch.nn.functional.linear``: in place only while some
    thread has an armed attention forward running (a process-wide count under a lock), and
    recording only for the thread whose forward it is.

    It wraps whatever ``F.linear`` is when the first such forward starts (torch's, or a
    user's own patch, which is then called as usual) and puts that back when the last one
    ends, unless something replaced the wrapper meanwhile (that replacement is kept)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        # Never reset: another thread may still hold the wrapper after it is taken out.
        self._inner: Callable[..., Tensor] = F.linear
        self._local = threading.local()

    def push(self, on_call: Callable[[Tensor, Tensor, Tensor], None]) -> None:
        with self._lock:
            if self._count == 0:
                self._inner = F.linear
                F.linear = self._linear
            self._count += 1
        self._stack().append(on_call)

    def pop(self) -> None:
        self._stack().pop()
        with self._lock:
            self._count -= 1
            # Bound methods compare equal (not identical) to each other.
            if self._count == 0 and F.linear == self._linear:
                F.linear = self._inner

    def _stack(self) -> list[Callable[[Tensor, Tensor, Tensor], None]]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def _linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        local = self._local
        if getattr(local, "inside", False):
            # Re-entered: a patch of F.linear made during an armed forward wrapped this
            # wrapper, and was kept, then wrapped by it again. Torch's own function ends the
            # loop; the outer call records.
            return _TORCH_LINEAR(input, weight, bias)
        local.inside = True
        try:
            out = self._inner(input, weight, bias)
        finally:
            local.inside = False
        stack = self._stack()
        if stack:
            stack[-1](input, weight, out)
        return out


#: the one tap of this process
TAP = LinearTap()
