"""TrainConfig settings that would silently do nothing warn, say why, and say what to change."""

import warnings

import pytest
import torch

import horizon
from helpers import batches, horizon_run, tiny_decoder
from horizon.config_warnings import IneffectiveSettingWarning, ineffective_settings

# (settings that do nothing, the words the warning must contain, the nearest settings that do something)
CASES = {
    "device_budget": (dict(plan="recompute", device_memory_budget_bytes=2**30),
                      r"device_memory_budget_bytes=1,073,741,824 has no effect.*Set plan='auto'",
                      dict(plan="auto", device_memory_budget_bytes=2**30)),
    "host_budget": (dict(host_memory_budget_bytes=2**30),
                    r"host_memory_budget_bytes=1,073,741,824 has no effect without ssd=.*units='auto'",
                    dict()),
    "ignore_with_clip": (dict(on_nonfinite="ignore", grad_clip_norm=1.0),
                         r"on_nonfinite='ignore' gains nothing.*grad_clip_norm is set.*Use on_nonfinite='skip'",
                         dict(on_nonfinite="ignore")),
    "ignore_with_accum": (dict(on_nonfinite="ignore", grad_accum_steps=2),
                          r"on_nonfinite='ignore' gains nothing.*grad_accum_steps > 1",
                          dict(on_nonfinite="skip", grad_accum_steps=2)),
    "unpinned_cpu": (dict(device="cpu", pin_memory=False), r"pin_memory=False has no effect on device='cpu'",
                     dict(device="cpu", pin_memory=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ineffective_setting_warns_once_at_the_caller(case):
    settings, words, _ = CASES[case]
    with pytest.warns(IneffectiveSettingWarning, match=words) as record:
        horizon.TrainConfig(**settings)
    assert len(record) == 1
    assert record[0].filename == __file__  # attributed to the TrainConfig(...) line, not horizon's internals


@pytest.mark.parametrize("case", sorted(CASES))
def test_effective_neighbour_is_silent(case):
    _, _, effective = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = horizon.TrainConfig(**effective)
    assert ineffective_settings(config) == []


def test_defaults_are_silent_and_several_settings_warn_each():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        horizon.TrainConfig()
    with pytest.warns(IneffectiveSettingWarning) as record:
        horizon.TrainConfig(host_memory_budget_bytes=1, pin_memory=False)
    assert [str(w.message).split("=")[0] for w in record] == ["TrainConfig.host_memory_budget_bytes",
                                                              "TrainConfig.pin_memory"]


def test_bad_values_still_raise_before_any_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="device_memory_budget_bytes must be a positive int"):
            horizon.TrainConfig(device_memory_budget_bytes=-1)


def _quiet(**settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IneffectiveSettingWarning)
        return horizon.TrainConfig(**settings)


def test_the_warned_budgets_really_change_nothing(tmp_path):
    """What the warnings claim: a 1-byte budget nobody reads trains exactly as no budget; read, it is refused."""
    model, data = tiny_decoder(num_layers=2), batches(2)
    _, want, _ = horizon_run(model, data, config=horizon.TrainConfig(grad_clip_norm=1.0))
    for settings in (dict(device_memory_budget_bytes=1), dict(host_memory_budget_bytes=1)):
        _, got, _ = horizon_run(model, data, config=_quiet(grad_clip_norm=1.0, **settings))
        assert all(torch.equal(got[k], want[k]) for k in want), settings
    with pytest.raises(ValueError, match="device_memory_budget_bytes=1 cannot hold"):
        horizon_run(model, data, config=horizon.TrainConfig(plan="auto", device_memory_budget_bytes=1))
    ssd = horizon.SSDConfig(dir=tmp_path, io_backend="python")
    with pytest.raises(ValueError, match="host_memory_budget_bytes=1 .* cannot hold the store"):
        horizon_run(model, data, config=horizon.TrainConfig(ssd=ssd, host_memory_budget_bytes=1))


def test_ignore_with_clipping_does_not_update_eagerly():
    assert _quiet(on_nonfinite="ignore").eager_updates
    assert not _quiet(on_nonfinite="ignore", grad_clip_norm=1.0).eager_updates
    assert not _quiet(on_nonfinite="ignore", grad_accum_steps=2).eager_updates
