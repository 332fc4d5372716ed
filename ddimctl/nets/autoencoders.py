"""Self-contained torch ports of diffusers' ``AutoencoderKL`` and ``VQModel``, the first stages of latent diffusion.

The module trees (hence every ``state_dict`` key and shape) and the forward numerics follow diffusers
(``diffusers/models/autoencoders/autoencoder_kl.py``, ``vq_model.py`` and ``vae.py``'s ``Encoder``, ``Decoder``,
``VectorQuantizer``), so a diffusers ``diffusion_pytorch_model.safetensors`` loads here with ``strict=True`` and
gives the same numbers, without importing diffusers. Only what latent-diffusion checkpoints use is built:
``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks, a ``UNetMidBlock2D`` with or without its one attention layer,
group normalisation. Anything else in a config is refused with a one-line :class:`ConfigError`.

Both classes share one small interface, the one a latent pipeline needs (images in [-1, 1], ``f`` the
``downscale_factor``):

    vae = autoencoder_from_config(json.loads(Path("vae/config.json").read_text()), "vae/config.json")
    vae.load_state_dict(safetensors.torch.load_file("vae/diffusion_pytorch_model.safetensors"))
    latents = vae.encode(images)    # (B, 3, H, W) -> (B, C_lat, H/f, W/f), scaled for the diffusion model
    images = vae.decode(latents)    # back to (B, 3, H, W), roughly in [-1, 1] (not clamped)

Scaling is the pipelines' convention, applied here so that callers cannot forget it: ``encode`` returns
``(z - shift_factor) * scaling_factor`` and ``decode`` first computes ``latents / scaling_factor + shift_factor``
(``latents_mean``/``latents_std``, where a config has them, as diffusers' SDXL pipelines use them). ``encode_raw`` and
``decode_raw`` are the unscaled maps, diffusers' ``vae.encode(x).latent_dist.mode()`` / ``vqvae.encode(x).latents``
and ``vae.decode(z).sample``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .layers import (
    Attention, Downsample2D, Upsample2D, act, activation, check_block_layout, complete_config, fmt, in_place_ok, is_int, is_number, shortcut,
)

__all__ = [
    "AutoencoderKL",
    "VQModel",
    "VectorQuantizer",
    "KL_DEFAULT_CONFIG",
    "VQ_DEFAULT_CONFIG",
    "normalize_kl_config",
    "normalize_vq_config",
    "autoencoder_from_config",
]

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
NORM_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code resnet_eps=1e-6 (GroupNorms and attention alike)
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar to this range

# diffusers' ``AutoencoderKL.__init__`` defaults, in its argument order (the order config.json is written in).
KL_DEFAULT_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

# diffusers' ``VQModel.__init__`` defaults, in its argument order.
VQ_DEFAULT_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 32,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "scaling_factor": 0.18215,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
    "force_upcast": False,
}

# Keys of the taming-transformers / CompVis VectorQuantizer that diffusers' VQModel hard-codes (remap=None,
# sane_index_shape=False) and does not take from a config. Accepted at those values, refused otherwise.
_VQ_FIXED_KEYS = {"remap": None, "sane_index_shape": False}

# Autoencoder classes of diffusers that are not built here, with what they are (for the refusal message).
_OTHER_AUTOENCODERS = {
    "AutoencoderTiny": "TAESD, a different architecture",
    "AsymmetricAutoencoderKL": "masked asymmetric decoder",
    "ConsistencyDecoderVAE": "a diffusion decoder",
    "AutoencoderDC": "DC-AE, a different architecture",
    "AutoencoderKLTemporalDecoder": "video decoder",
}


# --------------------------------------------------------------------------------------------------------------
# config validation


def _normalize(
    config: Mapping[str, Any], source: str, class_name: str, defaults: Mapping[str, Any], fixed: Mapping[str, Any]
) -> dict[str, Any]:
    """Shared part of the two ``normalize_*_config``: known keys, defaults filled in, the common fields checked."""
    out, fail = complete_config(config, source, class_name, defaults, fixed)

    check_block_layout(out, fail, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES)

    channels = out["block_out_channels"]
    for key in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
        if not is_int(out[key]) or out[key] < 1:
            raise fail(f"{key} must be a positive integer, got {fmt(out[key])}")
    groups = out["norm_num_groups"]
    for c in channels:
        if c % groups:
            raise fail(f"block_out_channels entry {c} is not divisible by norm_num_groups {groups}")
    for key in ("mid_block_add_attention", "force_upcast"):
        if not isinstance(out[key], bool):
            raise fail(f"{key} must be true or false, got {fmt(out[key])}")
    sf = out["scaling_factor"]
    if not is_number(sf) or sf <= 0:
        raise fail(f"scaling_factor must be a positive number, got {fmt(sf)}")
    size = out["sample_size"]  # only diffusers' tiling reads it; checked for form, otherwise unused here
    if size is not None:
        sizes = [size] if is_int(size) else size
        if not isinstance(sizes, list) or len(sizes) not in (1, 2) or not all(is_int(s) and s > 0 for s in sizes):
            raise fail(f"sample_size must be a positive integer, a [height, width] pair or null, got {fmt(size)}")
    return out


def normalize_kl_config(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Validate a diffusers ``AutoencoderKL`` config; return it complete, with diffusers' defaults filled in.

    Keys starting with ``_`` are dropped; the result starts with ``"_class_name": "AutoencoderKL"`` and then every
    ``AutoencoderKL`` argument. Anything this implementation cannot reproduce raises :class:`ConfigError` with a
    one-line message ``"{source}: ..."`` naming the key and the value.
    """
    out = _normalize(config, source, "AutoencoderKL", KL_DEFAULT_CONFIG, {})

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{source}: {message}")

    for key in ("use_quant_conv", "use_post_quant_conv"):
        if not isinstance(out[key], bool):
            raise fail(f"{key} must be true or false, got {fmt(out[key])}")
    shift = out["shift_factor"]
    if shift is not None and not is_number(shift):
        raise fail(f"shift_factor must be a number or null, got {fmt(shift)}")
    mean, std = out["latents_mean"], out["latents_std"]
    if (mean is None) != (std is None):
        # diffusers' SDXL pipelines would silently ignore a lone one of the two
        raise fail(f"latents_mean {fmt(mean)} and latents_std {fmt(std)} must be given together or both null")
    if mean is not None:
        n = out["latent_channels"]
        for key, positive in (("latents_mean", False), ("latents_std", True)):
            value = out[key]
            if isinstance(value, tuple):
                value = out[key] = list(value)
            if (
                not isinstance(value, list)
                or len(value) != n
                or not all(is_number(v) and (v > 0 or not positive) for v in value)
            ):
                what = "positive numbers" if positive else "numbers"
                raise fail(f"{key} must be a list of {n} {what} (one per latent channel), got {fmt(value)}")
        if shift is not None:
            raise fail(
                f"shift_factor {fmt(shift)} together with latents_mean/latents_std is ambiguous "
                "(no diffusers pipeline uses both)"
            )
    return out


def normalize_vq_config(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Validate a diffusers ``VQModel`` config; return it complete, with diffusers' defaults filled in.

    As :func:`normalize_kl_config`. ``norm_type: "spatial"`` (MoVQ, Kandinsky's decoder) is refused; ``remap`` and
    ``sane_index_shape`` (taming-transformers keys diffusers hard-codes) are accepted only at ``null`` / ``false``.
    """
    out = _normalize(config, source, "VQModel", VQ_DEFAULT_CONFIG, _VQ_FIXED_KEYS)

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{source}: {message}")

    if out["norm_type"] != "group":
        raise fail(
            f"unsupported norm_type {fmt(out['norm_type'])} (supported: group; \"spatial\" is MoVQ's "
            "spatially conditioned decoder)"
        )
    if not is_int(out["num_vq_embeddings"]) or out["num_vq_embeddings"] < 1:
        raise fail(f"num_vq_embeddings must be a positive integer, got {fmt(out['num_vq_embeddings'])}")
    dim = out["vq_embed_dim"]
    if dim is not None and (not is_int(dim) or dim < 1):
        raise fail(f"vq_embed_dim must be a positive integer or null, got {fmt(dim)}")
    if not isinstance(out["lookup_from_codebook"], bool):
        raise fail(f"lookup_from_codebook must be true or false, got {fmt(out['lookup_from_codebook'])}")
    return out


# --------------------------------------------------------------------------------------------------------------
# layers


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` built with ``temb_channels=None``: ``x + conv2(act(norm2(conv1(act(norm1(x))))))``
    with a 1x1 ``conv_shortcut`` on ``x`` when the channel count changes.

    ``ddimctl.nets.unet2d.ResnetBlock2D`` always has a ``time_emb_proj`` (a ``state_dict`` key the autoencoders lack),
    hence this class.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=NORM_EPS, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = nn.GroupNorm(num_groups=groups, num_channels=out_channels, eps=NORM_EPS, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = shortcut(in_channels, out_channels)

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        fresh = in_place_ok()  # norm and conv outputs below are new tensors nobody else holds
        hidden = self.conv1(act(self.nonlinearity, self.norm1(input_tensor), fresh))  # (B, C_out, H, W)
        hidden = self.conv2(self.dropout(act(self.nonlinearity, self.norm2(hidden), fresh)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)  # (B, C_out, H, W)
        return hidden.add_(input_tensor) if fresh else input_tensor + hidden  # a + b == b + a exactly


class _ResnetStack(nn.Module):
    """``num_layers`` resnets from ``in_channels`` to ``out_channels``, then an optional resampler (the subclass's)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
            for i in range(num_layers)
        )

    def _resnets(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        return hidden_states


class DownEncoderBlock2D(_ResnetStack):
    """``num_layers`` resnets, then (except in the last block) a stride-2 convolution padded right/bottom."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, groups: int, act_fn: str
    ):
        super().__init__(in_channels, out_channels, num_layers, groups, act_fn)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self._resnets(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)  # (B, C, H/2, W/2)
        return hidden_states


class UpDecoderBlock2D(_ResnetStack):
    """``num_layers`` resnets, then (except in the last block) nearest 2x upsampling and a 3x3 convolution."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool, groups: int, act_fn: str
    ):
        super().__init__(in_channels, out_channels, num_layers, groups, act_fn)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self._resnets(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)  # (B, C, 2H, 2W)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """resnet, (single-head attention,) resnet, at constant channels."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        # attentions registered before resnets, as diffusers does, so state_dict keys come in the same order
        self.attentions = nn.ModuleList([Attention(channels, channels, groups, NORM_EPS)]) if add_attention else None
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, groups, act_fn), ResnetBlock2D(channels, channels, groups, act_fn)]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        if self.attentions is not None:
            hidden_states = self.attentions[0](hidden_states)
        return self.resnets[1](hidden_states)


class Encoder(nn.Module):
    """diffusers' ``Encoder``: (B, in_channels, H, W) -> (B, out_channels [x2 if ``double_z``], H/f, W/f)."""

    def __init__(self, cfg: Mapping[str, Any], out_channels: int, double_z: bool):
        super().__init__()
        channels, groups, act_fn = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["act_fn"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], kernel_size=3, stride=1, padding=1)
        self.down_blocks = nn.ModuleList()
        output_channel = channels[0]
        for i in range(len(channels)):
            input_channel, output_channel = output_channel, channels[i]
            self.down_blocks.append(
                DownEncoderBlock2D(
                    input_channel, output_channel, cfg["layers_per_block"], i < len(channels) - 1, groups, act_fn
                )
            )
        self.mid_block = UNetMidBlock2D(channels[-1], groups, act_fn, cfg["mid_block_add_attention"])
        self.conv_norm_out = nn.GroupNorm(num_channels=channels[-1], num_groups=groups, eps=NORM_EPS)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn is, as in diffusers
        self.conv_out = nn.Conv2d(channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)  # (B, C0, H, W)
        for down_block in self.down_blocks:
            sample = down_block(sample)
        sample = self.mid_block(sample)  # (B, C_last, H/f, W/f)
        return self.conv_out(act(self.conv_act, self.conv_norm_out(sample), in_place_ok()))


class Decoder(nn.Module):
    """diffusers' ``Decoder`` (``norm_type="group"``): (B, in_channels, h, w) -> (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: Mapping[str, Any], in_channels: int):
        super().__init__()
        channels, groups, act_fn = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["act_fn"]
        self.conv_in = nn.Conv2d(in_channels, channels[-1], kernel_size=3, stride=1, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block, as in diffusers (state_dict key order)
        self.mid_block = UNetMidBlock2D(channels[-1], groups, act_fn, cfg["mid_block_add_attention"])
        reversed_channels = list(reversed(channels))
        output_channel = reversed_channels[0]
        for i in range(len(channels)):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.up_blocks.append(
                UpDecoderBlock2D(
                    prev_output_channel,
                    output_channel,
                    cfg["layers_per_block"] + 1,
                    i < len(channels) - 1,
                    groups,
                    act_fn,
                )
            )
        self.conv_norm_out = nn.GroupNorm(num_channels=channels[0], num_groups=groups, eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)  # (B, C_last, h, w)
        sample = self.mid_block(sample)
        for up_block in self.up_blocks:
            sample = up_block(sample)  # (B, C_i, ..., ...) doubling the size in all but the last block
        return self.conv_out(act(self.conv_act, self.conv_norm_out(sample), in_place_ok()))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry by L2 distance, computed as diffusers does (``torch.cdist`` then ``argmin``).

    Only inference is built: ``beta``/``legacy`` (which weigh the commitment loss) change nothing here.
    """

    def __init__(self, n_e: int, vq_embed_dim: int):
        super().__init__()
        self.n_e = n_e
        self.vq_embed_dim = vq_embed_dim
        self.embedding = nn.Embedding(n_e, vq_embed_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` (B, D, h, w) -> (``z_q`` (B, D, h, w), ``indices`` (B, h, w) long).

        ``z_q`` is diffusers' straight-through value ``z + (e - z)``: in floating point it can differ from the
        codebook entry ``e`` in the last bits, and it is what diffusers' decoder receives, so it is kept.
        (diffusers returns the indices flat, ``(B*h*w,)``.)
        """
        batch, _, height, width = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D)
        z_flattened = z.view(-1, self.vq_embed_dim)  # (B*h*w, D)
        indices = torch.argmin(torch.cdist(z_flattened, self.embedding.weight), dim=1)  # (B*h*w,)
        z_q = self.embedding(indices).view(z.shape)  # (B, h, w, D)
        z_q = z + (z_q - z)
        return z_q.permute(0, 3, 1, 2).contiguous(), indices.view(batch, height, width)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` (B, h, w) -> the codebook entries (B, D, h, w), as diffusers' ``get_codebook_entry``."""
        batch, height, width = indices.shape
        z_q = self.embedding(indices.reshape(-1)).view(batch, height, width, self.vq_embed_dim)
        return z_q.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# the models


class _Autoencoder(nn.Module):
    """What both autoencoders share: construction from a config, shapes, and the scaled ``encode``/``decode``."""

    _normalize = staticmethod(normalize_kl_config)  # each subclass sets its own

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        merged = config if config is not None else {}
        if kwargs:
            merged = {**merged, **kwargs}
        self.config: dict[str, Any] = type(self)._normalize(merged)
        # image side / latent side
        self.downscale_factor: int = 2 ** (len(self.config["block_out_channels"]) - 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> _Autoencoder:
        """Validate ``config`` (errors name ``source``) and build the model with freshly initialised weights."""
        return cls(cls._normalize(config, source))

    # the latent the diffusion model sees -----------------------------------------------------------------

    @property
    def _latent_channels(self) -> int:
        raise NotImplementedError

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """``(C_lat, H/f, W/f)`` of ``encode``'s output per image, from an image shape ending in ``(H, W)``.

        ``image_shape`` may be ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``; H and W must be multiples of
        ``downscale_factor``.
        """
        if len(image_shape) < 2 or len(image_shape) > 4:
            raise ValueError(f"image_shape must end in (H, W), got {tuple(image_shape)}")
        height, width = int(image_shape[-2]), int(image_shape[-1])
        f = self.downscale_factor
        if height < 1 or width < 1 or height % f or width % f:
            raise ValueError(f"image height and width must be positive multiples of {f}, got {height}x{width}")
        return (self._latent_channels, height // f, width // f)

    def _check_images(self, x: torch.Tensor) -> None:
        f = self.downscale_factor
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"] or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"images must be (B, {self.config['in_channels']}, H, W) with H and W multiples of {f}, "
                f"got shape {tuple(x.shape)}"
            )

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self._latent_channels:
            raise ValueError(f"latents must be (B, {self._latent_channels}, h, w), got shape {tuple(z.shape)}")

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent ``z`` -> the diffusion model's latent, ``(z - shift_factor) * scaling_factor``."""
        raise NotImplementedError

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latent -> unscaled ``z``, ``latents / scaling_factor + shift_factor``."""
        raise NotImplementedError

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the unscaled latent (see the subclasses)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the latents the diffusion model works on, (B, C_lat, H/f, W/f):
        ``scale_latents(encode_raw(x))``."""
        return self.scale_latents(self.encode_raw(x))


class AutoencoderKL(_Autoencoder):
    """diffusers' ``AutoencoderKL`` (the Stable Diffusion VAE family): encoder -> quant_conv -> (mean, logvar);
    post_quant_conv -> decoder.

    Config keys and defaults are diffusers' (:data:`KL_DEFAULT_CONFIG`). ``force_upcast`` is accepted and means
    nothing here: in diffusers it tells fp16 pipelines to run the VAE in float32; this model runs in whatever dtype
    it and its input are given. ``sample_size`` only sizes diffusers' tiling, which is not built.
    """

    _normalize = staticmethod(normalize_kl_config)

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        n = cfg["latent_channels"]
        self.encoder = Encoder(cfg, n, double_z=True)
        self.decoder = Decoder(cfg, n)
        self.quant_conv = nn.Conv2d(2 * n, 2 * n, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(n, n, 1) if cfg["use_post_quant_conv"] else None

    @property
    def _latent_channels(self) -> int:
        return self.config["latent_channels"]

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> the posterior's ``(mean, logvar)``, each (B, latent_channels, H/f, W/f).

        ``logvar`` is clamped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution`` does; ``mean`` is its
        ``mode()``. Unscaled.
        """
        self._check_images(x)
        moments = self.encoder(x)  # (B, 2 * latent_channels, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, *LOGVAR_RANGE)

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the posterior mean (its mode), unscaled: diffusers'
        ``vae.encode(x).latent_dist.mode()``. Deterministic, so that an inversion starts from a fixed point."""
        return self.encode_moments(x)[0]

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f), roughly in [-1, 1],
        not clamped: diffusers' ``vae.decode(z).sample``."""
        self._check_latents(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config["latents_mean"] is None:
            return None
        # as diffusers' SDXL pipelines build them: a float32 tensor cast to the latents' dtype
        n = self.config["latent_channels"]
        mean = torch.tensor(self.config["latents_mean"]).view(1, n, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(self.config["latents_std"]).view(1, n, 1, 1).to(like.device, like.dtype)
        return mean, std

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - shift_factor) * scaling_factor`` (``shift_factor`` null: ``z * scaling_factor``), or with
        ``latents_mean``/``latents_std`` ``(z - mean) * scaling_factor / std`` per channel, the expressions
        diffusers' img2img pipelines use (Flux, SD, SDXL)."""
        sf, shift = self.config["scaling_factor"], self.config["shift_factor"]
        stats = self._mean_std(z)
        if stats is not None:
            return (z - stats[0]) * sf / stats[1]
        return z * sf if shift is None else (z - shift) * sf

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents / scaling_factor + shift_factor`` (or ``latents * std / scaling_factor + mean``), the
        expressions diffusers' pipelines use before ``vae.decode``."""
        sf, shift = self.config["scaling_factor"], self.config["shift_factor"]
        stats = self._mean_std(latents)
        if stats is not None:
            return latents * stats[1] / sf + stats[0]
        return latents / sf if shift is None else latents / sf + shift

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f),
        roughly in [-1, 1], not clamped: ``decode_raw(unscale_latents(latents))``."""
        self._check_latents(latents)
        return self.decode_raw(self.unscale_latents(latents))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean, as diffusers' ``AutoencoderKL(x).sample``."""
        return self.decode_raw(self.encode_raw(x))


class VQModel(_Autoencoder):
    """diffusers' ``VQModel`` (the LDM VQ-f4/f8 first stages): encoder -> quant_conv gives the pre-quantisation
    latent ``h``; decoding quantises ``h`` to its nearest codebook entries, then post_quant_conv -> decoder.

    Config keys and defaults are diffusers' (:data:`VQ_DEFAULT_CONFIG`). ``force_upcast`` and ``sample_size`` are
    accepted and mean nothing here (diffusers' fp16 upcasting and tiling). ``lookup_from_codebook: true`` only
    changes ``decode_raw(..., force_not_quantize=True)``, as in diffusers (see there).
    """

    _normalize = staticmethod(normalize_vq_config)

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        cfg = self.config
        n = cfg["latent_channels"]
        dim = cfg["vq_embed_dim"] if cfg["vq_embed_dim"] is not None else n
        self.encoder = Encoder(cfg, n, double_z=False)
        self.quant_conv = nn.Conv2d(n, dim, 1)
        self.quantize = VectorQuantizer(cfg["num_vq_embeddings"], dim)
        self.post_quant_conv = nn.Conv2d(dim, n, 1)
        self.decoder = Decoder(cfg, n)

    @property
    def _latent_channels(self) -> int:
        return self.quantize.vq_embed_dim

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the pre-quantisation latent ``h`` (B, vq_embed_dim, H/f, W/f),
        unscaled: diffusers' ``vqvae.encode(x).latents``.

        Not quantised: quantising is many-to-one, so an inversion or an interpolation that started from a codebook
        entry would lose the continuous information the decoder's quantiser does not need anyway. LDM's own
        ``VQModelInterface.encode`` and diffusers' ``VQModel.encode`` return ``h`` too; both quantise at decode.
        """
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    def quantize_latents(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled ``h`` (B, D, h, w) -> (quantised latent (B, D, h, w), codebook indices (B, h, w))."""
        self._check_latents(h)
        return self.quantize(h)

    def decode_raw(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Unscaled latents (B, vq_embed_dim, h, w) -> images (B, out_channels, h*f, w*f), roughly in [-1, 1],
        not clamped: diffusers' ``vqvae.decode(h, force_not_quantize).sample``.

        ``h`` is quantised to the nearest codebook entries first unless ``force_not_quantize``. With
        ``lookup_from_codebook: true`` diffusers reads ``h`` passed with ``force_not_quantize=True`` as codebook
        *indices*; that is :meth:`decode_indices` here, and that combination raises ``ValueError``.
        """
        self._check_latents(h)
        if not force_not_quantize:
            quant, _ = self.quantize(h)
        elif self.config["lookup_from_codebook"]:
            raise ValueError(
                "this VQModel has lookup_from_codebook: true, where force_not_quantize=True means the input holds "
                "codebook indices: use decode_indices(indices)"
            )
        else:
            quant = h
        return self.decoder(self.post_quant_conv(quant))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, h, w) long -> images (B, out_channels, h*f, w*f): the entries' decoding, as
        diffusers' ``decode(indices, force_not_quantize=True, shape=(B, h, w, D))`` with ``lookup_from_codebook``."""
        if indices.ndim != 3 or indices.is_floating_point():
            raise ValueError(f"indices must be an integer tensor (B, h, w), got {indices.dtype} {tuple(indices.shape)}")
        return self.decoder(self.post_quant_conv(self.quantize.get_codebook_entry(indices)))

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``z * scaling_factor`` (a VQModel has no shift)."""
        return z * self.config["scaling_factor"]

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents / scaling_factor``, as diffusers' ``LDMPipeline`` divides before ``vqvae.decode``."""
        return latents / self.config["scaling_factor"]

    def decode(self, latents: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """The diffusion model's latents (B, vq_embed_dim, h, w) -> images (B, out_channels, h*f, w*f), roughly
        in [-1, 1], not clamped: ``decode_raw(unscale_latents(latents), force_not_quantize)``, what
        ``LDMPipeline`` does (it quantises: ``force_not_quantize=False``)."""
        self._check_latents(latents)
        return self.decode_raw(self.unscale_latents(latents), force_not_quantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (quantised), as diffusers' ``VQModel(x).sample``."""
        return self.decode_raw(self.encode_raw(x))


_CLASSES: dict[str, type[_Autoencoder]] = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}


def autoencoder_from_config(config: Mapping[str, Any], source: str = "config.json") -> AutoencoderKL | VQModel:
    """Build the autoencoder a diffusers config names in ``_class_name`` (``AutoencoderKL`` or ``VQModel``), with
    freshly initialised weights; anything else raises a one-line :class:`ConfigError` naming ``source``."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
    name = config.get("_class_name")
    supported = ", ".join(_CLASSES)
    if name is None:
        raise ConfigError(f"{source}: no _class_name, cannot tell which autoencoder this is (supported: {supported})")
    if name not in _CLASSES:
        what = _OTHER_AUTOENCODERS.get(name) if isinstance(name, str) else None
        detail = f"{what}; " if what else ""
        raise ConfigError(f"{source}: unsupported autoencoder class {fmt(name)} ({detail}supported: {supported})")
    return _CLASSES[name].from_config(config, source)
