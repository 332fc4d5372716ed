"""Command-line options shared by several commands, declared once: same flag, same name, same default.

Only typer and the standard library are imported here, so ``ddimctl --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model: a built-in name (mnist, mnist-flow), a diffusers-layout directory, a .safetensors file, "
        "or a Hub repo owner/name[@revision].",
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
        help="Timestep spacing: leading, trailing, linspace, quad, logsnr. Default: the checkpoint's "
        "(logsnr for every sampler but ddim and bdia on DDPM models; logsnr on DDPM models when inverting; a latent "
        "file's own when decoding one).",
        show_default=False,
    ),
]
SamplerOpt = Annotated[
    str,
    typer.Option("--sampler", help="Sampler: ddim; bdia (exactly invertible, latent = the pair x_T, x_T-1); or "
                 "deterministic multistep: dpm++2m, dpm++3m, unipc (DPM-Solver++ 2M with the UniC corrector), ipndm "
                 "(4th-order Adams-Bashforth)."),
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
    str, typer.Option("--inversion", help="exact: solve each inverse step (fixed point); plain: classic DDIM inversion.")
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
        "processes (on the same kind of device): each image gets its own model call. Costs speed, see README.",
    ),
]


DEFAULT_STEPS = 50
DEFAULT_BATCH_SIZE = 16

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
    float,
    typer.Option(
        "--guidance-scale",
        min=0.0,
        help="Classifier-free guidance weight w (class-conditional models with a null class): "
        "uncond + w (cond - uncond); 1 is no guidance.",
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
