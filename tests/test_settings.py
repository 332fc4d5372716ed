"""Scheduler configs from diffusers checkpoints become sampler settings."""

import pytest

from ddimctl.errors import ConfigError
from ddimctl.settings import SamplerSettings


def test_missing_keys_take_ddim_defaults():
    s = SamplerSettings.from_config({"_class_name": "DDPMScheduler", "beta_schedule": "linear"})
    assert (s.kind, s.prediction_type, s.clip_sample, s.set_alpha_to_one, s.timestep_spacing, s.steps_offset) == (
        "vp", "epsilon", True, True, "leading", 0)


def test_legacy_gaussian_ddpm_keys():
    s = SamplerSettings.from_config({"_class_name": "GaussianDDPMScheduler", "timesteps": 500, "beta_end": 0.03})
    assert s.num_train_timesteps == 500 and s.beta_end == 0.03
    assert len(s.schedule().alphas_cumprod) == 500


def test_flow_scheduler_config():
    s = SamplerSettings.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert (s.kind, s.prediction_type, s.shift, s.clip_sample, s.timestep_spacing) == ("flow", "flow", 3.0, False, "trailing")
    plan = s.plan(4)
    assert plan.b[0] == 1.0 and plan.b[-1] == 0.0
    assert SamplerSettings.from_config(s.to_diffusers_config()) == s


def test_round_trip_through_diffusers_config():
    s = SamplerSettings.from_config({"prediction_type": "v_prediction", "clip_sample": False, "timestep_spacing": "trailing"})
    assert SamplerSettings.from_config(s.to_diffusers_config()) == s


def test_ddim_scheduler_accepts_our_config(diffusers):
    s = SamplerSettings(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1)
    sch = diffusers.DDIMScheduler.from_config(s.to_diffusers_config())
    assert sch.config.prediction_type == "v_prediction" and sch.config.timestep_spacing == "trailing"


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "sigmoid"), ("prediction_type", "score"), ("timestep_spacing", "karras"),
    ("num_train_timesteps", 0), ("beta_end", -1.0), ("steps_offset", -2),
])
def test_unsupported_values_name_key_and_value(key, value):
    with pytest.raises(ConfigError) as e:
        SamplerSettings.from_config({key: value}, source="m/scheduler_config.json")
    msg = str(e.value)
    assert msg.startswith("m/scheduler_config.json: unsupported") and key in msg and repr(value) in msg
    assert "\n" not in msg


def test_overrides_and_denoiser():
    s = SamplerSettings.from_config({}).with_overrides(timestep_spacing="trailing", clip_sample=None)
    assert s.timestep_spacing == "trailing" and s.clip_sample is True
    assert s.denoiser(lambda x, t: x).clip_sample == 1.0
    with pytest.raises(ConfigError, match="--spacing|timestep_spacing"):
        s.with_overrides(source="--spacing", timestep_spacing="nope")
