"""Checkpoints: one written by release 0.1.0 still loads and resumes as that release did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MixedNet

from seng_dist import SENG

RELEASE = Path(__file__).resolve().parent / "data" / "release-0.1.0.pt"


@pytest.fixture(scope="module")
def release():
    return torch.load(RELEASE, weights_only=True)


@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_a_release_checkpoint_resumes_exactly_as_that_release_did(release, variant):
    from make_release_checkpoint import train  # the release's own training loop (data/)
    run = release["runs"][variant]
    model = MixedNet().train()
    model.load_state_dict(run["model"])
    # release 0.1.0 computed U c by eq. 23, then the default, and left BatchNorm to the
    # fallback rule; without saying so SENG refuses the state and names the layer
    with pytest.raises(ValueError, match=r"build SENG with skip_layers=\['bn'\] to resume"):
        SENG(model, variant=variant, uc="factored", **release["settings"]
             ).load_state_dict(run["opt"])
    opt = SENG(model, variant=variant, uc="factored", skip_layers="bn", **release["settings"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the release's run: BLAS sums then match bit for bit
    try:
        opt.load_state_dict(run["opt"])
        assert opt.step_count == release["head"] and opt.curvature_updates == 2
        weight = opt.blocks[0].weight
        assert opt.state[weight]["K"].dtype == torch.float32
        indices = [t for b in opt.blocks for t in opt.state[b.weight].values()
                   if torch.is_tensor(t) and not t.is_floating_point()]
        assert indices and all(t.dtype == torch.int64 for t in indices)
        head = release["head"]
        train(model, opt, range(head, head + release["tail"]))
    finally:
        torch.set_num_threads(threads)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), run["after"][name]), name


def test_a_release_checkpoint_is_refused_for_other_curvature_settings(release):
    run = release["runs"]["lagged"]
    opt = SENG(MixedNet(), skip_layers="bn", **dict(release["settings"], variant="blockdiag"))
    with pytest.raises(ValueError, match="variant='lagged' \\(here 'blockdiag'\\)"):
        opt.load_state_dict(run["opt"])


def test_a_checkpoint_resumes_under_the_other_uc_mode(release):
    # both modes read the same stored factors: uc is not a setting the curvature was shaped by
    import torch.nn.functional as F
    from conftest import batch
    run = release["runs"]["blockdiag"]
    model = MixedNet().train()
    model.load_state_dict(run["model"])
    opt = SENG(model, variant="blockdiag", uc="exact", skip_layers="bn", **release["settings"])
    opt.load_state_dict(run["opt"])
    assert opt.curvature_updates == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch(10)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() and not torch.equal(p.detach(), before[n])
               for n, p in model.named_parameters())


def _compiled_and_plain_state(compiled_first: bool) -> tuple[dict, SENG]:
    """A state saved by SENG built on one form of the model (torch.compile or plain), and a
    SENG on the other form, ready to load it."""
    import torch.nn.functional as F
    from conftest import batch, make_mixed
    forms = [lambda m: torch.compile(m, backend="eager"), lambda m: m]
    if not compiled_first:
        forms.reverse()
    model = forms[0](make_mixed().train())
    opt = SENG(model, curvature_update_interval=1)
    x, y = batch(8)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt.state_dict(), SENG(forms[1](make_mixed().train()), curvature_update_interval=1)


@pytest.mark.parametrize("compiled_first", [True, False], ids=["compiled->plain",
                                                                "plain->compiled"])
def test_states_move_between_a_compiled_and_a_plain_model(compiled_first):
    state, other = _compiled_and_plain_state(compiled_first)
    assert [b[0] for b in state["seng"]["blocks"]] == ["conv", "bn", "seq", "head"]
    other.load_state_dict(state)
    assert other.step_count == 1 and other.curvature.curvatures[0].ready
