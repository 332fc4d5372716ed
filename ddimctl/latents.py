"""Latent files: x_T tensors with where they came from, as ``.safetensors``.

A latent file holds one tensor named ``latents``, float32, shape (N, C, H, W) (``invert`` and ``sample
--save-latents`` write one image per file, N = 1) -- and, for a sampler whose latent is a pair of states (bdia:
x_T and x_{T-1}), a second tensor ``latents_prev`` of the same shape, with metadata ``latents_prev`` saying so --
-- and, for an exact inversion whose solve stopped short of its tolerance on some steps (under classifier-free
guidance the step map can fold, docs/guided-inversion.md), the offsets the solve left there: ``offsets`` (K, N, C, H,
W) float32 and ``offset_steps`` (K,) int64, the plan steps (0 = the step from x_T) they are added after, with
metadata ``offsets`` saying so; decoding x_T on the same plan with them retraces the inversion exactly --
and, for null-text inversion, its per-step null conditions: ``nulls.NAME`` (S, N, ...) float32 for each tensor NAME
of the condition (``class_emb``, ``encoder_hidden_states``, ...), one per plan step, with metadata ``nulls`` --
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .errors import InputError, first_line

LATENTS_KEY = "latents"
PREV_KEY = "latents_prev"
OFFSETS_KEY = "offsets"
OFFSET_STEPS_KEY = "offset_steps"
NULLS_PREFIX = "nulls."
SUFFIX = ".latent.safetensors"


def metadata_strings(values: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as safetensors stores it: strings as they are, anything else as JSON; the package version added."""
    from . import __version__

    out = {"ddimctl_version": __version__}
    out.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()})
    return out


@dataclass
class LatentFile:
    """What a latent file holds: ``latents`` x_T (N, C, H, W) float32, a pair latent's second state
    ``latents_prev`` (or None), exact inversion's ``offsets`` by plan step ({k: (N, C, H, W)}, empty when the solve
    needed none), null-text inversion's per-step null conditions ``nulls`` (plan order, each {name: (N, ...)}; None
    without) and the ``metadata``."""

    latents: Tensor
    latents_prev: Tensor | None
    offsets: dict[int, Tensor]
    metadata: dict[str, str]
    nulls: list[dict[str, Tensor]] | None = None

    def offset_list(self, steps: int) -> list[Tensor | None] | None:
        """The offsets in plan order for a plan of ``steps`` steps (None where a step has none), or None without
        offsets."""
        if not self.offsets:
            return None
        return [self.offsets.get(k) for k in range(steps)]


def save_latents(path: str | os.PathLike, latents: Tensor, metadata: Mapping[str, Any] | None = None,
                 latents_prev: Tensor | None = None, offsets: Sequence[Tensor | None] | None = None,
                 nulls: Sequence[Mapping[str, Tensor]] | None = None) -> Path:
    """Write ``latents`` ((C, H, W) or (N, C, H, W), any device) as float32 with ``metadata``, atomically;
    ``latents_prev`` (same shape), the second state of a pair latent, when given; and ``offsets``, exact
    inversion's per-step offsets in plan order (each the shape of ``latents`` or None; steps whose offset is
    None or zero are not written); ``nulls``: null-text inversion's null condition for each plan step (its named
    tensors, each (N, ...))."""
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
    kept = [(k, as4d(o)) for k, o in enumerate(offsets or []) if o is not None and bool(o.ne(0).any())]
    if kept:
        if any(o.shape != tensors[LATENTS_KEY].shape for _, o in kept):
            raise ValueError("offsets must have the shape of latents")
        tensors[OFFSETS_KEY] = torch.stack([o for _, o in kept])
        tensors[OFFSET_STEPS_KEY] = torch.tensor([k for k, _ in kept], dtype=torch.int64)
        meta[OFFSETS_KEY] = (f"per-step offsets of an exact inversion, added after the plan steps in "
                             f"'{OFFSET_STEPS_KEY}' of {len(offsets)} (decode on the same plan to retrace the source)")
    if nulls:
        for name in nulls[0]:
            tensors[NULLS_PREFIX + name] = torch.stack([n[name].detach().float().cpu() for n in nulls]).contiguous()
        meta["nulls"] = (f"null-text inversion's null condition for each of the {len(nulls)} plan steps (decode on "
                         "the same plan, guidance scale and condition to retrace the source)")
    return save_safetensors_atomic(path, tensors, metadata_strings(meta))


def load_latents(path: str | os.PathLike) -> tuple[Tensor, dict[str, str]]:
    """The ``latents`` tensor of a latent file as float32 (N, C, H, W), and its metadata."""
    x, _, meta = load_latent_pair(path)
    return x, meta


def load_latent_pair(path: str | os.PathLike) -> tuple[Tensor, Tensor | None, dict[str, str]]:
    """``latents`` and ``latents_prev`` (None when the file has no second state) as float32 (N, C, H, W), and
    the metadata."""
    lf = load_latent_file(path)
    return lf.latents, lf.latents_prev, lf.metadata


def load_latent_file(path: str | os.PathLike) -> LatentFile:
    """Everything a latent file holds (:class:`LatentFile`), each tensor checked against ``latents``."""
    p = Path(path)
    with _open(p) as f:
        names = list(f.keys())
        if LATENTS_KEY not in names:
            raise InputError(f"{p}: no tensor named '{LATENTS_KEY}' (found: {', '.join(sorted(names)) or 'none'})")
        x = f.get_tensor(LATENTS_KEY).float()
        x_prev = f.get_tensor(PREV_KEY).float() if PREV_KEY in names else None
        off = f.get_tensor(OFFSETS_KEY).float() if OFFSETS_KEY in names else None
        off_steps = f.get_tensor(OFFSET_STEPS_KEY) if OFFSET_STEPS_KEY in names else None
        nulls = {n[len(NULLS_PREFIX):]: f.get_tensor(n).float() for n in names if n.startswith(NULLS_PREFIX)}
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
    return LatentFile(x, x_prev, _offsets(p, x, off, off_steps, meta), meta, _nulls(p, x, nulls, meta))


def _nulls(p: Path, x: Tensor, nulls: dict[str, Tensor], meta: Mapping[str, str]) -> list[dict[str, Tensor]] | None:
    """A latent file's per-step null conditions, plan order; one-line errors naming the file."""
    if not nulls:
        return None
    total = meta.get("steps", "")
    for name, t in nulls.items():
        if t.ndim < 2 or t.shape[1] != x.shape[0] or (total.isdigit() and t.shape[0] != int(total)):
            raise InputError(f"{p}: '{NULLS_PREFIX}{name}' has shape {tuple(t.shape)}, expected ({total or 'S'}, "
                             f"{x.shape[0]}, ...): one null per plan step and image")
        if not torch.isfinite(t).all():
            raise InputError(f"{p}: '{NULLS_PREFIX}{name}' holds NaN or inf values")
    steps = {t.shape[0] for t in nulls.values()}
    if len(steps) != 1:
        raise InputError(f"{p}: the '{NULLS_PREFIX}*' tensors hold different numbers of steps ({sorted(steps)})")
    return [{name: t[k] for name, t in nulls.items()} for k in range(steps.pop())]


def _offsets(p: Path, x: Tensor, off: Tensor | None, steps: Tensor | None, meta: Mapping[str, str]
             ) -> dict[int, Tensor]:
    """A latent file's offsets by plan step, each (N, C, H, W); one-line errors naming the file."""
    if off is None and steps is None:
        return {}
    if off is None or steps is None:
        raise InputError(f"{p}: '{OFFSETS_KEY}' and '{OFFSET_STEPS_KEY}' go together; the file has only one")
    if off.ndim == 4:
        off = off.unsqueeze(1)
    if steps.ndim != 1 or off.shape[0] != steps.shape[0] or off.shape[1:] != x.shape:
        raise InputError(f"{p}: '{OFFSETS_KEY}' has shape {tuple(off.shape)} for {tuple(steps.shape)} steps, "
                         f"expected (K, {', '.join(map(str, x.shape))}) for K steps")
    if steps.dtype.is_floating_point or steps.dtype == torch.bool:
        raise InputError(f"{p}: '{OFFSET_STEPS_KEY}' must hold integer step indices, not {steps.dtype}")
    ks = [int(k) for k in steps.tolist()]
    total = meta.get("steps", "")
    limit = int(total) if total.isdigit() else None
    if len(set(ks)) != len(ks) or any(k < 0 or (limit is not None and k >= limit) for k in ks):
        raise InputError(f"{p}: '{OFFSET_STEPS_KEY}' {ks} are not distinct steps of a {total or '?'}-step plan")
    if not torch.isfinite(off).all():
        raise InputError(f"{p}: '{OFFSETS_KEY}' holds NaN or inf values")
    return {k: off[i] for i, k in enumerate(ks)}


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
