"""Weight files: one safetensors file or shards, the default weights or a variant, and loading them into a module
with strict key and shape checks.

diffusers names a model's weights ``diffusion_pytorch_model.safetensors`` (shards listed in
``diffusion_pytorch_model.safetensors.index.json``); transformers names them ``model.safetensors``: the ``stem``
argument says which. A variant (``fp16``) goes before the last suffix: ``diffusion_pytorch_model.fp16.safetensors``,
``diffusion_pytorch_model.safetensors.index.fp16.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import ModelError
from .files import CONVERT_HINT, PICKLE_SUFFIXES, load_tensors, pickle_error, read_json

DIFFUSERS_STEM = "diffusion_pytorch_model"  # diffusers' models
TRANSFORMERS_STEM = "model"  # transformers' models (text encoders)
_VARIANT = re.compile(r"[A-Za-z0-9_-]+")


def weights_name(stem: str = DIFFUSERS_STEM) -> str:
    return f"{stem}.safetensors"


def index_name(stem: str = DIFFUSERS_STEM) -> str:
    return f"{stem}.safetensors.index.json"


def _shard_pattern(stem: str) -> re.Pattern:
    return re.compile(re.escape(stem) + r"(?:\.[A-Za-z0-9_-]+)?-\d+-of-\d+\.safetensors")


def is_shard(name: str, stem: str = DIFFUSERS_STEM) -> bool:
    """Whether ``name`` is one shard of a sharded checkpoint (``..-00001-of-00002.safetensors``)."""
    return _shard_pattern(stem).fullmatch(name) is not None


def variant_name(name: str, variant: str | None) -> str:
    """diffusers' file name of ``variant``: ``diffusion_pytorch_model.fp16.safetensors``,
    ``diffusion_pytorch_model.safetensors.index.fp16.json`` (the variant goes before the last suffix)."""
    if variant is None:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def check_variant(variant: str | None) -> None:
    if variant is not None and (not isinstance(variant, str) or not _VARIANT.fullmatch(variant)):
        raise ModelError(f"variant {variant!r}: not a variant name (letters, digits, '_' and '-', e.g. fp16)")


@dataclass(frozen=True)
class Weights:
    """The safetensors files of one model: ``files`` (one, or the shards in order), the shard ``index`` when
    sharded, and the ``variant`` they are (None: the default weights)."""

    files: tuple[Path, ...]
    index: Path | None = None
    variant: str | None = None

    @property
    def sharded(self) -> bool:
        return self.index is not None


def read_index(index: Path) -> tuple[dict[str, str], list[Path]]:
    """The ``weight_map`` of a shard index and its shard files (sorted), checked to be plain names that exist."""
    doc = read_json(index)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index}: not a shard index (no 'weight_map' object)")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise ModelError(f"{index}: shard name {name!r} is not a plain file name in the index's folder")
        if not name.endswith(".safetensors"):
            if name.lower().endswith(PICKLE_SUFFIXES):
                raise pickle_error(index.parent / name)
            raise ModelError(f"{index}: shard {name!r} is not a .safetensors file")
    return weight_map, [index.parent / n for n in names]


def find_weights(folder: Path, variant: str | None, stem: str = DIFFUSERS_STEM) -> Weights | None:
    """The weights of ``variant`` in ``folder``: a shard index first (as diffusers), then the single file."""
    index = folder / variant_name(index_name(stem), variant)
    if index.is_file():
        _, shards = read_index(index)
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            more = f" ({len(missing)} missing)" if len(missing) > 1 else ""
            raise ModelError(f"{index}: shard {missing[0]} is missing{more}")
        return Weights(tuple(shards), index, variant)
    single = folder / variant_name(weights_name(stem), variant)
    if single.is_file():
        return Weights((single,), None, variant)
    return None


def variants_in(folder: Path, stem: str = DIFFUSERS_STEM) -> list[str]:
    """The variants whose weights are in ``folder`` (single files or shard indexes)."""
    found = set()
    single = re.compile(re.escape(stem) + r"\.([A-Za-z0-9_-]+)\.safetensors")
    index = re.compile(re.escape(stem) + r"\.safetensors\.index\.([A-Za-z0-9_-]+)\.json")
    if folder.is_dir():
        for p in folder.iterdir():
            if is_shard(p.name, stem):
                continue  # a shard (diffusion_pytorch_model.fp16-00001-of-00002.safetensors): its index says it
            m = single.fullmatch(p.name) or index.fullmatch(p.name)
            if m:
                found.add(m.group(1))
    return sorted(found)


def weight_patterns(folder: Path, rel: str, variant: str | None, stem: str = DIFFUSERS_STEM) -> list[str]:
    """Repo paths (relative, prefix ``rel``) of ``variant``'s weights in ``folder``: the shards its index names
    (the index is fetched with the configs), else the single file."""
    index = folder / variant_name(index_name(stem), variant)
    if index.is_file():
        _, shards = read_index(index)
        return [rel + p.name for p in shards]
    return [rel + variant_name(weights_name(stem), variant)]


def select_weights(folder: Path, variant: str | None, where: str, variants: Callable[[], list[str]],
                   stem: str = DIFFUSERS_STEM) -> Weights | None:
    """The weights to load from ``folder`` for the requested ``variant``. Only variant files and none asked: a
    one-line ModelError that says which to ask for; a variant asked and not there: a ModelError naming what is."""
    single, index = weights_name(stem), index_name(stem)
    weights = find_weights(folder, variant, stem)
    if weights is not None:
        return weights
    if variant is None:
        found = variants()
        if found:
            names = ", ".join(repr(v) for v in found)
            raise ModelError(
                f"{where}: no {single}, only the {names} variant{'s' if len(found) > 1 else ''} of the weights "
                f"({variant_name(single, found[0])}); load it with variant {found[0]!r}"
            )
        return None
    default = find_weights(folder, None, stem)
    found = [v for v in variants() if v != variant]
    what = []
    if default is not None:
        what.append(f"the default weights are {default.files[0].name if not default.sharded else default.index.name}: "
                    "load without a variant")
    if found:
        what.append(f"variants here: {', '.join(found)}")
    raise ModelError(
        f"{where}: no {variant!r} variant of the weights ({variant_name(single, variant)} or "
        f"{variant_name(index, variant)})" + (f"; {'; '.join(what)}" if what else "")
    )


def refuse_pickles_in(folder: Path, where: str, stem: str = DIFFUSERS_STEM) -> None:
    """Raise the pickle refusal when ``folder`` (which has no safetensors weights) holds pickle weights."""
    if folder.is_dir():
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
        if found:
            raise ModelError(
                f"{found[0]}: refusing to load a pickle checkpoint (it can run arbitrary code) and {where} has no "
                f"{weights_name(stem)}; {CONVERT_HINT}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Loading into a module


def load_state(weights: Weights) -> dict[str, torch.Tensor]:
    """Every tensor of ``weights``; for shards, checked against the index: each tensor in the shard the index
    names, none twice, none missing."""
    files, index = weights.files, weights.index
    if index is None:
        return load_tensors(files[0])
    weight_map, _ = read_index(index)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = load_tensors(path)
        for key in part:
            if key in state:
                raise ModelError(f"{path}: tensor {key} is also in another shard")
            if weight_map.get(key) != path.name:
                where = f"in {weight_map[key]}" if key in weight_map else "not at all"
                raise ModelError(f"{path}: holds tensor {key}, which {index.name} lists {where}")
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ModelError(f"{index}: lists {len(missing)} tensors no shard holds ({', '.join(missing[:3])})")
    return state


def check_state_dict(path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Strict matching with a one-line message: missing/unexpected keys (a few named, with counts), or the first
    tensor whose shape disagrees with the config."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f", ... ({len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{more})")
        raise ModelError(f"{path}: weights do not match config.json: {'; '.join(parts)}")
    for k, shape in expected.items():
        got = tuple(state[k].shape)
        if got != shape:
            raise ModelError(f"{path}: {k} has shape {list(got)} but the config needs {list(shape)}")


def load_module(build: Callable[[], torch.nn.Module], weights: Weights, dtype: torch.dtype, device: torch.device | str,
                convert: Callable[[dict], dict] | None = None) -> torch.nn.Module:
    """Build a module on the meta device, adopt ``weights`` (strict; ``convert`` maps older key names first),
    cast to ``dtype``, move to ``device``, eval mode."""
    with torch.device("meta"):  # no random init: the weights come from the file
        model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = load_state(weights)
    if convert is not None:
        state = convert(state)
    check_state_dict(weights.index or weights.files[0], state, expected)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # a buffer not in the state dict
        model = build().to(dtype)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()
