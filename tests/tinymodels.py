"""Tiny real checkpoints for CLI tests: random-weight UNets saved in ddimctl's (diffusers') layout, and tiny
diffusers autoencoders (f = 2) for latent diffusion."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": 8,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
}


def make_tiny_model(out: Path, channels: int = 1, size: int = 8, seed: int = 0, scale: float = 0.2, **scheduler) -> Path:
    """Save a random tiny UNet (weights scaled down, so its predictions are small and smooth) to ``out``."""
    from ddimctl.checkpoint import save
    from ddimctl.settings import SamplerSettings
    from ddimctl.nets.unet2d import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel.from_config({**TINY_UNET, "in_channels": channels, "out_channels": channels, "sample_size": size})
    with torch.no_grad():
        model.conv_out.weight.mul_(scale)
    settings = SamplerSettings.from_config(scheduler)
    save(out, model, settings, {"objective": settings.prediction_type})
    return out


AE_BLOCKS = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 8,
}
VQ = {**AE_BLOCKS, "latent_channels": 3, "num_vq_embeddings": 64}  # 3-channel images -> 3 x H/2 x W/2 latents
KL = {**AE_BLOCKS, "latent_channels": 4}  # 3-channel images -> 4 x H/2 x W/2 latents


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn N(0, 0.2^2) from ``seed`` (diffusers zero-initialises some layers); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_vq(diffusers, seed: int = 1, **overrides):
    """A random diffusers ``VQModel`` (config :data:`VQ` with ``overrides``)."""
    return randomize(diffusers.VQModel(**{**VQ, **overrides}), seed)


def tiny_kl(diffusers, seed: int = 2, **overrides):
    """A random diffusers ``AutoencoderKL`` (config :data:`KL` with ``overrides``)."""
    return randomize(diffusers.AutoencoderKL(**{**KL, **overrides}), seed)
