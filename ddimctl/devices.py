"""Device and dtype resolution for ``--device`` and ``--dtype``, and the process's place under ``torchrun``.

Every error is a one-line :class:`DdimctlError` that names the option and says what to do instead, e.g.
``--device cuda: CUDA is not available on this machine (use --device cpu or auto)``.
"""

from __future__ import annotations

import os
import re

import torch

from .errors import DdimctlError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {
    "auto": torch.float32,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a :class:`torch.device`.

    Raises :class:`DdimctlError` when the device is unknown or not available here.
    """
    spec = str(name).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m:
        if not torch.cuda.is_available():
            raise DdimctlError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if m.group(1) is not None:
            index, count = int(m.group(1)), torch.cuda.device_count()
            if index >= count:
                raise DdimctlError(
                    f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})"
                )
            return torch.device("cuda", index)
        return torch.device("cuda")
    if spec == "mps":
        if not _mps_available():
            raise DdimctlError(
                f"--device {name}: Apple MPS is not available on this machine (use --device cpu or auto)"
            )
        return torch.device("mps")
    raise DdimctlError(f"--device {name}: unknown device (expected one of {', '.join(DEVICES)})")


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The model dtype for ``--dtype`` on ``device``: ``auto``/``float32`` -> float32; ``float16``/``fp16`` and
    ``bfloat16``/``bf16`` on accelerators. float16 on the CPU is refused (slow, and many CPU kernels lack it);
    bfloat16 on the CPU is allowed."""
    spec = str(name).strip().lower()
    if spec not in DTYPES:
        raise DdimctlError(f"--dtype {name}: unknown dtype (expected auto, float32, float16/fp16 or bfloat16/bf16)")
    dtype = DTYPES[spec]
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        raise DdimctlError(
            f"--dtype {name}: float16 is not supported on the CPU (use float32, or bfloat16 for less memory)"
        )
    return dtype


def schedule_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype for tensors built from a noise schedule on ``device``: float64, except float32 on MPS (which has
    no float64).

    The sampler core computes its per-step coefficients as Python floats (float64) on the host, so this matters
    only for code that turns a schedule into tensors on the device (e.g. a training loop's alphas_cumprod table).
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def rank_world() -> tuple[int, int]:
    """(rank, world size) under ``torchrun`` (its RANK and WORLD_SIZE variables); (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
