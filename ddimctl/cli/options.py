"""Command-line options, declared once: same flag, same name, same default in every command.

Options that travel together are a group (:class:`ModelLoading`, :class:`Sampling`, :class:`Conditioning`,
:class:`Inversion`, :class:`Outputs`): a dataclass whose fields are the options. A command names a group as one
parameter (``sampling: Sampling``) and :func:`ddimctl.cli.app.command` expands it into the group's options, then
hands the command one object; ``Annotated[Sampling, Group(exclude=("eta",))]`` leaves some out. A new option of a
group is one field here.

Only typer and the standard library are imported at the top, so ``ddimctl --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .. import DEFAULT_MODEL

if TYPE_CHECKING:
    from ..conditioning import ConditionOptions
    from ..engine import Engine, SamplingOptions
    from .output import Reporter

DEFAULT_STEPS = 50
DEFAULT_BATCH_SIZE = 16

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model: a built-in name (mnist, mnist-flow, mnist-cond), a diffusers-layout directory, a .safetensors "
        "file, or a Hub repo owner/name[@revision].",
        envvar="DDIMCTL_MODEL",
    ),
]
StepsOpt = Annotated[int, typer.Option("--steps", "-s", min=1, help="Number of sampling steps (model calls for ddim).")]
EtaOpt = Annotated[
    float,
    typer.Option("--eta", min=0.0, max=1.0, help="DDIM eta: 0 deterministic (ODE), 1 DDPM. Values outside [0, 1] are refused."),
]
SpacingOpt = Annotated[
    Optional[str],
    typer.Option(
        "--spacing",
        help="Timestep spacing: leading, trailing, linspace, quad, logsnr, pipeline (SD3 and Flux: the sigmas of "
        "diffusers' own pipeline, their default). Default: the checkpoint's (logsnr for every sampler but ddim and "
        "bdia on DDPM models; logsnr when inverting; a latent file's own when decoding one).",
        show_default=False,
    ),
]
SamplerOpt = Annotated[
    str,
    typer.Option("--sampler", help="Sampler: ddim; bdia (exactly invertible, latent = the pair x_T, x_T-1); "
                 "deterministic multistep: dpm++2m, dpm++3m, unipc (DPM-Solver++ 2M with the UniC corrector), ipndm "
                 "(4th-order Adams-Bashforth); or fireflow (FireFlow's midpoint step reusing the midpoint velocity: "
                 "second order, steps + 1 model calls; --inversion plain is its own reversed scheme)."),
]
ScheduleOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--schedule",
        help="A schedule file from `ddimctl tune`: call the model at its tuned noise levels (it sets --steps, and "
        "is refused for another model or sampler).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (float32), float32, float16 or bfloat16.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per model call.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; image i uses seed + i, whatever the batch size.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document with every output and the settings.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
SkipExistingOpt = Annotated[
    bool, typer.Option("--skip-existing", help="Keep existing output files and produce only the missing ones.")
]
ClipOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--clip-sample/--no-clip-sample",
        help="Clamp the predicted x0 to the data range at each step. Default: the checkpoint's scheduler config.",
        show_default=False,
    ),
]
InversionOpt = Annotated[
    str, typer.Option("--inversion", help="exact: solve each inverse step (fixed point); plain: classic DDIM inversion; "
                      "negative-prompt: exact, guided away from the source condition itself (guidance then has no "
                      "effect on the round trip); null-text: optimise the null condition per step (guided ddim; "
                      "reconstruct and edit only).")
]
TolOpt = Annotated[float, typer.Option("--tol", min=0.0, help="Exact inversion: the RMS error (data in [-1, 1]) "
                                       "it may leave in the decoded image; 3e-3 is an MSE of about 2e-6 in [0, 1].")]
MaxIterOpt = Annotated[int, typer.Option("--max-iter", min=1, help="Exact inversion: iterations per step at most.")]
ChannelsLastOpt = Annotated[
    bool, typer.Option("--channels-last", help="Run the model in channels-last memory format (often faster on GPUs).")
]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model (falls back if it cannot).")]
DeterministicOpt = Annotated[
    bool,
    typer.Option(
        "--deterministic",
        help="Byte-identical results whatever --batch-size, --n, position in the batch or number of torchrun "
        "processes (on the same kind of device): each image gets its own model call. Costs speed (README, "
        "Reproducibility).",
    ),
]
PromptOpt = Annotated[
    Optional[str],
    typer.Option("--prompt", help="Text-to-image models: the prompt of every image.", show_default=False),
]
PromptFileOpt = Annotated[
    Optional[Path],
    typer.Option("--prompt-file", help="Text-to-image models: a text file with one prompt per line, the i-th for the "
                 "i-th image.", show_default=False),
]
NegativePromptOpt = Annotated[
    Optional[str],
    typer.Option("--negative-prompt", help="Text-to-image models with classifier-free guidance: what the guidance "
                 "steers away from (default: the empty prompt; SDXL: zeros, as diffusers).", show_default=False),
]
HeightOpt = Annotated[Optional[int], typer.Option("--height", min=1, help="Image height in pixels, a multiple of the "
                      "autoencoder's factor (models that take other sizes; default: the model's).", show_default=False)]
WidthOpt = Annotated[Optional[int], typer.Option("--width", min=1, help="Image width in pixels (as --height).",
                     show_default=False)]
ClassLabelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--class-label",
        help="Class-conditional models: the class of every image (an integer), or a file with one label per line, "
        "the i-th for the i-th image. sample's default: image i gets class i mod the number of classes.",
        show_default=False,
    ),
]
GuidanceOpt = Annotated[
    Optional[float],
    typer.Option(
        "--guidance-scale",
        min=0.0,
        help="Guidance weight w: classifier-free guidance, uncond + w (cond - uncond), for class-conditional models "
        "with a null class, Stable Diffusion 1.x/2.x/XL and SD3; Flux-dev's embedded guidance value. 1 is no "
        "classifier-free guidance. Default: the pipeline's (7.5 SD 1.x/2.x, 5 SDXL, 7 SD3, 3.5 Flux-dev; 1 for "
        "class-conditional UNets), and 1 for classifier-free guidance where images are inverted (invert, "
        "reconstruct, edit, an image end of interpolate): exact there, and decoded back at the same w.",
        show_default=False,
    ),
]
VariantOpt = Annotated[
    Optional[str],
    typer.Option("--variant", help="Weights variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors).",
                 show_default=False),
]
AutoencoderOpt = Annotated[
    Optional[str],
    typer.Option(
        "--autoencoder",
        help="Latent diffusion: decode with this autoencoder (VQModel or AutoencoderKL: a folder, a pipeline's "
        "vae/ or vqvae/, or a Hub repo) instead of the pipeline's own.",
        show_default=False,
    ),
]
AutoencoderScaleOpt = Annotated[
    Optional[float],
    typer.Option(
        "--autoencoder-scaling-factor",
        help="Latent diffusion: the latent scale (default: the autoencoder config's; 1.0 for a VQModel config that "
        "gives none, as CompVis' LDMs were trained).",
        show_default=False,
    ),
]


# ----------------------------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class Group:
    """How a command takes an option group: without the options in ``exclude``, and with other ``defaults``."""

    exclude: tuple[str, ...] = ()
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class ModelLoading:
    """Which model, and how to load it."""

    model: ModelOpt = DEFAULT_MODEL
    variant: VariantOpt = None
    autoencoder: AutoencoderOpt = None
    autoencoder_scaling_factor: AutoencoderScaleOpt = None
    device: DeviceOpt = "auto"
    dtype: DtypeOpt = "auto"
    compile_model: CompileOpt = False

    def engine(self, options: "SamplingOptions", rep: "Reporter") -> "Engine":
        """Resolve ``--device`` and ``--dtype`` and load the model into an :class:`~ddimctl.engine.Engine`; the
        loader's notes go to stderr when the work starts."""
        import gc

        from ..devices import resolve_device, resolve_dtype
        from ..engine import Engine

        # torch and the modules just imported live until the process exits: take their objects out of the cyclic
        # collector's walks, one of which would otherwise cost ~0.1 s of a 4 s `sample` (benchmarks/first_run.py)
        gc.freeze()
        dev = resolve_device(self.device)
        return Engine.load(self.model, options, dev, resolve_dtype(self.dtype, dev), compile=self.compile_model,
                           note=rep.note_later, **self.references())

    def references(self) -> dict[str, Any]:
        """The loader's keyword arguments besides the model (``ddimctl.families.resolve``'s)."""
        return dict(variant=self.variant, autoencoder=self.autoencoder,
                    autoencoder_scaling_factor=self.autoencoder_scaling_factor)


@dataclass
class Sampling:
    """How to sample: the steps, the sampler and its plan, batching."""

    steps: StepsOpt = DEFAULT_STEPS
    height: HeightOpt = None
    width: WidthOpt = None
    eta: EtaOpt = 0.0
    spacing: SpacingOpt = None
    sampler: SamplerOpt = "ddim"
    schedule: ScheduleOpt = None
    clip_sample: ClipOpt = None
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE
    deterministic: DeterministicOpt = False
    channels_last: ChannelsLastOpt = False

    def options(self, conditioning: "Conditioning | None" = None, **extra: Any) -> "SamplingOptions":
        """The library's :class:`~ddimctl.engine.SamplingOptions` (with ``extra`` fields, e.g. the inversion's).

        ``--steps`` is the number of steps of the ``--schedule`` file when it was left at its default (a
        ``--steps`` given that differs from the file's is refused when the engine loads the schedule)."""
        from ..engine import SamplingOptions

        steps = self.steps
        if self.schedule is not None and not _given("steps"):
            from ..schedule_files import read_schedule

            steps = read_schedule(self.schedule).steps
        guidance = None if conditioning is None else conditioning.guidance_scale
        return SamplingOptions(steps=steps, eta=self.eta, sampler=self.sampler, spacing=self.spacing,
                               clip_sample=self.clip_sample, deterministic=self.deterministic,
                               channels_last=self.channels_last, guidance_scale=guidance, height=self.height,
                               width=self.width,
                               schedule_file=None if self.schedule is None else str(self.schedule), **extra)


@dataclass
class Conditioning:
    """What each image is conditioned on, and the guidance."""

    class_label: ClassLabelOpt = None
    prompt: PromptOpt = None
    prompt_file: PromptFileOpt = None
    negative_prompt: NegativePromptOpt = None
    guidance_scale: GuidanceOpt = None

    def options(self) -> "ConditionOptions":
        from ..conditioning import ConditionOptions

        return ConditionOptions(class_label=self.class_label, prompt=self.prompt,
                                prompt_file=None if self.prompt_file is None else str(self.prompt_file),
                                negative_prompt=self.negative_prompt, guidance_scale=self.guidance_scale)


@dataclass
class EditTarget:
    """What ``edit`` turns each image into: the target conditions, named as the source's with ``to_``."""

    to_class_label: Annotated[Optional[str], typer.Option(
        "--to-class-label", help="The class to turn each image into (an integer, or a file with one label per line).",
        show_default=False)] = None
    to_prompt: Annotated[Optional[str], typer.Option(
        "--to-prompt", help="Text-to-image models: the prompt each image is decoded under.", show_default=False)] = None
    to_prompt_file: Annotated[Optional[Path], typer.Option(
        "--to-prompt-file", help="Text-to-image models: one target prompt per line, the i-th for the i-th image.",
        show_default=False)] = None

    def options(self, source: Conditioning) -> "ConditionOptions":
        """The target conditions, with the source's negative prompt."""
        from ..conditioning import ConditionOptions

        return ConditionOptions(class_label=self.to_class_label, prompt=self.to_prompt,
                                prompt_file=None if self.to_prompt_file is None else str(self.to_prompt_file),
                                negative_prompt=source.negative_prompt)


@dataclass
class Inversion:
    """How images are inverted."""

    inversion: InversionOpt = "exact"
    tol: TolOpt = 3e-3
    max_iter: MaxIterOpt = 50

    def options(self) -> dict[str, Any]:
        """The :class:`~ddimctl.engine.SamplingOptions` fields of the inversion."""
        return dict(inversion=self.inversion, tol=self.tol, max_iter=self.max_iter)


@dataclass
class Outputs:
    """Where results go and what is said about them."""

    overwrite: OverwriteOpt = False
    skip_existing: SkipExistingOpt = False
    json_out: JsonOpt = False
    quiet: QuietOpt = False

    def reporter(self) -> "Reporter":
        from .output import Reporter

        return Reporter(self.json_out, self.quiet)


GROUPS = (ModelLoading, Sampling, Conditioning, EditTarget, Inversion, Outputs)


def _given(param: str) -> bool:
    """Whether the running command's ``param`` came from the command line or the environment (not its default)."""
    import importlib

    package = typer.BadParameter.__module__.rsplit(".", 1)[0]  # click, or the click Typer vendors
    ctx = importlib.import_module(package + ".globals").get_current_context(silent=True)
    if ctx is None:
        return True
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
