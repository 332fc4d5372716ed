"""Latent files: x_T tensors with where they came from, as ``.safetensors``.

A latent file holds one tensor named ``latents``, float32, shape (N, C, H, W) (``invert`` and ``sample
--save-latents`` write one image per file, N = 1) -- and, for a sampler whose latent is a pair of states (bdia:
x_T and x_{T-1}), a second tensor ``latents_prev`` of the same shape, with metadata ``latents_prev`` saying so --
and string metadata: ``ddimctl_version`` and what produced
it — the model reference and revision, steps, spacing, sampler, inversion method, prediction type, and per
image its seed or source file and original size. Non-string values are stored as JSON.

    save_latents("cat.latent.safetensors", x_T, {"model": "mnist", "steps": 50, "source": "cat.png"})
    x_T, meta = load_latents("cat.latent.safetensors")    # (1, C, H, W) float32, {"model": "mnist", ...}

Writing is atomic (:mod:`ddimctl.fsutil`); reading checks the file, the tensor's name, rank and values, each
problem a one-line :class:`~ddimctl.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import InputError, first_line

LATENTS_KEY = "latents"
PREV_KEY = "latents_prev"
SUFFIX = ".latent.safetensors"


def metadata_strings(values: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as safetensors stores it: strings as they are, anything else as JSON; the package version added."""
    from . import __version__

    out = {"ddimctl_version": __version__}
    out.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()})
    return out


def save_latents(path: str | os.PathLike, latents: Tensor, metadata: Mapping[str, Any] | None = None,
                 latents_prev: Tensor | None = None) -> Path:
    """Write ``latents`` ((C, H, W) or (N, C, H, W), any device) as float32 with ``metadata``, atomically; and
    ``latents_prev`` (same shape), the second state of a pair latent, when given."""
    from .fsutil import save_safetensors_atomic

    def as4d(t: Tensor) -> Tensor:
        x = t.detach().float().cpu()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"latents must be (C, H, W) or (N, C, H, W), got shape {tuple(t.shape)}")
        return x.contiguous()

    tensors = {LATENTS_KEY: as4d(latents)}
    meta = dict(metadata or {})
    if latents_prev is not None:
        tensors[PREV_KEY] = as4d(latents_prev)
        if tensors[PREV_KEY].shape != tensors[LATENTS_KEY].shape:
            raise ValueError("latents_prev must have the shape of latents")
        meta[PREV_KEY] = "x_{T-1}, the second state of the latent pair (decode with the bdia sampler)"
    return save_safetensors_atomic(path, tensors, metadata_strings(meta))


def load_latents(path: str | os.PathLike) -> tuple[Tensor, dict[str, str]]:
    """The ``latents`` tensor of a latent file as float32 (N, C, H, W), and its metadata."""
    x, _, meta = load_latent_pair(path)
    return x, meta


def load_latent_pair(path: str | os.PathLike) -> tuple[Tensor, Tensor | None, dict[str, str]]:
    """``latents`` and ``latents_prev`` (None when the file has no second state) as float32 (N, C, H, W), and
    the metadata."""
    p = Path(path)
    with _open(p) as f:
        names = list(f.keys())
        if LATENTS_KEY not in names:
            raise InputError(f"{p}: no tensor named '{LATENTS_KEY}' (found: {', '.join(sorted(names)) or 'none'})")
        x = f.get_tensor(LATENTS_KEY).float()
        x_prev = f.get_tensor(PREV_KEY).float() if PREV_KEY in names else None
        meta = dict(f.metadata() or {})
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise InputError(f"{p}: '{LATENTS_KEY}' has shape {tuple(x.shape)}, expected (N, C, H, W)")
    if not torch.isfinite(x).all():
        raise InputError(f"{p}: '{LATENTS_KEY}' holds NaN or inf values")
    if x_prev is not None:
        if x_prev.ndim == 3:
            x_prev = x_prev.unsqueeze(0)
        if x_prev.shape != x.shape:
            raise InputError(f"{p}: '{PREV_KEY}' has shape {tuple(x_prev.shape)}, '{LATENTS_KEY}' {tuple(x.shape)}")
        if not torch.isfinite(x_prev).all():
            raise InputError(f"{p}: '{PREV_KEY}' holds NaN or inf values")
    return x, x_prev, meta


def recorded_spacing(meta: Mapping[str, str]) -> str | None:
    """The spacing a latent file was made with, to decode it with the same plan; None when it records none or a
    tuned schedule (whose levels only its schedule file holds)."""
    spacing = meta.get("spacing") or None
    return None if spacing == "tuned" else spacing


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A latent file's metadata, from its header alone (no tensor is read); one-line errors as :func:`load_latents`."""
    with _open(Path(path)) as f:
        return dict(f.metadata() or {})


@contextmanager
def _open(p: Path):
    """``safe_open`` of a latent file, each way it can fail one line naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            yield f
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, not a latent file") from None
    except (SafetensorError, OSError) as e:
        raise InputError(f"{p}: not a readable .safetensors file ({first_line(e)})") from None


def check_shape(x: Tensor, shape: tuple[int, ...], path: str | os.PathLike) -> Tensor:
    """``x`` (N, C, H, W) when its per-item shape is ``shape`` (what the model works on); else an InputError."""
    if tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"{path}: latents of shape {tuple(x.shape[1:])}, the model needs {tuple(shape)}")
    return x
