"""Settings: a renamed setting's old name still works, with a deprecation warning naming the new
one, wherever flat settings are taken; named choices become enums at validation and the code
dispatches on them."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

from seng_dist import SENG, SENGConfig, SENGDeprecationWarning, SENGWarning
from seng_dist.config import RENAMED_SETTINGS, DampingDiagonal, Variant
from seng_dist.deepspeed import seng_params
from seng_dist.diagonal import AdamDiagonal, IdentityDiagonal
from seng_dist.rounds import BlockDiagonalRound, LaggedRound

RANK_RENAMED = (
    "SENG: the setting 'rank' was renamed 'factor_rank'; rank=2 was taken as "
    "factor_rank=2. The old name will be removed in a future release"
)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_the_old_name_rank_is_factor_rank_with_a_deprecation_warning():
    assert RENAMED_SETTINGS == {"rank": "factor_rank"}
    with pytest.warns(SENGDeprecationWarning) as said:
        opt = SENG(_net(), rank=2)
    [warning] = said
    assert str(warning.message) == RANK_RENAMED
    assert warning.filename == __file__  # the user's line, not SENG's
    # A FutureWarning, shown by Python's default filters wherever SENG is built (a
    # DeprecationWarning is hidden outside __main__).
    assert issubclass(warning.category, FutureWarning)
    assert not issubclass(warning.category, DeprecationWarning)
    assert issubclass(warning.category, SENGWarning)
    assert opt.config.sketch.factor_rank == 2
    with pytest.warns(SENGDeprecationWarning, match="renamed 'factor_rank'"):
        config = SENGConfig.from_settings(rank=2)
    assert config == SENGConfig.from_settings(factor_rank=2)
    assert "rank" not in SENGConfig.setting_names()
    with pytest.warns(SENGDeprecationWarning, match=r"renamed 'factor_rank': read it as"):
        assert config.sketch.rank == 2  # read under the old name
    with pytest.raises(AttributeError, match="no attribute 'rnak'"):
        config.sketch.rnak  # noqa: B018


def test_the_new_name_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SENG(_net(), factor_rank=3).config.sketch.factor_rank == 3


def test_a_setting_given_under_both_names_is_refused_naming_both():
    message = "SENG settings 'rank' and 'factor_rank' were both given"
    with pytest.raises(ValueError, match=message):
        SENG(_net(), rank=2, factor_rank=2)
    with pytest.raises(ValueError, match=message):
        SENGConfig().replace(rank=None, factor_rank=None)


def test_a_ds_config_may_name_the_old_setting():
    cfg = {
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "SENG", "params": {"rank": 2, "lr": 0.1}},
    }
    with pytest.warns(SENGDeprecationWarning, match="renamed 'factor_rank'"):
        params = seng_params(cfg)
    assert params == {
        "factor_rank": 2,
        "lr": 0.1,
        "shard_state": "none",
        "gradient_accumulation_steps": 1,
    }
    cfg["optimizer"]["params"]["factor_rank"] = 2
    with pytest.raises(ValueError, match="'rank' and 'factor_rank' were both given"):
        seng_params(cfg)


@pytest.mark.parametrize(
    "setting, kind", [("variant", Variant), ("damping_diagonal", DampingDiagonal)]
)
def test_named_choices_are_enums_that_compare_and_save_as_their_strings(setting, kind):
    for choice in kind:
        config = SENGConfig.from_settings(**{setting: choice.value})
        value = config.flat()[setting]
        assert value is choice and value == choice.value and str(value) == choice.value
        assert f"{value}" == choice.value
        saved = config.fingerprint()[setting]
        assert type(saved) is str and saved == choice.value  # loads with weights_only=True
        assert SENGConfig.from_settings(**{setting: choice}).flat()[setting] is choice
    allowed = ", ".join(repr(c.value) for c in kind)
    with pytest.raises(ValueError, match=f"{setting} must be one of {allowed}, got 'other'"):
        SENGConfig.from_settings(**{setting: "other"})


def test_each_variant_and_diagonal_has_its_class():
    model = _net()
    rounds = {v: type(SENG(model, variant=v.value).round) for v in Variant}
    assert rounds == {Variant.BLOCKDIAG: BlockDiagonalRound, Variant.LAGGED: LaggedRound}
    diagonals = {
        d: type(SENG(model, damping_diagonal=d.value).round.diagonal) for d in DampingDiagonal
    }
    assert diagonals == {
        DampingDiagonal.IDENTITY: IdentityDiagonal,
        DampingDiagonal.ADAM: AdamDiagonal,
    }
