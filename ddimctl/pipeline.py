"""Batch operations over a loaded checkpoint: what the commands share, with no terminal and no files written.

:class:`Engine` holds a model, its sampler settings and the :class:`SamplingOptions` of one job, and runs the
sampler core on batches: :meth:`Engine.generate` (x_T -> x0), :meth:`Engine.invert` (x0 -> x_T),
:meth:`Engine.decode` (the eta = 0 sample that retraces an inversion) and :meth:`Engine.reconstruct` (both, with
the error). :func:`parse_end` / :meth:`Engine.end_latent` turn an interpolation end (``seed:N``, a latent file or
an image) into x_T. The model runs in its own dtype while the sampler state stays float32, so float16/bfloat16
models do not accumulate rounding in x over the steps.

    engine = Engine.load("mnist", SamplingOptions(steps=10))
    x_T, x0 = engine.generate(seeds=[0, 1, 2])          # (3, 1, 32, 32) each, x0 in [-1, 1]
    rec = engine.reconstruct(x0)                         # rec.x_T, rec.x0, rec.mse, rec.stats
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import InputError, SettingError
from .inversion import InversionStats, invert_ddim
from .prediction import Denoiser
from .sampler import SAMPLERS, make_generators, randn, sample
from .schedule import SPACINGS, SamplingPlan
from .settings import SamplerSettings

INVERSIONS = ("exact", "plain")


@dataclass(kw_only=True)
class SamplingOptions:
    """The options every sampling command shares (keyword-only)."""

    steps: int = 50
    eta: float = 0.0
    sampler: str = "ddim"
    spacing: str | None = None  # None: the checkpoint's (logsnr for the multistep samplers on VP models)
    inversion: str = "exact"  # "exact" | "plain"
    tol: float = 1e-5
    max_iter: int = 50
    clip_sample: bool | None = None  # None: the checkpoint's
    channels_last: bool = False  # feed the model channels-last inputs (the model's weights should be too)
    schedule_file: str | None = None  # a tuned schedule (ddimctl tune): its levels replace the spacing's

    def resolved_spacing(self, settings: SamplerSettings) -> str:
        if self.spacing is not None:
            return self.spacing
        # The multistep samplers extrapolate in log-SNR (or, ipndm, in sigma = b / a): steps uniform in log-SNR
        # suit them on VP models (benchmarks/samplers.py); rectified flow's own uniform-sigma (trailing) grid
        # measured better there.
        if self.sampler != "ddim" and settings.kind == "vp":
            return "logsnr"
        return settings.timestep_spacing

    def check(self) -> None:
        """Refuse settings no checkpoint could run (one :class:`SettingError` naming the field)."""
        if self.sampler not in SAMPLERS:
            raise SettingError(("sampler", self.sampler), f"unknown sampler (expected one of {', '.join(SAMPLERS)})")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise SettingError(("spacing", self.spacing), f"unknown spacing (expected one of {', '.join(SPACINGS)})")
        if self.inversion not in INVERSIONS:
            raise SettingError(("inversion", self.inversion), f"expected one of {', '.join(INVERSIONS)}")
        if self.schedule_file is not None and self.spacing is not None:
            raise SettingError([("schedule", self.schedule_file), ("spacing", self.spacing)],
                               "a tuned schedule places its own steps; leave the spacing out")
        if self.sampler != "ddim" and self.eta != 0:
            raise SettingError(("eta", self.eta), f"the {self.sampler} sampler is deterministic (use eta 0, or the ddim sampler)")


@dataclass
class Reconstruction:
    """What :meth:`Engine.reconstruct` gives for a batch: the latents ``x_T``, the reconstructions ``x0`` (both
    (B, C, H, W) float32 on the engine's device), the per-image ``mse`` and ``psnr`` (float64 (B,), images in
    [0, 1] as in the DDIM paper's Table 2) and the inversion's ``stats``."""

    x_T: Tensor
    x0: Tensor
    mse: Tensor
    psnr: Tensor
    stats: InversionStats
    decode_calls: int = 0

    @property
    def model_calls(self) -> int:
        """Batched model evaluations for invert + decode."""
        return self.stats.model_calls + self.decode_calls


@dataclass
class Engine:
    """A model ready to sample and invert with fixed options.

    ``model``: ``model(x, t) -> output`` in ``model_dtype`` on ``device``; ``image_shape``: (C, H, W);
    ``source``: where the model came from (a :class:`ddimctl.checkpoint.Resolved`), for provenance records.
    """

    model: Callable[[Tensor, Tensor], Tensor]
    settings: SamplerSettings
    options: SamplingOptions
    image_shape: tuple[int, int, int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_dtype: torch.dtype = torch.float32
    source: Any = None

    def __post_init__(self) -> None:
        self.options.check()
        T = self.settings.num_train_timesteps
        if self.options.steps > T:
            raise SettingError(("steps", self.options.steps), f"more than the model's {T} training timesteps")
        spacing = self.options.resolved_spacing(self.settings)
        self.settings = self.settings.with_overrides(timestep_spacing=spacing, clip_sample=self.options.clip_sample)
        try:
            self.plan: SamplingPlan = self.settings.plan(self.options.steps)
        except ValueError as e:
            raise SettingError([("steps", self.options.steps), ("spacing", spacing)], str(e)) from None
        if self.options.schedule_file is not None:
            from .tuning import load_schedule, model_identity

            self.plan = load_schedule(self.options.schedule_file, *model_identity(self.source), self.options.sampler,
                                      self.options.steps, self.settings.schedule())
        self.denoiser: Denoiser = self.settings.denoiser(self._call_model)
        # Clipping or thresholding x0_hat makes the step many-to-one, so no inversion can undo it: invert, and
        # decode (which must retrace an inversion), run the plain ODE.
        self.ode_denoiser: Denoiser = self.settings.with_overrides(clip_sample=False, thresholding=False).denoiser(
            self._call_model
        )

    @classmethod
    def load(
        cls,
        ref: Any,
        options: SamplingOptions | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
        note: Callable[[str], None] | None = None,
    ) -> "Engine":
        """Load a model reference (see :func:`ddimctl.checkpoint.resolve`) onto ``device`` in ``dtype`` and build
        the engine; ``compile`` and ``options.channels_last`` are applied by :func:`ddimctl.perf.prepare_model`
        (its notes go to ``note``)."""
        from .checkpoint import load
        from .perf import prepare_model

        options = options if options is not None else SamplingOptions()
        device = torch.device(device)
        ckpt = load(ref, device=device, dtype=dtype)
        model, _ = prepare_model(ckpt.model, options.channels_last, compile, note=note)
        shape = (ckpt.channels, ckpt.image_size, ckpt.image_size)
        return cls(model, ckpt.settings, options, shape, device, dtype, source=ckpt.resolved)

    def _call_model(self, x: Tensor, t: Tensor) -> Tensor:
        x_in = x.to(self.model_dtype)
        if self.options.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        return self.model(x_in, t).to(x.dtype).contiguous()

    @property
    def spacing(self) -> str:
        return "tuned" if self.options.schedule_file is not None else self.settings.timestep_spacing

    # -- records of what ran -------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The model and the settings in effect, as the JSON reports give them."""
        r = self.source
        return {
            "model": {"ref": getattr(r, "ref", None), "source": getattr(r, "source", None),
                      "repo_id": getattr(r, "repo_id", None), "revision": getattr(r, "revision", None)},
            "settings": {
                "steps": self.options.steps,
                "eta": self.options.eta,
                "sampler": self.options.sampler,
                "spacing": self.spacing,
                "schedule": self.options.schedule_file,
                "prediction_type": self.settings.prediction_type,
                "clip_sample": self.settings.clip_sample,
                "device": str(self.device),
                "dtype": str(self.model_dtype).replace("torch.", ""),
            },
        }

    def provenance(self) -> dict[str, Any]:
        """What a latent file records about how its x_T was made (see :mod:`ddimctl.latents`)."""
        r = self.source
        return {
            "model": getattr(r, "ref", None) or "",
            "model_revision": getattr(r, "revision", None) or "",
            "steps": str(self.options.steps),
            "spacing": self.spacing,
            **({"schedule": self.options.schedule_file} if self.options.schedule_file is not None else {}),
            "sampler": self.options.sampler,
            "inversion": self.options.inversion,
            "prediction_type": self.settings.prediction_type,
        }

    # -- the jobs ------------------------------------------------------------------------------------------------

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

    def check_invertible(self) -> None:
        """Refuse, before any work, a sampler that :meth:`invert` cannot retrace."""
        if self.options.sampler != "ddim":
            raise SettingError(("sampler", self.options.sampler), "inversion inverts the DDIM step; use the ddim sampler")

    @torch.inference_mode()
    def invert(self, x0: Tensor, callback=None) -> tuple[Tensor, InversionStats]:
        """x_T (B, C, H, W) whose eta = 0 sample is x0, and what the inversion cost."""
        self.check_invertible()
        stats = InversionStats()
        x = invert_ddim(
            self.ode_denoiser, x0.to(self.device, torch.float32), self.plan, callback,
            exact=self.options.inversion == "exact", tol=self.options.tol, max_iter=self.options.max_iter,
            stats=stats,
        )
        return x, stats

    @torch.inference_mode()
    def decode(self, x_T: Tensor, callback=None) -> Tensor:
        """The eta = 0 sample of x_T, without clipping (the inverse of :meth:`invert`; reconstruct, interpolate)."""
        return sample(self.ode_denoiser, x_T.to(self.device, torch.float32), self.plan, self.options.sampler, 0.0, None, callback)

    def reconstruct(self, x0: Tensor, callback=None) -> Reconstruction:
        """Invert images x0 (B, C, H, W) in [-1, 1], decode the latents again, and measure the error."""
        from .images import mse, psnr

        x_T, stats = self.invert(x0, callback)
        rec = self.decode(x_T, callback)
        target = x0.to(rec.device, rec.dtype)
        return Reconstruction(x_T, rec, mse(rec, target), psnr(rec, target), stats, decode_calls=len(self.plan))

    def end_latent(self, end: "End") -> Tensor:
        """x_T (1, C, H, W) on the device for a parsed interpolation end (an image end is inverted here)."""
        if end.kind == "seed":
            return self.noise([end.seed])
        if end.kind == "latent":
            return end.tensor[:1].to(self.device)
        x_T, _ = self.invert(end.tensor[:1])
        return x_T


# ----------------------------------------------------------------------------------------------------------------
# Interpolation ends


@dataclass
class End:
    """A parsed interpolation end: ``seed:N`` (``seed``), a latent file (``tensor`` holds x_T) or an image
    (``tensor`` holds the image, still to be inverted). ``notes``: what loading the image changed."""

    spec: str
    kind: str  # "seed" | "latent" | "image"
    seed: int = 0
    tensor: Tensor | None = None
    notes: list[str] = field(default_factory=list)


def parse_end(spec: str, image_shape: tuple[int, int, int]) -> End:
    """Read an interpolation end without running the model: ``seed:N``, a ``.safetensors`` latent file (checked
    against ``image_shape``), or an image file (loaded and fitted to ``image_shape``)."""
    if spec.startswith("seed:"):
        try:
            return End(spec, "seed", seed=int(spec[5:]))
        except ValueError:
            raise InputError(f"{spec}: expected seed:N with an integer N") from None
    if Path(spec).suffix == ".safetensors":
        from .latents import check_shape, load_latents

        x, _ = load_latents(spec)
        return End(spec, "latent", tensor=check_shape(x, image_shape, spec))
    from .images import iter_image_paths, load_image

    (path,) = iter_image_paths([spec])[:1]
    img = load_image(path, image_shape[0], image_shape[1])
    return End(spec, "image", tensor=img.tensor, notes=img.notes)


# ----------------------------------------------------------------------------------------------------------------
# Batches


def finite_mask(x: Tensor) -> Tensor:
    """(B,) bool: which samples hold only finite values (one device sync for the whole batch)."""
    return torch.isfinite(x.flatten(1)).all(dim=1).cpu()


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Split ``items`` into consecutive chunks of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """The items rank ``rank`` of ``world`` handles: every world-th by index, starting at rank."""
    return list(items[rank::world])
