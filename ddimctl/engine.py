"""Batch operations over a loaded model: what the commands share, with no terminal and no files written.

:class:`Engine` holds a :class:`~ddimctl.families.LoadedModel`, its sampler settings and the
:class:`SamplingOptions` of one job, and runs the sampler core on batches: :meth:`Engine.generate` (x_T -> x0),
:meth:`Engine.invert` (x0 -> x_T), :meth:`Engine.decode` (the eta = 0 sample that retraces an inversion),
:meth:`Engine.reconstruct` (both, with the error), :meth:`Engine.edit`, :meth:`Engine.interpolation` (slerp between
two ends) and :meth:`Engine.tune` (a tuned schedule). Each image's condition (a class id, ...) is a value its
model's conditioner reads (:mod:`ddimctl.conditioning`); the engine encodes a batch of them and wraps the network
with its guidance. The model runs in its own dtype while the sampler state stays float32, so float16/bfloat16
models do not accumulate rounding in x over the steps.

    engine = Engine.load("mnist", SamplingOptions(steps=10))
    x_T, x0 = engine.generate(seeds=[0, 1, 2])          # (3, 1, 32, 32) each, x0 in [-1, 1]
    rec = engine.reconstruct(x0)                         # rec.x_T, rec.x0, rec.mse, rec.stats
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from .conditioning import ConditionOptions, guide
from .errors import InputError, SettingError
from .inversion import (
    INVERT_FUNCTIONS, OFFSET_FACTOR, InversionStats, ddim_plan_update, run_plan_updates, select_offsets,
    stopped_short,
)
from .prediction import Denoiser
from .sampler import SAMPLERS, ddim_step, make_generators, model_times, randn, sample, sample_bdia, slerp
from .schedule import SPACINGS, SamplingPlan
from .settings import SamplerSettings

if TYPE_CHECKING:
    from .latents import LatentFile

INVERSIONS = ("exact", "plain", "negative-prompt", "null-text")
#: Inversions that solve each step exactly (negative-prompt: exact inversion with the null condition := the source)
EXACT_INVERSIONS = ("exact", "negative-prompt")
#: Inversions that change the null condition of classifier-free guidance (docs/inversion.md)
GUIDED_INVERSIONS = ("negative-prompt", "null-text")
#: Samplers whose latent is a pair (x_T, x_{T-1}) of states rather than x_T alone.
PAIR_SAMPLERS = ("bdia",)
#: Samplers that make S + 1 model calls for S steps.
EXTRA_CALL_SAMPLERS = ("fireflow",)


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
    inversion: str = "exact"  # "exact" | "plain" | "negative-prompt" | "null-text" (INVERSIONS)
    tol: float = 3e-3  # exact inversion: RMS error (model units) it may leave in the decoded image
    max_iter: int = 50
    clip_sample: bool | None = None  # None: the checkpoint's
    channels_last: bool = False  # feed the model channels-last inputs (the model's weights should be too)
    deterministic: bool = False  # each sample in its own fixed-shape forward: results independent of batching
    guidance_scale: float | None = None  # guidance weight (None: the model's default, 1 where images are inverted)
    height: int | None = None  # the images' size (None: the model's default; where the model allows another)
    width: int | None = None
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
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise SettingError(("guidance_scale", self.guidance_scale), "must be >= 0 (1: no guidance)")
        if self.sampler == "bdia" and self.steps < 2:
            raise SettingError(("steps", self.steps), "the bdia sampler needs at least 2 steps")
        if self.inversion == "null-text" and self.sampler != "ddim":
            raise SettingError([("inversion", self.inversion), ("sampler", self.sampler)],
                               "null-text inversion optimises DDIM steps: use the ddim sampler")
        if self.sampler == "bdia" and self.inversion == "plain":
            raise SettingError([("sampler", self.sampler), ("inversion", self.inversion)],
                               "the bdia sampler inverts exactly by construction: use exact inversion")


@dataclass
class Inverted:
    """What :meth:`Engine.invert` gives for a batch: the latents ``x_T`` (B, C, h, w), for a pair sampler (bdia)
    the latent's second state ``x_prev`` (x_{T-1}; None otherwise), and what the inversion cost (``stats``)."""

    x_T: Tensor
    x_prev: Tensor | None
    stats: InversionStats
    #: null-text inversion: step k's optimised null condition (continuous, :func:`ddimctl.null_text.continuous`),
    #: plan order, for :meth:`Engine.decode`; and the state its walk reached (what decoding with them gives back)
    nulls: list | None = None
    reached: Tensor | None = None
    #: exact inversion with the ddim sampler: per step (plan order) what the solve left ((B, C, h, w)): under
    #: guidance every step's; without it only where a step stopped above OFFSET_FACTOR x its bound (zero for the
    #: images that needed none; None for a step none needed; None when no step did;
    #: :func:`ddimctl.inversion.stopped_short`): decode with them to retrace x0
    offsets: list | None = None


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
    offsets: list | None = None  # exact inversion's per-step offsets (Inverted.offsets), added in the decode
    autoencoder_mse: Tensor | None = None  # latent diffusion: the autoencoder's own round trip (encode, decode)
    inversion_mse: Tensor | None = None  # latent diffusion: the reconstruction against that round trip

    @property
    def model_calls(self) -> int:
        """Batched model calls for invert + decode (forwards launched for the batch)."""
        return self.stats.model_calls + self.decode_calls

    @property
    def image_calls(self) -> list[int]:
        """Per image: the model evaluations it caused (its own solve, which does not depend on its batch, and the
        decode)."""
        return [c + self.decode_calls for c in self.stats.image_calls]


@dataclass
class Edit:
    """What :meth:`Engine.edit` gives: the part-way latent ``x_mid`` (at the level where regeneration starts), the
    ``edited`` images, the inversion's ``stats``, the ``steps`` regenerated and each edit's MSE to its source."""

    x_mid: Tensor
    edited: Tensor
    stats: InversionStats
    steps: int
    mse: Tensor


class Engine:
    """A loaded model ready to sample and invert with fixed options.

    ``model``: a :class:`~ddimctl.families.LoadedModel` (its network in ``dtype`` on ``device``). ``image_shape``:
    (C, H, W) of the images it makes and takes; ``latent_shape``: what the sampler works on (the same for a pixel
    model; with an ``autoencoder``, x_T is a latent, :meth:`generate` / :meth:`decode` return decoded images and
    :meth:`invert` encodes its images first). ``source``: where the model came from (a
    :class:`~ddimctl.checkpoint.Resolved`, None for one built in memory), for provenance records.
    """

    def __init__(self, model, options: SamplingOptions | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model = model
        self.options = options = options if options is not None else SamplingOptions()
        self.device = torch.device(device)
        self.model_dtype = dtype
        self.network = model.network
        self.source = model.resolved
        self.autoencoder = model.autoencoder
        self.conditioner = model.conditioner
        options.check()
        refusal = getattr(self.conditioner, "refusal", None)
        if refusal is not None:
            raise refusal
        w = options.guidance_scale
        if w is None and options.inverting and self.conditioner.guidance == "classifier-free":
            w = 1.0  # inversion is exact at w = 1 and its latent decodes back at the same w (README: Models)
        self.guidance_scale = self.conditioner.scale(ConditionOptions(guidance_scale=w))
        if options.inversion in GUIDED_INVERSIONS:
            self._check_guided_inversion(options.inversion)
        self.image_shape, self.latent_shape = model.shapes(options.height, options.width)
        T = model.settings.num_train_timesteps
        if options.steps > T:
            raise SettingError(("steps", options.steps), f"more than the model's {T} training timesteps")
        spacing = options.resolved_spacing(model.settings)
        self.settings = model.settings.with_overrides(timestep_spacing=spacing, clip_sample=options.clip_sample)
        try:
            self.plan: SamplingPlan = model.plan(options.steps, self.settings, self.latent_shape)
        except ValueError as e:
            raise SettingError([("steps", options.steps), ("spacing", spacing)], str(e)) from None
        if options.schedule_file is not None:
            from .schedule_files import load_schedule, model_identity

            self.plan = load_schedule(options.schedule_file, *model_identity(self.source), options.sampler,
                                      options.steps, self.settings.schedule())
            if self.plan.schedule is None:  # the model times between its levels (fireflow's midpoints)
                self.plan = replace(self.plan, schedule=self.settings.schedule())
        # Clipping or thresholding x0_hat makes the step many-to-one, so no inversion can undo it: invert, and
        # decode (which must retrace an inversion), run the plain ODE.
        self.ode_settings = self.settings.with_overrides(clip_sample=False, thresholding=False)

    def _check_guided_inversion(self, inversion: str) -> None:
        """Refuse negative-prompt / null-text inversion for a model they cannot change (one line naming the option)."""
        c = self.conditioner
        if c.guidance != "classifier-free":
            why = ("takes its guidance as an input (guidance-distilled), with no null condition" if c.guidance == "embedded"
                   else "is not guided")
            raise SettingError(("inversion", inversion), f"changes the null condition of classifier-free guidance, "
                               f"and this model {why}: use exact or plain")
        if inversion == "null-text":
            if getattr(c, "null_label", 0) is None:
                raise SettingError(("inversion", inversion), "the model declares no null class label to start the "
                                   "optimisation from: use exact or plain")
            if self.guidance_scale == 1.0:
                raise SettingError([("inversion", inversion), ("guidance_scale", 1.0)],
                                   "null-text inversion optimises the null condition of a guided model: give a "
                                   "guidance scale other than 1")

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
        """Load a model reference (see :func:`ddimctl.families.resolve`) onto ``device`` in ``dtype`` and build
        the engine; ``compile`` and ``options.channels_last`` are applied by :func:`ddimctl.perf.prepare_model`.
        A latent-diffusion pipeline loads with its autoencoder; ``autoencoder`` (a reference) pairs the model with
        another one, ``autoencoder_scaling_factor`` overrides its latent scale, ``variant`` picks weight files such as
        ``fp16``. What the loader does not follow, and compile fallbacks, go to ``note`` one line each."""
        from dataclasses import replace

        from .families import load
        from .perf import prepare_model

        options = options if options is not None else SamplingOptions()
        device = torch.device(device)
        loaded = load(ref, device=device, dtype=dtype, variant=variant,
                      autoencoder=True if autoencoder is None else autoencoder,
                      autoencoder_scaling_factor=autoencoder_scaling_factor)
        for line in loaded.notes:
            if note is not None:
                note(line)
        network, _ = prepare_model(loaded.network, options.channels_last, compile, note=note)
        engine = cls(replace(loaded, network=network), options, device, dtype)
        if note is not None and engine.guidance_scale != 1.0 and engine.settings.clip_sample:
            note(GUIDED_CLIP_NOTE)
        return engine

    # -- conditions ----------------------------------------------------------------------------------------------

    def conditions(self, options: ConditionOptions, n: int, role: str = "") -> list[Any] | None:
        """One condition value per image for ``n`` images from the user's options (checked: refused before any
        work when the model cannot take them); None for an unconditioned model. ``role``: ``to_`` for an edit's
        target, naming its options in errors."""
        return self.conditioner.values(options, n, role)

    def default_conditions(self, n: int) -> list[Any] | None:
        """The conditions of ``n`` images given none (class-conditional: image i gets class i mod K)."""
        return self.conditioner.default_values(n)

    def check_conditions(self, values: Sequence[Any] | None, role: str = "") -> None:
        """Refuse, before any work, conditions the model cannot take (or none where it needs them), and get ready
        for them (a text model encodes each distinct prompt once, then frees the accelerator of its encoders)."""
        self.conditioner.check(values, role)
        self.conditioner.prepare(values, self.device)

    def record(self, value: Any) -> dict[str, Any]:
        """What reports and latent files record of one image's condition."""
        return self.conditioner.record(value) if value is not None else {}

    def denoisers(self, conditions: Sequence[Any] | None, n: int, guidance_scale: float | None = None,
                  null_conditions: Sequence[Any] | None = None) -> tuple[Denoiser, Denoiser]:
        """(sampling denoiser, ODE denoiser) for a batch of ``n`` images with these conditions, guided with the
        engine's scale (or ``guidance_scale``). ``null_conditions``: condition values (one per image) that
        classifier-free guidance guides away from instead of the model's null condition (negative-prompt
        inversion: the source's); where they equal ``conditions`` guidance has no effect, and the model is the
        conditional one alone (one forward of the batch, not two)."""
        values = None if conditions is None else list(conditions)
        self.conditioner.check(values)
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        cond = self.conditioner.encode(values, n, self.device)
        guided = w != 1.0 and self.conditioner.guidance == "classifier-free"  # an embedded guidance needs no null
        uncond = None
        if guided and null_conditions is not None:
            nulls = list(null_conditions)
            if nulls == values:
                guided, w = False, 1.0  # uncond + w (cond - uncond) = cond
            else:
                self.conditioner.check(nulls)
                uncond = self.conditioner.encode(nulls, n, self.device)
        elif guided:
            uncond = self.conditioner.null(values, n, self.device)
        model = guide(self._call_network, self.conditioner, cond, uncond, w)
        return self.settings.denoiser(model), self.ode_settings.denoiser(model)

    def _call_network(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        x_in = x.to(self.model_dtype)
        if self.options.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        if self.options.deterministic:
            out = self._per_sample(x_in, t, cond)
        else:
            out = self.network(x_in, t, **cond)
        return out.to(x.dtype).contiguous()

    def _per_sample(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The network on each sample alone, each in fresh memory: the result of sample i depends on nothing but its
        own input, whatever the batch it came in, its position, the batch size or the number of processes.

        On the CPU the kernels' rounding also depends on how many threads split an operation, so each sample runs
        single-threaded, in a pool of worker threads (as many as torch's intra-op threads: the same parallelism,
        across samples instead of within each operation). Measured: benchmarks/bench_deterministic.py.
        """
        def one(i: int) -> Tensor:
            ti = t[i : i + 1] if t.shape[0] > 1 else t
            return self.network(x[i : i + 1].clone(), ti.clone(), **{k: v[i : i + 1].clone() for k, v in cond.items()})

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
            "model": {"ref": r.ref if r else None, "source": r.source if r else None,
                      "repo_id": r.repo_id if r else None, "revision": r.revision if r else None},
            "settings": {
                "steps": self.options.steps,
                "eta": self.options.eta,
                "sampler": self.options.sampler,
                "spacing": self.spacing,
                "schedule": self.options.schedule_file,
                "prediction_type": self.settings.prediction_type,
                "clip_sample": self.settings.clip_sample,
                "guidance_scale": self.guidance_scale,
                "device": str(self.device),
                "dtype": str(self.model_dtype).replace("torch.", ""),
                **self.conditioner.describe(),
            },
        }

    def provenance(self) -> dict[str, Any]:
        """What a latent file records about how its x_T was made (see :mod:`ddimctl.latents`)."""
        r = self.source
        return {
            "model": (r.ref if r else None) or "",
            "model_revision": (r.revision if r else None) or "",
            "steps": str(self.options.steps),
            "spacing": self.spacing,
            **({"schedule": self.options.schedule_file} if self.options.schedule_file is not None else {}),
            "sampler": self.options.sampler,
            "inversion": self.options.inversion,
            "prediction_type": self.settings.prediction_type,
            **({"guidance_scale": self.guidance_scale} if self.conditioner.guidance is not None else {}),
            **self.conditioner.describe(),
        }

    # -- images <-> what the sampler works on --------------------------------------------------------------------

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
        if self.options.deterministic:  # each image alone, as the network runs then
            return torch.cat([fn(x[i : i + 1].clone().to(dtype)) for i in range(x.shape[0])]).float()
        return fn(x.to(dtype)).float()

    # -- the jobs ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, seeds: Sequence[int], x_T: Tensor | None = None, callback=None,
                 x_prev: Tensor | None = None, conditions: Sequence[Any] | None = None,
                 offsets: Sequence[Tensor | None] | None = None, nulls: Sequence[Any] | None = None
                 ) -> tuple[Tensor, Tensor]:
        """Sample a batch: returns (x_T, x0), each (B, C, H, W) float32, x0 in the model's data range.

        Sample i draws from one generator seeded ``seeds[i]``: first its x_T, then (eta > 0) the noise of each step.
        When ``x_T`` is given, the x_T draw is still made and discarded, so a run from saved latents with the same
        seeds repeats the original run exactly. ``conditions``: each sample's condition (a class id, ...).
        ``offsets``: an exact inversion's per-step offsets for the given x_T (a latent file's), added after each
        step as :meth:`decode` does (the ddim sampler with eta = 0, unclipped: the inversion's own steps).
        ``nulls``: null-text inversion's per-step null conditions for the given x_T, decoded as :meth:`decode` does.
        """
        denoiser, ode = self.denoisers(conditions, len(seeds))
        gens = make_generators(seeds)
        drawn = randn(gens, self.latent_shape, torch.float32, self.device)
        x = drawn if x_T is None else x_T.to(self.device, torch.float32)
        if x_prev is not None:  # a latent pair: only the pair sampler reads it (_decode_with checks the sampler)
            return x, self._decode_with(denoiser, x, callback, x_prev, self.plan)
        if nulls is not None:
            return x, self.decode(x, callback, conditions=conditions, nulls=nulls)
        if offsets is not None:
            return x, self._decode_with(ode, x, callback, None, self.plan, offsets)
        x0 = sample(denoiser, x, self.plan, self.options.sampler, self.options.eta,
                    gens if self.options.eta > 0 else None, callback)
        return x, self.to_images(x0)

    @property
    def pair_latents(self) -> bool:
        """Whether this sampler's latent is a pair (x_T, x_{T-1}) (:data:`PAIR_SAMPLERS`)."""
        return self.options.sampler in PAIR_SAMPLERS

    def latent_offsets(self, latent: "LatentFile", conditions: Sequence[Any] | None = None
                       ) -> tuple[list | None, str | None]:
        """A latent file's per-step offsets in plan order when this engine decodes it as it was inverted (see
        :meth:`_as_inverted`) under ``conditions`` (one per image of the file): (offsets, None); else (None, why they
        are not added), and (None, None) for a file without offsets."""
        if not latent.offsets:
            return None, None
        why_not = self._as_inverted(latent.metadata, "per-step offsets", conditions)
        return (None, why_not) if why_not else (latent.offset_list(len(self.plan)), None)

    def latent_nulls(self, latent: "LatentFile", conditions: Sequence[Any] | None = None
                     ) -> tuple[list | None, str | None]:
        """A null-text latent file's per-step null conditions (plan order, each a :class:`Cond` of its batch on
        the device) when this engine decodes it as it was inverted (as :meth:`latent_offsets`): (nulls, None); else
        (None, why they are not used); (None, None) without nulls."""
        from .conditioning import Cond

        if latent.nulls is None:
            return None, None
        why_not = self._as_inverted(latent.metadata, "null-text nulls", conditions)
        if why_not:
            return None, why_not
        ref = self._continuous(self.conditioner.null(None, 1, self.device))
        if set(ref.tensors) != set(latent.nulls[0]):
            raise InputError(f"{latent.metadata.get('model') or 'the latent file'}: null-text nulls of "
                             f"{', '.join(sorted(latent.nulls[0]))}; this model's null condition has "
                             f"{', '.join(sorted(ref.tensors))}")
        return [Cond({k: v.to(self.device, ref.tensors[k].dtype) for k, v in n.items()}) for n in latent.nulls], None

    def _as_inverted(self, meta: dict[str, str], what: str, conditions: Sequence[Any] | None) -> str | None:
        """Why a latent file's per-step corrections (``what``) cannot be used by this engine's decode under
        ``conditions``; None when it decodes as the file was inverted: on the same plan (steps, spacing or
        schedule), with the ddim sampler at eta = 0, the same guidance scale and each image's recorded condition.
        The corrections belong to that one trajectory (an edit to another condition regenerates from x_T alone,
        as ``edit`` does)."""
        from .latents import metadata_strings

        tail = ": x_T is decoded without them"
        made = (meta.get("steps"), meta.get("spacing"), meta.get("schedule"))
        mine = (str(self.options.steps), self.spacing, self.options.schedule_file)
        if made != mine:
            return f"its {what} were made on {made[0]} steps, {made[1]} spacing; this run takes {mine[0]} steps, {mine[1]} spacing{tail}"
        if self.options.sampler != "ddim" or self.options.eta != 0:
            return (f"its {what} retrace an eta = 0 ddim sample; this run's sampler is {self.options.sampler} with "
                    f"eta {self.options.eta:g}{tail}")
        if self.conditioner.guidance is not None:
            w = meta.get("guidance_scale")
            if w is None or float(w) != self.guidance_scale:
                return f"its {what} were made at guidance scale {w}; this run's is {self.guidance_scale:g}{tail}"
        for value in conditions or []:
            recorded = {k: v for k, v in metadata_strings(self.record(value)).items() if k != "ddimctl_version"}
            if any(meta.get(k) != v for k, v in recorded.items()):
                shown = ", ".join(f"{k} {meta.get(k)}" for k in recorded)
                return f"its {what} belong to the source's condition ({shown}), not this run's{tail}"
        return None

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
    def invert(self, x0: Tensor, callback=None, conditions: Sequence[Any] | None = None,
               plan: SamplingPlan | None = None) -> Inverted:
        """x_T (B, C, H, W) whose eta = 0 sample with this sampler is x0 (and, for a pair sampler, the latent's
        second state x_{T-1}), and what the inversion cost."""
        self.check_invertible()
        if self.options.inversion == "null-text":
            return self._invert_null_text(x0, callback, conditions, plan or self.plan)
        _, ode = self.denoisers(conditions, x0.shape[0], null_conditions=self._source_nulls(conditions))
        stats = InversionStats(keep_offsets=self.keeps_offsets)
        x, x_prev = INVERT_FUNCTIONS[self.options.sampler](
            ode, self.to_latents(x0).to(self._state_dtype), plan or self.plan,
            self.options.inversion in EXACT_INVERSIONS, self.options.tol, self.options.max_iter, callback, stats,
        )
        # unguided, a step that stopped within OFFSET_FACTOR x its bound is within the decode's error budget; under
        # guidance perturbations can grow past the bound's model (w = 10, 50 steps: steps solved to their bound
        # still left a 1.4e-2 MSE miss, docs/guided-inversion.md), so every step's offset is kept
        factor = OFFSET_FACTOR if self.guidance_scale == 1.0 else 0.0
        offsets = stopped_short(stats, factor) if self.keeps_offsets else None
        stats.offsets = None  # the dense record: every step of every image
        # x_prev in the state's dtype: a bdia pair rounded to float32 decodes ~1e-4 off
        return Inverted(x, x_prev, stats, offsets=offsets)

    @property
    def keeps_offsets(self) -> bool:
        """Whether :meth:`invert` keeps what its solve left at each step (exact inversion with the ddim sampler;
        :attr:`Inverted.offsets`; negative-prompt inversion runs the conditional model alone,
        which has no fold)."""
        return self.options.sampler == "ddim" and self.options.inversion == "exact"

    def _source_nulls(self, conditions: Sequence[Any] | None) -> Sequence[Any] | None:
        """The null conditions that inverting (and decoding back) under ``conditions`` guides away from:
        the conditions themselves for negative-prompt inversion, the model's own (None) otherwise."""
        return conditions if self.options.inversion == "negative-prompt" else None

    def _continuous(self, cond):
        from .null_text import continuous

        try:
            return continuous(cond, self.model.model)
        except ValueError as e:
            raise SettingError(("inversion", "null-text"), f"{e}: use exact or plain") from None

    def _invert_null_text(self, x0: Tensor, callback, conditions: Sequence[Any] | None, plan: SamplingPlan
                          ) -> Inverted:
        """Null-text inversion (:mod:`ddimctl.null_text`): the network's parameters frozen, autograd on for the
        null conditions alone."""
        from .null_text import null_text_inversion

        n = x0.shape[0]
        values = None if conditions is None else list(conditions)
        _, pivot = self.denoisers(conditions, n, guidance_scale=1.0)  # unclipped: invertible steps
        cond = self._continuous(self.conditioner.encode(values, n, self.device))
        null = self._continuous(self.conditioner.null(values, n, self.device))
        module = self.model.model
        frozen = [p for p in module.parameters() if p.requires_grad] if isinstance(module, torch.nn.Module) else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.inference_mode(False):
                res = null_text_inversion(self._call_network, pivot, cond, null, self.to_latents(x0).float(), plan,
                                          self.guidance_scale, pivot_denoiser=pivot, callback=callback)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        stats = InversionStats(model_calls=res.batched_calls)
        for its, losses, in zip(res.iterations, res.losses):
            stats._record(torch.tensor(losses, dtype=torch.float64).sqrt(), torch.tensor(its),
                          torch.tensor(its) + 2)
        stats.image_calls = [c + len(plan) for c in stats.image_calls]
        return Inverted(res.x_T, None, stats, nulls=res.nulls, reached=self.to_images(res.reached))

    @property
    def _state_dtype(self) -> torch.dtype:
        """The sampler state's dtype: float32, float64 for a pair sampler, whose inverse recursion subtracts nearly
        equal states (the model still runs in its own dtype; float64 states round to the same float32 inputs in
        both directions, so a round trip is exact to float64 rounding)."""
        return torch.float64 if self.pair_latents and self.device.type != "mps" else torch.float32

    @torch.inference_mode()
    def decode(self, x_T: Tensor, callback=None, x_prev: Tensor | None = None,
               conditions: Sequence[Any] | None = None, plan: SamplingPlan | None = None,
               null_conditions: Sequence[Any] | None = None, nulls: Sequence[Any] | None = None,
               offsets: Sequence[Tensor | None] | None = None) -> Tensor:
        """The eta = 0 sample of x_T with this sampler, without clipping (the inverse of :meth:`invert`;
        reconstruct, interpolate). ``x_prev``: the second state of a pair latent (bdia only).
        ``null_conditions``: what guidance guides away from (default: the conditions themselves under
        negative-prompt inversion, else the model's null); ``nulls``: null-text inversion's per-step null conditions
        (:attr:`Inverted.nulls`), one per step of the plan; ``offsets``: exact inversion's per-step offsets
        (:attr:`Inverted.offsets`), added after each step of the plan they were made on."""
        plan = plan or self.plan
        if nulls is not None:
            from .null_text import decode_with_nulls

            if len(nulls) != len(plan):
                raise SettingError(("steps", len(plan)), f"null-text nulls for {len(nulls)} steps: decode with the "
                                   "plan they were optimised on")
            values = None if conditions is None else list(conditions)
            _, pivot = self.denoisers(conditions, x_T.shape[0], guidance_scale=1.0)
            cond = self._continuous(self.conditioner.encode(values, x_T.shape[0], self.device))
            x = decode_with_nulls(self._call_network, pivot, cond, list(nulls), x_T.to(self.device, torch.float32),
                                  plan, self.guidance_scale, callback)
            return self.to_images(x)
        if null_conditions is None:
            null_conditions = self._source_nulls(conditions)
        _, ode = self.denoisers(conditions, x_T.shape[0], null_conditions=null_conditions)
        return self._decode_with(ode, x_T, callback, x_prev, plan, offsets)

    def _decode_with(self, denoiser: Denoiser, x_T: Tensor, callback, x_prev: Tensor | None,
                     plan: SamplingPlan, offsets: Sequence[Tensor | None] | None = None) -> Tensor:
        x = x_T.to(self.device, x_T.dtype if x_T.dtype == torch.float64 else torch.float32)
        if offsets is not None:
            self.check_offsets(offsets, plan)
            moved = [None if o is None else o.to(self.device, torch.float32) for o in offsets]
            return self.to_images(run_plan_updates(ddim_plan_update, denoiser, x.float(), plan, callback, moved))
        if self.pair_latents:
            x_next = None if x_prev is None else x_prev.to(self.device, self._state_dtype)
            z = sample_bdia(denoiser, x.to(self._state_dtype), plan, x_next, callback=callback).float()
            return self.to_images(z)
        if x_prev is not None:
            raise SettingError(("sampler", self.options.sampler),
                               f"a latent pair (x_T, x_T-1) decodes only with the {PAIR_SAMPLERS[0]} sampler")
        return self.to_images(sample(denoiser, x.float(), plan, self.options.sampler, 0.0, None, callback))

    def check_offsets(self, offsets: Sequence[Tensor | None], plan: SamplingPlan | None = None) -> None:
        """Refuse per-step offsets this engine cannot add as they were made: another sampler than ddim, or another
        number of steps than the plan's."""
        plan = plan or self.plan
        if self.options.sampler != "ddim" or self.options.eta != 0:
            raise SettingError(("sampler", self.options.sampler), "per-step offsets retrace an eta = 0 ddim sample: "
                               "use the ddim sampler with eta 0")
        if len(offsets) != len(plan):
            raise SettingError(("steps", len(plan)), f"offsets for {len(offsets)} steps: decode with the plan they "
                               "were made on")

    def decode_calls(self, pair: bool = False, nulls: bool = False) -> int:
        """Model calls :meth:`decode` makes per batch (one fewer from a bdia pair: its first state is given; one more
        for fireflow, whose first step calls the model at x_T and at its midpoint; two per step with null-text's
        nulls: the condition and the step's null, each a forward of the batch)."""
        if nulls:
            return 2 * len(self.plan)
        extra = 1 if self.options.sampler in EXTRA_CALL_SAMPLERS else 0
        return len(self.plan) + extra - (1 if pair and self.pair_latents else 0)

    def reconstruct(self, x0: Tensor, callback=None, conditions: Sequence[Any] | None = None) -> Reconstruction:
        """Invert images x0 (B, C, H, W) in [-1, 1], decode the latents again, and measure the error."""
        from .images import mse, psnr

        inv = self.invert(x0, callback, conditions)
        rec = self.decode(inv.x_T, callback, inv.x_prev, conditions=conditions, nulls=inv.nulls, offsets=inv.offsets)
        target = x0.to(rec.device, rec.dtype)
        ae = inv_mse = None
        if self.autoencoder is not None:  # how much of the error is the autoencoder's, and how much the inversion's
            round_trip = self.to_images(self.to_latents(x0))
            ae, inv_mse = mse(round_trip, target), mse(rec, round_trip)
        return Reconstruction(inv.x_T, rec, mse(rec, target), psnr(rec, target), inv.stats,
                              decode_calls=self.decode_calls(inv.x_prev is not None, inv.nulls is not None),
                              x_prev=inv.x_prev, offsets=inv.offsets,
                              autoencoder_mse=ae, inversion_mse=inv_mse)

    def edit_steps(self, strength: float) -> int:
        """How many of the plan's steps an edit of ``strength`` in (0, 1] regenerates (at least one)."""
        if not 0 < strength <= 1:
            raise SettingError(("strength", strength), "must be in (0, 1]")
        return max(1, round(strength * len(self.plan)))

    def edit(self, x0: Tensor, source: Sequence[Any], target: Sequence[Any], strength: float = 1.0,
             callback=None) -> Edit:
        """DDIM editing of images x0 (B, C, H, W) in [-1, 1] from the conditions ``source`` to ``target`` (one value
        each per image): invert exactly under the source over the last ``strength`` share of the plan's steps (1:
        all of them, to x_T), then sample from there under the target. Less strength keeps more of the image (only
        the less noisy part of the trajectory is regenerated)."""
        from .images import mse

        k = self.edit_steps(strength)
        if self.pair_latents and k < 2:
            raise SettingError(("strength", strength), f"the {PAIR_SAMPLERS[0]} sampler needs at least 2 steps to regenerate")
        plan = self.plan.tail(k)
        inv = self.invert(x0, callback, source, plan)
        # negative-prompt inversion's editing: guided away from the source; null-text: with the optimised nulls;
        # exact inversion's offsets belong to the source's trajectory (as Direct / PnP inversion's source branch)
        edited = self.decode(inv.x_T, callback, inv.x_prev, conditions=target, plan=plan,
                             null_conditions=self._source_nulls(source), nulls=inv.nulls)
        return Edit(inv.x_T, edited, inv.stats, k, mse(edited, x0.to(edited.device, edited.dtype)))

    @torch.inference_mode()
    def second_state(self, x_T: Tensor, conditions: Sequence[Any] | None = None) -> Tensor:
        """x_{T-1} = the DDIM step from x_T (one model call): a pair sampler's second state when only x_T is known
        (a seed, or a latent file from another sampler); bdia's own first step."""
        x = x_T.to(self.device, torch.float32)
        ts = model_times(self.plan, x)
        ode = self.denoisers(conditions, x.shape[0], null_conditions=self._source_nulls(conditions))[1]
        out = ode(x, ts[0:1], self.plan.a[0], self.plan.b[0])
        return ddim_step(out[0], out[1], self.plan.a[1], self.plan.b[1])

    def end_latent(self, end: "End", conditions: Sequence[Any] | None = None) -> tuple[Tensor, Tensor | None]:
        """(x_T, x_{T-1} or None), each (1, C, H, W) on the device, for a parsed interpolation end (an image end is
        inverted here). A pair sampler always gets the pair (x_{T-1} made by :meth:`second_state` if need be)."""
        return self._end_state(end, conditions)[:2]

    def _end_state(self, end: "End", conditions: Sequence[Any] | None = None
                   ) -> tuple[Tensor, Tensor | None, list | None, str | None]:
        """:meth:`end_latent`, with the end's per-step offsets (plan order, each (1, C, h, w) or None; None for
        none) and why a latent file's offsets are not used (None when they are, or there are none)."""
        offsets = why_not = None
        if end.kind == "seed":
            x_T, x_prev = self.noise([end.seed]), None
        elif end.kind == "latent":
            x_T = end.tensor[:1].to(self.device)
            x_prev = None if end.tensor_prev is None else end.tensor_prev[:1].to(self.device)
            if end.latent is not None:
                offsets, why_not = self.latent_offsets(end.latent, conditions)
                offsets = select_offsets(offsets, slice(0, 1))
        else:
            inv = self.invert(end.tensor[:1], conditions=conditions)
            x_T, x_prev, offsets = inv.x_T, inv.x_prev, inv.offsets
        if x_prev is not None and not self.pair_latents:
            raise InputError(f"{end.spec}: holds a {PAIR_SAMPLERS[0]} latent pair; interpolate it with the "
                             f"{PAIR_SAMPLERS[0]} sampler")
        if self.pair_latents and x_prev is None:
            x_prev = self.second_state(x_T, conditions)
        return x_T, x_prev, offsets, why_not

    def interpolation(self, a: "End", b: "End", alphas: Sequence[float], conditions: Sequence[Any] | None = None
                      ) -> Frames:
        """The latents of the frames between the ends ``a`` and ``b`` at ``alphas`` (0: a, 1: b), slerped in x_T:
        (K, C, h, w), and for a pair sampler the frames' second states, slerped alongside (the ends stay exact);
        the ends' per-step offsets (exact inversion's, :attr:`Inverted.offsets`) blended linearly, so that each
        end decodes as its own latent does; ``conditions``: the condition (one value) an image end is inverted
        under."""
        if self.options.inversion == "null-text" and "image" in (a.kind, b.kind):
            raise SettingError(("inversion", "null-text"), "null-text's per-step null conditions belong to one "
                               "image and cannot be interpolated: use exact, plain or negative-prompt")
        (xa, pa, oa, na), (xb, pb, ob, nb) = self._end_state(a, conditions), self._end_state(b, conditions)
        x_T = torch.cat([slerp(xa, xb, t) for t in alphas])  # (K, C, h, w)
        x_prev = torch.cat([slerp(pa, pb, t) for t in alphas]) if self.pair_latents else None
        offsets = None
        if oa is not None or ob is not None:
            def blend(o_a, o_b):
                if o_a is None and o_b is None:
                    return None
                o_a = torch.zeros_like(xa) if o_a is None else o_a.to(xa.device, xa.dtype)
                o_b = torch.zeros_like(xb) if o_b is None else o_b.to(xb.device, xb.dtype)
                return torch.cat([(1 - t) * o_a + t * o_b for t in alphas])

            n = len(self.plan)
            offsets = [blend(None if oa is None else oa[k], None if ob is None else ob[k]) for k in range(n)]
        notes = [f"{e.spec}: {why}" for e, why in ((a, na), (b, nb)) if why is not None]
        return Frames(x_T, x_prev, offsets, notes)

    def tune(self, seeds: Sequence[int], heldout_seeds: Sequence[int], method: str = "ld3", iterations: int = 20,
             reference_steps: int | None = None, batch_size: int = 64, callback=None,
             conditions: Sequence[Any] | None = None):
        """Tune this plan's levels for the engine's sampler and number of steps on the noises of ``seeds`` (each
        seed's x_T, as :meth:`generate` draws it), then measure the tuned and the untuned plan against the
        reference on those and on ``heldout_seeds``; a :class:`~ddimctl.schedule_files.TunedSchedule`.
        ``conditions``: one per training seed then one per held-out seed (default: the model's defaults).

        ``callback`` gets ``phase`` ("reference", "tuning", "held-out"), ``step`` and ``total``. The network's
        parameters are frozen while tuning and restored after.
        """
        from .schedule_files import TunedSchedule, model_identity
        from .tuning import (
            DEFAULT_INITS, REFERENCE_SAMPLER, REFERENCE_STEPS, TuneReport, plan_error, reference_samples,
            reference_trajectory, tune_plan,
        )

        reference_steps = reference_steps or REFERENCE_STEPS
        sampler, steps = self.options.sampler, self.options.steps
        schedule = self.settings.schedule()
        seeds, heldout_seeds = list(seeds), list(heldout_seeds)
        if conditions is None:
            conditions = self.default_conditions(len(seeds) + len(heldout_seeds))
        train_cond = None if conditions is None else list(conditions)[: len(seeds)]
        held_cond = None if conditions is None else list(conditions)[len(seeds):]
        denoise = self.denoisers(train_cond, len(seeds))[0]
        module = self.model.model
        frozen = [p for p in module.parameters() if p.requires_grad] if isinstance(module, torch.nn.Module) else []
        for p in frozen:
            p.requires_grad_(False)

        def phase(name: str):
            return None if callback is None else (lambda info: callback({**info, "phase": name}))

        try:
            noises = self.noise(seeds)
            ref = reference_trajectory(denoise, schedule, noises, REFERENCE_SAMPLER, reference_steps, batch_size,
                                       callback=phase("reference"))
            report = TuneReport()
            inits = [*DEFAULT_INITS, self.plan]
            plan = tune_plan(denoise, schedule, steps, sampler, noises, ref, method=method, iterations=iterations,
                             init=inits, batch_size=batch_size, callback=callback, report=report)
            errors = {"train": {"tuned": plan_error(denoise, plan, sampler, noises, ref.x0, batch_size),
                                "untuned": plan_error(denoise, self.plan, sampler, noises, ref.x0, batch_size)}}
            if heldout_seeds:
                held_denoise = self.denoisers(held_cond, len(heldout_seeds))[0]
                held = self.noise(heldout_seeds)
                held_ref = reference_samples(held_denoise, schedule, held, REFERENCE_SAMPLER, reference_steps,
                                             batch_size, callback=phase("held-out"))
                errors["heldout"] = {
                    "tuned": plan_error(held_denoise, plan, sampler, held, held_ref, batch_size),
                    "untuned": plan_error(held_denoise, self.plan, sampler, held, held_ref, batch_size)}
        finally:
            for p in frozen:
                p.requires_grad_(True)
        ref_name, revision = model_identity(self.source)
        own = {f"plan {len(inits) - 1}": f"{self.spacing} (untuned)"}  # tune_plan's name for the engine's plan
        tuning = {
            "method": method, "iterations": iterations if method == "ld3" else 0,
            "reference": {"sampler": REFERENCE_SAMPLER, "steps": reference_steps, "spacing": "logsnr"},
            "clip_sample": bool(self.settings.clip_sample),
            "untuned_spacing": self.spacing, "seeds": seeds, "heldout_seeds": heldout_seeds,
            "init": own.get(report.init, report.init),
            "init_errors": {own.get(k, k): v for k, v in report.init_errors.items()},
            "initial_error": report.initial_error, "losses": report.losses,
        }
        return TunedSchedule.from_plan(plan, ref_name or "", revision, sampler, self.settings.kind,
                                       self.settings.prediction_type, errors=errors, tuning=tuning)


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
    latent: "LatentFile | None" = None  # a latent file's contents (its per-step offsets)


@dataclass
class Frames:
    """The latents of an interpolation's frames: ``x_T`` (K, C, h, w); for a pair sampler the second states
    ``x_prev``; the per-step ``offsets`` (plan order, each (K, C, h, w) or None) blended linearly between the ends'
    (None when neither end has any); and ``notes`` on what of the ends could not be used."""

    x_T: Tensor
    x_prev: Tensor | None
    offsets: list | None = None
    notes: list[str] = field(default_factory=list)


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
        from .latents import check_shape, load_latent_file

        lf = load_latent_file(spec)
        if lf.nulls is not None:
            raise InputError(f"{spec}: holds null-text inversion's per-step null conditions, which belong to one "
                             "image and cannot be interpolated: invert it with exact or negative-prompt")
        return End(spec, "latent", tensor=check_shape(lf.latents, latent_shape or image_shape, spec),
                   tensor_prev=lf.latents_prev, latent=lf)
    from .images import iter_image_paths, load_image

    (path,) = iter_image_paths([spec])[:1]
    img = load_image(path, image_shape[0], tuple(image_shape[1:]))
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
