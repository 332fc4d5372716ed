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

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import InputError, SettingError
from .inversion import INVERT_FUNCTIONS, InversionStats
from .prediction import Denoiser
from .sampler import SAMPLERS, ddim_step, make_generators, model_times, randn, sample, sample_bdia
from .schedule import SPACINGS, SamplingPlan
from .settings import SamplerSettings

INVERSIONS = ("exact", "plain")
#: Samplers whose latent is a pair (x_T, x_{T-1}) of states rather than x_T alone.
PAIR_SAMPLERS = ("bdia",)


def inversion_spacing(settings: SamplerSettings) -> str:
    """The spacing that invert, reconstruct and interpolate use when none is given: ``logsnr``, where every step
    changes sigma = b / a by the same ratio (about 2.9 at 10 steps on the built-in DDPM model) and the step next
    to the data is tiny (sigma 0.01, 0.001 for flow), so no inverse step is much harder than its neighbours.
    ``leading`` makes the step next to the data 23x in sigma, and rectified flow's uniform grid starts at sigma
    0.1: there the fixed point stalls (benchmarks/inversion.py measures both)."""
    return "logsnr"


GUIDED_CLIP_NOTE = ("the checkpoint clips x0 (clip_sample), which under classifier-free guidance clamps the "
                    "extrapolated x0 without recomputing eps and can drift off the requested class; "
                    "--no-clip-sample turns it off")


@dataclass(kw_only=True)
class SamplingOptions:
    """The options every sampling command shares (keyword-only)."""

    steps: int = 50
    eta: float = 0.0
    sampler: str = "ddim"
    spacing: str | None = None  # None: the checkpoint's (logsnr for the multistep samplers on VP models)
    inversion: str = "exact"  # "exact" | "plain"
    tol: float = 3e-3  # exact inversion: RMS error (model units) it may leave in the decoded image
    max_iter: int = 50
    clip_sample: bool | None = None  # None: the checkpoint's
    channels_last: bool = False  # feed the model channels-last inputs (the model's weights should be too)
    deterministic: bool = False  # each sample in its own fixed-shape forward: results independent of batching
    guidance_scale: float = 1.0  # classifier-free guidance weight (class-conditional models with a null label)
    inverting: bool = False  # the job inverts images (default spacing: inversion_spacing)
    schedule_file: str | None = None  # a tuned schedule (ddimctl tune): its levels replace the spacing's

    def resolved_spacing(self, settings: SamplerSettings) -> str:
        if self.spacing is not None:
            return self.spacing
        if self.inverting:
            return inversion_spacing(settings)
        # The multistep samplers extrapolate in log-SNR (or, ipndm, in sigma = b / a): steps uniform in log-SNR
        # suit them on VP models (benchmarks/samplers.py); rectified flow's own uniform-sigma (trailing) grid
        # measured better there.
        if self.sampler not in ("ddim", "bdia") and settings.kind == "vp":
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
        if not self.guidance_scale >= 0:
            raise SettingError(("guidance_scale", self.guidance_scale), "must be >= 0 (1: no guidance)")
        if self.sampler == "bdia" and self.steps < 2:
            raise SettingError(("steps", self.steps), "the bdia sampler needs at least 2 steps")
        if self.sampler == "bdia" and self.inversion == "plain":
            raise SettingError([("sampler", self.sampler), ("inversion", self.inversion)],
                               "the bdia sampler inverts exactly by construction: use exact inversion")


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
    x_prev: Tensor | None = None  # the latent's second state, for a pair sampler (bdia)
    autoencoder_mse: Tensor | None = None  # latent diffusion: the autoencoder's own round trip (encode, decode)

    @property
    def model_calls(self) -> int:
        """Batched model evaluations for invert + decode."""
        return self.stats.model_calls + self.decode_calls


@dataclass
class Edit:
    """What :meth:`Engine.edit` gives: the part-way latent ``x_mid`` (at the level where regeneration starts), the
    ``edited`` images, the inversion's ``stats``, the ``steps`` regenerated and each edit's MSE to its source."""

    x_mid: Tensor
    edited: Tensor
    stats: InversionStats
    steps: int
    mse: Tensor


@dataclass
class Engine:
    """A model ready to sample and invert with fixed options.

    ``model``: ``model(x, t) -> output`` in ``model_dtype`` on ``device``; ``image_shape``: (C, H, W) of the
    images it makes and takes; ``source``: where the model came from (a :class:`ddimctl.checkpoint.Resolved`), for
    provenance records.

    Latent diffusion: with an ``autoencoder`` (:mod:`ddimctl.nets.autoencoders`: ``encode(images) -> latents``,
    ``decode(latents) -> images``, scaled as diffusers' pipelines scale them) the sampler works on latents of
    ``latent_shape`` (the UNet's), x_T is a latent, and :meth:`generate` / :meth:`decode` return decoded images while
    :meth:`invert` encodes its images first.
    """

    model: Callable[[Tensor, Tensor], Tensor]
    settings: SamplerSettings
    options: SamplingOptions
    image_shape: tuple[int, int, int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_dtype: torch.dtype = torch.float32
    source: Any = None
    num_classes: int | None = None  # class-conditional: the model's class embeddings, labels 0 .. num_classes - 1
    null_label: int | None = None  # the label the model was trained to read as "no class" (guidance needs it)
    autoencoder: Any = None  # latent diffusion: images <-> the latents the model samples
    latent_shape: tuple[int, int, int] | None = None  # what the sampler works on; None: image_shape

    def __post_init__(self) -> None:
        if self.latent_shape is None:
            self.latent_shape = self.image_shape
        self.options.check()
        w = self.options.guidance_scale
        if w != 1.0 and self.num_classes is None:
            raise SettingError(("guidance_scale", w), "the model is not class-conditional")
        if w != 1.0 and self.null_label is None:
            raise SettingError(("guidance_scale", w), "the model declares no null (unconditional) class label to "
                               "guide against (ddimctl's class-conditional models record it as null_class_label)")
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
        variant: str | None = None,
        autoencoder: Any = None,
        autoencoder_scaling_factor: float | None = None,
    ) -> "Engine":
        """Load a model reference (see :func:`ddimctl.checkpoint.resolve`) onto ``device`` in ``dtype`` and build
        the engine; ``compile`` and ``options.channels_last`` are applied by :func:`ddimctl.perf.prepare_model`.
        A latent-diffusion pipeline loads with its autoencoder; ``autoencoder`` (a reference) pairs the UNet with
        another one, ``autoencoder_scaling_factor`` overrides its latent scale, ``variant`` picks weight files such as
        ``fp16``. What the loader does not follow, and compile fallbacks, go to ``note`` one line each."""
        from .checkpoint import load
        from .perf import prepare_model

        options = options if options is not None else SamplingOptions()
        device = torch.device(device)
        ckpt = load(ref, device=device, dtype=dtype, variant=variant,
                    autoencoder=True if autoencoder is None else autoencoder,
                    autoencoder_scaling_factor=autoencoder_scaling_factor)
        for line in ckpt.notes:
            if note is not None:
                note(line)
        num_classes, null_label = class_conditioning(ckpt.model, ckpt.resolved)
        model, _ = prepare_model(ckpt.prediction_model(), options.channels_last, compile, note=note)
        engine = cls(model, ckpt.settings, options, ckpt.image_shape, device, dtype, source=ckpt.resolved,
                     num_classes=num_classes, null_label=null_label, autoencoder=ckpt.autoencoder,
                     latent_shape=ckpt.sample_shape)
        if note is not None and options.guidance_scale != 1.0 and engine.settings.clip_sample:
            note(GUIDED_CLIP_NOTE)
        return engine

    def class_labels(self, labels: Sequence[int] | Tensor | None, n: int | None = None,
                     field: str = "class_label") -> Tensor | None:
        """Check class labels for this model and return them as a (B,) int64 tensor (None for an unconditional
        model). ``n``: the batch size, when one label (a single int) is given for all of it; ``field``: the setting
        the labels came from, named in errors."""
        if labels is None:
            if self.num_classes is not None:
                raise SettingError((field, "none"), f"the model is class-conditional: give each image a class "
                                   f"(0 .. {self.num_classes - 1})")
            return None
        values = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if self.num_classes is None:
            raise SettingError((field, int(values[0])), "the model is not class-conditional")
        bad = values[(values < 0) | (values >= self.num_classes)]
        if len(bad):
            null = f"; {self.null_label} is its null class" if self.null_label is not None else ""
            raise SettingError((field, int(bad[0])), f"the model has classes 0 .. {self.num_classes - 1}{null}")
        if n is not None and len(values) == 1:
            values = values.expand(n)
        return values.to(self.device)

    def default_labels(self, indices: Sequence[int]) -> list[int] | None:
        """Classes for images that were given none: image i gets class i mod K over the model's real classes (its
        null class left out), so a grid shows every class in turn; None for an unconditional model."""
        if self.num_classes is None:
            return None
        real = [c for c in range(self.num_classes) if c != self.null_label]
        return [real[i % len(real)] for i in indices]

    def _denoisers(self, labels: Tensor | None) -> tuple[Denoiser, Denoiser]:
        """(sampling denoiser, ODE denoiser) for a batch with these labels (checked by :meth:`class_labels`)."""
        if labels is None:
            if self.num_classes is not None:
                self.class_labels(None)
            return self.denoiser, self.ode_denoiser
        extra = {"class_labels": labels, "guidance_scale": self.options.guidance_scale, "null_label": self.null_label}
        return dataclasses.replace(self.denoiser, **extra), dataclasses.replace(self.ode_denoiser, **extra)

    def _call_model(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        x_in = x.to(self.model_dtype)
        if self.options.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        if self.options.deterministic:
            out = self._per_sample(x_in, t, labels)
        else:
            out = self.model(x_in, t) if labels is None else self.model(x_in, t, labels)
        return out.to(x.dtype).contiguous()

    def _per_sample(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """The model on each sample alone, each in fresh memory: the result of sample i depends on nothing but its
        own input, whatever the batch it came in, its position, the batch size or the number of processes.

        On the CPU the kernels' rounding also depends on how many threads split an operation, so each sample runs
        single-threaded, in a pool of worker threads (as many as torch's intra-op threads: the same parallelism,
        across samples instead of within each operation). Measured: benchmarks/bench_deterministic.py.
        """
        def one(i: int) -> Tensor:
            ti = t[i : i + 1] if t.shape[0] > 1 else t
            if labels is None:
                return self.model(x[i : i + 1].clone(), ti.clone())
            return self.model(x[i : i + 1].clone(), ti.clone(), labels[i : i + 1].clone())

        if x.device.type != "cpu":
            return torch.cat([one(i) for i in range(x.shape[0])])
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def work(i: int) -> Tensor:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return one(i)

        return torch.cat(list(_cpu_workers().map(work, range(x.shape[0]))))

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
                "guidance_scale": self.options.guidance_scale,
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
            **({"guidance_scale": self.options.guidance_scale} if self.num_classes is not None else {}),
        }

    # -- the jobs ------------------------------------------------------------------------------------------------

    def noise(self, seeds: Sequence[int]) -> Tensor:
        """x_T for each seed: (B, *latent_shape) float32 on the device; identical on every device and batch."""
        return randn(make_generators(seeds), self.latent_shape, torch.float32, self.device)

    @torch.inference_mode()
    def to_latents(self, images: Tensor) -> Tensor:
        """Images (B, *image_shape) in [-1, 1] -> what the sampler works on (the autoencoder's scaled latents; the
        images themselves without one)."""
        images = images.to(self.device, torch.float32)
        if self.autoencoder is None:
            return images
        return self._autoencode(self.autoencoder.encode, images)

    @torch.inference_mode()
    def to_images(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`to_latents` (the autoencoder's decoder; unclamped)."""
        if self.autoencoder is None:
            return latents
        return self._autoencode(self.autoencoder.decode, latents.float())

    def _autoencode(self, fn, x: Tensor) -> Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        if self.options.deterministic:  # each image alone, as the UNet runs then
            return torch.cat([fn(x[i : i + 1].clone().to(dtype)) for i in range(x.shape[0])]).float()
        return fn(x.to(dtype)).float()

    @torch.inference_mode()
    def generate(self, seeds: Sequence[int], x_T: Tensor | None = None, callback=None,
                 x_prev: Tensor | None = None, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sample a batch: returns (x_T, x0), each (B, C, H, W) float32, x0 in the model's data range.

        Sample i draws from one generator seeded ``seeds[i]``: first its x_T, then (eta > 0) the noise of each step.
        When ``x_T`` is given, the x_T draw is still made and discarded, so a run from saved latents with the same
        seeds repeats the original run exactly. ``labels``: each sample's class (class-conditional models).
        """
        denoiser, _ = self._denoisers(labels)
        gens = make_generators(seeds)
        drawn = randn(gens, self.latent_shape, torch.float32, self.device)
        x = drawn if x_T is None else x_T.to(self.device, torch.float32)
        if x_prev is not None:  # a latent pair: only the pair sampler reads it (Engine.decode checks the sampler)
            return x, self.decode(x, callback, x_prev, denoiser=denoiser)
        x0 = sample(denoiser, x, self.plan, self.options.sampler, self.options.eta,
                    gens if self.options.eta > 0 else None, callback)
        return x, self.to_images(x0)

    @property
    def pair_latents(self) -> bool:
        """Whether this sampler's latent is a pair (x_T, x_{T-1}) (:data:`PAIR_SAMPLERS`)."""
        return self.options.sampler in PAIR_SAMPLERS

    def check_latent_pair(self, path: Any, meta: dict[str, str]) -> None:
        """Refuse a latent pair (x_T, x_T-1) from a pair sampler's latent file (``path``, with its metadata) that this
        engine would not decode as it was made: another sampler, or another plan (the pair is two states of one
        plan)."""
        if not self.pair_latents:
            raise InputError(f"{path}: holds a latent pair (x_T, x_T-1) made by {PAIR_SAMPLERS[0]}; decode it with "
                             f"the {PAIR_SAMPLERS[0]} sampler")
        made = (meta.get("steps"), meta.get("spacing"))
        if made[0] is not None and made != (str(self.options.steps), self.spacing):
            raise InputError(f"{path}: a {PAIR_SAMPLERS[0]} latent pair made with {made[0]} steps and {made[1]} "
                             "spacing; decode it with the same")

    def check_invertible(self) -> None:
        """Refuse, before any work, a sampler that :meth:`invert` cannot retrace."""
        if self.options.sampler not in INVERT_FUNCTIONS:
            raise SettingError(("sampler", self.options.sampler),
                               f"no inversion for this sampler yet (invertible: {', '.join(INVERT_FUNCTIONS)})")

    @torch.inference_mode()
    def invert(self, x0: Tensor, callback=None, labels: Tensor | None = None,
               plan: SamplingPlan | None = None) -> tuple[Tensor, InversionStats]:
        """x_T (B, C, H, W) whose eta = 0 sample with this sampler is x0, and what the inversion cost. For a pair
        sampler (bdia) ``stats.latents_prev`` holds the latent's second state x_{T-1}."""
        self.check_invertible()
        _, ode = self._denoisers(labels)
        stats = InversionStats()
        x, x_prev = INVERT_FUNCTIONS[self.options.sampler](
            ode, self.to_latents(x0).to(self._state_dtype), plan or self.plan, self.options.inversion == "exact",
            self.options.tol, self.options.max_iter, callback, stats,
        )
        stats.latents_prev = x_prev  # kept in the state's dtype: a bdia pair rounded to float32 decodes ~1e-4 off
        return x, stats

    @property
    def _state_dtype(self) -> torch.dtype:
        """The sampler state's dtype: float32, float64 for a pair sampler, whose inverse recursion subtracts nearly
        equal states (the model still runs in its own dtype; float64 states round to the same float32 inputs in
        both directions, so a round trip is exact to float64 rounding)."""
        return torch.float64 if self.pair_latents and self.device.type != "mps" else torch.float32

    @torch.inference_mode()
    def decode(self, x_T: Tensor, callback=None, x_prev: Tensor | None = None, denoiser=None,
               labels: Tensor | None = None, plan: SamplingPlan | None = None) -> Tensor:
        """The eta = 0 sample of x_T with this sampler, without clipping (the inverse of :meth:`invert`;
        reconstruct, interpolate). ``x_prev``: the second state of a pair latent (bdia only)."""
        denoiser = denoiser if denoiser is not None else self._denoisers(labels)[1]
        x = x_T.to(self.device, x_T.dtype if x_T.dtype == torch.float64 else torch.float32)
        if self.pair_latents:
            x_next = None if x_prev is None else x_prev.to(self.device, self._state_dtype)
            z = sample_bdia(denoiser, x.to(self._state_dtype), plan or self.plan, x_next, callback=callback).float()
            return self.to_images(z)
        if x_prev is not None:
            raise SettingError(("sampler", self.options.sampler),
                               f"a latent pair (x_T, x_T-1) decodes only with the {PAIR_SAMPLERS[0]} sampler")
        return self.to_images(sample(denoiser, x.float(), plan or self.plan, self.options.sampler, 0.0, None, callback))

    def decode_calls(self, pair: bool = False) -> int:
        """Model calls :meth:`decode` makes per batch (one fewer from a bdia pair: its first state is given)."""
        return len(self.plan) - (1 if pair and self.pair_latents else 0)

    def reconstruct(self, x0: Tensor, callback=None, labels: Tensor | None = None) -> Reconstruction:
        """Invert images x0 (B, C, H, W) in [-1, 1], decode the latents again, and measure the error."""
        from .images import mse, psnr

        x_T, stats = self.invert(x0, callback, labels)
        x_prev = stats.latents_prev
        rec = self.decode(x_T, callback, x_prev, labels=labels)
        target = x0.to(rec.device, rec.dtype)
        ae = None if self.autoencoder is None else mse(self.to_images(self.to_latents(x0)), target)
        return Reconstruction(x_T, rec, mse(rec, target), psnr(rec, target), stats,
                              decode_calls=self.decode_calls(x_prev is not None), x_prev=x_prev, autoencoder_mse=ae)

    def edit_steps(self, strength: float) -> int:
        """How many of the plan's steps an edit of ``strength`` in (0, 1] regenerates (at least one)."""
        if not 0 < strength <= 1:
            raise SettingError(("strength", strength), "must be in (0, 1]")
        return max(1, round(strength * len(self.plan)))

    def edit(self, x0: Tensor, source: Tensor, target: Tensor, strength: float = 1.0, callback=None) -> "Edit":
        """DDIM editing of images x0 (B, C, H, W) in [-1, 1] from class ``source`` to class ``target`` (each (B,),
        see :meth:`class_labels`): invert exactly under the source class over the last ``strength`` share of the
        plan's steps (1: all of them, to x_T), then sample from there under the target class. Less strength keeps
        more of the image (only the less noisy part of the trajectory is regenerated)."""
        from .images import mse

        k = self.edit_steps(strength)
        if self.pair_latents and k < 2:
            raise SettingError(("strength", strength), f"the {PAIR_SAMPLERS[0]} sampler needs at least 2 steps to regenerate")
        plan = self.plan.tail(k)
        x_mid, stats = self.invert(x0, callback, source, plan)
        edited = self.decode(x_mid, callback, stats.latents_prev, labels=target, plan=plan)
        return Edit(x_mid, edited, stats, k, mse(edited, x0.to(edited.device, edited.dtype)))

    @torch.inference_mode()
    def second_state(self, x_T: Tensor, labels: Tensor | None = None) -> Tensor:
        """x_{T-1} = the DDIM step from x_T (one model call): a pair sampler's second state when only x_T is known
        (a seed, or a latent file from another sampler); bdia's own first step."""
        x = x_T.to(self.device, torch.float32)
        ts = model_times(self.plan, x)
        out = self._denoisers(labels)[1](x, ts[0:1], self.plan.a[0], self.plan.b[0])
        return ddim_step(out[0], out[1], self.plan.a[1], self.plan.b[1])

    def end_latent(self, end: "End", labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(x_T, x_{T-1} or None), each (1, C, H, W) on the device, for a parsed interpolation end (an image end is
        inverted here). A pair sampler always gets the pair (x_{T-1} made by :meth:`second_state` if need be)."""
        if end.kind == "seed":
            x_T, x_prev = self.noise([end.seed]), None
        elif end.kind == "latent":
            x_T = end.tensor[:1].to(self.device)
            x_prev = None if end.tensor_prev is None else end.tensor_prev[:1].to(self.device)
        else:
            x_T, stats = self.invert(end.tensor[:1], labels=labels)
            x_prev = stats.latents_prev
        if x_prev is not None and not self.pair_latents:
            raise InputError(f"{end.spec}: holds a {PAIR_SAMPLERS[0]} latent pair; interpolate it with the "
                             f"{PAIR_SAMPLERS[0]} sampler")
        if self.pair_latents and x_prev is None:
            x_prev = self.second_state(x_T, labels)
        return x_T, x_prev


def parse_class_labels(spec: str) -> list[int]:
    """``--class-label``: one integer for every image, or a text file with one integer label per line (blank lines
    and ``#`` comments skipped), the i-th for the i-th image."""
    try:
        return [int(spec)]
    except ValueError:
        pass
    path = Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{spec}: neither an integer class label nor a file of labels") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{spec}: cannot read the class labels ({e.__class__.__name__})") from None
    labels = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                labels.append(int(text))
            except ValueError:
                raise InputError(f"{spec}: line {n} is not an integer class label ({text!r})") from None
    if not labels:
        raise InputError(f"{spec}: no class labels in the file")
    return labels


def labels_for(labels: list[int] | None, count: int, spec: str | None) -> list[int] | None:
    """``count`` per-image labels from :func:`parse_class_labels`'s result: one label repeated, or exactly one
    per image."""
    if labels is None:
        return None
    if len(labels) == 1:
        return labels * count
    if len(labels) != count:
        raise InputError(f"{spec}: {len(labels)} class labels for {count} images")
    return labels


def class_conditioning(model: Any, resolved: Any) -> tuple[int | None, int | None]:
    """(number of classes, null label) of a loaded UNet: ``num_class_embeds`` (None for an unconditional model) and
    the null label its checkpoint declares (``null_class_label`` in ddimctl's metadata; None when it declares none,
    as diffusers' UNet2DModel configs do). Class embeddings that are not a table of integer labels (diffusers'
    ``class_embed_type`` ``timestep`` / ``identity``) are refused: ddimctl passes class ids."""
    if not getattr(model, "is_class_conditional", False):
        return None, None
    n = getattr(model, "num_class_embeds", None)
    if n is None:
        raise SettingError(("class_embed_type", model.config.get("class_embed_type")),
                           "ddimctl conditions on integer class ids (num_class_embeds); this embedding is not supported")
    null = (getattr(resolved, "meta", None) or {}).get("null_class_label")
    return int(n), (int(null) if null is not None else None)


_WORKERS: list = []


def _single_threaded() -> None:
    torch.set_num_threads(1)  # per OS thread: the caller keeps its own setting


def _cpu_workers():
    """The process's pool of single-threaded workers for deterministic CPU forwards (made once, on first use)."""
    if not _WORKERS:
        from concurrent.futures import ThreadPoolExecutor

        _WORKERS.append(ThreadPoolExecutor(max(1, torch.get_num_threads()), "ddimctl-det", _single_threaded))
    return _WORKERS[0]


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
    tensor_prev: Tensor | None = None  # a latent file's second state (a bdia pair)


def end_kind(spec: str) -> str:
    """What an interpolation end is, from its spelling alone: ``seed`` (seed:N), ``latent`` (a .safetensors file)
    or ``image``."""
    if spec.startswith("seed:"):
        return "seed"
    return "latent" if Path(spec).suffix == ".safetensors" else "image"


def parse_end(spec: str, image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int] | None = None) -> End:
    """Read an interpolation end without running the model: ``seed:N``, a ``.safetensors`` latent file (checked
    against ``latent_shape``, which is ``image_shape`` for a pixel model), or an image file (loaded and fitted to
    ``image_shape``)."""
    kind = end_kind(spec)
    if kind == "seed":
        try:
            return End(spec, "seed", seed=int(spec[5:]))
        except ValueError:
            raise InputError(f"{spec}: expected seed:N with an integer N") from None
    if kind == "latent":
        from .latents import check_shape, load_latent_pair

        x, x_prev, _ = load_latent_pair(spec)
        return End(spec, "latent", tensor=check_shape(x, latent_shape or image_shape, spec), tensor_prev=x_prev)
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
