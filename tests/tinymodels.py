"""Tiny real checkpoints for CLI tests: random-weight UNets saved in ddimctl's (diffusers') layout."""

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
    from ddimctl.unet import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel.from_config({**TINY_UNET, "in_channels": channels, "out_channels": channels, "sample_size": size})
    with torch.no_grad():
        model.conv_out.weight.mul_(scale)
    settings = SamplerSettings.from_config(scheduler)
    save(out, model, settings, {"objective": settings.prediction_type})
    return out
