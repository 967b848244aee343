"""Layer kinds: Conv1d, grouped and depthwise convolutions, transformers' Conv1D, LayerNorm and
the RMSNorms, the opt-in Embedding, exact against the reference; the registry of layer types."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from conftest import (
    EXACT_EXPLICIT,
    EXACT_IMPLICIT,
    Conv1D,
    check_exact,
    requires_engine,
    seng_directions,
    solve_bound,
)
from torch import nn

from seng_dist import SENG, SENGWarning
from seng_dist.reference import (
    block_matrix,
    exact_direction,
    per_sample_gradients,
    relative_error,
)


def _check(model: nn.Module, layers: list[str], shape: tuple[int, ...], settings: dict) -> SENG:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 3, (8,), generator=g)
    model(x)  # materialise a lazy head
    return check_exact(model, layers, x, y, **settings)


@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=4, padding="same", dilation=1, bias=False),
        dict(kernel_size=2, dilation=2),
    ],
    ids=["stride-pad", "same-even-nobias", "dilation"],
)
def test_conv1d_is_exact(conv, settings):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, **conv), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    _check(model, ["0", "3"], (3, 9), settings)


@pytest.mark.parametrize(
    "conv,shape",
    [
        (nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 5, 5)),
        (nn.Conv2d(4, 4, 3, stride=2, groups=4), (4, 7, 7)),  # depthwise
        (nn.Conv2d(4, 8, 3, padding="same", groups=4, bias=False), (4, 5, 5)),  # multiplier 2
        (nn.Conv1d(4, 4, 3, groups=4), (4, 9)),
    ],
    ids=["grouped", "depthwise", "depthwise-x2-nobias", "depthwise-1d"],
)
def test_grouped_and_depthwise_convs_are_exact_on_the_explicit_path_at_any_size(conv, shape):
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    opt = _check(model, ["0", "3"], shape, dict(EXACT_IMPLICIT))  # threshold 0: all implicit
    paths = {b.name: b.path for b in opt.blocks}
    assert paths == {"0": "explicit", "3": "implicit"}
    row = next(line for line in opt.describe().splitlines() if line.startswith("0.weight"))
    assert "grouped convolution: explicit path at any size" in row


def test_an_unbatched_conv1d_call_is_one_sample():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3)
    opt = SENG(conv, curvature_update_interval=1, sketch_size=None)
    conv(torch.randn(2, 7)).pow(2).sum().backward()  # (C, L): no batch dimension
    opt.step()
    assert opt.state[conv.weight]["U"].shape == (1, 3 * 7)


def test_a_kinds_per_sample_gradients_are_the_product_of_its_factors():
    # LayerKind.grads, the per-call gradients a new kind may rely on, against torch.func.
    from seng_dist.kinds import ConvKind, LayerKind
    from seng_dist.reference import per_sample_gradients

    torch.manual_seed(0)
    for module, x in (
        (nn.Linear(4, 3), torch.randn(5, 2, 4)),
        (nn.Conv1d(2, 3, 3, padding=1), torch.randn(5, 2, 6)),
    ):
        out = module(x)
        gy = torch.randn_like(out)
        kind = LayerKind() if isinstance(module, nn.Linear) else ConvKind()
        mine = kind.grads(module, x, gy, bias=True)
        ref = per_sample_gradients(module, x, gy, loss_fn=lambda o, g: (o * g).sum())
        w = ref["weight"].reshape(5, 3, -1)
        assert relative_error(mine, torch.cat([w, ref["bias"].unsqueeze(-1)], -1)) < 1e-5


BUILT_IN = (
    "nn.Linear",
    "nn.Conv1d",
    "nn.Conv2d",
    "nn.BatchNorm1d",
    "nn.BatchNorm2d",
    "nn.BatchNorm3d",
    "nn.MultiheadAttention",
    "nn.LayerNorm",
    "*RMSNorm (transformers' LlamaRMSNorm, ..., by name)",
    "nn.RMSNorm",
    "Conv1D (transformers, matched by name)",
)


def test_the_supported_layer_types_are_the_registrys_in_order_and_find_blocks_names_them():
    import seng_dist
    from seng_dist.layers import find_blocks

    types = seng_dist.supported_layer_types()
    assert types == BUILT_IN
    layout = find_blocks(nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2)))
    assert layout.fallback["0"] == (
        "Embedding is not a supported layer type (seng_dist.supported_layer_types())"
    )


class Sequence(nn.Module):
    """``layer`` on ``(B, T, d)`` tokens between two Linears; with ``batch_first=False`` the
    sequence layers see ``(T, B, ·)`` (SENG must be told, as for any Linear)."""

    def __init__(self, layer: nn.Module, d: tuple[int, ...], batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(5, math.prod(d))
        self.d = d
        self.layer = layer
        # A Conv1D maps d to nf features, a norm keeps d.
        self.head = nn.Linear(getattr(layer, "nf", math.prod(d)), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)  # (T, B, 5): every layer sees the sequence first
        h = torch.tanh(self.embed(x)).unflatten(-1, self.d)
        h = torch.tanh(self.layer(h.contiguous()))  # Conv1D views its input
        return self.head(h.mean(1 if self.batch_first else 0).flatten(1))


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters (a norm's start at γ = 1, β = 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5).add_(0.5)
    return module


def _tokens(n: int = 6, t: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, t, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _check_layer(
    model: Sequence,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: dict,
    block_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
) -> SENG:
    """check_exact for a model of :class:`Sequence`, the middle layer's per-sample block
    matrices built from the reference's per-name gradients by ``block_of``."""
    opt = SENG(model, **settings, batch_first=model.batch_first)
    grads = per_sample_gradients(model, x, y)
    d = seng_directions(opt, model, x, y)
    for layer in ("embed", "layer", "head"):
        u = block_of(grads) if layer == "layer" else block_matrix(grads, layer)
        assert relative_error(d[layer], exact_direction(u, 0.3)) < solve_bound(u, 0.3), layer
    return opt


def _transposed(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """A Conv1D's ``[Wᵀ | b]`` per sample."""
    w, b = grads["layer.weight"], grads["layer.bias"]
    return torch.cat([w.transpose(1, 2), b.unsqueeze(-1)], dim=-1)


def _affine_rows(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """A norm's ``[γ | β]`` per sample, one row per element of the normalised shape."""
    cols = [grads[k].flatten(1) for k in ("layer.weight", "layer.bias") if k in grads]
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_transformers_conv1d_is_a_transposed_linear_and_exact(settings, batch_first):
    torch.manual_seed(0)
    model = Sequence(_randomise(Conv1D(4, 6)), (6,), batch_first)
    x, y = _tokens()
    opt = _check_layer(model, x, y, settings, _transposed)
    block = next(b for b in opt.blocks if b.name == "layer")
    assert (block.n_G, block.n_A) == (4, 7)


def test_a_conv1d_blocks_matrices_map_to_its_nx_nf_layout():
    from seng_dist.layers import find_blocks

    layer = _randomise(Conv1D(3, 2))
    layer(torch.randn(4, 2)).pow(2).sum().backward()
    (block,) = find_blocks(layer).blocks
    w, b = layer.weight, layer.bias
    assert b.grad is not None and w.grad is not None
    assert torch.equal(block.grad_matrix(), torch.cat([w.grad.T, b.grad[:, None]], 1))
    assert torch.equal(block.param_matrix(), torch.cat([w.T, b[:, None]], 1).detach())
    assert [t.shape for t in block.split(block.param_matrix())] == [(2, 3), (3,)]
    assert all(
        torch.equal(t, p) for t, p in zip(block.split(block.param_matrix()), (w, b), strict=True)
    )
    mat = torch.zeros(3, 3)
    block.add_params_(mat, 2.0, 3.0)
    assert torch.equal(mat, torch.cat([2 * w.T, 3 * b[:, None]], 1).detach())


def test_a_module_named_conv1d_without_its_contract_is_left_to_the_fallback_rule():
    class Conv1D(nn.Module):  # another library's, with a (nf, nx) weight
        def __init__(self) -> None:
            super().__init__()
            self.nf, self.weight = 3, nn.Parameter(torch.randn(3, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    with pytest.warns(SENGWarning, match="lacks transformers' Conv1D contract"):
        opt = SENG(nn.Sequential(Conv1D(), nn.Linear(3, 2)))
    assert [b.name for b in opt.blocks] == ["1"]


@requires_engine("transformers", "ci/install_frameworks.sh")
@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
def test_transformers_own_conv1d_and_rmsnorms_are_blocks_and_exact(settings):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as HFGemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm as HFLlamaRMSNorm
    from transformers.pytorch_utils import Conv1D as HFConv1D

    x, y = _tokens()
    for layer, block_of in (
        (HFConv1D(4, 6), _transposed),
        (HFLlamaRMSNorm(6), _affine_rows),
        (HFGemmaRMSNorm(6), _affine_rows),
    ):
        torch.manual_seed(0)
        _check_layer(Sequence(_randomise(layer), (6,)), x, y, settings, block_of)


NORMS = {
    "layernorm": (lambda: nn.LayerNorm(6), (6,)),
    "layernorm-nobias": (lambda: nn.LayerNorm(6, bias=False), (6,)),
    "layernorm-2d": (lambda: nn.LayerNorm((2, 3)), (2, 3)),
    "rmsnorm": (lambda: nn.RMSNorm(6, eps=1e-5), (6,)),
    "rmsnorm-2d-default-eps": (lambda: nn.RMSNorm((2, 3)), (2, 3)),
}


@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("norm", NORMS)
def test_layernorm_and_rmsnorm_are_affine_rows_and_exact(norm, batch_first, settings):
    make, d = NORMS[norm]
    torch.manual_seed(0)
    model = Sequence(_randomise(make()), d, batch_first)
    x, y = _tokens()
    opt = _check_layer(model, x, y, settings, _affine_rows)
    block = next(b for b in opt.blocks if b.name == "layer")
    assert (block.n_G, block.n_A) == (6, 1 if "nobias" in norm or "rms" in norm else 2)


class LlamaRMSNorm(nn.Module):
    """HF's ``LlamaRMSNorm`` (transformers.models.llama), reproduced: ε is ``variance_epsilon``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """HF's ``GemmaRMSNorm``, reproduced: ε is ``eps`` and the weight is used as ``1 + γ``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class T5LayerNorm(nn.Module):
    """HF's T5 norm: an RMSNorm by another name, its forward Llama's (as in transformers)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    forward = LlamaRMSNorm.forward


class GatedRMSNorm(LlamaRMSNorm):
    """Named like an RMSNorm, but its forward takes a gate too (optional, as Mamba's gated
    norm's): not RMSNormKind's contract."""

    def forward(
        self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        gated = hidden_states if gate is None else hidden_states * torch.sigmoid(gate)
        return super().forward(gated)


@pytest.mark.parametrize("norm", [LlamaRMSNorm, GemmaRMSNorm], ids=["llama", "gemma"])
def test_transformers_rmsnorms_are_blocks_by_name_and_exact(norm):
    torch.manual_seed(0)
    model = Sequence(_randomise(norm(6)), (6,))
    x, y = _tokens()
    for settings in (EXACT_EXPLICIT, EXACT_IMPLICIT):
        _check_layer(model, x, y, settings, _affine_rows)


def test_a_module_named_rmsnorm_without_its_contract_is_left_to_the_fallback_rule():
    class ScaledRMSNorm(LlamaRMSNorm):
        def __init__(self, dim: int) -> None:
            super().__init__(dim)
            self.scale = nn.Parameter(torch.ones(()))

    for norm, why in (
        (GatedRMSNorm, "forward takes other arguments than one input"),
        (ScaledRMSNorm, "lacks the RMSNorm contract"),
    ):
        with pytest.warns(SENGWarning, match=why):
            opt = SENG(nn.Sequential(nn.Linear(3, 3), norm(3)))
        assert [b.name for b in opt.blocks] == ["0"]


@pytest.fixture
def t5_layernorm_registered():
    """T5LayerNorm registered as a user would, and unregistered after the test."""
    import seng_dist

    seng_dist.register_layer_kind(T5LayerNorm, seng_dist.kinds.RMSNormKind())
    yield
    seng_dist.kinds.REGISTRY.unregister(T5LayerNorm)


def test_a_users_layer_type_is_registered_in_one_line_and_exact(t5_layernorm_registered):
    import seng_dist

    assert seng_dist.supported_layer_types() == (*BUILT_IN, f"{__name__}.T5LayerNorm")
    torch.manual_seed(0)
    model = Sequence(_randomise(T5LayerNorm(6)), (6,))
    x, y = _tokens()
    for settings in (EXACT_EXPLICIT, EXACT_IMPLICIT):
        _check_layer(model, x, y, settings, _affine_rows)


def test_a_registration_affects_only_the_sengs_built_after_it():
    import seng_dist

    before = SENG(Sequence(T5LayerNorm(6), (6,)))
    try:
        seng_dist.register_layer_kind(T5LayerNorm, seng_dist.kinds.RMSNormKind())
        after = SENG(Sequence(T5LayerNorm(6), (6,)))
    finally:
        seng_dist.kinds.REGISTRY.unregister(T5LayerNorm)
    assert [b.name for b in before.blocks] == ["embed", "head"]
    assert [b.name for b in after.blocks] == ["embed", "layer", "head"]
    assert seng_dist.supported_layer_types() == BUILT_IN


def test_a_subclass_of_a_registered_type_is_a_block_unless_it_overrides_forward():
    class Kept(nn.LayerNorm):
        pass

    class Overriding(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    with pytest.warns(SENGWarning, match="'1' .Overriding overrides forward. is not precondit"):
        opt = SENG(nn.Sequential(Kept(3), Overriding(3), nn.Linear(3, 2)))
    assert [b.name for b in opt.blocks] == ["0", "2"]


def test_only_the_kinds_that_follow_batch_first_read_the_batch_second():
    from seng_dist.layers import find_blocks

    model = nn.Sequential(
        nn.BatchNorm1d(3), nn.Conv1d(3, 3, 1), nn.LayerNorm(3), nn.RMSNorm(3), nn.Linear(3, 2)
    )
    layout = find_blocks(model, batch_first=False)
    assert [b.batch_dim for b in layout.blocks] == [0, 0, 1, 1, 1]


def test_a_checkpoint_from_before_layernorm_was_a_block_resumes_with_it_in_skip_layers():
    # Releases up to 0.2.0 left LayerNorm to the fallback rule: their checkpoints list no
    # LayerNorm block, which skip_layers=(nn.LayerNorm,) reproduces (as BatchNorm's did).
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Sequence(nn.LayerNorm(6), (6,))
    old = SENG(model, skip_layers=(nn.LayerNorm,), curvature_update_interval=1)
    x, y = _tokens()
    F.cross_entropy(model(x), y).backward()
    old.step()
    saved = old.state_dict()
    with pytest.raises(ValueError, match=r"build SENG with skip_layers=\['layer'\] to resume"):
        SENG(model, curvature_update_interval=1).load_state_dict(saved)
    SENG(model, skip_layers=(nn.LayerNorm,), curvature_update_interval=1).load_state_dict(saved)


class Embedded(nn.Module):
    """Ids ``(B, T)`` (``(T, B)`` with ``batch_first=False``) through an embedding with a padding
    id, a Linear on the sequence and a head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.Embedding(7, 4, padding_idx=0)
        self.embed = nn.Linear(4, 5)  # named as Sequence's, for _check_layer
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(self.layer(ids if self.batch_first else ids.t())))
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.fixture
def embedding_registered():
    """nn.Embedding as a block (opt-in), unregistered after the test."""
    import seng_dist

    seng_dist.register_layer_kind(nn.Embedding, seng_dist.kinds.EmbeddingKind())
    yield
    seng_dist.kinds.REGISTRY.unregister(nn.Embedding)


@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_an_embedding_registered_as_a_block_is_exact(embedding_registered, settings, batch_first):
    torch.manual_seed(0)
    model = Embedded(batch_first)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (6, 5), generator=g)  # id 0, the padding id, among them
    assert (ids == 0).any()
    y = torch.randint(0, 3, (6,), generator=g)
    opt = _check_layer(model, ids, y, settings, lambda grads: grads["layer.weight"])
    block = next(b for b in opt.blocks if b.name == "layer")
    assert (block.n_G, block.n_A) == (7, 4)


def test_an_embedding_that_renormalises_or_has_sparse_gradients_is_refused(embedding_registered):
    for emb, why in (
        (nn.Embedding(5, 3, max_norm=1.0), "max_norm"),
        (nn.Embedding(5, 3, sparse=True), "sparse"),
    ):
        with pytest.warns(SENGWarning, match=why):
            opt = SENG(nn.Sequential(emb, nn.Linear(3, 2)))
        assert [b.name for b in opt.blocks] == ["1"]
