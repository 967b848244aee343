"""Checkpoints: one written by release 0.1.0 still loads and resumes as that release did, and so
does one that names a setting by its old name; what a checkpoint resumes under (another variant,
another rank)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import MixedNet, batch, make_mixed, train_steps
from launch import run_ranks

from seng_dist import SENG
from seng_dist.config import RENAMED_SETTINGS, saved_names
from seng_dist.rounds import LaggedRound

RELEASE = Path(__file__).resolve().parent / "data" / "release-0.1.0.pt"


@pytest.fixture
def release():
    # Loaded for each test: a resumed run's steps update the loaded tensors in place. The
    # settings the release was run with, by today's names (rank is factor_rank); its
    # checkpoints keep the names they were written with.
    data = torch.load(RELEASE, weights_only=True)
    data["settings"] = saved_names(data["settings"])
    return data


#: float32's unit roundoff
U32 = 2.0**-24
#: The longest sum of a tail step: the conv's and the sequence Linear's weight gradients, over
#: 16 samples × 16 positions (the curvature's sums are shorter: ϱ = 10, 24 sketched columns).
LONGEST_SUM = 16 * 16


def _rounding_bound(
    norm: float, steps: list[float], cond: float, settings: dict[str, Any], tail: int
) -> float:
    """How far a parameter tensor's end of the release's tail, run in float32 on two machines
    whose kernels round differently, can be apart: ``norm`` its ‖θ‖ before the tail, ``steps``
    its moves ‖lr·v‖ (the checkpoint's momentum, then each step's), ``cond`` the largest
    cond(K + λI) of the curvature the steps used.

    Each machine's result is within E of exact arithmetic, so the two are within 2E, with E
    the sum of (the batches differ by an ulp too: torch.randn's vectorised Box-Muller rounds
    per instruction set, an error like any sum's first rounding):

    * the update θ ← θ + lr·v, rounded by u·|θ| an entry each step: ``tail·u·(‖θ‖ + Σ steps)``
      (Σ steps bounds how far θ gets from where it started);
    * each step's direction d, computed from sums of at most ``LONGEST_SUM`` = n terms, off by
      γ_n = n·u relatively, which the damped solve (K + λI)⁻¹ amplifies at most ``cond``
      times. Heavy-ball momentum carries an error of d_j into every later step with weight
      μ^(k-j) ≤ 1, so θ's end takes at most ``tail`` times each step's error, and
      lr·‖d_j‖ ≤ ‖lr·v_j‖ + μ‖lr·v_(j-1)‖: ``tail·γ_n·cond·(1 + μ)·Σ steps``.

    An error in θ feeds the next steps' gradients too; through lr/λ = 0.1 and the small
    network's curvature it adds a fraction of the terms kept, which γ_n's worst case (typical
    rounding errors of n terms sum to √n·u, 16 times less) more than covers.
    """
    path = sum(steps)
    per_machine = tail * U32 * (norm + path) + (
        tail * LONGEST_SUM * U32 * cond * (1 + settings["momentum"]) * path
    )
    return 2 * per_machine


def _damped_condition(grams: list[torch.Tensor], damping: float) -> float:
    """The largest cond₂(K + λI) = (‖K‖ + λ)/λ of the Gram matrices ``grams``."""
    return max(1 + float(torch.linalg.matrix_norm(K.double(), 2)) / damping for K in grams)


@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_a_release_checkpoint_resumes_as_that_release_did(release, variant):
    from make_release_checkpoint import train  # the release's own training loop (data/)

    run = release["runs"][variant]
    settings, head, tail = release["settings"], release["head"], release["tail"]
    model = MixedNet().train()
    model.load_state_dict(run["model"])
    # release 0.1.0 computed U c by eq. 23, then the default, and left BatchNorm to the
    # fallback rule; without saying so SENG refuses the state and names the layer
    with pytest.raises(ValueError, match=r"build SENG with skip_layers=\['bn'\] to resume"):
        SENG(model, variant=variant, uc="factored", **settings).load_state_dict(run["opt"])
    opt = SENG(model, variant=variant, uc="factored", skip_layers="bn", **settings)
    opt.load_state_dict(run["opt"])
    assert opt.step_count == head and opt.curvature_updates == 2
    weight = opt.blocks[0].weight
    assert opt.state[weight]["K"].dtype == torch.float32
    indices = [
        t
        for b in opt.blocks
        for t in opt.state[b.weight].values()
        if torch.is_tensor(t) and not t.is_floating_point()
    ]
    assert indices and all(t.dtype == torch.int64 for t in indices)
    params = dict(model.named_parameters())
    norms = {n: float(p.detach().norm()) for n, p in params.items()}
    steps = {
        n: [settings["lr"] * float(opt.state[p]["momentum_buffer"].norm())]
        for n, p in params.items()
    }
    grams = [opt.state[b.weight]["K"] for b in opt.blocks]
    for k in range(head, head + tail):
        before = {n: p.detach().clone() for n, p in params.items()}
        train(model, opt, range(k, k + 1))
        for n, p in params.items():
            steps[n].append(float((p.detach() - before[n]).norm()))
    assert opt.curvature_updates == 3  # the tail's last step rebuilds the curvature
    cond = _damped_condition(
        grams + [opt.state[b.weight]["K"] for b in opt.blocks], settings["damping"]
    )
    # The release ran on another machine, whose kernels round otherwise: its parameters are
    # matched to float32's rounding over the tail (_rounding_bound), not bit for bit (the
    # next test holds a resume on one machine to that). The rebuild's discrete choices are
    # the same on both: a sketch index moves only for a sample point within rounding of a
    # boundary of the cumulative leverage scores, and the signs LAPACK gives the factors'
    # singular vectors (eq. 23 sums the factors, so a sign counts) held here under relative
    # perturbations of 1e-6, 10⁴ times the rounding. Wrong state moves the parameters 48 to
    # 6,000 times the bound: the checkpoint's momentum, its previous gradient (lagged) or its
    # generator left out, or U c computed exactly instead of by eq. 23.
    for name, p in params.items():
        bound = _rounding_bound(norms[name], steps[name], cond, settings, tail)
        assert float((p.detach() - run["after"][name]).norm()) <= bound, name


@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_a_run_resumed_from_a_release_checkpoint_resumes_bit_exactly_once_saved(release, variant):
    # On one machine a resume is bit-exact: the release's checkpoint run through the tail, and
    # run one step, saved, loaded into a new model and optimizer and run through the rest (the
    # curvature rebuilt at the last step), end at the same parameters bit for bit.
    from make_release_checkpoint import train

    head, tail = release["head"], release["tail"]
    straight = _resumed(release, variant, variant)
    train(*straight, range(head, head + tail))
    model, opt = _resumed(release, variant, variant)
    train(model, opt, range(head, head + 1))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    again = MixedNet().train()
    again.load_state_dict(saved["model"])
    again_opt = SENG(again, variant=variant, uc="factored", skip_layers="bn", **release["settings"])
    again_opt.load_state_dict(saved["opt"])
    train(again, again_opt, range(head + 1, head + tail))
    assert again_opt.curvature_updates == 3
    assert _equal(_params(straight[0]), _params(again))


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(sketch_method="uniform"), "sketch_method='leverage' \\(here 'uniform'\\)"),
        # a setting newer than the release: the checkpoint was written with its default then
        (dict(damping_diagonal="adam"), "damping_diagonal='identity' \\(here 'adam'\\)"),
    ],
)
def test_a_release_checkpoint_is_refused_for_other_curvature_settings(release, setting, message):
    run = release["runs"]["lagged"]
    opt = SENG(
        MixedNet(),
        variant="lagged",
        uc="factored",
        skip_layers="bn",
        **dict(release["settings"], **setting),
    )
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(run["opt"])


def _resumed(
    release: dict, saved: str, variant: str, state: dict | None = None, uc: str = "factored"
) -> tuple[MixedNet, SENG]:
    """The release's ``saved`` run (or ``state`` of that model) resumed under ``variant``."""
    run = release["runs"][saved]
    model = MixedNet().train()
    model.load_state_dict(run["model"])
    opt = SENG(model, variant=variant, uc=uc, skip_layers="bn", **release["settings"])
    # a copy: torch's load keeps the given tensors, which the steps update in place
    opt.load_state_dict(copy.deepcopy(run["opt"] if state is None else state))
    return model, opt


def _step(model: MixedNet, opt: SENG) -> dict[str, torch.Tensor]:
    x, y = batch(10)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return _params(model)


def _params(model: MixedNet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _has_previous(opt: SENG) -> list[bool]:
    return [LaggedRound.PREVIOUS in opt.state[b.weight] for b in opt.blocks]


def test_a_blockdiag_checkpoint_resumes_as_lagged_with_a_block_diagonal_first_step(release):
    lagged = _resumed(release, "blockdiag", "lagged")
    blockdiag = _resumed(release, "blockdiag", "blockdiag")
    assert _has_previous(lagged[1]) == [False] * 3
    assert _equal(_step(*lagged), _step(*blockdiag))
    assert _has_previous(lagged[1]) == [True] * 3  # lagging from the next step on


def test_a_lagged_checkpoint_resumes_as_blockdiag_without_its_previous_gradient(release):
    model, opt = _resumed(release, "lagged", "blockdiag")
    assert LaggedRound.PREVIOUS in release["runs"]["lagged"]["opt"]["state"][0]
    assert _has_previous(opt) == [False] * 3
    state = copy.deepcopy(opt.state_dict())
    assert not any(LaggedRound.PREVIOUS in st for st in state["state"].values())
    # Resumed as lagged again, the gradient of the lagged run is not used (it is stale): the
    # first step is block-diagonal.
    again = _step(*_resumed(release, "lagged", "lagged", state))
    assert _equal(again, _step(model, opt))


def test_a_checkpoint_resumes_under_the_other_uc_mode(release):
    # both modes read the same stored factors: uc is not a setting the curvature was shaped by
    model, opt = _resumed(release, "blockdiag", "blockdiag", uc="exact")
    assert opt.curvature_updates == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = _step(model, opt)
    assert all(torch.isfinite(p).all() and not torch.equal(p, before[n]) for n, p in after.items())


def test_a_checkpoint_naming_a_setting_by_its_old_name_resumes_bit_exactly():
    # A checkpoint written before a setting was renamed holds it under the old name (release
    # 0.1.0's holds rank): one saved now, its settings renamed back, resumes as saved.
    settings = dict(
        explicit_threshold=32,
        sketch_size=12,
        factor_rank=2,
        factor_sketch_size=10,
        sketch_method="leverage",
        curvature_update_interval=3,
    )
    model = make_mixed().train()
    opt = SENG(model, **settings)
    train_steps(model, opt, range(2), 0)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    old_names = {new: old for old, new in RENAMED_SETTINGS.items()}
    config = saved["opt"]["seng"]["config"]
    saved["opt"]["seng"]["config"] = {old_names.get(k, k): v for k, v in config.items()}
    assert "rank" in saved["opt"]["seng"]["config"]
    assert "factor_rank" not in saved["opt"]["seng"]["config"]
    train_steps(model, opt, range(2, 5), 0)  # the run not interrupted; a rebuild at step 3

    again = make_mixed(seed=5).train()
    again.load_state_dict(saved["model"])
    again_opt = SENG(again, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint's old name is read silently
        again_opt.load_state_dict(saved["opt"])
    train_steps(again, again_opt, range(2, 5), 0)
    assert again_opt.curvature_updates == opt.curvature_updates == 2
    assert _equal(_params(model), _params(again))
    # The old name still shapes the curvature: another value is refused, naming the setting.
    other = SENG(make_mixed(seed=5).train(), **dict(settings, factor_rank=3))
    with pytest.raises(ValueError, match="factor_rank=2 \\(here 3\\)"):
        other.load_state_dict(saved["opt"])


def _compiled_and_plain_state(compiled_first: bool) -> tuple[dict, SENG]:
    """A state saved by SENG built on one form of the model (torch.compile or plain), and a
    SENG on the other form, ready to load it."""
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


@pytest.mark.parametrize(
    "compiled_first", [True, False], ids=["compiled->plain", "plain->compiled"]
)
def test_states_move_between_a_compiled_and_a_plain_model(compiled_first):
    state, other = _compiled_and_plain_state(compiled_first)
    assert [b[0] for b in state["seng"]["blocks"]] == ["conv", "bn", "seq", "head"]
    other.load_state_dict(state)
    assert other.step_count == 1 and other.curvature.curvatures[0].ready


def _resume_rank_zeros_state(rank: int, world: int, config: dict) -> dict[str, Any]:
    """Train 2 steps; then resume steps 2-3 from rank 0's state on every rank, from each rank's
    own state with rank 1's curvature dropped (rebuilt at step 2: the expected outcome), and
    from rank 0's state as a checkpoint from before the writer was recorded."""
    model = make_mixed()
    opt = SENG(model, **config)
    train_steps(model, opt, range(2), rank)
    own = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    zeros = opt.communicator.broadcast_object(own if rank == 0 else None, name="test.ckpt")
    legacy = copy.deepcopy(zeros)
    for key in ("saved_by_rank", "saved_world_size"):
        del legacy["opt"]["seng"][key]

    def resume(state: dict, drop: bool) -> dict[str, Any]:
        model = make_mixed(seed=5)
        model.load_state_dict(state["model"])
        opt = SENG(model, **config, curvature_update_interval=200)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            opt.load_state_dict(copy.deepcopy(state["opt"]))
        if drop:  # what rank 1 is expected to do with a foreign curvature
            opt.curvature.drop(everywhere=False)
        before = opt.curvature_updates
        train_steps(model, opt, range(2, 4), rank)
        return {
            "warnings": [str(w.message) for w in said if "curvature of rank" in str(w.message)],
            "rebuilt": opt.curvature_updates - before,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        }

    return {
        "foreign": resume(zeros, False),
        "expected": resume(own, rank != 0),
        "legacy": resume(legacy, False),
    }


@pytest.mark.parametrize("variant", ["blockdiag", "lagged"])
def test_one_ranks_state_loaded_on_every_rank_is_said_and_rebuilt_on_the_others(variant):
    # Overlapped in tiny buckets: rank 1 rebuilds at step 2, rank 0 does not; what their early
    # buckets carry follows the schedule, the same on both.
    config = dict(
        variant=variant,
        bucket_size_mb=2e-4,
        explicit_threshold=32,
        sketch_size=12,
        factor_rank=2,
        factor_sketch_size=10,
        sketch_method="leverage",
    )
    ranks = run_ranks(_resume_rank_zeros_state, 2, config, timeout=240)
    assert ranks[0]["foreign"]["warnings"] == [] and ranks[0]["foreign"]["rebuilt"] == 0
    [said] = ranks[1]["foreign"]["warnings"]
    assert "the curvature of rank 0 of a 2-rank job, loaded on rank 1 of 2" in said
    assert "state_dict_all_ranks = True" in said
    assert ranks[1]["foreign"]["rebuilt"] == 1
    for res in ranks:
        for name, p in res["expected"]["params"].items():
            assert torch.equal(res["foreign"]["params"][name], p), name
            assert torch.equal(ranks[0]["foreign"]["params"][name], p), name
        # a checkpoint that does not say who wrote it loads as before: kept, unsaid
        assert res["legacy"]["warnings"] == [] and res["legacy"]["rebuilt"] == 0


def test_the_grad_scalers_state_travels_in_the_checkpoint():
    """A GradScaler given as opt.grad_scaler (as the DeepSpeed plugin gives the engine's, whose
    own checkpoint does not keep it): its loss scale and growth tracker resume with the step."""
    model = make_mixed()
    opt = SENG(model, lr=0.05)
    opt.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    train_steps(model, opt, range(1), 0)
    opt.grad_scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    opt.grad_scaler.update(new_scale=2.0**7)
    saved = copy.deepcopy(opt.state_dict())
    resumed = SENG(make_mixed(), lr=0.05)
    resumed.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    resumed.load_state_dict(saved)
    assert resumed.grad_scaler.get_scale() == 2.0**7
    assert resumed.grad_scaler.state_dict() == opt.grad_scaler.state_dict()
