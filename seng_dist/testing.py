"""An independent float64 reference for SENG directions, for tests and accuracy reports.

It shares nothing with the solver: per-sample gradients come from ``torch.func``
(``vmap(grad(...))``) on a float64 copy of the model, and each layer's direction is a dense
solve ``-(U Uᵀ + λI)⁻¹ g``. Models with BatchNorm must be in eval mode: in train mode the batch
statistics couple the samples and a per-sample gradient is not defined.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor,
                         loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
                         ) -> dict[str, Tensor]:
    """``∇ψ_i`` for every sample, per parameter name, in float64: shape ``(B, *p.shape)``."""
    m = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in m.named_buffers()}

    def loss_i(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(m, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x.double(), y)


def block_matrix(grads: dict[str, Tensor], layer: str) -> Tensor:
    """``[W | b]`` of a layer from per-name tensors with a leading sample dim: ``(B, n_G, n_A)``."""
    w = grads[f"{layer}.weight"]
    w = w.reshape(w.shape[0], w.shape[1], -1)
    b = grads.get(f"{layer}.bias")
    return w if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1)


def reference_directions(model: nn.Module, x: Tensor, y: Tensor, layers: list[str],
                         damping: float, curvature_batch_size: int | None = None,
                         loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
                         ) -> dict[str, Tensor]:
    """Exact SENG direction ``-(UUᵀ + λI)⁻¹ g`` of each named layer, ``(n_G, n_A)`` float64.

    ``g`` is the mean gradient over the whole batch, ``U = [u_1 … u_ϱ]/√ϱ`` over its first
    ϱ samples.
    """
    grads = per_sample_gradients(model, x, y, loss_fn)
    out = {}
    for layer in layers:
        u = block_matrix(grads, layer)
        shape = u.shape[1:]
        u = u.reshape(u.shape[0], -1)
        g = u.mean(0)
        rho = u.shape[0] if curvature_batch_size is None else min(curvature_batch_size,
                                                                  u.shape[0])
        U = u[:rho].T / rho ** 0.5
        M = U @ U.T + damping * torch.eye(U.shape[0], dtype=U.dtype)
        out[layer] = -torch.linalg.solve(M, g).reshape(shape)
    return out


def relative_error(a: Tensor, b: Tensor) -> float:
    """``‖a - b‖ / ‖b‖`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
