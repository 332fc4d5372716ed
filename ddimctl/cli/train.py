"""``ddimctl train``: the command-line skin over :mod:`ddimctl.train`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .app import command
from .options import AutoencoderScaleOpt, BatchSizeOpt, DeviceOpt, OverwriteOpt, QuietOpt, SeedOpt, VariantOpt
from .output import Progress

if TYPE_CHECKING:
    from ..train import TrainConfig


@command
def train(
    data: Annotated[str, typer.Argument(help="A folder of images (recursive), or a built-in dataset: mnist, digits.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (checkpoint/, state, metrics.jsonl, samples/).")],
    image_size: Annotated[int, typer.Option("--image-size", help="Training resolution in pixels (MNIST's 28x28 is padded to 32).")] = 32,
    channels: Annotated[int, typer.Option("--channels", help="Image channels: 1 (grayscale) or 3 (RGB).")] = 1,
    base_channels: Annotated[int, typer.Option("--base-channels", help="UNet channels at full resolution.")] = 32,
    channel_mult: Annotated[str, typer.Option("--channel-mult", help="Channel multiplier per resolution level.")] = "1,2,2",
    layers_per_block: Annotated[int, typer.Option("--layers-per-block", help="ResNet layers per UNet block.")] = 1,
    attention_resolutions: Annotated[str, typer.Option("--attention-resolutions", help="Resolutions with self-attention, e.g. 8 or 16,8.")] = "8",
    norm_num_groups: Annotated[int, typer.Option("--norm-groups", help="GroupNorm groups.")] = 8,
    objective: Annotated[str, typer.Option("--objective", help="epsilon, v_prediction, sample, or flow (rectified flow).")] = "epsilon",
    beta_schedule: Annotated[str, typer.Option("--beta-schedule", help="linear, scaled_linear or squaredcos_cap_v2 (DDPM objectives).")] = "linear",
    train_steps: Annotated[int, typer.Option("--train-steps", help="Optimisation steps in all.")] = 10_000,
    batch_size: BatchSizeOpt = 64,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 2e-4,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear learning-rate warm-up.")] = 200,
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="After warm-up: constant, or cosine (decays to 0 at --train-steps).")] = "constant",
    class_conditional: Annotated[bool, typer.Option("--class-conditional", help="Learn p(x | class): labels from the built-in datasets, or one subfolder per class in an image folder; the model gets a null class too (see --label-dropout).")] = False,
    label_dropout: Annotated[float, typer.Option("--label-dropout", help="Class-conditional: share of examples shown the null class, which classifier-free guidance needs.")] = 0.1,
    init: Annotated[str | None, typer.Option("--init", help="Start from this checkpoint's weights (built-in name, path or Hub id; same UNet and objective); the optimizer starts fresh.")] = None,
    autoencoder: Annotated[str | None, typer.Option("--autoencoder", help="Latent diffusion: learn the latents of this frozen autoencoder (VQModel or AutoencoderKL: a folder, a pipeline's vqvae/ or vae/, a .safetensors file or a Hub repo); the UNet's channels and size follow from it, and checkpoint/ is a pipeline with both.", show_default=False)] = None,
    autoencoder_scaling_factor: AutoencoderScaleOpt = None,
    variant: VariantOpt = None,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="EMA decay of the saved weights.")] = 0.999,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Gradient-norm clip (0: off).")] = 1.0,
    seed: SeedOpt = 0,
    hflip: Annotated[bool, typer.Option("--hflip", help="Random horizontal flips (not for digits).")] = False,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Checkpoint and state every N steps.")] = 1000,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Read the losses back from the device and append them to metrics.jsonl every N steps (one row per step; also at every save).")] = 10,
    sample_every: Annotated[int, typer.Option("--sample-every", min=0, help="Preview grid every N steps (0: never).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    device: DeviceOpt = "auto",
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no, bf16 or fp16 (CUDA only).")] = "no",
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU threads for torch (0: torch's default).")] = 0,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model on a folder of images or a built-in dataset (mnist, digits)."""
    import torch

    from ..train import TrainConfig, parse_ints

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _train(data, out, device, resume, overwrite, quiet, TrainConfig(
            data=data, image_size=image_size, channels=channels, base_channels=base_channels,
            channel_mult=parse_ints(channel_mult, "channel_mult"),
            layers_per_block=layers_per_block,
            attention_resolutions=parse_ints(attention_resolutions, "attention_resolutions"),
            norm_num_groups=norm_num_groups, objective=objective, beta_schedule=beta_schedule, train_steps=train_steps,
            batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay, grad_clip=grad_clip,
            seed=seed, hflip=hflip, save_every=save_every, sample_every=sample_every, log_every=log_every,
            mixed_precision=mixed_precision,
            lr_schedule=lr_schedule, init=init, class_conditional=class_conditional, label_dropout=label_dropout,
            autoencoder=autoencoder, autoencoder_scaling_factor=autoencoder_scaling_factor, variant=variant,
        ))
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests, notebooks) keep their setting


def _train(data: str, out: Path, device: str, resume: bool, overwrite: bool, quiet: bool, cfg: "TrainConfig") -> None:
    """Load the data, run :func:`ddimctl.train.train` with a progress bar, report the checkpoint."""
    from ..data import load_training_data
    from ..devices import rank_world, resolve_device
    from ..train import load_frozen_autoencoder
    from ..train import train as run

    cfg.validate()
    dev = resolve_device(device)
    say = (lambda m: None) if quiet else (lambda m: sys.stderr.write(m + "\n"))
    ae = load_frozen_autoencoder(cfg, dev) if cfg.autoencoder else None  # refusals before the data is read
    loaded = load_training_data(data, cfg.image_size, cfg.channels, labelled=cfg.class_conditional)
    images, skipped, described = loaded.images, loaded.skipped, loaded.description
    if images.shape[1] != cfg.channels:
        images = images[:, : cfg.channels]
    if cfg.class_conditional:
        cfg.num_classes = len(loaded.class_names)
    say(f"training on {len(images)} images ({described}){f', {skipped} unreadable files skipped' if skipped else ''}")
    if ae is not None:
        for line in ae.notes:
            say(line)
        c, s = cfg.sample_channels, cfg.sample_size
        say(f"in the latent space of the {ae.resolved.class_name} {cfg.autoencoder}: {c}x{s}x{s} latents, scaling "
            f"factor {ae.resolved.scaling_factor:g} (each image encoded once)")
    rank = rank_world()[0]
    bar = Progress("training", cfg.train_steps, enabled=rank == 0 and not quiet and sys.stderr.isatty(),
                   columns="loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} it/s", loss=float("nan"), rate=0.0)
    with bar:
        def on_step(info):
            bar.update(completed=info["step"], loss=info["loss"], rate=info["step"] / max(info["elapsed"], 1e-9))

        state = run(cfg, out, dev, resume=resume, overwrite=overwrite, data=images, on_step=on_step,
                    labels=loaded.labels, class_names=loaded.class_names, autoencoder=ae)
    if rank == 0:
        sys.stdout.write(f"{out / 'checkpoint'}\n")
        say(f"step {state.step}: checkpoint {out / 'checkpoint'} (sample with: ddimctl sample --model {out / 'checkpoint'})")
