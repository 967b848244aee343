"""The Monte-Carlo Fisher: per-sample gradients at targets drawn from the model's predictive
distribution.

SENG's ``U`` holds per-sample gradients. With ``fisher="empirical"`` (the paper's) they are the
gradients of the user's loss at the true targets: the empirical Fisher, which can mis-scale and
mis-orient the step where the model's fit is poor (Kunstner, Balles & Hennig 2019). With
``fisher="mc"`` they are the gradients of the distribution's negative log-likelihood at
targets ``ŷ ~ p(y | output)``, drawn for the curvature batch: an unbiased one-sample estimate of
the true Fisher (K-FAC's usual choice), which for these three losses is also their Gauss-Newton
matrix. The user names the distribution once per step with :meth:`SENG.sample_fisher`, between
the forward and ``backward()``; on a curvature step SENG draws the targets and runs one extra
backward of their loss (to the blocks' weights, whose gradients it drops), the layers' output
gradients taken on the way.

Each distribution's per-sample loss is a torch loss at ``reduction="none"``, reduced over the
sample's elements (``"mean"`` as torch's default reduction does per sample, or ``"sum"``):

* ``"categorical"``: logits, classes in the last dimension, ``F.cross_entropy``;
* ``"bernoulli"``: logits, every element a Bernoulli, ``F.binary_cross_entropy_with_logits``;
* ``"gaussian"``: means, ``F.mse_loss`` with ``ŷ ~ N(output, I/2)`` (``(ŷ - μ)²`` is the
  negative log-likelihood of that variance, so its Fisher is ``mse_loss``'s Gauss-Newton).

The draws come from uniform or normal numbers of SENG's own generator (on the CPU, then moved
to the output's device), so they are reproducible and saved with the optimizer's state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Choice

#: the per-sample reductions over a sample's elements
ELEMENT_REDUCTIONS = ("mean", "sum")


class Distribution(Choice):
    """The predictive distributions :meth:`SENG.sample_fisher` draws targets from."""

    #: logits over the classes in the last dimension
    CATEGORICAL = "categorical"
    #: logits of independent Bernoullis, one per element
    BERNOULLI = "bernoulli"
    #: means of independent Gaussians of variance 1/2 (the Fisher of ``mse_loss``)
    GAUSSIAN = "gaussian"


def draw(output: Tensor, distribution: Distribution, generator: torch.Generator) -> Tensor:
    """Targets ``ŷ ~ p(y | output)`` (no gradient), shaped as the loss of ``distribution``
    takes them: class indices for ``categorical``, else like ``output``."""
    out = output.detach()
    match distribution:
        case Distribution.CATEGORICAL:
            probs = torch.softmax(out.float(), dim=-1)
            u = _uniform(out.shape[:-1], generator, out.device)
            # Inverse CDF; the clamp catches a u above the rounded last cumulative sum.
            idx = (probs.cumsum(-1) < u.unsqueeze(-1)).sum(-1)
            return idx.clamp_(max=out.shape[-1] - 1)
        case Distribution.BERNOULLI:
            return (_uniform(out.shape, generator, out.device) < torch.sigmoid(out.float())).to(
                out.dtype
            )
        case Distribution.GAUSSIAN:
            noise = torch.randn(out.shape, generator=generator, dtype=torch.float32)
            return out + (noise * 0.5**0.5).to(out.device, out.dtype)


def per_sample_loss(
    output: Tensor, target: Tensor, distribution: Distribution, reduction: str
) -> Tensor:
    """Each sample's negative log-likelihood (batch first), shape ``(B,)``."""
    match distribution:
        case Distribution.CATEGORICAL:
            loss = F.cross_entropy(
                output.reshape(-1, output.shape[-1]), target.reshape(-1), reduction="none"
            )
        case Distribution.BERNOULLI:
            loss = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        case Distribution.GAUSSIAN:
            loss = F.mse_loss(output, target, reduction="none")
    loss = loss.reshape(output.shape[0], -1)
    return loss.mean(1) if reduction == "mean" else loss.sum(1)


def _uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator).to(device)
