"""Attention and sequence-first models: nn.MultiheadAttention's projections as blocks, exact
against the float64 reference; the module computes what it computes without SENG; where the
batch is in every captured layer."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import EXACT_EXPLICIT, EXACT_IMPLICIT, TinyEncoder, check_exact, tokens
from torch import nn

from seng_dist import SENG, SENGWarning

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")
STOCK_LINEAR = F.linear


class SelfAttention(nn.Module):
    """Self-attention over (B, T, E) tokens, the last token channel a padding flag; the module
    runs in either batch layout (the model transposes for batch_first=False)."""

    def __init__(
        self,
        batch_first: bool,
        mask: str,
        need_weights: bool,
        kdim: int | None = None,
        embed: int = 8,
        heads: int = 2,
        classes: int = 3,
    ) -> None:
        super().__init__()
        self.batch_first, self.mask, self.need_weights = batch_first, mask, need_weights
        self.embed = nn.Linear(5, embed)
        self.attn = nn.MultiheadAttention(
            embed, heads, batch_first=batch_first, kdim=kdim, vdim=kdim
        )
        self.kv = nn.Linear(embed, kdim) if kdim else None
        self.head = nn.Linear(embed, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x[..., :-1])
        pad = x[..., -1] > 0  # (B, T): True where the key is padding
        kv = self.kv(h) if self.kv is not None else h
        if not self.batch_first:
            h, kv = h.transpose(0, 1), kv.transpose(0, 1)
        kw: dict = {}
        if self.mask == "padding":
            kw["key_padding_mask"] = pad
        elif self.mask == "causal":
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            kw["is_causal"] = True
        out, _ = self.attn(
            h, kv, kv if self.kv is not None else h, need_weights=self.need_weights, **kw
        )
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize(
    "mask,need_weights", [("padding", True), ("causal", False), ("none", False)]
)
def test_attention_projections_are_exact(settings, batch_first, mask, need_weights):
    torch.manual_seed(0)
    model = SelfAttention(batch_first, mask, need_weights)
    x, y = tokens()
    check_exact(model, ["attn.in_proj", "attn.out_proj", "embed", "head"], x, y, **settings)


def test_attention_with_kdim_has_a_block_per_projection_and_its_bias_on_the_fallback_rule():
    torch.manual_seed(0)
    model = SelfAttention(True, "padding", False, kdim=4)
    x, y = tokens()
    opt = check_exact(
        model, ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "kv"], x, y
    )
    row = next(line for line in opt.describe().splitlines() if line.startswith("attn.in_proj_b"))
    assert "fallback" in row and "shared by the q/k/v" in row


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another: the packed in_proj_weight is
    used as two row blocks (Q; K and V)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, kv = x[:, :3, :8], x[:, 3:, :8]
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.head(out.mean(1))


def test_cross_attention_uses_the_packed_weight_in_two_row_blocks_and_is_exact():
    torch.manual_seed(0)
    x = torch.randn(6, 7, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (6,))
    for settings in (EXACT_EXPLICIT, EXACT_IMPLICIT):
        check_exact(CrossAttention(), ["attn.in_proj", "attn.out_proj"], x, y, **settings)


@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_transformer_encoder_layers_are_preconditioned_and_exact(
    batch_first, norm_first, settings, recwarn
):
    torch.manual_seed(0)
    model = TinyEncoder(batch_first).train()
    for layer in model.encoder.layers:
        layer.norm_first = norm_first  # read by each forward
        for norm in (layer.norm1, layer.norm2):  # not γ = 1, β = 0
            nn.init.normal_(norm.weight, 1.0, 0.5)
            nn.init.normal_(norm.bias, 0.0, 0.5)
    x, y = tokens(n=4, t=6)
    layers = [
        f"encoder.layers.{i}.{name}"
        for i in range(2)
        for name in (
            "self_attn.in_proj",
            "self_attn.out_proj",
            "linear1",
            "linear2",
            "norm1",
            "norm2",
        )
    ]
    opt = check_exact(model, layers + ["embed", "head"], x, y, **settings)
    # every Linear, projection and LayerNorm is a block with curvature, and nothing warned of
    # a missing one
    assert len(opt.blocks) == len(layers) + 2
    assert all(c.ready for c in opt.curvature.curvatures)
    assert not [w for w in recwarn if "no curvature" in str(w.message)]


class TinyTransformer(nn.Module):
    """nn.Transformer (one pre-LN encoder and decoder layer, no dropout) in either batch
    layout: the source is the tokens with their padding mask, the target the first three
    tokens under a causal mask; the decoder's cross-attention uses the packed in_proj_weight
    as two row blocks."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(5, 8)
        self.transformer = nn.Transformer(
            8, 2, 1, 1, dim_feedforward=16, dropout=0.0, batch_first=batch_first, norm_first=True
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.embed(x[..., :-1])
        tgt = src[:, :3]
        pad = x[..., -1] > 0
        causal = nn.Transformer.generate_square_subsequent_mask(3)
        if not self.batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        out = self.transformer(
            src,
            tgt,
            tgt_mask=causal,
            tgt_is_causal=True,
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
        )
        return self.head(out.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("settings", [EXACT_EXPLICIT, EXACT_IMPLICIT], ids=["explicit", "implicit"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_transformer_decoder_and_cross_attention_are_preconditioned_and_exact(
    settings, batch_first, recwarn
):
    torch.manual_seed(0)
    model = TinyTransformer(batch_first).train()
    x, y = tokens(n=4, t=6)
    encoder = [
        f"transformer.encoder.layers.0.{name}"
        for name in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    ]
    decoder = [
        f"transformer.decoder.layers.0.{name}"
        for name in (
            "self_attn.in_proj",
            "self_attn.out_proj",
            "multihead_attn.in_proj",
            "multihead_attn.out_proj",
            "linear1",
            "linear2",
        )
    ]
    opt = check_exact(model, encoder + decoder + ["embed", "head"], x, y, **settings)
    assert all(c.ready for c in opt.curvature.curvatures)
    assert not [w for w in recwarn if "no curvature" in str(w.message)]


def test_attention_output_and_gradients_are_bit_identical_to_stock_on_curvature_steps():
    torch.manual_seed(0)
    model = SelfAttention(False, "padding", True)
    model.attn.dropout = 0.3  # attention dropout on: the same masks must be drawn
    stock = copy.deepcopy(model)
    opt = SENG(model, curvature_update_interval=1)
    x, y = tokens()
    for _ in range(2):
        assert opt.curvature.armed
        torch.manual_seed(5)
        out = model(x)
        torch.manual_seed(5)
        ref = stock(x)
        assert torch.equal(out, ref)
        F.cross_entropy(out, y).backward()
        F.cross_entropy(ref, y).backward()
        for (name, p), q in zip(model.named_parameters(), stock.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), name
        opt.step()
        with torch.no_grad():
            for p, q in zip(model.parameters(), stock.parameters(), strict=True):
                q.copy_(p)
        opt.zero_grad()
        stock.zero_grad()
    assert F.linear is STOCK_LINEAR  # the tap is gone after the forward


class SeqFirstLinear(nn.Module):
    """A plain Linear on (T, B, E) tokens, outside any module that declares batch_first."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x.transpose(0, 1))).mean(0))


def test_a_misread_batch_dimension_is_an_error_and_batch_first_false_is_exact():
    torch.manual_seed(0)
    model = SeqFirstLinear()
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(2))  # B 6, T 5
    y = torch.randint(0, 3, (6,))
    opt = SENG(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(
        ValueError,
        match=r"different batch sizes in one forward \('mix': 5, "
        r"'head': 6\).*batch_first=False",
    ):
        opt.step()
    check_exact(model, ["mix", "head"], x, y, **EXACT_EXPLICIT, batch_first=False)


def test_batch_first_must_be_a_bool():
    with pytest.raises(ValueError, match="batch_first must be True or False, got 0"):
        SENG(nn.Linear(2, 2), batch_first=0)


def _attention_calls(opt: SENG) -> dict[str, int]:
    """How many calls of each attention block the capture holds."""
    return {
        b.name: len(r.inputs) for b, r in opt.curvature.capture.records.items() if b.via is not None
    }


def test_another_thread_calling_linear_during_an_armed_attention_forward_is_unaffected():
    torch.manual_seed(0)
    model = SelfAttention(True, "none", False)
    opt = SENG(model, curvature_update_interval=1)
    x, y = tokens()
    w = model.attn.in_proj_weight  # a weight the capture watches, from another thread
    a = torch.randn(4, 8)
    seen: dict[str, object] = {}

    def other_thread() -> None:
        seen["out"] = F.linear(a, w)

    def during_forward(*_: object) -> None:  # runs after SENG's pre-hook: the tap is in place
        seen["swapped"] = F.linear is not STOCK_LINEAR
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()

    model.attn.register_forward_pre_hook(during_forward)
    F.cross_entropy(model(x), y).backward()
    assert seen["swapped"]
    assert torch.equal(seen["out"], STOCK_LINEAR(a, w))
    # Only the forward's own calls were recorded: one of in_proj, one of out_proj.
    assert _attention_calls(opt) == {"attn.in_proj": 1, "attn.out_proj": 1}
    opt.step()
    assert F.linear is STOCK_LINEAR


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_users_patch_of_linear_is_called_during_attention_and_kept(when, monkeypatch):
    torch.manual_seed(0)
    calls = []

    def patched(
        input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        calls.append(weight.shape)
        return STOCK_LINEAR(input, weight, bias)

    model = SelfAttention(True, "none", False)
    if when == "before":
        monkeypatch.setattr(F, "linear", patched)
    opt = SENG(model, curvature_update_interval=1)
    if when == "after":
        monkeypatch.setattr(F, "linear", patched)
    x, y = tokens()
    F.cross_entropy(model(x), y).backward()
    assert F.linear is patched  # kept once the attention forward is over
    assert (24, 8) in calls and (8, 8) in calls  # in_proj's and out_proj's calls went through it
    assert _attention_calls(opt) == {"attn.in_proj": 1, "attn.out_proj": 1}
    opt.step()
    assert opt.curvature_updates == 1 and F.linear is patched


def test_a_patch_of_linear_made_during_an_armed_attention_forward_does_not_loop():
    """A patch installed while SENG's recorder is in place wraps the recorder and is kept; at
    the next armed forward the recorder wraps that patch in turn. The calls must still go
    through once each (not loop) and be recorded once."""
    torch.manual_seed(0)
    model = SelfAttention(True, "none", False)
    opt = SENG(model, curvature_update_interval=1)
    seen: list[tuple[int, ...]] = []

    def patch_once(module: nn.Module, args: tuple) -> None:
        if F.linear is not STOCK_LINEAR and not seen:
            inner = F.linear  # SENG's recorder: this forward is armed

            def patched(
                input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
            ) -> torch.Tensor:
                seen.append(tuple(weight.shape))
                return inner(input, weight, bias)

            F.linear = patched

    model.attn.register_forward_pre_hook(patch_once)  # runs after SENG's own pre-hook
    try:
        for step in range(2):
            opt.zero_grad()
            x, y = tokens()
            out = model(x)
            assert _attention_calls(opt) == {"attn.in_proj": 1, "attn.out_proj": 1}
            F.cross_entropy(out, y).backward()
            opt.step()
            assert seen.count((24, 8)) == step + 1  # the patch ran once per forward
    finally:
        F.linear = STOCK_LINEAR
    assert opt.curvature_updates == 2


def test_torch_compile_runs_and_leaves_the_attention_projections_to_the_fallback_rule():
    """Under torch.compile the F.linear calls inside the attention are not seen: its blocks
    have no curvature (warned) and follow the fallback rule; the other layers have theirs."""
    torch.manual_seed(0)
    model = SelfAttention(True, "none", False)
    opt = SENG(model, curvature_update_interval=2)
    # Dynamo's graph capture decides what the recorder sees, whatever the backend; aot_eager
    # compiles no C++ (inductor's kernels depend on the machine's compiler and CPU).
    compiled = torch.compile(model, backend="aot_eager")
    x, y = tokens()
    losses = []
    with pytest.warns(SENGWarning, match="'attn.in_proj' has no curvature yet"):
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    has_curvature = {
        c.block.name: "K" in opt.state[c.block.weight] for c in opt.curvature.curvatures
    }
    assert has_curvature == {
        "embed": True,
        "attn.in_proj": False,
        "attn.out_proj": False,
        "head": True,
    }
    assert F.linear is STOCK_LINEAR
