"""Layers that ddimctl's own networks share (:mod:`.unet2d`, :mod:`.autoencoders`): diffusers' attention and
resampling layers, the activations by config name, and the config-value helpers their validators use.

The module trees and numerics follow diffusers', so the state-dict keys match and outputs agree to float rounding.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["ACTIVATIONS", "Attention", "Downsample2D", "Upsample2D", "act", "activation", "check_block_layout", "complete_config", "fmt",
           "in_place_ok", "is_int", "is_number", "shortcut", "upsample_nearest"]


# --------------------------------------------------------------------------------------------------------------
# config values

def fmt(value: Any) -> str:
    """A config value as it reads in a message: strings quoted, JSON-ish otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return is_int(v)


def complete_config(config: Mapping[str, Any], source: str, class_name: str, defaults: Mapping[str, Any],
                    fixed: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], Callable[[str], ConfigError]]:
    """A config with every key of ``defaults`` (in their order, lists as lists, after ``"_class_name"``) and the
    ``fail(message)`` that makes its one-line errors (``"{source}: {message}"``). Keys starting with ``_`` are
    dropped; a key not in ``defaults`` is refused, and so is a ``fixed`` key with another value than the one
    diffusers' class always uses."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{source}: {message}")

    fixed = fixed or {}
    cfg: dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str):
            raise fail(f"unsupported key {key!r}")
        if key.startswith("_"):
            continue  # metadata diffusers writes (_class_name, _diffusers_version, _name_or_path, ...)
        if key in fixed:
            if value != fixed[key] or isinstance(value, bool) != isinstance(fixed[key], bool):
                raise fail(
                    f"unsupported {key} {fmt(value)} (diffusers' {class_name} always uses {fmt(fixed[key])})"
                )
            continue
        if key not in defaults:
            raise fail(f"unsupported key '{key}' (value {fmt(value)}) for {class_name}")
        cfg[key] = value
    out: dict[str, Any] = {"_class_name": class_name}
    for key, default in defaults.items():
        value = cfg.get(key, default)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out, fail


def check_block_layout(out: dict[str, Any], fail: Callable[[str], Exception], down_types: tuple, up_types: tuple
                       ) -> None:
    """Check a config's ``down_block_types`` / ``up_block_types`` (non-empty lists of supported names), its
    ``act_fn`` and its ``block_out_channels`` (positive integers, one per block); ``fail(message)`` makes the error."""
    for key, supported in (("down_block_types", down_types), ("up_block_types", up_types)):
        value = out[key]
        if not isinstance(value, list) or not value:
            raise fail(f"{key} must be a non-empty list of block type names, got {fmt(value)}")
        for entry in value:
            if entry not in supported or not isinstance(entry, str):
                raise fail(f"unsupported {key} entry {fmt(entry)} (supported: {', '.join(supported)})")
    act = out["act_fn"]
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise fail(f"unsupported act_fn {fmt(act)} (supported: {', '.join(ACTIVATIONS)})")
    channels = out["block_out_channels"]
    if not isinstance(channels, list) or not channels or not all(is_int(c) and c > 0 for c in channels):
        raise fail(f"block_out_channels must be a non-empty list of positive integers, got {fmt(channels)}")
    for key in ("down_block_types", "up_block_types"):
        if len(out[key]) != len(channels):
            raise fail(
                f"{key} {fmt(out[key])} has {len(out[key])} entries but block_out_channels {fmt(channels)} "
                f"has {len(channels)}"
            )


# --------------------------------------------------------------------------------------------------------------
# activations

# diffusers' ``getactivation`` table (the name is matched case-insensitively there too).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name.lower()]()


def in_place_ok() -> bool:
    """Whether intermediate tensors may be updated in place: no autograd graph is being recorded (sampling runs
    under ``torch.inference_mode``). In place or not, every value is bit for bit the same; in place, the
    large activations are not allocated afresh (a few per cent of a CPU forward). One visible difference: a
    forward hook on an inner module that keeps its output sees it overwritten by the next in-place operation."""
    return not torch.is_grad_enabled()


def act(module: nn.Module, x: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``module(x)``, computed in ``x``'s storage when ``in_place`` and the activation has an in-place form."""
    if in_place:
        if isinstance(module, nn.SiLU):
            return F.silu(x, inplace=True)
        if isinstance(module, nn.ReLU):
            return F.relu(x, inplace=True)
        if isinstance(module, nn.Mish):
            return F.mish(x, inplace=True)
    return module(x)


# --------------------------------------------------------------------------------------------------------------
# residual, attention and resampling


def shortcut(in_channels: int, out_channels: int) -> nn.Conv2d | None:
    """A resnet's 1x1 ``conv_shortcut`` where the channels change (None where they do not)."""
    if in_channels == out_channels:
        return None
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

def upsample_nearest(hidden_states: torch.Tensor) -> torch.Tensor:
    """2x nearest-neighbour upsampling, (B, C, H, W) -> (B, C, 2H, 2W)."""
    # diffusers' workarounds for upsample_nearest_nhwc failing on large batches / large outputs
    if hidden_states.shape[0] >= 64 or hidden_states.numel() * 2 > 2**31:
        hidden_states = hidden_states.contiguous()
    return F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")


class Attention(nn.Module):
    """Spatial self-attention with residual, as diffusers' ``Attention`` built from a deprecated attention block.

    ``heads = channels // head_dim``; attention runs through ``F.scaled_dot_product_attention`` exactly like
    diffusers' default ``AttnProcessor2_0`` (scale ``head_dim ** -0.5``, no dropout).
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        norm_num_groups: int | None,
        eps: float,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        self.heads = channels // head_dim
        self.head_dim = head_dim
        inner_dim = self.heads * head_dim
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = (
            nn.GroupNorm(num_channels=channels, num_groups=norm_num_groups, eps=eps, affine=True)
            if norm_num_groups is not None
            else None
        )
        self.to_q = nn.Linear(channels, inner_dim, bias=True)
        self.to_k = nn.Linear(channels, inner_dim, bias=True)
        self.to_v = nn.Linear(channels, inner_dim, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, channels, bias=True), nn.Dropout(0.0)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.reshape(batch, channels, height * width)  # (B, C, H*W)
        if self.group_norm is not None:
            # normalised in (B, C, H*W) form like diffusers: a (B, C, H, W) GroupNorm differs in the last bits
            hidden_states = self.group_norm(hidden_states)
        hidden_states = hidden_states.transpose(1, 2)  # (B, H*W, C)
        # (B, H*W, inner) -> (B, heads, H*W, head_dim)
        query = self.to_q(hidden_states).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        key = self.to_k(hidden_states).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        value = self.to_v(hidden_states).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, height * width, -1)  # (B, H*W, inner)
        hidden_states = self.to_out[1](self.to_out[0](hidden_states))  # (B, H*W, C)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        out = hidden_states.add_(residual) if in_place_ok() else hidden_states + residual
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution; ``padding=0`` pads right/bottom by one first, as diffusers does."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(hidden_states)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest(hidden_states))  # (B, C, 2H, 2W)
