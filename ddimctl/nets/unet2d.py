"""A self-contained torch port of diffusers' ``UNet2DModel``.

The module tree (hence every ``state_dict`` key and shape) and the forward numerics follow diffusers'
``UNet2DModel`` (``diffusers/models/unets/unet_2d.py`` and the blocks it builds), so a diffusers
``diffusion_pytorch_model.safetensors`` loads here with ``strict=True`` and gives the same output (within 1e-5
in float32), without importing diffusers. Built:

- blocks ``DownBlock2D``, ``AttnDownBlock2D``, ``ResnetDownsampleBlock2D`` / ``UpBlock2D``, ``AttnUpBlock2D``,
  ``ResnetUpsampleBlock2D``, an optional ``UNetMidBlock2D``; ``downsample_type`` / ``upsample_type`` ``"conv"``
  or ``"resnet"`` (resampling by a parameter-free pool / nearest upsample inside a ``ResnetBlock2D``);
- ``resnet_time_scale_shift`` ``"default"`` (time embedding added before ``norm2``) or ``"scale_shift"``
  (``norm2(h) * (1 + scale) + shift``; the mid-block attention then has no group norm unless
  ``attn_norm_num_groups`` is set, as in diffusers);
- ``time_embedding_type`` ``"positional"``, ``"fourier"`` (Gaussian Fourier features of log t; the output is
  divided by t, as diffusers does) or ``"learned"`` (a table of ``num_train_timesteps`` rows);
- class conditioning: ``num_class_embeds`` (a table), ``class_embed_type`` ``"timestep"`` or ``"identity"``,
  summed with the time embedding; ``forward(sample, timestep, class_labels)``;
- any ``out_channels`` (``2 * in_channels`` for learned-variance models: the caller splits the output).

Refused with a one-line :class:`ConfigError` naming the key and the value: any other block type
(``SkipDownBlock2D``, ``AttnSkipDownBlock2D``, ``KDownBlock2D``, cross-attention blocks, ...),
``resnet_time_scale_shift`` ``"spatial"`` / ``"ada_group"`` (diffusers' UNet2DModel cannot build them either),
other ``class_embed_type`` values (which diffusers silently ignores), ``norm_num_groups: null`` (diffusers fails
on it), ``"learned"`` without ``num_train_timesteps``, and unknown keys.

A timestep shared by the batch (a number, a 0-d or a (1,) tensor) runs the time path once, on one row, and
broadcasts it; every matmul of that path is computed row by row, so the same value given as a (B,) tensor gives
a bit-identical output.

    model = UNet2DModel.from_config(json.loads(Path("config.json").read_text()))
    model.load_state_dict(safetensors.torch.load_file("diffusion_pytorch_model.safetensors"))
    eps = model(x_t, t)  # a plain tensor shaped like x_t (with out_channels channels)
    eps = model(x_t, t, class_labels=labels)  # when model.is_class_conditional
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    Attention, Downsample2D, Upsample2D, act, activation, check_block_layout, complete_config, fmt, in_place_ok, is_int, is_number, shortcut,
    upsample_nearest,
)

__all__ = [
    "UNet2DModel",
    "DEFAULT_CONFIG",
    "normalize_config",
    "count_parameters",
    "convert_legacy_attention_keys",
]

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", None)
TIME_EMBEDDING_TYPES = ("positional", "fourier", "learned")
RESNET_TIME_SCALE_SHIFTS = ("default", "scale_shift")
RESAMPLE_TYPES = ("conv", "resnet")  # downsample_type / upsample_type (they only change the Attn* blocks)
CLASS_EMBED_TYPES = (None, "timestep", "identity")

# diffusers' ``UNet2DModel.__init__`` defaults, in its argument order (the order config.json is written in).
DEFAULT_CONFIG: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}


# --------------------------------------------------------------------------------------------------------------
# config validation


def normalize_config(config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Validate a diffusers ``UNet2DModel`` config and return it complete, with diffusers' defaults filled in.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``, ...) are dropped; the
    result starts with ``"_class_name": "UNet2DModel"`` and then every ``UNet2DModel`` argument, lists as lists.
    Any key or value this implementation cannot reproduce raises :class:`ConfigError` with a one-line message
    ``"{source}: ..."`` naming the key and the value.
    """
    out, fail = complete_config(config, source, "UNet2DModel", DEFAULT_CONFIG)

    def choice(key: str, supported: tuple) -> None:
        value = out[key]
        if value not in supported or isinstance(value, bool):
            names = ", ".join(fmt(s) if s is None else str(s) for s in supported)
            raise fail(f"unsupported {key} {fmt(value)} (supported: {names})")

    def positive_int(key: str, *, nullable: bool = False) -> None:
        value = out[key]
        if value is None and nullable:
            return
        if not is_int(value) or value < 1:
            what = "a positive integer or null" if nullable else "a positive integer"
            raise fail(f"{key} must be {what}, got {fmt(value)}")

    def boolean(key: str) -> None:
        if not isinstance(out[key], bool):
            raise fail(f"{key} must be true or false, got {fmt(out[key])}")

    # refused features first: their names are the most useful thing to report
    choice("time_embedding_type", TIME_EMBEDDING_TYPES)
    choice("resnet_time_scale_shift", RESNET_TIME_SCALE_SHIFTS)
    choice("downsample_type", RESAMPLE_TYPES)
    choice("upsample_type", RESAMPLE_TYPES)
    choice("mid_block_type", MID_BLOCK_TYPES)
    # diffusers silently builds no class embedding for any other class_embed_type: refused rather than ignored
    choice("class_embed_type", CLASS_EMBED_TYPES)
    check_block_layout(out, fail, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES)

    # shapes and types
    channels = out["block_out_channels"]
    if out["norm_num_groups"] is None:
        # diffusers' UNet2DModel has a fallback for it (min(block_out_channels[0] // 4, 32)) only for conv_norm_out
        # and the mid block: its down/up blocks hand None to GroupNorm and fail, so no such checkpoint exists
        raise fail("unsupported norm_num_groups null (diffusers' UNet2DModel cannot build its resnets without it)")
    for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        positive_int(key)
    for key in ("time_embedding_dim", "attention_head_dim", "attn_norm_num_groups", "num_train_timesteps"):
        positive_int(key, nullable=True)
    positive_int("num_class_embeds", nullable=True)
    if out["time_embedding_type"] == "learned" and out["num_train_timesteps"] is None:
        raise fail("time_embedding_type 'learned' needs num_train_timesteps (the size of its table), got null")
    for key in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        boolean(key)
    if not is_int(out["downsample_padding"]) or out["downsample_padding"] < 0:
        raise fail(f"downsample_padding must be a non-negative integer, got {fmt(out['downsample_padding'])}")
    if not is_number(out["freq_shift"]):
        raise fail(f"freq_shift must be a number, got {fmt(out['freq_shift'])}")
    half_dim = channels[0] // 2
    if out["time_embedding_type"] == "positional" and half_dim - out["freq_shift"] == 0:
        raise fail(f"freq_shift {fmt(out['freq_shift'])} equals half of block_out_channels[0] (division by zero)")
    if not is_number(out["mid_block_scale_factor"]) or out["mid_block_scale_factor"] == 0:
        raise fail(f"mid_block_scale_factor must be a non-zero number, got {fmt(out['mid_block_scale_factor'])}")
    if not is_number(out["norm_eps"]) or out["norm_eps"] < 0:
        raise fail(f"norm_eps must be a non-negative number, got {fmt(out['norm_eps'])}")
    if not is_number(out["dropout"]) or not 0 <= out["dropout"] <= 1:
        raise fail(f"dropout must be a number in [0, 1], got {fmt(out['dropout'])}")

    groups = out["norm_num_groups"]
    for c in channels:
        if c % groups:
            raise fail(f"block_out_channels entry {c} is not divisible by norm_num_groups {groups}")
    has_mid_attention = out["mid_block_type"] is not None and out["add_attention"]
    attn_groups = out["attn_norm_num_groups"]  # null: norm_num_groups with "default", no norm with "scale_shift"
    if attn_groups is not None and has_mid_attention and channels[-1] % attn_groups:
        raise fail(
            f"block_out_channels entry {channels[-1]} (mid block) is not divisible by "
            f"attn_norm_num_groups {attn_groups}"
        )
    head_dim = out["attention_head_dim"]
    if head_dim is not None:
        attn_channels = [c for c, t in zip(channels, out["down_block_types"]) if t == "AttnDownBlock2D"]
        attn_channels += [c for c, t in zip(reversed(channels), out["up_block_types"]) if t == "AttnUpBlock2D"]
        attn_channels += [channels[-1]] if has_mid_attention else []
        if attn_channels and head_dim > min(attn_channels):
            raise fail(
                f"attention_head_dim {head_dim} is larger than the {min(attn_channels)} channels of an attention block"
            )

    size = out["sample_size"]
    if size is not None:
        sizes = [size] if is_int(size) else size
        if not isinstance(sizes, list) or len(sizes) not in (1, 2) or not all(is_int(s) and s > 0 for s in sizes):
            raise fail(f"sample_size must be a positive integer, a [height, width] pair or null, got {fmt(size)}")
        factor = 2 ** (len(channels) - 1)
        if any(s % factor for s in sizes):
            raise fail(
                f"sample_size {fmt(size)} is not a multiple of {factor} (2 ** (len(block_out_channels) - 1))"
            )
    return out


# --------------------------------------------------------------------------------------------------------------
# layers


def timestep_embedding(
    timesteps: torch.Tensor, embedding_dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float
) -> torch.Tensor:
    """diffusers' ``get_timestep_embedding`` (max_period 10000, scale 1): ``(N,)`` -> float32 ``(N, embedding_dim)``."""
    half_dim = embedding_dim // 2
    exponent = -math.log(10000) * torch.arange(start=0, end=half_dim, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].float() * emb[None, :]  # (N, half_dim)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)  # (N, 2 * half_dim)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))  # (N, embedding_dim)
    return emb


class Timesteps(nn.Module):
    """Sinusoidal projection of timesteps (no parameters); always returns float32."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)


def _linear_per_row(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for ``x`` (N, in) computed as N one-row products: (N, out).

    A plain (N, in) matmul picks its kernel and summation order by N, so on a CPU a row alone and the same row
    inside a batch of 4 come out different in the last bits. Here each row is its own (1, in) x (in, out) product
    of a batched matmul over a stride-0 view of the weight (no copy), so a row's result never depends on how
    many rows come with it: the time path of a (1,) timestep and of the same timestep repeated B times agree
    bit for bit. Used only on the time embedding path (a few rows of a few hundred features). Its rounding also
    depends on the weight's address modulo 16 bytes (not the input's): :func:`_align_time_path_weights` keeps
    those weights aligned when a state dict is adopted.

    When autograd records (training), the value is still the per-row one, but the gradient flows through a plain
    ``F.linear`` of the same map (added as ``ref - ref.detach()``, exactly zero): the batched matmul's own weight
    gradient would materialise an (N, in, out) tensor.
    """
    weight, bias = linear.weight, linear.bias
    record = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    rows = x.detach() if record else x
    weight_t = (weight.detach() if record else weight).t()  # (in, out)
    out = torch.bmm(rows[:, None, :], weight_t.expand(x.shape[0], -1, -1))[:, 0, :]  # (N, out)
    if bias is not None:
        out = out + (bias.detach() if record else bias)
    if record:
        reference = F.linear(x, weight, bias)
        out = out + (reference - reference.detach())
    return out


def _align_time_path_weights(model: nn.Module, incompatible_keys: Any = None) -> None:
    """Give every weight :func:`_linear_per_row` uses storage of its own at an aligned address.

    ``load_state_dict(..., assign=True)`` adopts the loaded tensors as they are, and safetensors hands them out
    at arbitrary offsets of one buffer; the CPU batched matmul rounds differently when its weight is not 16-byte
    aligned (measured here), so a checkpoint loaded that way would differ in the last bits from the model it was
    saved from. A fresh allocation is 64-byte aligned. Registered as a load_state_dict post-hook.
    """
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            linears = [module.time_emb_proj]
        elif isinstance(module, TimestepEmbedding):
            linears = [module.linear_1, module.linear_2]
        else:
            continue
        for linear in linears:
            weight = linear.weight
            if not weight.is_meta and weight.data_ptr() % 64:
                weight.data = weight.data.clone(memory_format=torch.contiguous_format)


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers always uses SiLU here, whatever ``act_fn`` says)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """(N, in_channels) -> (N, time_embed_dim), row by row (:func:`_linear_per_row`)."""
        return _linear_per_row(self.linear_2, self.act(_linear_per_row(self.linear_1, sample)))


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of ``log(t)`` (score-SDE noise levels), as diffusers' ``GaussianFourierProjection``
    built by ``UNet2DModel`` (``scale=16``, ``log=True``, ``flip_sin_to_cos=False``: the config's
    ``flip_sin_to_cos`` and ``freq_shift`` do not apply). Its fixed random frequencies are the ``weight``
    parameter (``time_proj.weight``, not trained). ``(N,)`` -> ``(N, 2 * embedding_size)``.
    """

    def __init__(self, embedding_size: int, scale: float = 16.0, log: bool = True, flip_sin_to_cos: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        x_proj = x[:, None] * self.weight[None, :] * 2 * math.pi  # (N, embedding_size), diffusers' operation order
        if self.flip_sin_to_cos:
            return torch.cat([torch.cos(x_proj), torch.sin(x_proj)], dim=-1)
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block conditioned on the time embedding, diffusers' ``ResnetBlock2D``.

    ``time_embedding_norm="default"`` adds the projected embedding before ``norm2``; ``"scale_shift"`` projects
    it to twice the channels and applies ``norm2(h) * (1 + scale) + shift``. ``down=True`` (``up=True``) halves
    (doubles) the resolution of both branches after ``norm1`` and the activation: 2x2 average pooling (nearest
    upsampling), no parameters, as the resampling resnets of ``Resnet{Down,Up}sampleBlock2D`` and the
    ``"resnet"`` down/upsample types do.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        act_fn: str,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
        time_embedding_norm: str = "default",
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.time_embedding_norm = time_embedding_norm
        self.up, self.down = up, down
        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        proj_channels = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, proj_channels)
        self.norm2 = nn.GroupNorm(num_groups=groups, num_channels=out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = shortcut(in_channels, out_channels)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``input_tensor`` (B, C_in, H, W), ``temb`` (B, D) or (1, D) (then broadcast over the batch)."""
        fresh = in_place_ok()  # norm and conv outputs below are new tensors nobody else holds
        hidden = act(self.nonlinearity, self.norm1(input_tensor), fresh)
        if self.up:
            input_tensor, hidden = upsample_nearest(input_tensor), upsample_nearest(hidden)  # (B, C_in, 2H, 2W)
        elif self.down:
            input_tensor = F.avg_pool2d(input_tensor, kernel_size=2, stride=2)  # (B, C_in, H/2, W/2)
            hidden = F.avg_pool2d(hidden, kernel_size=2, stride=2)
        hidden = self.conv1(hidden)  # (B, C_out, H', W')
        temb = _linear_per_row(self.time_emb_proj, self.nonlinearity(temb))[:, :, None, None]  # (B|1, C_proj, 1, 1)
        if self.time_embedding_norm == "scale_shift":
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)  # (B|1, C_out, 1, 1) each
            hidden = self.norm2(hidden)
            if fresh:
                hidden = hidden.mul_(1 + time_scale).add_(time_shift)
            else:
                hidden = hidden * (1 + time_scale) + time_shift
        else:
            hidden = self.norm2(hidden.add_(temb) if fresh else hidden + temb)
        hidden = self.conv2(self.dropout(act(self.nonlinearity, hidden, fresh)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)  # (B, C_out, H', W')
        out = hidden.add_(input_tensor) if fresh else input_tensor + hidden  # a + b == b + a exactly
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


def _resnet_maker(out_channels: int, temb_channels: int, groups: int, eps: float, act_fn: str, dropout: float,
                  time_embedding_norm: str):
    """``resnet(c_in, **kwargs)``: a block's :class:`ResnetBlock2D` from ``c_in`` to its ``out_channels``."""

    def resnet(c_in: int, **kwargs: Any) -> ResnetBlock2D:
        return ResnetBlock2D(c_in, out_channels, temb_channels, groups, eps, act_fn, dropout,
                             time_embedding_norm=time_embedding_norm, **kwargs)

    return resnet


def _attentions(with_attention: bool, num_layers: int, channels: int, head_dim: int, groups: int, eps: float
                ) -> nn.ModuleList | None:
    """A block's attention layers (one per resnet), or None for a block without."""
    if not with_attention:
        return None
    return nn.ModuleList(Attention(channels, head_dim, groups, eps) for _ in range(num_layers))


class DownBlock2D(nn.Module):
    """diffusers' ``DownBlock2D`` / ``AttnDownBlock2D`` (``with_attention``) / ``ResnetDownsampleBlock2D``:
    resnets (+ attention), then an optional downsampler, ``"conv"`` (:class:`Downsample2D`) or ``"resnet"``
    (a :class:`ResnetBlock2D` with ``down=True``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        downsample: str | None,
        with_attention: bool,
        groups: int,
        eps: float,
        act_fn: str,
        dropout: float,
        downsample_padding: int,
        attention_head_dim: int,
        time_embedding_norm: str = "default",
    ):
        super().__init__()

        resnet = _resnet_maker(out_channels, temb_channels, groups, eps, act_fn, dropout, time_embedding_norm)

        # attentions registered before resnets, as diffusers does, so state_dict keys come in the same order
        self.attentions = _attentions(with_attention, num_layers, out_channels, attention_head_dim, groups, eps)
        self.resnets = nn.ModuleList(resnet(in_channels if i == 0 else out_channels) for i in range(num_layers))
        self.downsamplers: nn.ModuleList | None = None
        if downsample == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)])
        elif downsample == "resnet":
            self.downsamplers = nn.ModuleList([resnet(out_channels, down=True)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Returns the block output and every intermediate state the up path concatenates back in."""
        output_states: tuple[torch.Tensor, ...] = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            downsampler = self.downsamplers[0]
            if isinstance(downsampler, ResnetBlock2D):
                hidden_states = downsampler(hidden_states, temb)  # (B, C, H/2, W/2)
            else:
                hidden_states = downsampler(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class UpBlock2D(nn.Module):
    """diffusers' ``UpBlock2D`` / ``AttnUpBlock2D`` (``with_attention``) / ``ResnetUpsampleBlock2D``:
    (concat skip, resnet, attention) x n, then an optional upsampler, ``"conv"`` (:class:`Upsample2D`) or
    ``"resnet"`` (a :class:`ResnetBlock2D` with ``up=True``)."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int,
        upsample: str | None,
        with_attention: bool,
        groups: int,
        eps: float,
        act_fn: str,
        dropout: float,
        attention_head_dim: int,
        time_embedding_norm: str = "default",
    ):
        super().__init__()

        resnet = _resnet_maker(out_channels, temb_channels, groups, eps, act_fn, dropout, time_embedding_norm)

        resnets = []
        for i in range(num_layers):
            res_skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in_channels = prev_output_channel if i == 0 else out_channels
            resnets.append(resnet(resnet_in_channels + res_skip_channels))
        self.attentions = _attentions(with_attention, num_layers, out_channels, attention_head_dim, groups, eps)
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers: nn.ModuleList | None = None
        if upsample == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])
        elif upsample == "resnet":
            self.upsamplers = nn.ModuleList([resnet(out_channels, up=True)])

    def forward(
        self, hidden_states: torch.Tensor, res_hidden_states: tuple[torch.Tensor, ...], temb: torch.Tensor
    ) -> torch.Tensor:
        """Consumes ``res_hidden_states`` from the end, one per resnet."""
        for i, resnet in enumerate(self.resnets):
            skip = res_hidden_states[-1 - i]
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (B, C + C_skip, H, W)
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
        if self.upsamplers is not None:
            upsampler = self.upsamplers[0]
            if isinstance(upsampler, ResnetBlock2D):
                hidden_states = upsampler(hidden_states, temb)  # (B, C, 2H, 2W)
            else:
                hidden_states = upsampler(hidden_states)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """resnet, then (attention, resnet); every output divided by ``output_scale_factor``."""

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        groups: int,
        attn_groups: int | None,
        eps: float,
        act_fn: str,
        dropout: float,
        output_scale_factor: float,
        add_attention: bool,
        attention_head_dim: int,
        time_embedding_norm: str = "default",
    ):
        super().__init__()
        if attn_groups is None:  # diffusers: the attention gets a group norm only with "default" conditioning
            attn_groups = groups if time_embedding_norm == "default" else None

        def resnet() -> ResnetBlock2D:
            return ResnetBlock2D(
                channels, channels, temb_channels, groups, eps, act_fn, dropout, output_scale_factor,
                time_embedding_norm=time_embedding_norm,
            )  # fmt: skip

        self.attentions = (
            nn.ModuleList([Attention(channels, attention_head_dim, attn_groups, eps, output_scale_factor)])
            if add_attention
            else None
        )
        self.resnets = nn.ModuleList([resnet(), resnet()])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        if self.attentions is not None:
            hidden_states = self.attentions[0](hidden_states)
        return self.resnets[1](hidden_states, temb)


# --------------------------------------------------------------------------------------------------------------
# the model


class UNet2DModel(nn.Module):
    """diffusers' ``UNet2DModel``: ``model(sample, timestep, class_labels=None) -> tensor``.

    Build it from a config dict (``UNet2DModel(config)``, ``UNet2DModel(**config)`` or
    ``UNet2DModel.from_config(config)``); the config is validated by :func:`normalize_config` and kept, complete,
    as ``self.config`` (writable back as diffusers' ``config.json``).
    """

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        merged = config if config is not None else {}
        if kwargs:
            merged = {**merged, **kwargs}
        self.config: dict[str, Any] = normalize_config(merged)
        cfg = self.config

        channels = cfg["block_out_channels"]
        n_blocks = len(channels)
        groups, eps, act_fn, dropout = cfg["norm_num_groups"], cfg["norm_eps"], cfg["act_fn"], cfg["dropout"]
        head_dim = cfg["attention_head_dim"]
        scale_shift = cfg["resnet_time_scale_shift"]
        time_embed_dim = cfg["time_embedding_dim"] or channels[0] * 4
        self.center_input_sample = cfg["center_input_sample"]
        self.downscale_factor = 2 ** (n_blocks - 1)
        self.time_embedding_type: str = cfg["time_embedding_type"]
        self.class_embed_type: str | None = cfg["class_embed_type"]

        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], kernel_size=3, padding=(1, 1))
        self.time_proj: nn.Module
        timestep_input_dim = channels[0]
        if self.time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(channels[0], scale=16)
            timestep_input_dim = 2 * channels[0]
        elif self.time_embedding_type == "learned":
            self.time_proj = nn.Embedding(cfg["num_train_timesteps"], channels[0])
        else:
            self.time_proj = Timesteps(channels[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)

        # class conditioning, summed with the time embedding: a table of num_class_embeds rows, the time
        # projection + MLP applied to the labels ("timestep"), or the labels themselves ("identity", (B, D))
        self.class_embedding: nn.Module | None = None
        if self.class_embed_type is None and cfg["num_class_embeds"] is not None:
            self.class_embedding = nn.Embedding(cfg["num_class_embeds"], time_embed_dim)
        elif self.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        elif self.class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        self.time_embed_dim = time_embed_dim

        # registration order as in diffusers (down_blocks, up_blocks, then mid_block) for the same key order
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        output_channel = channels[0]
        for i, block_type in enumerate(cfg["down_block_types"]):
            input_channel, output_channel = output_channel, channels[i]
            downsample = None
            if i < n_blocks - 1:  # only AttnDownBlock2D follows downsample_type, as in diffusers
                downsample = {"DownBlock2D": "conv", "ResnetDownsampleBlock2D": "resnet"}.get(
                    block_type, cfg["downsample_type"]
                )
            self.down_blocks.append(
                DownBlock2D(
                    input_channel,
                    output_channel,
                    time_embed_dim,
                    num_layers=cfg["layers_per_block"],
                    downsample=downsample,
                    with_attention=block_type == "AttnDownBlock2D",
                    groups=groups,
                    eps=eps,
                    act_fn=act_fn,
                    dropout=dropout,
                    downsample_padding=cfg["downsample_padding"],
                    attention_head_dim=head_dim if head_dim is not None else output_channel,
                    time_embedding_norm=scale_shift,
                )
            )

        self.mid_block = None
        if cfg["mid_block_type"] is not None:
            self.mid_block = UNetMidBlock2D(
                channels[-1],
                time_embed_dim,
                groups=groups,
                attn_groups=cfg["attn_norm_num_groups"],
                eps=eps,
                act_fn=act_fn,
                dropout=dropout,
                output_scale_factor=cfg["mid_block_scale_factor"],
                add_attention=cfg["add_attention"],
                attention_head_dim=head_dim if head_dim is not None else channels[-1],
                time_embedding_norm=scale_shift,
            )

        reversed_channels = list(reversed(channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(cfg["up_block_types"]):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, n_blocks - 1)]
            upsample = None
            if i < n_blocks - 1:  # only AttnUpBlock2D follows upsample_type, as in diffusers
                upsample = {"UpBlock2D": "conv", "ResnetUpsampleBlock2D": "resnet"}.get(
                    block_type, cfg["upsample_type"]
                )
            self.up_blocks.append(
                UpBlock2D(
                    input_channel,
                    prev_output_channel,
                    output_channel,
                    time_embed_dim,
                    num_layers=cfg["layers_per_block"] + 1,
                    upsample=upsample,
                    with_attention=block_type == "AttnUpBlock2D",
                    groups=groups,
                    eps=eps,
                    act_fn=act_fn,
                    dropout=dropout,
                    attention_head_dim=head_dim if head_dim is not None else output_channel,
                    time_embedding_norm=scale_shift,
                )
            )

        self.conv_norm_out = nn.GroupNorm(num_channels=channels[0], num_groups=groups, eps=eps)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn is, as in diffusers
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], kernel_size=3, padding=1)
        self.register_load_state_dict_post_hook(_align_time_path_weights)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> UNet2DModel:
        """Validate ``config`` (errors name ``source``) and build the model with freshly initialised weights."""
        normalized = normalize_config(config, source)
        return cls(normalized)

    @property
    def is_class_conditional(self) -> bool:
        """Whether ``forward`` needs ``class_labels`` (``num_class_embeds`` or ``class_embed_type`` is set)."""
        return self.class_embedding is not None

    @property
    def num_class_embeds(self) -> int | None:
        """The number of class ids (labels in ``[0, num_class_embeds)``) for a class-table model; None otherwise
        (unconditional, or ``class_embed_type`` ``"timestep"``/``"identity"``, whose labels are not ids)."""
        return self.config["num_class_embeds"] if isinstance(self.class_embedding, nn.Embedding) else None

    def _timesteps(self, timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        """``timestep`` as a ``(1,)`` or ``(batch,)`` tensor on ``device`` (no host sync).

        A number, a 0-d or a ``(1,)`` tensor stays one row: the time path runs once and broadcasts over the batch.
        """
        if not torch.is_tensor(timestep):
            # diffusers wraps python numbers as torch.long, so a float timestep is truncated towards zero
            return torch.tensor([int(timestep)], dtype=torch.long, device=device)
        timesteps = timestep.to(device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]  # (1,)
        if timesteps.ndim != 1 or timesteps.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep must be a number, a 0-d tensor, a (1,) or a ({batch},) tensor, "
                f"got shape {tuple(timestep.shape)}"
            )
        if self.time_embedding_type == "learned" and timesteps.is_floating_point():
            raise ValueError(
                f"this model looks its timesteps up in a table (time_embedding_type 'learned'): pass integer "
                f"timesteps in [0, {self.config['num_train_timesteps']}), got a {timesteps.dtype} tensor"
            )
        return timesteps  # (1,) or (B,)

    def _class_embedding(self, class_labels: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The class term added to the time embedding: (B, D), or (1, D) for one label shared by the batch."""
        assert self.class_embedding is not None
        labels = class_labels.to(self.conv_in.weight.device)
        if self.class_embed_type == "timestep":
            labels = self.time_proj(labels).to(dtype=dtype)  # (N, C_t); diffusers leaves it float32
        class_emb = self.class_embedding(labels).to(dtype=dtype)
        if class_emb.ndim != 2 or class_emb.shape[0] not in (1, batch) or class_emb.shape[1] != self.time_embed_dim:
            expected = f"(B, {self.time_embed_dim})" if self.class_embed_type == "identity" else "(B,)"
            raise ValueError(
                f"class_labels must be a {expected} tensor for this model (batch {batch}), "
                f"got shape {tuple(class_labels.shape)}"
            )
        return class_emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        class_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from ``sample`` (B, in_channels, H, W) at ``timestep``; returns (B, out_channels, H, W).

        ``timestep``: a number, a 0-d or (1,) tensor (shared by the batch: the time embedding is computed once)
        or a (B,) tensor. ``class_labels``: required exactly when :attr:`is_class_conditional` (class ids (B,)
        for a class table, values (B,) for ``class_embed_type`` ``"timestep"``, (B, D) for ``"identity"``).
        H and W must be multiples of ``2 ** (len(block_out_channels) - 1)``. ``class_emb``: instead of
        ``class_labels``, the class term itself, (B, time_embed_dim) or (1, time_embed_dim), added to the time
        embedding as a looked-up row would be (null-text inversion optimises the null class's row this way).
        """
        if class_emb is not None:
            if self.class_embedding is None or class_labels is not None:
                raise ValueError("class_emb replaces class_labels, for a class-conditional model only")
            want = self.time_embed_dim
            if class_emb.ndim != 2 or class_emb.shape[0] not in (1, sample.shape[0]) or class_emb.shape[1] != want:
                raise ValueError(f"class_emb must be (B, {want}), got shape {tuple(class_emb.shape)}")
        if sample.ndim != 4 or sample.shape[-2] % self.downscale_factor or sample.shape[-1] % self.downscale_factor:
            raise ValueError(
                f"sample must be (B, C, H, W) with H and W multiples of {self.downscale_factor}, "
                f"got shape {tuple(sample.shape)}"
            )
        if self.class_embedding is not None and class_labels is None and class_emb is None:
            what = {None: "class ids", "timestep": "class values", "identity": "class embeddings"}
            raise ValueError(
                f"this model is class-conditional (num_class_embeds {fmt(self.config['num_class_embeds'])}, "
                f"class_embed_type {fmt(self.class_embed_type)}): pass class_labels ({what[self.class_embed_type]})"
            )
        if self.class_embedding is None and class_labels is not None:
            raise ValueError(
                "class_labels given, but this model is not class-conditional (num_class_embeds and "
                "class_embed_type are null)"
            )
        batch = sample.shape[0]
        if self.center_input_sample:
            sample = 2 * sample - 1.0

        # time: computed on the (1,) or (B,) timesteps as they come, never expanded to the batch first;
        # the projection is cast to the weights' dtype as diffusers casts to self.dtype
        dtype = self.time_embedding.linear_1.weight.dtype
        timesteps = self._timesteps(timestep, batch, sample.device)  # (1,) or (B,)
        t_emb = self.time_proj(timesteps).to(dtype=dtype)  # (1|B, C_t)
        emb = self.time_embedding(t_emb)  # (1|B, time_embed_dim)
        if class_labels is not None:
            emb = emb + self._class_embedding(class_labels, batch, dtype)  # (1|B, time_embed_dim)
        elif class_emb is not None:
            emb = emb + class_emb.to(device=emb.device, dtype=dtype)  # (1|B, time_embed_dim)

        sample = self.conv_in(sample)  # (B, C0, H, W)
        down_block_res_samples: tuple[torch.Tensor, ...] = (sample,)
        for down_block in self.down_blocks:
            sample, res_samples = down_block(sample, emb)
            down_block_res_samples += res_samples

        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)

        for up_block in self.up_blocks:
            n = len(up_block.resnets)
            res_samples = down_block_res_samples[-n:]
            down_block_res_samples = down_block_res_samples[:-n]
            sample = up_block(sample, res_samples, emb)

        sample = self.conv_out(act(self.conv_act, self.conv_norm_out(sample), in_place_ok()))  # (B, C_out, H, W)

        if self.time_embedding_type == "fourier":
            # diffusers divides the output by the timesteps (score-SDE: the noise level sigma); the quotient is
            # taken in the promoted dtype as there, then kept in the model's dtype (diffusers would return float64
            # for float64 timesteps)
            sample = (sample / timesteps.reshape(-1, 1, 1, 1)).to(dtype=sample.dtype)
        return sample


# --------------------------------------------------------------------------------------------------------------
# helpers


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements in ``model``."""
    return sum(p.numel() for p in model.parameters())


_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_legacy_attention_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pre-0.14 diffusers attention keys (``...attentions.N.query.weight``, ``key``, ``value``, ``proj_attn``)
    to the current ones (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), as diffusers does on load.

    Returns a new dict; keys already in the current form are kept as they are.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        parts = name.split(".")
        if (
            len(parts) >= 4
            and parts[-1] in ("weight", "bias")
            and parts[-2] in _LEGACY_ATTENTION_NAMES
            and parts[-4] == "attentions"
        ):
            name = ".".join(parts[:-2] + [_LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
        out[name] = tensor
    return out
