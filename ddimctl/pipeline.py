"""Batch operations over a loaded checkpoint: what the commands share, with no terminal and no files.

:class:`Engine` holds a model, its sampler settings and the sampling options of one command, and runs the
sampler core on batches: :meth:`Engine.generate` (x_T -> x0), :meth:`Engine.invert` (x0 -> x_T). The model runs
in its own dtype while the sampler state stays float32, so float16/bfloat16 models do not accumulate rounding
in x over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import DdimctlError
from .prediction import Denoiser
from .sampler import SAMPLERS, InversionStats, invert_ddim, make_generators, randn, sample
from .schedule import SamplingPlan
from .settings import SamplerSettings


@dataclass
class SamplingOptions:
    """The options every sampling command shares."""

    steps: int = 50
    eta: float = 0.0
    sampler: str = "ddim"
    spacing: str | None = None  # None: the checkpoint's (logsnr for dpm++2m on VP models)
    inversion: str = "exact"  # "exact" | "plain"
    tol: float = 1e-5
    max_iter: int = 50
    clip_sample: bool | None = None  # None: the checkpoint's
    channels_last: bool = False  # feed the model channels-last inputs (the model's weights should be too)

    def resolved_spacing(self, settings: SamplerSettings) -> str:
        if self.spacing is not None:
            return self.spacing
        # DPM-Solver++(2M) extrapolates in log-SNR: steps uniform in it suit VP models (benchmarks/accuracy.py);
        # rectified flow's own uniform-sigma (trailing) grid measured better there.
        if self.sampler == "dpm++2m" and settings.kind == "vp":
            return "logsnr"
        return settings.timestep_spacing


@dataclass
class Engine:
    """A model ready to sample and invert with fixed options.

    ``model``: ``model(x, t) -> output`` in ``model_dtype`` on ``device``; ``image_shape``: (C, H, W).
    """

    model: Callable[[Tensor, Tensor], Tensor]
    settings: SamplerSettings
    options: SamplingOptions
    image_shape: tuple[int, int, int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.options.sampler not in SAMPLERS:
            raise DdimctlError(f"--sampler {self.options.sampler}: unknown sampler (expected one of {', '.join(SAMPLERS)})")
        T = self.settings.num_train_timesteps
        if self.options.steps > T:
            raise DdimctlError(f"--steps {self.options.steps}: more than the model's {T} training timesteps")
        spacing = self.options.resolved_spacing(self.settings)
        self.settings = self.settings.with_overrides(
            source="--spacing", timestep_spacing=spacing, clip_sample=self.options.clip_sample
        )
        try:
            self.plan: SamplingPlan = self.settings.plan(self.options.steps)
        except ValueError as e:
            raise DdimctlError(f"--steps {self.options.steps} with --spacing {spacing}: {e}") from None
        self.denoiser: Denoiser = self.settings.denoiser(self._call_model)
        # Clipping or thresholding x0_hat makes the step many-to-one, so no inversion can undo it: invert, and
        # decode (which must retrace an inversion), run the plain ODE.
        self.ode_denoiser: Denoiser = self.settings.with_overrides(clip_sample=False, thresholding=False).denoiser(
            self._call_model
        )
        if self.options.sampler == "dpm++2m" and self.options.eta != 0:
            raise DdimctlError("--eta: the dpm++2m sampler is deterministic; use --eta 0 or --sampler ddim")

    def _call_model(self, x: Tensor, t: Tensor) -> Tensor:
        x_in = x.to(self.model_dtype)
        if self.options.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        return self.model(x_in, t).to(x.dtype).contiguous()

    @property
    def spacing(self) -> str:
        return self.settings.timestep_spacing

    def noise(self, seeds: Sequence[int]) -> Tensor:
        """x_T for each seed: (B, C, H, W) float32 on the device; identical on every device and batch."""
        return randn(make_generators(seeds), self.image_shape, torch.float32, self.device)

    @torch.inference_mode()
    def generate(self, seeds: Sequence[int], x_T: Tensor | None = None, callback=None) -> tuple[Tensor, Tensor]:
        """Sample a batch: returns (x_T, x0), each (B, C, H, W) float32, x0 in the model's data range.

        Sample i draws from one generator seeded ``seeds[i]``: first its x_T, then (eta > 0) the noise of each step.
        When ``x_T`` is given, the x_T draw is still made and discarded, so a run from saved latents with the same
        seeds repeats the original run exactly.
        """
        gens = make_generators(seeds)
        drawn = randn(gens, self.image_shape, torch.float32, self.device)
        x = drawn if x_T is None else x_T.to(self.device, torch.float32)
        x0 = sample(self.denoiser, x, self.plan, self.options.sampler, self.options.eta,
                    gens if self.options.eta > 0 else None, callback)
        return x, x0

    @torch.inference_mode()
    def invert(self, x0: Tensor, callback=None) -> tuple[Tensor, InversionStats]:
        """x_T (B, C, H, W) whose eta = 0 DDIM sample is x0, and what the inversion cost."""
        stats = InversionStats()
        exact = self.options.inversion == "exact"
        x = invert_ddim(
            self.ode_denoiser, x0.to(self.device, torch.float32), self.plan, callback,
            exact=exact, tol=self.options.tol, max_iter=self.options.max_iter, stats=stats,
        )
        return x, stats

    @torch.inference_mode()
    def decode(self, x_T: Tensor, callback=None) -> Tensor:
        """The eta = 0 sample of x_T, without clipping (the inverse of :meth:`invert`; reconstruct, interpolate)."""
        return sample(self.ode_denoiser, x_T.to(self.device, torch.float32), self.plan, self.options.sampler, 0.0, None, callback)


def finite_mask(x: Tensor) -> Tensor:
    """(B,) bool: which samples hold only finite values (one device sync for the whole batch)."""
    return torch.isfinite(x.flatten(1)).all(dim=1).cpu()


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Split ``items`` into consecutive chunks of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """The items rank ``rank`` of ``world`` handles: every world-th by index, starting at rank."""
    return list(items[rank::world])
