"""Reading and writing the files of a checkpoint: JSON configs, safetensors headers and tensors, hashes. Every
problem is a one-line :class:`~ddimctl.errors.ModelError` naming the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ModelError, first_line

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
SCHEDULER_NAME = "scheduler_config.json"
META_NAME = "ddimctl.json"
MODEL_INDEX = "model_index.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
CONVERT_HINT = "convert it to .safetensors, e.g. diffusers' save_pretrained(dir, safe_serialization=True)"


def pickle_error(path: Path | str) -> ModelError:
    return ModelError(f"{path}: refusing to load a pickle checkpoint (it can run arbitrary code); {CONVERT_HINT}")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; one-line ModelError when unreadable, not JSON or not an object."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not JSON (not UTF-8 text)") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def open_safetensors(path: Path):
    import safetensors

    try:
        return safetensors.safe_open(str(path), framework="pt")
    except safetensors.SafetensorError as e:
        detail = first_line(e).removeprefix("Error while deserializing header: ")
        if "not fully covered" in detail or "invalid header length" in detail:
            detail += ": truncated?"
        raise ModelError(f"{path}: not a valid safetensors file ({detail})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its header only."""
    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header (no tensor data is read)."""
    with open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def count_elements(paths: Sequence[Path]) -> int:
    """Total elements of every tensor in ``paths`` (headers only)."""
    total = 0
    for path in paths:
        for shape in tensor_shapes(path).values():
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


def metadata_json(metadata: Mapping[str, str], key: str, path: Path) -> dict[str, Any] | None:
    """``metadata[key]`` parsed as a JSON object, or None when absent."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: metadata '{key}' is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: metadata '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def load_tensors(path: Path):
    """Every tensor of one safetensors file, on the CPU in its stored dtype."""
    import safetensors
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except safetensors.SafetensorError as e:
        raise ModelError(f"{path}: not a valid safetensors file ({first_line(e)})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
