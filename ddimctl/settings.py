"""Sampler settings read from a diffusers scheduler config, with command-line overrides.

Reads the keys of diffusers' DDIMScheduler, DDPMScheduler (also the legacy ``GaussianDDPMScheduler`` with
``timesteps``) and FlowMatchEulerDiscreteScheduler. Keys a config leaves out take diffusers' DDIMScheduler
defaults, so that ddimctl on a diffusers checkpoint reproduces diffusers' DDIMPipeline (which converts any
scheduler config with ``DDIMScheduler.from_config``). An unsupported value is a :class:`ConfigError` naming the
key and the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError
from .prediction import PREDICTION_TYPES, Denoiser, Model, Thresholding
from .schedule import BETA_SCHEDULES, SPACINGS, Schedule, SamplingPlan, flow_schedule, make_plan, vp_schedule

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


@dataclass(frozen=True)
class SamplerSettings:
    """Everything about a checkpoint's noise process and parameterization that sampling needs."""

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

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "scheduler_config.json") -> "SamplerSettings":
        """Normalize a diffusers scheduler config dict; ``source`` names it in error messages."""
        cfg = dict(config)
        if "timesteps" in cfg and "num_train_timesteps" not in cfg:  # legacy GaussianDDPMScheduler
            cfg["num_train_timesteps"] = cfg.pop("timesteps")
        is_flow = cfg.get("_class_name") in FLOW_SCHEDULERS or cfg.get("prediction_type") == "flow"
        base = cls(kind="flow", prediction_type="flow", timestep_spacing="trailing", clip_sample=False) if is_flow else cls()
        known = {f.name for f in dataclasses.fields(cls)} - {"kind"}
        values = {k: cfg[k] for k in known if k in cfg and cfg[k] is not None}
        if "trained_betas" in values:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        try:
            settings = dataclasses.replace(base, **values)
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
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("kind", "shift")})
        if out["trained_betas"] is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out
