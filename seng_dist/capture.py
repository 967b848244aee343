"""Capture of per-sample layer inputs and output gradients on stock ``torch.nn`` modules.

Hooks are installed only while a curvature update is due (``arm``) and removed afterwards, so
plain steps pay nothing. The output gradient is taken with a tensor hook registered on the
layer's output inside the forward hook, not with a module backward hook: a tensor hook keeps
working when a later in-place op (``nn.ReLU(inplace=True)``) modifies that output, and it
receives the gradient with respect to the layer's own output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import Block


@dataclass
class Record:
    """One block's captured calls in the current forward pass."""

    batch_size: int
    inputs: list[Tensor] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)

    def complete(self) -> bool:
        return bool(self.inputs) and all(g is not None for g in self.grads)


class Capture:
    """Records ``(x, ∂L/∂y)`` for the first ``limit`` samples of each block's calls."""

    def __init__(self, model: nn.Module, blocks: list[Block]) -> None:
        self.model = model
        self.blocks = blocks
        self.limit: int | None = None
        self.records: dict[Block, Record] = {}
        #: whether a forward pass with gradients ran since the hooks were armed
        self.forwarded = False
        self._handles: list[RemovableHandle] = []

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self, limit: int | None) -> None:
        """Install the hooks; ``limit`` caps the samples kept per call (None: all)."""
        self.limit = limit
        if self._handles:
            return
        self.forwarded = False
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook()))
        for block in self.blocks:
            self._handles.append(block.module.register_forward_hook(self._forward_hook(block)))

    def disarm(self) -> None:
        """Remove the hooks and drop what was recorded."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.records.clear()

    def _model_pre_hook(self) -> Callable[..., None]:
        # A closure, like the layers' hooks, not a bound method: copy.deepcopy of the model
        # copies its hooks, and a copied bound method would carry a copy of this capture.
        def hook(*_: object) -> None:
            # A new forward of the whole model starts a fresh capture (e.g. after an evaluation
            # pass in train mode); calls within one forward accumulate.
            if torch.is_grad_enabled():
                self.records.clear()
                self.forwarded = True

        return hook

    def _forward_hook(self, block: Block) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, Tensor)
                    and output.requires_grad):
                return
            x = inputs[0]
            rec = self.records.get(block)
            if rec is None:
                rec = self.records[block] = Record(batch_size=x.shape[0])
            k = self.limit
            rec.inputs.append(block.layer_input(x, k))
            rec.grads.append(None)
            slot = len(rec.grads) - 1

            def grad_hook(grad: Tensor) -> None:
                rec.grads[slot] = grad.detach()[:k].clone()

            output.register_hook(grad_hook)

        return hook
