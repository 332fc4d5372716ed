"""Sampler settings read from a diffusers scheduler config, with command-line overrides.

A scheduler config names a class (``_class_name``) and the noise process the model was trained with: its betas
(``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
``rescale_betas_zero_snr``) and its ``prediction_type``. ddimctl reproduces that process and samples it with its
own samplers, so it reads the config of every diffusers class that describes the same variance-preserving
process as DDPM/DDIM (:data:`VP_SCHEDULERS`: DDIM, DDPM and its legacy ``GaussianDDPMScheduler``, PNDM,
DPM-Solver, UniPC, DEIS, SA-Solver, Euler, Heun, LMS, KDPM2) or rectified flow (:data:`FLOW_SCHEDULERS`). Other
classes (variance exploding, consistency models, EDM, ...) are refused with a one-line :class:`ConfigError`
(:data:`REFUSED_SCHEDULERS` says why for each known one).

A key the config leaves out takes the default of the class the config names, as that class would run (the betas
of ``HeunDiscreteScheduler`` default to 0.00085..0.012, ``PNDMScheduler`` has ``set_alpha_to_one`` false); a key
the class does not have takes the value that matches what the class does (a class without ``clip_sample`` never
clips: false). With no ``_class_name``, diffusers' DDIMScheduler defaults apply. An unsupported value is a
:class:`ConfigError` naming the key and the value.

Keys that change what diffusers' own scheduler would do but that ddimctl does not follow (its own time steps
instead of ``use_karras_sigmas``, no learned variance, ...) are named, one line each, in
:attr:`SamplerSettings.notes`, for a front end to show; the library never prints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .prediction import PREDICTION_TYPES, Denoiser, Model, Thresholding
from .schedule import BETA_SCHEDULES, SPACINGS, Schedule, SamplingPlan, flow_schedule, make_plan, vp_schedule

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")

# diffusers' defaults (0.42) for the settings each VP class decides, by class: (beta_start, beta_end,
# beta_schedule, clip_sample, set_alpha_to_one, timestep_spacing). Every other setting has the same default in
# all of them (1000 training steps, epsilon, no thresholding, steps_offset 0, no zero-SNR rescaling). Where a class
# has no such argument the value is what the class does: it never clips (false), it ends at the clean sample
# (set_alpha_to_one true); DPMSolverSinglestepScheduler's grid linspace(0, T - 1, N + 1)[::-1][:-1] is nearest to
# trailing. tests/test_formats.py checks this table against diffusers' signatures.
_DDPM = (0.0001, 0.02, "linear", True, True, "leading")
_KARRAS = (0.0001, 0.02, "linear", False, True, "linspace")  # the k-diffusion / multistep family
_KARRAS_SD = (0.00085, 0.012, "linear", False, True, "linspace")
VP_SCHEDULERS: dict[str, tuple] = {
    "DDIMScheduler": _DDPM,
    "DDIMParallelScheduler": _DDPM,
    "DDIMInverseScheduler": _DDPM,
    "DDPMScheduler": _DDPM,
    "DDPMParallelScheduler": _DDPM,
    "GaussianDDPMScheduler": _DDPM,  # diffusers <= 0.1's name for DDPMScheduler (keys "timesteps", ...)
    "PNDMScheduler": (0.0001, 0.02, "linear", False, False, "leading"),
    "DPMSolverMultistepScheduler": _KARRAS,
    "DPMSolverMultistepInverseScheduler": _KARRAS,
    "DPMSolverSinglestepScheduler": (0.0001, 0.02, "linear", False, True, "trailing"),
    "DPMSolverSDEScheduler": _KARRAS_SD,
    "UniPCMultistepScheduler": _KARRAS,
    "DEISMultistepScheduler": _KARRAS,
    "SASolverScheduler": _KARRAS,
    "EulerDiscreteScheduler": _KARRAS,
    "EulerAncestralDiscreteScheduler": _KARRAS,
    "LMSDiscreteScheduler": _KARRAS,
    "HeunDiscreteScheduler": _KARRAS_SD,
    "KDPM2DiscreteScheduler": _KARRAS_SD,
    "KDPM2AncestralDiscreteScheduler": _KARRAS_SD,
}
_CLASS_KEYS = ("beta_start", "beta_end", "beta_schedule", "clip_sample", "set_alpha_to_one", "timestep_spacing")

# Scheduler classes that are not a VP or flow process ddimctl can reproduce, and why (for the refusal).
REFUSED_SCHEDULERS: dict[str, str] = {
    "ScoreSdeVeScheduler": "variance-exploding score SDE (x_t = x0 + sigma_t eps), not variance preserving",
    "KarrasVeScheduler": "variance-exploding process of Karras et al.'s stochastic sampler",
    "ScoreSdeVpScheduler": "continuous-time VP SDE (beta_min/beta_max on t in (0, 1]): no discrete betas or "
                           "integer timesteps to reproduce",
    "CMStochasticIterativeScheduler": "consistency model: a one- or few-step sampler of its own, not a DDIM process",
    "LCMScheduler": "latent consistency model: its own few-step sampler",
    "TCDScheduler": "trajectory consistency distillation: its own few-step sampler",
    "SCMScheduler": "TrigFlow consistency model",
    "EDMEulerScheduler": "EDM preconditioning (sigma_data, sigma-conditioned inputs), not DDPM timesteps",
    "EDMDPMSolverMultistepScheduler": "EDM preconditioning (sigma_data, sigma-conditioned inputs), not DDPM timesteps",
    "IPNDMScheduler": "its own continuous noise schedule, no betas",
    "UnCLIPScheduler": "unCLIP's decoder scheduler (fixed_small_log variance, image-embedding conditioned)",
    "RePaintScheduler": "RePaint's inpainting resampler",
    "VQDiffusionScheduler": "discrete (token) diffusion",
    "AmusedScheduler": "masked-token generation",
    "DDPMWuerstchenScheduler": "Wuerstchen's continuous schedule",
    "CogVideoXDDIMScheduler": "CogVideoX's SNR-shifted schedule (snr_shift_scale)",
    "CogVideoXDPMScheduler": "CogVideoX's SNR-shifted schedule (snr_shift_scale)",
}
_SUPPORTED_TEXT = (
    "ddimctl reads VP schedulers (DDPM, DDIM, PNDM, DPM-Solver, UniPC, DEIS, SA-Solver, Euler, Heun, LMS, KDPM2) "
    "and FlowMatchEuler/FlowMatchHeun"
)
_OWN_STEPS = "ddimctl chooses its own time steps (spacing)"


def _is_on(value: Any) -> bool:
    return value is not None and value is not False and value != 0


def _vp_notes(cfg: Mapping[str, Any], source: str) -> list[str]:
    """One line per key that changes what the named diffusers class would do but that ddimctl does not follow;
    a :class:`ConfigError` for the keys that change what the model is given."""
    notes = []

    def note(key: str, why: str) -> None:
        notes.append(f"{source}: {key} {cfg[key]!r} ignored ({why})")

    if _is_on(cfg.get("use_flow_sigmas")):
        raise ConfigError(
            f"{source}: unsupported use_flow_sigmas {cfg['use_flow_sigmas']!r} (a rectified-flow process on a VP "
            "scheduler class; ddimctl reads flow models from FlowMatchEuler/FlowMatchHeun configs)"
        )
    if cfg.get("timestep_type") == "continuous" and cfg.get("prediction_type") == "v_prediction":
        raise ConfigError(
            f"{source}: unsupported timestep_type 'continuous' with v_prediction (the model takes 0.25 log(sigma) "
            "as its time input, EDM-style, not the integer timesteps ddimctl passes)"
        )
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
        if _is_on(cfg.get(key)):
            note(key, _OWN_STEPS)
    for key in ("sigma_min", "sigma_max", "shift_terminal"):
        if cfg.get(key) is not None:
            note(key, _OWN_STEPS)
    if cfg.get("interpolation_type", "linear") != "linear":
        note("interpolation_type", "ddimctl uses the training timesteps' own noise levels")
    if cfg.get("final_sigmas_type", "zero") == "sigma_min":
        note("final_sigmas_type", "ddimctl's last step lands on the clean sample, sigma 0")
    clipped = cfg.get("lambda_min_clipped")
    if isinstance(clipped, (int, float)) and not isinstance(clipped, bool) and math.isfinite(clipped):
        note("lambda_min_clipped", _OWN_STEPS)
    if _is_on(cfg.get("use_dynamic_shifting")):
        note("use_dynamic_shifting", _OWN_STEPS)
    variance = cfg.get("variance_type")
    if variance in ("learned", "learned_range"):
        note("variance_type", "the model's variance channels are not used: exact at eta 0; at eta > 0 DDIM's "
                              "sigma_t(eta) replaces the learned variance")
    elif variance not in (None, "fixed_small"):
        note("variance_type", "a DDPM ancestral-sampling variance; DDIM's eta sets the noise of each step")
    return notes


def _flow_notes(cfg: Mapping[str, Any], source: str, shift: float) -> list[str]:
    notes = []

    def note(key: str, why: str) -> None:
        notes.append(f"{source}: {key} {cfg[key]!r} ignored ({why})")

    if _is_on(cfg.get("invert_sigmas")):
        raise ConfigError(f"{source}: unsupported invert_sigmas {cfg['invert_sigmas']!r} (sigma runs from 0 to 1 "
                          "in this model's time input; ddimctl's flow models take sigma * T)")
    if _is_on(cfg.get("use_dynamic_shifting")):
        note("use_dynamic_shifting", f"diffusers' pipelines shift by the image size (base_shift, max_shift); "
                                     f"ddimctl uses the static shift {shift}")
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if _is_on(cfg.get(key)):
            note(key, _OWN_STEPS)
    if cfg.get("shift_terminal") is not None:
        note("shift_terminal", _OWN_STEPS)
    if _is_on(cfg.get("stochastic_sampling")):
        note("stochastic_sampling", "ddimctl's eta decides the noise of each step")
    return notes


@dataclass(frozen=True)
class SamplerSettings:
    """Everything about a checkpoint's noise process and parameterization that sampling needs.

    ``scheduler_class``: the ``_class_name`` the settings were read from (None: none given); ``notes``: one line
    per config key that ddimctl does not follow (see the module docstring). Neither takes part in equality.
    """

    kind: str = "vp"  # "vp" | "flow"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    shift: float = 1.0
    scheduler_class: str | None = field(default=None, compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "scheduler_config.json") -> "SamplerSettings":
        """Normalize a diffusers scheduler config dict; ``source`` names it in error messages and notes."""
        cfg = dict(config)
        if "timesteps" in cfg and "num_train_timesteps" not in cfg:  # legacy GaussianDDPMScheduler
            cfg["num_train_timesteps"] = cfg.pop("timesteps")
        if "clip_predicted_image" in cfg and "clip_sample" not in cfg:  # legacy GaussianDDPMScheduler
            cfg["clip_sample"] = cfg.pop("clip_predicted_image")
        name = cfg.get("_class_name")
        if name is not None and name not in VP_SCHEDULERS and name not in FLOW_SCHEDULERS:
            why = REFUSED_SCHEDULERS.get(name) if isinstance(name, str) else None
            raise ConfigError(
                f"{source}: unsupported scheduler class {name!r} ({why + '; ' if why else ''}{_SUPPORTED_TEXT})"
            )
        is_flow = name in FLOW_SCHEDULERS or cfg.get("prediction_type") == "flow"
        if is_flow:
            base = cls(kind="flow", prediction_type="flow", timestep_spacing="trailing", clip_sample=False)
        else:
            base = cls(**dict(zip(_CLASS_KEYS, VP_SCHEDULERS[name]))) if name is not None else cls()
        known = {f.name for f in dataclasses.fields(cls)} - {"kind", "scheduler_class", "notes"}
        values = {k: cfg[k] for k in known if k in cfg and cfg[k] is not None}
        if "trained_betas" in values:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        if is_flow:
            notes = _flow_notes(cfg, source, values.get("shift", base.shift))
        else:
            notes = _vp_notes(cfg, source)
        try:
            settings = dataclasses.replace(base, **values, scheduler_class=name, notes=tuple(notes))
        except TypeError as e:  # pragma: no cover - replace() only fails on unknown names, filtered above
            raise ConfigError(f"{source}: {e}") from None
        return settings.validated(source)

    def with_overrides(self, source: str = "options", **overrides: Any) -> "SamplerSettings":
        """Apply command-line overrides (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None}).validated(source)

    def validated(self, source: str) -> "SamplerSettings":
        def bad(key: str, value: Any, expected: str) -> ConfigError:
            return ConfigError(f"{source}: unsupported {key} {value!r} ({expected})")

        if self.kind not in ("vp", "flow"):
            raise bad("kind", self.kind, "expected vp or flow")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise bad("num_train_timesteps", self.num_train_timesteps, "expected a positive integer")
        if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
            raise bad("beta_schedule", self.beta_schedule, f"supported: {', '.join(BETA_SCHEDULES)}")
        if self.timestep_spacing not in SPACINGS:
            raise bad("timestep_spacing", self.timestep_spacing, f"supported: {', '.join(SPACINGS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise bad("prediction_type", self.prediction_type, f"supported: {', '.join(PREDICTION_TYPES)}")
        if self.kind == "flow" and self.prediction_type != "flow":
            raise bad("prediction_type", self.prediction_type, "a flow-matching scheduler needs flow")
        if self.kind == "vp" and self.prediction_type == "flow":
            raise bad("prediction_type", self.prediction_type, "flow needs a flow-matching scheduler")
        for key in ("beta_start", "beta_end", "clip_sample_range", "sample_max_value", "shift"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise bad(key, value, "expected a positive number")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise bad("dynamic_thresholding_ratio", self.dynamic_thresholding_ratio, "expected a value in (0, 1]")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise bad("steps_offset", self.steps_offset, "expected an integer >= 0")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise bad("trained_betas", f"<{len(self.trained_betas)} values>", f"expected {self.num_train_timesteps}")
        return self

    def schedule(self) -> Schedule:
        """The noise schedule these settings describe."""
        if self.kind == "flow":
            return flow_schedule(self.num_train_timesteps, self.shift)
        try:
            return vp_schedule(
                self.num_train_timesteps,
                self.beta_start,
                self.beta_end,
                self.beta_schedule,
                self.trained_betas,
                self.rescale_betas_zero_snr,
                self.set_alpha_to_one,
            )
        except ValueError as e:
            raise ConfigError(f"scheduler config: {e}") from None

    def plan(self, steps: int) -> SamplingPlan:
        """The sampling plan for ``steps`` steps with these settings' spacing and offset."""
        return make_plan(self.schedule(), steps, self.timestep_spacing, self.steps_offset)

    def denoiser(self, model: Model) -> Denoiser:
        """Wrap ``model`` with these settings' parameterization, clipping and thresholding."""
        thresholding = Thresholding(self.dynamic_thresholding_ratio, self.sample_max_value) if self.thresholding else None
        clip = self.clip_sample_range if self.clip_sample else None
        return Denoiser(model, self.prediction_type, clip, thresholding)

    def to_diffusers_config(self) -> dict[str, Any]:
        """A diffusers scheduler config (DDIMScheduler, or FlowMatchEulerDiscreteScheduler for flow)."""
        if self.kind == "flow":
            return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": self.num_train_timesteps,
                    "shift": self.shift}
        out = {"_class_name": "DDIMScheduler"}
        skip = ("kind", "shift", "scheduler_class", "notes")
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip})
        if out["trained_betas"] is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out
