"""BackwardPasses: each gradient as it arrives, the end of each pass, the step's window."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from seng_dist import SENG
from seng_dist.passes import BackwardPasses


class Log:
    """A listener that writes down what it hears."""

    def __init__(self, passes: BackwardPasses) -> None:
        self.passes = passes
        self.events: list[str] = []
        passes.listeners.append(self)

    def gradient(self, param: Tensor, passes: int) -> None:
        self.events.append(f"g{passes}")

    def pass_ended(self, passes: int) -> None:
        # Every watched gradient of the pass is in when it ends.
        self.events.append(f"end{passes}")

    def window_opened(self) -> None:
        self.events.append("window")


class Net(nn.Module):
    def __init__(self, reentrant: bool | None = None) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.reentrant is None:
            h = torch.tanh(self.b(h))
        else:  # the middle layer checkpointed
            h = checkpoint(lambda t: torch.tanh(self.b(t)), h, use_reentrant=self.reentrant)
        return self.c(h).sum()


def _net(reentrant: bool | None = None) -> tuple[Net, BackwardPasses, Log]:
    torch.manual_seed(0)
    model = Net(reentrant)
    passes = BackwardPasses(model, list(model.parameters()))
    return model, passes, Log(passes)


def test_each_pass_ends_after_all_its_gradients_and_counts_in_the_window():
    model, passes, log = _net()
    model(torch.randn(2, 3)).backward()
    model(torch.randn(2, 3)).backward()
    assert log.events == ["g0"] * 6 + ["end1"] + ["g1"] * 6 + ["end2"]
    assert passes.in_window == passes.completed == 2
    passes.open_window()
    assert passes.in_window == 0 and passes.completed == 2


def test_a_reentrant_checkpoint_does_not_end_the_pass_early():
    for reentrant in (True, False):
        model, passes, log = _net(reentrant)
        model(torch.randn(2, 3)).backward()
        assert log.events == ["g0"] * 6 + ["end1"], reentrant


def test_submodules_called_directly_still_end_their_pass():
    model, passes, log = _net()
    model.c(torch.tanh(model.b(torch.tanh(model.a(torch.randn(2, 3)))))).sum().backward()
    assert log.events == ["g0"] * 6 + ["end1"]


def test_gradients_reset_to_none_open_a_new_window():
    model, passes, log = _net()
    model(torch.randn(2, 3)).backward()
    model.zero_grad()  # set_to_none, without the optimizer: the next pass is a step's first
    model(torch.randn(2, 3)).backward()
    assert passes.in_window == 1 and "window" in log.events
    model(torch.randn(2, 3)).backward()  # accumulated onto the gradients: same window
    assert passes.in_window == 2


def test_autograd_grad_accumulates_nothing_and_is_no_pass():
    model, passes, log = _net()
    out = model(torch.randn(2, 3))
    torch.autograd.grad(out, list(model.parameters()))
    assert passes.completed == 0 and log.events == []


def test_backward_passes_without_a_step_are_told_once():
    """Another optimizer stepping the model (the Trainer's own, under deepspeed=) leaves
    SENG's hooks hearing passes that never reach a SENG step: said once, past the limit."""
    from seng_dist.passes import UnsteppedPasses

    model = nn.Linear(3, 2)
    opt = SENG(model, gradient_accumulation_steps=2)
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(UnsteppedPasses.LIMIT + 1):  # a pass and a step, many times: quiet...
            model(x).sum().backward()
            opt.step()
        assert not [w for w in seen if "no SENG step()" in str(w.message)]
        for _ in range(2 * UnsteppedPasses.LIMIT):  # ...passes with no SENG step: said once
            model.zero_grad()
            model(x).sum().backward()
    told = [w for w in seen if "backward passes and no SENG step()" in str(w.message)]
    assert len(told) == 1
