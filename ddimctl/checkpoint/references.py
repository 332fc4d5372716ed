"""Model references -> where their files are (:func:`locate`).

Every reference a command accepts is located here:

* a local directory in diffusers' layout: a model folder (weights with ``config.json`` beside them, at the root or
  in ``unet/``) or a pipeline folder (``model_index.json`` names the pipeline class and its components);
* a single ``.safetensors`` file that carries its configs as JSON in the file's metadata (keys ``config``,
  ``scheduler_config``, ``ddimctl``), read without loading the weights;
* a built-in model name (:data:`ddimctl.BUILTIN_MODELS`), shipped as a directory under ``ddimctl/models/``;
* a Hugging Face Hub repo ``owner/name[@revision]`` or ``hf://owner/name[@revision]``, fetched into the normal
  Hugging Face cache (:mod:`.hub`): the configs first, then only the weights the configs call for (so a refused
  pipeline downloads no weights, and one variant's weights are fetched, not every variant's).

A local path that exists wins over a built-in name, which wins over a Hub repo. Only safetensors are loaded:
pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``, ...) are refused, since unpickling can run arbitrary code.
Every problem is a one-line :class:`~ddimctl.errors.ModelError` naming the reference or file.

Which family of models a folder holds, which of its components are read and what is refused is
:mod:`ddimctl.families`' decision (:func:`ddimctl.families.resolve`, which gives a ``Resolved``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import BUILTIN_MODELS
from ..errors import ModelError
from .autoencoders import Fetch, no_fetch
from .files import MODEL_INDEX, PICKLE_SUFFIXES, SCHEDULER_NAME, pickle_error, read_json
from .hub import hub_fetch, hub_variants, parse_hub_ref
from .model_index import ModelIndex
from .weights import DIFFUSERS_STEM, check_variant, variants_in

BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "models"
_OWN_WEIGHTS = re.compile(r"diffusion_pytorch_model(?:\.([A-Za-z0-9_-]+))?\.safetensors")


@dataclass(frozen=True)
class Location:
    """Where a reference's files are. ``root``: the folder (a local one, a built-in model's, or a Hub snapshot);
    ``file``: a single ``.safetensors`` file instead; ``label``: how messages name it (``owner/name@commit`` for
    the Hub); ``fetch(patterns)``: makes the files matching repo-relative ``patterns`` present (a Hub download;
    nothing for local files); ``variants(folder, stem)``: the weight variants a folder has (for the Hub, also
    those not downloaded); ``part``: the component folder or file the reference named inside a pipeline (its
    pipeline is read as a whole, with a note)."""

    ref: str
    source: str  # "builtin" | "dir" | "file" | "hub"
    root: Path
    label: str
    file: Path | None = None
    fetch: Fetch = no_fetch
    variants: Callable[..., list[str]] = variants_in
    repo_id: str | None = None
    revision: str | None = None
    part: Path | None = None
    variant: str | None = None  # the variant a unet/ weights file named in a pipeline is


def locate(ref: str | os.PathLike, config_patterns: list[str] | None = None) -> Location:
    """Where ``ref``'s files are: an existing local path, then a built-in name, then a Hub repo ``owner/name``
    (``@revision`` and an ``hf://`` prefix allowed), whose files matching ``config_patterns`` are fetched now (the
    configs) and the rest on demand. Raises :class:`ModelError` (one line) when it cannot."""
    ref = os.fspath(ref)
    path = Path(ref).expanduser()
    if ref and path.exists():
        return _locate_path(ref, path)
    if ref in BUILTIN_MODELS:
        root = BUILTIN_ROOT / ref
        if not root.is_dir():
            raise ModelError(
                f"{ref}: the built-in model is not installed ({root} is missing; reinstall ddimctl, or pass a model "
                "directory, .safetensors file or Hub repo with --model)"
            )
        return Location(ref, "builtin", root, ref)
    hub = parse_hub_ref(ref)
    if hub is not None:
        repo_id, revision = hub
        snapshot = hub_fetch(ref, repo_id, revision, list(config_patterns or []))
        commit = snapshot.name

        def fetch(patterns: list[str]) -> None:
            hub_fetch(ref, repo_id, commit, patterns)

        def variants(folder: Path, stem: str = DIFFUSERS_STEM) -> list[str]:
            rel = "" if folder == snapshot else f"{folder.relative_to(snapshot).as_posix()}/"
            return hub_variants(repo_id, commit, folder, rel, stem)

        return Location(ref, "hub", snapshot, f"{repo_id}@{commit}", fetch=fetch, variants=variants,
                        repo_id=repo_id, revision=commit)
    if ref.startswith("hf://"):
        raise ModelError(f"{ref}: not a Hub repo reference (expected hf://owner/name or hf://owner/name@revision)")
    raise ModelError(f"{ref}: no such file, directory, built-in model or Hub repo")


def _locate_path(ref: str, path: Path) -> Location:
    if path.is_dir():
        if path.name == "unet" and (path.parent / MODEL_INDEX).is_file():
            return Location(ref, "dir", path.parent, str(path.parent), part=path)
        return Location(ref, "dir", path, str(path))
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise pickle_error(path)
    if suffix == ".safetensors":
        pipeline = path.parent.parent
        own = _OWN_WEIGHTS.fullmatch(path.name)
        if path.parent.name == "unet" and (pipeline / MODEL_INDEX).is_file() and own:
            return Location(ref, "dir", pipeline, str(pipeline), file=path, part=path, variant=own.group(1))
        return Location(ref, "file", path.parent, str(path), file=path)
    raise ModelError(f"{path}: not a model checkpoint (expected a diffusers model directory or a .safetensors file)")


def check_variant_for(location: Location, variant: str | None) -> None:
    """Refuse a variant that cannot apply: not a variant name, or a single file (which has none)."""
    check_variant(variant)
    if variant is not None and location.file is not None:
        raise ModelError(f"{location.file}: a single file has no variants (variant {variant!r} applies to folders)")


def read_scheduler_config(root: Path, index: ModelIndex | None, label: str) -> tuple[dict[str, Any], str, list[Path]]:
    """A folder's scheduler config ``(config, source, files)``: ``scheduler_config.json`` at the root or in
    ``scheduler/`` (``{}`` when there is none: defaults apply), with the class ``model_index.json`` names when the
    config itself does not."""
    config: dict[str, Any] = {}
    source = f"{label} (no {SCHEDULER_NAME}: defaults)"
    files = []
    for p in (root / SCHEDULER_NAME, root / "scheduler" / SCHEDULER_NAME):
        if p.is_file():
            config, source = read_json(p), str(p)
            files.append(p)
            break
    named = index.component("scheduler") if index is not None else None
    if named is not None and "_class_name" not in config:
        config = {"_class_name": named[1], **config}  # model_index.json names the class
    return config, source, files
