"""Scheduler configs of every diffusers class ddimctl reads: the same noise process as diffusers' own scheduler,
the class's defaults for missing keys, notes for keys it does not follow, and one-line refusals of the rest."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from ddimctl.errors import ConfigError
from ddimctl.schedule import shift_sigma
from ddimctl.settings import (
    _CLASS_KEYS,
    FLOW_SCHEDULERS,
    REFUSED_SCHEDULERS,
    VP_SCHEDULERS,
    SamplerSettings,
)

SRC = "m/scheduler_config.json"
# classes of VP_SCHEDULERS that diffusers 0.42 has no constructible class for
NOT_IN_DIFFUSERS = {"GaussianDDPMScheduler"}  # diffusers <= 0.1's name
NEEDS_TORCHSDE = {"DPMSolverSDEScheduler"}


def _scheduler(diffusers, name: str, **kwargs):
    if name in NOT_IN_DIFFUSERS:
        pytest.skip(f"{name} is not a diffusers class any more")
    try:
        return getattr(diffusers, name)(**kwargs)
    except ImportError as e:  # DPMSolverSDEScheduler without torchsde
        pytest.skip(f"{name}: {e}")


def _saved_config(sch) -> dict:
    """What save_pretrained writes to scheduler_config.json (the class name and every argument)."""
    return {"_class_name": type(sch).__name__, "_diffusers_version": "0.42.1", **dict(sch.config)}


def _signature_defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _source_defaults(diffusers, name: str) -> dict:
    import ast
    from pathlib import Path

    folder = Path(diffusers.__file__).parent / "schedulers"
    for path in sorted(folder.glob("scheduling_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == name:
                init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
                args = init.args.args[-len(init.args.defaults):]
                return {a.arg: ast.literal_eval(d) for a, d in zip(args, init.args.defaults)}
    raise AssertionError(f"{name} not found in {folder}")


@pytest.mark.parametrize("name", sorted(set(VP_SCHEDULERS) - NOT_IN_DIFFUSERS))
def test_class_defaults_table_matches_diffusers_signatures(diffusers, name):
    defaults = _signature_defaults(getattr(diffusers, name))
    if not defaults:  # a dummy class (its optional dependency is missing): read __init__'s defaults from the source
        defaults = _source_defaults(diffusers, name)
    table = dict(zip(_CLASS_KEYS, VP_SCHEDULERS[name]))
    fallback = {"clip_sample": False, "set_alpha_to_one": True}  # what a class without the argument does
    for key, value in table.items():
        if key in defaults:
            assert defaults[key] == value, (name, key)
        elif key in fallback:
            assert value == fallback[key], (name, key)
    # every setting outside the table has the same default in every class as in SamplerSettings
    ours = SamplerSettings()
    for key in ("num_train_timesteps", "prediction_type", "steps_offset", "thresholding", "rescale_betas_zero_snr",
                "dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range", "trained_betas"):
        if key in defaults:
            assert defaults[key] == getattr(ours, key), (name, key)


def _assert_same_process(settings: SamplerSettings, sch) -> None:
    ours = settings.schedule().alphas_cumprod
    theirs = sch.alphas_cumprod.double().numpy()
    assert ours.shape == theirs.shape
    # diffusers computes in float32 (and some classes pin a zero-SNR end at 2**-24)
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(VP_SCHEDULERS))
def test_saved_configs_give_diffusers_alphas_cumprod(diffusers, name):
    params = _signature_defaults(getattr(diffusers, name, object)) if name not in NOT_IN_DIFFUSERS else {}
    kwargs = {"num_train_timesteps": 700, "beta_start": 0.0012, "beta_end": 0.017, "beta_schedule": "scaled_linear"}
    if "prediction_type" in params:
        kwargs["prediction_type"] = "v_prediction"
    sch = _scheduler(diffusers, name, **kwargs)
    settings = SamplerSettings.from_config(_saved_config(sch), source=SRC)
    _assert_same_process(settings, sch)
    assert settings.prediction_type == sch.config.get("prediction_type", "epsilon")
    assert settings.scheduler_class == name and settings.kind == "vp"
    assert settings.notes == ()  # a config at the class's defaults has nothing ddimctl ignores
    if "timestep_spacing" in params:
        assert settings.timestep_spacing == sch.config.timestep_spacing


@pytest.mark.parametrize("name", sorted(VP_SCHEDULERS))
def test_missing_keys_take_the_named_class_defaults(diffusers, name):
    sch = _scheduler(diffusers, name)
    settings = SamplerSettings.from_config({"_class_name": name}, source=SRC)
    _assert_same_process(settings, sch)  # e.g. Heun/KDPM2: betas 0.00085..0.012, not DDIM's 0.0001..0.02
    if "set_alpha_to_one" in sch.config:
        assert settings.set_alpha_to_one == sch.config.set_alpha_to_one
    assert settings.clip_sample == sch.config.get("clip_sample", False)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_zero_snr_rescaling_and_other_beta_schedules(diffusers, name, schedule):
    sch = _scheduler(diffusers, name, beta_schedule=schedule, rescale_betas_zero_snr=True,
                     prediction_type="v_prediction")
    settings = SamplerSettings.from_config(_saved_config(sch), source=SRC)
    assert settings.rescale_betas_zero_snr
    _assert_same_process(settings, sch)


def test_trained_betas(diffusers):
    betas = np.linspace(1e-4, 0.03, 200).tolist()
    for name in ("DDPMScheduler", "EulerDiscreteScheduler", "PNDMScheduler"):
        sch = getattr(diffusers, name)(num_train_timesteps=200, trained_betas=betas)
        config = _saved_config(sch)
        config["trained_betas"] = betas  # save_pretrained writes the list
        _assert_same_process(SamplerSettings.from_config(config, source=SRC), sch)


def test_legacy_gaussian_ddpm_reads_like_ddpm(diffusers):
    legacy = {"_class_name": "GaussianDDPMScheduler", "timesteps": 300, "beta_start": 0.0002, "beta_end": 0.03,
              "beta_schedule": "linear", "clip_predicted_image": False, "variance_type": "fixed_small"}
    settings = SamplerSettings.from_config(legacy, source=SRC)
    _assert_same_process(settings, diffusers.DDPMScheduler(num_train_timesteps=300, beta_start=0.0002,
                                                           beta_end=0.03))
    assert settings.clip_sample is False and settings.notes == ()


@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
def test_flow_configs_give_diffusers_sigmas(diffusers, name):
    sch = getattr(diffusers, name)(shift=3.0, num_train_timesteps=500)
    settings = SamplerSettings.from_config(_saved_config(sch), source=SRC)
    assert (settings.kind, settings.prediction_type, settings.shift, settings.num_train_timesteps) == (
        "flow", "flow", 3.0, 500)
    assert settings.notes == ()
    T = settings.num_train_timesteps
    ours = np.array([shift_sigma((t + 1) / T, settings.shift) for t in reversed(range(T))])
    theirs = sch.sigmas.double().numpy()[:T]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# notes: keys that change what diffusers' scheduler would do, which ddimctl does not follow


OWN = "ddimctl chooses its own time steps (spacing)"


@pytest.mark.parametrize(
    "name, key, value, why",
    [
        ("EulerDiscreteScheduler", "use_karras_sigmas", True, OWN),
        ("DPMSolverMultistepScheduler", "use_exponential_sigmas", True, OWN),
        ("UniPCMultistepScheduler", "use_beta_sigmas", True, OWN),
        ("DPMSolverMultistepScheduler", "use_lu_lambdas", True, OWN),
        ("EulerDiscreteScheduler", "sigma_min", 0.1, OWN),
        ("EulerDiscreteScheduler", "sigma_max", 14.6, OWN),
        ("EulerDiscreteScheduler", "timestep_type", "continuous", None),  # epsilon: the model still gets t
        ("EulerDiscreteScheduler", "interpolation_type", "log_linear",
         "ddimctl uses the training timesteps' own noise levels"),
        ("DPMSolverMultistepScheduler", "final_sigmas_type", "sigma_min",
         "ddimctl's last step lands on the clean sample, sigma 0"),
        ("DPMSolverMultistepScheduler", "lambda_min_clipped", -5.1, OWN),
        ("UniPCMultistepScheduler", "use_dynamic_shifting", True, OWN),
        ("DDPMScheduler", "variance_type", "learned_range",
         "the model's variance channels are not used: exact at eta 0; at eta > 0 DDIM's sigma_t(eta) replaces the "
         "learned variance"),
        ("DDPMScheduler", "variance_type", "fixed_large",
         "a DDPM ancestral-sampling variance; DDIM's eta sets the noise of each step"),
        ("FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting", True,
         "diffusers' pipelines shift by the image size (base_shift, max_shift); ddimctl uses the static shift 1.0"),
        ("FlowMatchEulerDiscreteScheduler", "stochastic_sampling", True,
         "ddimctl's eta decides the noise of each step"),
        ("FlowMatchEulerDiscreteScheduler", "shift_terminal", 0.1, OWN),
    ],
)
def test_ignored_keys_are_named_in_one_note(diffusers, name, key, value, why):
    config = {**_saved_config(getattr(diffusers, name)()), key: value}
    settings = SamplerSettings.from_config(config, source=SRC)
    if why is None:
        assert settings.notes == ()
        return
    assert settings.notes == (f"{SRC}: {key} {value!r} ignored ({why})",)
    assert SamplerSettings.from_config({**config, key: _signature_defaults(getattr(diffusers, name))[key]},
                                       source=SRC).notes == ()


def test_notes_do_not_change_equality_or_the_saved_config():
    noted = SamplerSettings.from_config({"_class_name": "DDPMScheduler", "variance_type": "learned_range"})
    plain = SamplerSettings.from_config({"_class_name": "DDPMScheduler"})
    assert noted.notes and not plain.notes and noted == plain
    assert "notes" not in noted.to_diffusers_config() and "scheduler_class" not in noted.to_diffusers_config()
    assert noted.with_overrides(timestep_spacing="trailing").notes == noted.notes


# ----------------------------------------------------------------------------------------------------------------
# refusals


SUPPORTED = ("ddimctl reads VP schedulers (DDPM, DDIM, PNDM, DPM-Solver, UniPC, DEIS, SA-Solver, Euler, Heun, LMS, "
             "KDPM2) and FlowMatchEuler/FlowMatchHeun")


@pytest.mark.parametrize("name,why", [
    ("ScoreSdeVeScheduler", "variance-exploding score SDE (x_t = x0 + sigma_t eps), not variance preserving"),
    ("CMStochasticIterativeScheduler", "consistency model: a one- or few-step sampler of its own, not a DDIM process"),
], ids=["variance-exploding", "consistency-model"])
def test_refused_classes_get_the_exact_line(diffusers, name, why):
    config = _saved_config(getattr(diffusers, name)())
    with pytest.raises(ConfigError) as e:
        SamplerSettings.from_config(config, source=SRC)
    assert str(e.value) == f"{SRC}: unsupported scheduler class '{name}' ({why}; {SUPPORTED})"


@pytest.mark.parametrize("name", sorted(REFUSED_SCHEDULERS))
def test_every_refused_class_says_why(name):
    with pytest.raises(ConfigError) as e:
        SamplerSettings.from_config({"_class_name": name, "num_train_timesteps": 1000}, source=SRC)
    assert str(e.value) == f"{SRC}: unsupported scheduler class {name!r} ({REFUSED_SCHEDULERS[name]}; {SUPPORTED})"


def test_unknown_classes_are_refused():
    with pytest.raises(ConfigError) as e:
        SamplerSettings.from_config({"_class_name": "MyScheduler"}, source=SRC)
    assert str(e.value) == f"{SRC}: unsupported scheduler class 'MyScheduler' ({SUPPORTED})"


def test_every_diffusers_scheduler_class_is_read_or_refused(diffusers):
    """No diffusers scheduler class is read by accident: each one is either in our tables or refused."""
    names = [n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax")]
    assert len(names) > 30
    for name in names:
        if name in VP_SCHEDULERS or name in FLOW_SCHEDULERS:
            continue
        with pytest.raises(ConfigError, match="unsupported scheduler class"):
            SamplerSettings.from_config({"_class_name": name}, source=SRC)


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True},
         "unsupported use_flow_sigmas True (a rectified-flow process on a VP scheduler class"),
        ({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous", "prediction_type": "v_prediction"},
         "unsupported timestep_type 'continuous' with v_prediction (the model takes 0.25 log(sigma)"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "unsupported invert_sigmas True"),
        ({"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction"},
         "unsupported prediction_type 'flow_prediction'"),
        ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "unsupported beta_schedule 'sigmoid'"),
    ],
)
def test_keys_that_change_what_the_model_is_given_are_refused(config, needle):
    with pytest.raises(ConfigError) as e:
        SamplerSettings.from_config(config, source=SRC)
    assert str(e.value).startswith(f"{SRC}: {needle}") and "\n" not in str(e.value)


def test_the_process_is_used_not_the_class_solver(diffusers):
    """A DPM-Solver++ config and a DDIM config with the same betas give the same sampling plan: the class only
    tells the process."""
    a = SamplerSettings.from_config(_saved_config(diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear",
                                                                                        timestep_spacing="leading")))
    b = SamplerSettings.from_config(_saved_config(diffusers.DDIMScheduler(beta_schedule="scaled_linear",
                                                                          clip_sample=False)))
    pa, pb = a.plan(10), b.plan(10)
    assert np.array_equal(pa.timesteps, pb.timesteps) and np.array_equal(pa.a, pb.a)
