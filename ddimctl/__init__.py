"""ddimctl: DDIM sampling, inversion, reconstruction and interpolation for diffusion and rectified-flow models.

The library under the ``ddimctl`` command. The sampler core is plain functions::

    from ddimctl import Denoiser, vp_schedule, make_plan, sample, invert_ddim

and :class:`Engine` runs them over a model as the commands do (``Engine.load("mnist")``).

Names are imported lazily, so ``import ddimctl`` (and ``ddimctl --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The models shipped inside the package (``ddimctl/models/NAME``), and the one every command uses by default.
BUILTIN_MODELS = ("mnist", "mnist-flow", "mnist-cond")
DEFAULT_MODEL = "mnist"

_EXPORTS = {
    "conditioning": ["ClassLabels", "ClassifierFreeGuidance", "Cond", "ConditionOptions", "Conditioned", "guide"],
    "engine": ["Engine", "SamplingOptions"],
    "families": ["LoadedModel"],
    "inversion": ["InversionStats", "invert_ddim"],
    "latents": ["load_latents", "save_latents"],
    "prediction": ["Denoiser", "Thresholding", "from_x0_eps", "to_x0_eps"],
    "sampler": ["ddim_sigma", "ddim_step", "make_generators", "randn", "sample", "sample_ddim", "sample_dpmpp_2m",
                "sample_dpmpp_3m", "sample_ipndm", "sample_unipc", "slerp"],
    "schedule": ["Schedule", "SamplingPlan", "flow_schedule", "make_plan", "select_timesteps", "vp_schedule"],
    "schedule_files": ["load_schedule", "read_schedule", "save_schedule"],
    "tuning": ["reference_samples", "tune_plan"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'ddimctl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
