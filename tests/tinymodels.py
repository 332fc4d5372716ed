"""The tests' tiny models and the helpers of their comparisons with diffusers, in one place.

- Tiny UNet configs (UNet2DModel keys, ddimctl's and diffusers' alike): :data:`TINY_UNET` and the variants the
  tests build from it, each difference written where it is made (``{**TINY_UNET, "num_class_embeds": 4}``);
  :data:`UNET_32_64`, the base of the layer-by-layer comparisons of ``ddimctl.nets.unet2d`` with diffusers.
- Tiny autoencoder configs (:data:`AE_BLOCKS`, :data:`VQ`, :data:`KL`) and random diffusers autoencoders (f = 2)
  for latent diffusion (:func:`tiny_vq`, :func:`tiny_kl`).
- :data:`TRAIN_TINY`: ``ddimctl train`` options that build a :data:`TINY_UNET`-sized network.
- Builders: :func:`make_tiny_model` saves a random tiny UNet as a checkpoint for CLI tests; :func:`randomize`.
- Comparisons: :func:`max_diff`, :func:`unet_out` (ours or diffusers' output), :func:`load_saved_unet` (ours from
  what diffusers' ``save_pretrained`` wrote), :func:`with_legacy_attention_keys` (a state dict as diffusers < 0.14
  named it).

The ``diffusers`` fixture (the module, or a skip where it is not installed) is in conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------------------
# UNet configs

# two levels, attention at the second (lower) one
TWO_LEVELS = {"down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}

# 1 x 8 x 8 images, 8 and 16 channels, one layer per block, diffusers' default time embedding
TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1,
    **TWO_LEVELS, "norm_num_groups": 4, "attention_head_dim": 8,
}
# google/ddpm-*'s time embedding (diffusers' defaults are freq_shift 0, flip_sin_to_cos True)
DDPM_TIME = {"freq_shift": 1, "flip_sin_to_cos": False}
# 3-channel images, 16 and 32 channels
TINY_UNET_RGB = {**TINY_UNET, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32], "norm_num_groups": 8}

# ddimctl.nets.unet2d against diffusers layer by layer: 32 and 64 channels, GroupNorm eps 1e-6 (test_unet.py and
# test_unet_variants.py set the size, depth and attention heads of their own bases)
UNET_32_64 = {"block_out_channels": [32, 64], "norm_num_groups": 8, "norm_eps": 1e-6, **TWO_LEVELS}


# ----------------------------------------------------------------------------------------------------------------
# `ddimctl train` options for a TINY_UNET-sized network (attention resolution, channels and optimiser: the tests')

TRAIN_TINY = ["--image-size", "8", "--base-channels", "8", "--channel-mult", "1,2", "--norm-groups", "4",
              "--batch-size", "8", "--threads", "1", "--quiet"]
# one thread: tiny convolutions gain nothing from more, and lose 10x when the cores are shared


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints for CLI tests


def make_tiny_model(out: Path, channels: int = 1, size: int = 8, seed: int = 0, scale: float = 0.2, **scheduler) -> Path:
    """Save a random tiny UNet (:data:`TINY_UNET` with :data:`DDPM_TIME`; weights scaled down, so its predictions
    are small and smooth) to ``out``."""
    from ddimctl.checkpoint import save
    from ddimctl.settings import SamplerSettings
    from ddimctl.nets.unet2d import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel.from_config(
        {**TINY_UNET, **DDPM_TIME, "in_channels": channels, "out_channels": channels, "sample_size": size})
    with torch.no_grad():
        model.conv_out.weight.mul_(scale)
    settings = SamplerSettings.from_config(scheduler)
    save(out, model, settings, {"objective": settings.prediction_type})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Autoencoders

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


# ----------------------------------------------------------------------------------------------------------------
# Comparisons


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, computed in float64."""
    return (a.double() - b.double()).abs().max().item()


def unet_out(model, x: torch.Tensor, t, **kwargs) -> torch.Tensor:
    """The output of a UNet, ours (a tensor) or diffusers' (``.sample``), without autograd."""
    with torch.no_grad():
        out = model(x, t, **kwargs)
    return out.sample if hasattr(out, "sample") else out


def load_saved_unet(folder: Path):
    """Our UNet2DModel built from the config.json that ``save_pretrained`` wrote to ``folder`` and loaded (strict)
    from its safetensors weights, in eval mode; returns (model, the saved state dict)."""
    import json

    from safetensors.torch import load_file

    from ddimctl.nets.unet2d import UNet2DModel

    ours = UNet2DModel.from_config(json.loads((folder / "config.json").read_text())).eval()
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    ours.load_state_dict(state, strict=True)
    return ours, state


def with_legacy_attention_keys(state: dict) -> dict:
    """``state`` (in its order) with the attention weights named as diffusers before 0.14 named them (query, key,
    value, proj_attn; the 2022 Hub uploads have these names)."""
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    return legacy
