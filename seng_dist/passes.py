"""Backward passes as SENG sees them: which parameter's gradient arrived, when a pass ended,
and how many passes the current step's gradients hold.

:class:`BackwardPasses` puts a post-accumulate-grad hook on every trainable parameter the
optimizer updates. The first gradient of a pass queues a callback that the autograd engine runs
when that backward call is over (as DDP's reducer does), so listeners hear of every gradient
as it is accumulated and of the end of each pass. Two counts follow from that:

* ``completed``: passes since construction. The capture starts a fresh record at its first
  call after a pass ended, so a micro-batch's records never mix with the previous one's,
  however the model is called (its own forward, or its submodules directly).
* ``in_window``: passes since the step's gradients were last cleared (``step()``, the
  optimizer's ``zero_grad()``, or gradients found reset to None when a pass starts, as
  ``model.zero_grad()`` does). It is the number of micro-batches the gradients accumulate,
  whether or not the user told SENG.

A pass's end is queued from the model's output gradient when the model's own forward produced
the output: that hook runs in the outermost backward, so a reentrant checkpoint's inner
backward (run inside it) does not end the pass early. Without it (submodules called directly)
the first parameter gradient queues the callback.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from .warn import warn


class PassListener(Protocol):
    """What a :class:`BackwardPasses` tells."""

    def gradient(self, param: Tensor, passes: int) -> None:
        """``param``'s gradient was accumulated in the pass ``passes + 1`` of the window."""

    def pass_ended(self, passes: int) -> None:
        """A pass that reached the parameters ended; the window now holds ``passes``."""

    def window_opened(self) -> None:
        """The gradients were cleared: a new step's accumulation starts."""


class BackwardPasses:
    """The backward passes that reach ``params`` (see the module docstring).

    Args:
        model: the module whose forward's outputs mark the outermost backward.
        params: the parameters to watch (the trainable ones get a hook).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor]) -> None:
        #: passes ended since construction
        self.completed = 0
        #: passes ended since the gradients were last cleared
        self.in_window = 0
        self.listeners: list[PassListener] = []
        self._queued = False  # the end of the running pass is queued
        self._touched = False  # a watched gradient arrived in the running pass
        self._last: Tensor | None = None  # the last parameter whose gradient arrived
        self._me = weakref.ref(self)
        self._handles: list[RemovableHandle] = [
            model.register_forward_hook(partial(_on_output, self._me))
        ]
        self.watch(params)

    def watch(self, params: Sequence[Tensor]) -> None:
        """Hook the trainable ones of ``params``."""
        for p in params:
            if p.requires_grad:
                self._handles.append(
                    p.register_post_accumulate_grad_hook(partial(_on_grad, self._me))
                )

    def close(self) -> None:
        """Remove the hooks (their optimizer was retired: a newer one updates the
        parameters)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def watching(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def open_window(self) -> None:
        """The gradients were cleared or consumed: the next pass is a new step's first.
        Called from user code (``step()``, ``zero_grad()``), never during a pass: a pass that
        raised before its end is forgotten too."""
        self._queued = self._touched = False
        self._new_window()

    def _new_window(self) -> None:
        self.in_window = 0
        self._last = None
        for listener in self.listeners:
            listener.window_opened()

    def rest_on(self, param: Tensor | None) -> None:
        """The round freed the gradients of other ranks' parameters (sharded gradients): read
        a cleared gradient off ``param``, one this rank keeps (None: none is kept), to tell a
        ``model.zero_grad()`` between passes."""
        self._last = param

    def queue_end(self) -> None:
        """Have the autograd engine call :meth:`_end` when the running backward is over
        (once per pass). Call only from inside a backward pass."""
        if not self._queued:
            self._queued = True
            # torch has no public hook for "backward is over"; DDP and FSDP use this one.
            Variable._execution_engine.queue_callback(self._end)  # noqa: SLF001

    def gradient(self, param: Tensor) -> None:
        """The hook: ``param``'s gradient was accumulated."""
        if not self._touched:
            self._touched = True
            # model.zero_grad() (set_to_none) between passes, with no step(): a new window.
            if self._last is not None and self._last is not param and self._last.grad is None:
                self._new_window()
        self._last = param
        self.queue_end()
        for listener in self.listeners:
            listener.gradient(param, self.in_window)

    def _end(self) -> None:
        self._queued = False
        if not self._touched:  # e.g. torch.autograd.grad: nothing was accumulated
            return
        self._touched = False
        self.completed += 1
        self.in_window += 1
        for listener in self.listeners:
            listener.pass_ended(self.in_window)


def _on_grad(passes: weakref.ref[BackwardPasses], param: Tensor) -> None:
    owner = passes()
    if owner is not None:
        owner.gradient(param)


def _on_output(
    passes: weakref.ref[BackwardPasses], module: nn.Module, inputs: Any, output: Any
) -> None:
    owner = passes()
    if owner is None or not torch.is_grad_enabled():
        return
    for t in tree_leaves(output):
        if isinstance(t, Tensor) and t.requires_grad:
            t.register_hook(partial(_on_output_grad, passes))


def _on_output_grad(passes: weakref.ref[BackwardPasses], grad: Tensor) -> None:
    owner = passes()
    if owner is not None and owner.watching:
        owner.queue_end()


class UnsteppedPasses:
    """A :class:`PassListener` that says once when backward passes keep coming and ``step()``
    does not: another optimizer steps the model (transformers' ``Trainer`` with ``deepspeed=``
    drops an optimizer passed in ``optimizers=`` and builds its own), or the loop lost its
    ``step()``. SENG's hooks would otherwise go on quietly with nothing preconditioned."""

    #: passes without a step() before it speaks: far beyond a usual accumulation
    LIMIT = 64

    def __init__(self, accumulation: int) -> None:
        self.limit = max(self.LIMIT, 4 * accumulation)
        self.since_step = 0

    def gradient(self, param: Tensor, passes: int) -> None:
        pass

    def window_opened(self) -> None:
        pass

    def pass_ended(self, passes: int) -> None:
        self.since_step += 1
        if self.since_step == self.limit:
            warn(
                f"SENG: {self.limit} backward passes and no SENG step(): is another optimizer "
                "stepping this model? (transformers' Trainer with deepspeed= drops the "
                "optimizer given in optimizers=; build SENG in create_optimizer instead, as "
                "integrations/transformers/train.py's SENGTrainer does.) Raise "
                "gradient_accumulation_steps if this many passes per step are intended"
            )

    def stepped(self) -> None:
        """``step()`` ran (taken, skipped or empty)."""
        self.since_step = 0
