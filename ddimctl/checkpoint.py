"""Model references -> checkpoint files -> a loaded UNet (and autoencoder) with its sampler settings; and saving.

One function, :func:`resolve`, turns every reference a command accepts into files on disk:

* a local directory in diffusers' layout: weights with ``config.json`` beside them, at the root or in ``unet/``;
  ``scheduler_config.json`` at the root or in ``scheduler/``; ``ddimctl.json`` for ddimctl's own metadata.
  Weights are ``diffusion_pytorch_model.safetensors``, or shards listed in
  ``diffusion_pytorch_model.safetensors.index.json``; ``variant="fp16"`` picks diffusers' variant files
  (``diffusion_pytorch_model.fp16.safetensors``, ``diffusion_pytorch_model.safetensors.index.fp16.json``);
* a pipeline directory: ``model_index.json`` names the pipeline class and its components. ddimctl runs a
  ``UNet2DModel`` ``unet`` with a ``scheduler``, and optionally an autoencoder (``vqvae`` or ``vae``: diffusers'
  ``VQModel`` or ``AutoencoderKL``) that decodes the UNet's latents into images (latent diffusion, e.g.
  ``LDMPipeline``). Any other component (a transformer, a text encoder, a tokenizer, a conditional UNet, ...) is a
  one-line :class:`ConfigError` naming it;
* a single ``.safetensors`` file that carries its configs as JSON in the file's metadata (keys ``config``,
  ``scheduler_config``, ``ddimctl``), read without loading the weights;
* a built-in model name (:data:`BUILTIN_MODELS`), shipped as a directory under ``ddimctl/models/``;
* a Hugging Face Hub repo ``owner/name[@revision]`` or ``hf://owner/name[@revision]``, fetched into the normal
  Hugging Face cache by ``huggingface_hub.snapshot_download`` (which honours ``HF_HUB_OFFLINE``,
  ``HF_HUB_CACHE`` and ``HF_TOKEN``): the configs first, then only the weights the configs call for (so a
  refused pipeline downloads no weights, and one variant's weights are fetched, not every variant's).

A local path that exists wins over a built-in name, which wins over a Hub repo. Only safetensors are loaded:
pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``, ...) are refused, since unpickling can run arbitrary code.
Every problem is a one-line :class:`ModelError` naming the reference or file.

Latent diffusion. :func:`load` gives the UNet and, for a latent pipeline, its autoencoder
(``Checkpoint.autoencoder``) when the caller asks for it with ``autoencoder=True`` (or pairs the UNet with an
autoencoder from elsewhere: ``autoencoder="path/or/owner/repo"``); a caller that does not say it decodes latents
gets a :class:`ModelError` for a latent pipeline rather than latents it would take for images.
Scaling: a ``VQModel`` config without ``scaling_factor`` (CompVis/ldm-celebahq-256's ``vqvae``) uses 1.0, the
scale LDM's VQ first stages were trained with, not diffusers' default 0.18215 (with which diffusers' own
LDMPipeline decodes that model wrongly, diffusers issue #6725); a note says so, and
``autoencoder_scaling_factor`` overrides any config.

Notes: what ddimctl reads differently from diffusers, or does not use (learned variance channels, scheduler keys
it does not follow, the autoencoder's scaling, a variant fallback), is collected as one-line strings in
``Resolved.notes`` / ``Checkpoint.notes`` for a front end to show; the library never prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import ConfigError, ModelError, OutputError, first_line
from .settings import SamplerSettings

from . import BUILTIN_MODELS, DEFAULT_MODEL  # noqa: E402,F401  (defined once, torch-free, in the package root)

BUILTIN_ROOT = Path(__file__).resolve().parent / "models"

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
SCHEDULER_NAME = "scheduler_config.json"
META_NAME = "ddimctl.json"
PIPELINE_INDEX = "model_index.json"
AUTOENCODER_COMPONENTS = ("vqvae", "vae")  # the component names diffusers' latent pipelines give the autoencoder
AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# What a Hub snapshot fetches first: configs and shard indexes (every variant's: they are small), at the root and
# in the component folders ddimctl reads; transformer/config.json only to say why such a repo is refused.
HUB_CONFIG_FILES = [PIPELINE_INDEX, SCHEDULER_NAME, META_NAME, f"scheduler/{SCHEDULER_NAME}",
                    f"transformer/{CONFIG_NAME}"]
for _folder in ("", "unet/", "vae/", "vqvae/"):
    HUB_CONFIG_FILES += [f"{_folder}{CONFIG_NAME}", f"{_folder}diffusion_pytorch_model.safetensors.index*.json"]
del _folder
_HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_VARIANT = re.compile(r"[A-Za-z0-9_-]+")
_SHARD = re.compile(r"diffusion_pytorch_model(?:\.[A-Za-z0-9_-]+)?-\d+-of-\d+\.safetensors")
_CONVERT_HINT = "convert it to .safetensors, e.g. diffusers' save_pretrained(dir, safe_serialization=True)"
_RUNS = "ddimctl runs UNet2DModel pipelines: unet + scheduler, optionally with a vqvae/vae autoencoder"
# VQModel's and AutoencoderKL's default scaling_factor in diffusers (written into every config it saves)
DIFFUSERS_DEFAULT_SCALING = 0.18215


def _pickle_error(path: Path | str) -> ModelError:
    return ModelError(f"{path}: refusing to load a pickle checkpoint (it can run arbitrary code); {_CONVERT_HINT}")


def variant_name(name: str, variant: str | None) -> str:
    """diffusers' file name of ``variant``: ``diffusion_pytorch_model.fp16.safetensors``,
    ``diffusion_pytorch_model.safetensors.index.fp16.json`` (the variant goes before the last suffix)."""
    if variant is None:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def _check_variant(variant: str | None) -> None:
    if variant is not None and (not isinstance(variant, str) or not _VARIANT.fullmatch(variant)):
        raise ModelError(f"variant {variant!r}: not a variant name (letters, digits, '_' and '-', e.g. fp16)")


# ----------------------------------------------------------------------------------------------------------------
# Weight files: one safetensors file or shards, default or a variant


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


def _read_index(index: Path) -> tuple[dict[str, str], list[Path]]:
    """The ``weight_map`` of a shard index and its shard files (sorted), checked to be plain names that exist."""
    doc = _read_json(index)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index}: not a shard index (no 'weight_map' object)")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise ModelError(f"{index}: shard name {name!r} is not a plain file name in the index's folder")
        if not name.endswith(".safetensors"):
            if name.lower().endswith(PICKLE_SUFFIXES):
                raise _pickle_error(index.parent / name)
            raise ModelError(f"{index}: shard {name!r} is not a .safetensors file")
    return weight_map, [index.parent / n for n in names]


def _find_weights(folder: Path, variant: str | None) -> Weights | None:
    """The weights of ``variant`` in ``folder``: a shard index first (as diffusers), then the single file."""
    index = folder / variant_name(WEIGHTS_INDEX_NAME, variant)
    if index.is_file():
        _, shards = _read_index(index)
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            more = f" ({len(missing)} missing)" if len(missing) > 1 else ""
            raise ModelError(f"{index}: shard {missing[0]} is missing{more}")
        return Weights(tuple(shards), index, variant)
    single = folder / variant_name(WEIGHTS_NAME, variant)
    if single.is_file():
        return Weights((single,), None, variant)
    return None


def _variants_in(folder: Path) -> list[str]:
    """The variants whose weights are in ``folder`` (single files or shard indexes)."""
    found = set()
    single = re.compile(r"diffusion_pytorch_model\.([A-Za-z0-9_-]+)\.safetensors")
    index = re.compile(r"diffusion_pytorch_model\.safetensors\.index\.([A-Za-z0-9_-]+)\.json")
    if folder.is_dir():
        for p in folder.iterdir():
            if _SHARD.fullmatch(p.name):
                continue  # a shard (diffusion_pytorch_model.fp16-00001-of-00002.safetensors): its index says it
            m = single.fullmatch(p.name) or index.fullmatch(p.name)
            if m:
                found.add(m.group(1))
    return sorted(found)


def _weight_patterns(folder: Path, rel: str, variant: str | None) -> list[str]:
    """Repo paths (relative, prefix ``rel``) of ``variant``'s weights in ``folder``: the shards its index names
    (the index is fetched with the configs), else the single file."""
    index = folder / variant_name(WEIGHTS_INDEX_NAME, variant)
    if index.is_file():
        _, shards = _read_index(index)
        return [rel + p.name for p in shards]
    return [rel + variant_name(WEIGHTS_NAME, variant)]


def _select_weights(folder: Path, variant: str | None, where: str, variants: Callable[[], list[str]]) -> Weights | None:
    """The weights to load from ``folder`` for the requested ``variant``. Only variant files and none asked: a
    one-line ModelError that says which to ask for; a variant asked and not there: a ModelError naming what is."""
    weights = _find_weights(folder, variant)
    if weights is not None:
        return weights
    if variant is None:
        found = variants()
        if found:
            names = ", ".join(repr(v) for v in found)
            raise ModelError(
                f"{where}: no {WEIGHTS_NAME}, only the {names} variant{'s' if len(found) > 1 else ''} of the weights "
                f"({variant_name(WEIGHTS_NAME, found[0])}); load it with variant {found[0]!r}"
            )
        return None
    default = _find_weights(folder, None)
    found = [v for v in variants() if v != variant]
    what = []
    if default is not None:
        what.append(f"the default weights are {default.files[0].name if not default.sharded else default.index.name}: "
                    "load without a variant")
    if found:
        what.append(f"variants here: {', '.join(found)}")
    raise ModelError(
        f"{where}: no {variant!r} variant of the weights ({variant_name(WEIGHTS_NAME, variant)} or "
        f"{variant_name(WEIGHTS_INDEX_NAME, variant)})" + (f"; {'; '.join(what)}" if what else "")
    )


# ----------------------------------------------------------------------------------------------------------------
# Pipelines: model_index.json


@dataclass(frozen=True)
class PipelineIndex:
    """A ``model_index.json``: the pipeline ``class_name`` and its non-null ``components`` as
    ``{name: (library, class)}``."""

    path: Path
    class_name: str | None
    components: dict[str, tuple[str | None, str]]

    def component(self, name: str) -> tuple[str | None, str] | None:
        return self.components.get(name)


_UNET_CLASSES = {
    "UNet2DConditionModel": "a text/image-conditioned UNet with cross-attention",
    "UNet1DModel": "a 1-D (audio) UNet",
    "UNet3DConditionModel": "a video UNet",
    "UNetSpatioTemporalConditionModel": "a video UNet",
    "UNet2DModel": "",
}
_REFUSED_PIPELINES = {
    "LDMSuperResolutionPipeline": "image-conditioned (super-resolution: the UNet takes the low-resolution image)",
    "LDMTextToImagePipeline": "text-conditioned",
}


def _describe_class(entry: tuple[str | None, str]) -> str:
    lib, cls = entry
    return f"{lib} {cls}" if lib else str(cls)


def _read_pipeline(root: Path) -> PipelineIndex | None:
    """Read and check ``root/model_index.json`` (None when absent): every component ddimctl cannot use is a
    one-line ConfigError naming it."""
    path = root / PIPELINE_INDEX
    if not path.is_file():
        return None
    raw = _read_json(path)
    name = raw.get("_class_name")
    components: dict[str, tuple[str | None, str]] = {}
    for key, value in raw.items():
        if key.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2:
            continue  # metadata, or a pipeline argument that is not a component (e.g. DiTPipeline's id2label)
        lib, cls = value
        if cls is None:
            continue  # an optional component left out ([null, null])
        components[key] = (lib, str(cls))
    pipeline = PipelineIndex(path, name if isinstance(name, str) else None, components)
    _check_components(pipeline)
    return pipeline


def _check_components(p: PipelineIndex) -> None:
    pname = p.class_name or "this pipeline"
    where = str(p.path)
    if p.class_name in _REFUSED_PIPELINES:
        raise ConfigError(f"{where}: {p.class_name} is {_REFUSED_PIPELINES[p.class_name]}; {_RUNS}")
    for key, entry in p.components.items():
        if key == "transformer" or ("Transformer" in entry[1] and not key.startswith("text_encoder")):
            raise ConfigError(
                f"{where}: {pname}'s denoiser is a transformer ({key}: {_describe_class(entry)}, DiT-style), "
                f"not a UNet2DModel; {_RUNS}"
            )
    for key, entry in p.components.items():
        if key.startswith(("text_encoder", "tokenizer")) or key in ("bert", "image_encoder", "prior"):
            raise ConfigError(
                f"{where}: {pname} is conditioned on text or images (component {key}: {_describe_class(entry)}); "
                f"{_RUNS}, unconditional or class-conditional"
            )
    unet = p.component("unet")
    if unet is not None and unet[1] != "UNet2DModel":
        why = _UNET_CLASSES.get(unet[1])
        raise ConfigError(
            f"{where}: component unet is {_describe_class(unet)}{f' ({why})' if why else ''}; {_RUNS}"
        )
    present = [k for k in AUTOENCODER_COMPONENTS if k in p.components]
    if len(present) > 1:
        raise ConfigError(f"{where}: both vqvae and vae components: cannot tell which decodes the latents")
    for key in present:
        cls = p.components[key][1]
        if cls not in AUTOENCODER_CLASSES:
            from .nets.autoencoders import autoencoder_from_config

            autoencoder_from_config({"_class_name": cls}, f"{where} (component {key})")  # raises, naming the class
    for key, entry in p.components.items():
        if key not in ("unet", "scheduler", *AUTOENCODER_COMPONENTS):
            raise ConfigError(f"{where}: component {key} ({_describe_class(entry)}) is not one ddimctl uses; {_RUNS}")


# ----------------------------------------------------------------------------------------------------------------
# Resolution


@dataclass
class ResolvedAutoencoder:
    """An autoencoder (diffusers ``AutoencoderKL`` or ``VQModel``) before its weights are read.

    ``config``: validated and complete, with the scaling policy applied (see the module docstring);
    ``raw_config``: as the file has it; ``weights``: its safetensors file(s); ``folder``: where its config is
    (a pipeline's ``vqvae/``, a model folder, ...); ``notes``: one-line notes (scaling, variant fallback).
    """

    ref: str
    source: str  # "pipeline" (the model's own component) | "dir" | "file" | "hub"
    config: dict[str, Any]
    raw_config: dict[str, Any]
    config_source: str
    weights: Weights
    files: list[Path] = field(default_factory=list)
    repo_id: str | None = None
    revision: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]

    @property
    def scaling_factor(self) -> float:
        return float(self.config["scaling_factor"])

    @property
    def downscale_factor(self) -> int:
        """Image side / latent side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the diffusion model sees (a VQModel's ``vq_embed_dim`` when set)."""
        if self.class_name == "VQModel" and self.config.get("vq_embed_dim") is not None:
            return int(self.config["vq_embed_dim"])
        return int(self.config["latent_channels"])

    @property
    def image_channels(self) -> int:
        return int(self.config["out_channels"])

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "ref": self.ref,
            "source": self.source,
            "class": self.class_name,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "config": self.config_source,
            "weights": [str(p) for p in self.weights.files],
            "variant": self.weights.variant,
            "scaling_factor": self.scaling_factor,
            "shift_factor": cfg.get("shift_factor"),
            "latents_mean_std": cfg.get("latents_mean") is not None,
            "downscale_factor": self.downscale_factor,
            "latent_channels": self.latent_channels,
            "image_channels": self.image_channels,
            "parameters": _count_elements(self.weights.files),
        }


@dataclass
class Resolved:
    """What a model reference points to, before any weights are read.

    ``model_config``: the UNet config, validated and complete (``ddimctl.nets.unet2d.normalize_config``);
    ``scheduler_config``: the raw diffusers scheduler config ({} when there is none: defaults apply);
    ``meta``: ddimctl's own metadata ({} when absent); ``revision``: the 40-hex commit for Hub refs, else None.
    ``config_source``/``scheduler_source`` name where the configs came from, for messages.
    ``weights``: the (first) safetensors file; ``weight_files``: all of them (the shards, in order, when
    ``weights_index`` names a sharded checkpoint); ``variant``: which variant they are (None: the default).
    ``pipeline``: the ``model_index.json`` read, if any; ``autoencoder``: the autoencoder that decodes the UNet's
    latents (a latent pipeline's own, or one paired with it), None for a pixel-space model.
    ``notes``: one line each about what ddimctl reads differently from diffusers or does not use.
    """

    ref: str
    source: str  # "builtin" | "dir" | "file" | "hub"
    weights: Path
    model_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None
    revision: str | None = None
    files: list[Path] = field(default_factory=list)
    config_source: str = CONFIG_NAME
    scheduler_source: str = SCHEDULER_NAME
    weight_files: list[Path] = field(default_factory=list)
    weights_index: Path | None = None
    variant: str | None = None
    pipeline: PipelineIndex | None = None
    autoencoder: ResolvedAutoencoder | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.weight_files:
            self.weight_files = [self.weights]

    def settings(self) -> SamplerSettings:
        """The sampler settings of the scheduler config (missing keys: the named class's defaults, see
        :meth:`SamplerSettings.from_config`)."""
        return SamplerSettings.from_config(self.scheduler_config, source=self.scheduler_source)

    # shapes -------------------------------------------------------------------------------------------------

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the UNet works on: the images of a pixel model, the latents of a latent one."""
        size = _image_size(self.model_config, self.config_source)
        return (int(self.model_config["in_channels"]), size, size)

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """The UNet's (C, h, w) when an autoencoder decodes it; None for a pixel-space model."""
        return self.sample_shape if self.autoencoder is not None else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes: decoded by the autoencoder when there is one."""
        c, h, w = self.sample_shape
        if self.autoencoder is None:
            return (c, h, w)
        f = self.autoencoder.downscale_factor
        return (self.autoencoder.image_channels, h * f, w * f)

    @property
    def prediction_channels(self) -> int:
        """Output channels that hold the prediction: all of them, or the first half of a learned-variance UNet's."""
        return int(self.model_config["in_channels"])

    @property
    def learned_variance(self) -> bool:
        return self.model_config["out_channels"] == 2 * self.model_config["in_channels"]

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for ``ddimctl info``; reads the weights' headers and hashes the files, loads nothing.

        ``image_size``/``channels`` are the images the model makes (decoded, for a latent pipeline);
        ``latent_shape`` the UNet's latents (null for a pixel model).
        """
        cfg = self.model_config
        settings = self.settings()
        scheduler = settings.to_diffusers_config()
        if scheduler.get("trained_betas") is not None:
            scheduler["trained_betas"] = f"<{len(scheduler['trained_betas'])} values>"
        summary_keys = (
            "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types", "mid_block_type", "attention_head_dim", "norm_num_groups",
            "act_fn", "time_embedding_type", "flip_sin_to_cos", "freq_shift", "resnet_time_scale_shift",
            "num_class_embeds", "class_embed_type",
        )
        sharded = self.weights_index is not None
        image = self.image_shape
        return {
            "ref": self.ref,
            "source": self.source,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "weights": str(self.weights_index if sharded else self.weights),
            "weights_sha256": None if sharded else sha256_file(self.weights),
            "shards": [{"file": str(p), "sha256": sha256_file(p)} for p in self.weight_files] if sharded else None,
            "variant": self.variant,
            "files": [str(p) for p in self.files],
            "parameters": _count_elements(self.weight_files),
            "tensors": sum(len(_tensor_shapes(p)) for p in self.weight_files),
            "image_size": image[1],
            "channels": image[0],
            "latent_shape": list(self.latent_shape) if self.latent_shape else None,
            "prediction_type": settings.prediction_type,
            "prediction_channels": self.prediction_channels,
            "learned_variance": self.learned_variance,
            "num_class_embeds": cfg.get("num_class_embeds"),
            "kind": settings.kind,
            "pipeline": None if self.pipeline is None else {
                "class": self.pipeline.class_name,
                "components": {k: list(v) for k, v in self.pipeline.components.items()},
            },
            "autoencoder": self.autoencoder.describe() if self.autoencoder is not None else None,
            "model_config": {k: cfg.get(k) for k in summary_keys},
            "scheduler": scheduler,
            "scheduler_class": settings.scheduler_class,
            "meta": self.meta,
            "notes": list(self.notes),
        }


def resolve(
    ref: str | os.PathLike,
    *,
    variant: str | None = None,
    autoencoder: str | os.PathLike | ResolvedAutoencoder | None = None,
    autoencoder_scaling_factor: float | None = None,
) -> Resolved:
    """Resolve a model reference: an existing local path, then a built-in name, then a Hub repo ``owner/name``
    (``@revision`` and an ``hf://`` prefix allowed). Raises :class:`ModelError` (one line) when it cannot.

    ``variant``: load diffusers' variant files (``"fp16"``: ``diffusion_pytorch_model.fp16.safetensors`` or its
    shards) instead of the default weights. ``autoencoder``: a reference to an autoencoder (see
    :func:`resolve_autoencoder`) that decodes this UNet's latents, instead of the pipeline's own.
    ``autoencoder_scaling_factor``: use this latent scale instead of the autoencoder config's.
    """
    _check_variant(variant)
    ref = os.fspath(ref)
    path = Path(ref).expanduser()
    if ref and path.exists():
        r = _resolve_path(ref, path, variant)
    elif ref in BUILTIN_MODELS:
        r = _resolve_builtin(ref, variant)
    else:
        hub = parse_hub_ref(ref)
        if hub is not None:
            r = _resolve_hub(ref, *hub, variant)
        elif ref.startswith("hf://"):
            raise ModelError(f"{ref}: not a Hub repo reference (expected hf://owner/name or hf://owner/name@revision)")
        else:
            raise ModelError(f"{ref}: no such file, directory, built-in model or Hub repo")
    return with_autoencoder(r, autoencoder, autoencoder_scaling_factor, variant)


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for ``owner/name``, ``owner/name@rev`` and ``hf://...``; None if ``ref`` is not one.

    A name ending in ``.safetensors`` or a pickle suffix is taken for a missing file, not a repo.
    """
    text = ref[len("hf://"):] if ref.startswith("hf://") else ref
    repo_id, at, revision = text.partition("@")
    if not _HUB_REPO.fullmatch(repo_id) or (at and not revision):
        return None
    if not ref.startswith("hf://") and repo_id.lower().endswith((".safetensors",) + PICKLE_SUFFIXES):
        return None
    return repo_id, (revision or None)


def _resolve_path(ref: str, path: Path, variant: str | None) -> Resolved:
    if path.is_dir():
        if path.name == "unet" and (path.parent / PIPELINE_INDEX).is_file():
            return _as_part_of_pipeline(ref, path, path.parent, variant)
        return _resolve_dir(ref, path, "dir", variant=variant)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise _pickle_error(path)
    if suffix == ".safetensors":
        if variant is not None:
            raise ModelError(f"{path}: a single file has no variants (variant {variant!r} applies to folders)")
        pipeline = path.parent.parent
        if path.parent.name == "unet" and (pipeline / PIPELINE_INDEX).is_file():
            own = re.fullmatch(r"diffusion_pytorch_model(?:\.([A-Za-z0-9_-]+))?\.safetensors", path.name)
            if own:
                r = _as_part_of_pipeline(ref, path, pipeline, own.group(1))
                if r.weights == path and r.weights_index is None:
                    return r
        return _resolve_file(ref, path)
    raise ModelError(f"{path}: not a model checkpoint (expected a diffusers model directory or a .safetensors file)")


def _as_part_of_pipeline(ref: str, part: Path, root: Path, variant: str | None) -> Resolved:
    """The UNet of a pipeline folder, named by its unet/ folder or weights file: read as the pipeline, so that its
    scheduler (and, for a latent pipeline, its autoencoder) come with it; a note says so."""
    r = _resolve_dir(ref, root, "dir", variant=variant)
    r.notes.insert(0, f"{part}: read as part of the pipeline {root} (its scheduler and components)")
    return r


def _resolve_builtin(name: str, variant: str | None) -> Resolved:
    root = BUILTIN_ROOT / name
    if not root.is_dir():
        raise ModelError(
            f"{name}: the built-in model is not installed ({root} is missing; reinstall ddimctl, or pass a model "
            "directory, .safetensors file or Hub repo with --model)"
        )
    return _resolve_dir(name, root, "builtin", variant=variant)


def _looks_like_model(folder: Path) -> bool:
    """A folder holding a model: a config.json or any diffusers weights file (any variant, shards, pickles)."""
    if not folder.is_dir():
        return False
    if (folder / CONFIG_NAME).is_file():
        return True
    return any(p.name.startswith("diffusion_pytorch_model") for p in folder.iterdir())


def _unet_folder(root: Path, pipeline: PipelineIndex | None) -> Path | None:
    if pipeline is not None and pipeline.component("unet") is not None and (root / "unet").is_dir():
        return root / "unet"
    return next((f for f in (root, root / "unet") if _looks_like_model(f)), None)


def _autoencoder_component(root: Path, pipeline: PipelineIndex | None) -> str | None:
    """The name of a pipeline folder's autoencoder component (vqvae/ or vae/), from model_index.json or, without
    one, from a vqvae/ or vae/ folder holding a config.json."""
    if pipeline is not None:
        named = [k for k in AUTOENCODER_COMPONENTS if pipeline.component(k) is not None]
        if named:
            return named[0]
    present = [k for k in AUTOENCODER_COMPONENTS if (root / k / CONFIG_NAME).is_file()]
    if len(present) > 1:
        raise ConfigError(f"{root}: both vqvae/ and vae/ hold a config.json: cannot tell which decodes the latents")
    return present[0] if present else None


Fetch = Callable[[list[str]], None]


def _no_fetch(patterns: list[str]) -> None:
    return None


def _resolve_dir(
    ref: str, root: Path, source: str, label: str | None = None, variant: str | None = None,
    fetch: Fetch = _no_fetch, variants: Callable[[Path], list[str]] = _variants_in,
) -> Resolved:
    """A diffusers-layout directory (model dir, pipeline dir with unet/ + scheduler/ [+ vqvae/ or vae/], or a Hub
    snapshot). Every config is read and checked before any weights: ``fetch(repo paths)`` is called once the
    configs say which weight files are needed (a Hub snapshot downloads them then; local folders have them)."""
    label = label or str(root)
    pipeline = _read_pipeline(root)
    folder = _unet_folder(root, pipeline)
    if folder is None:
        raise _no_weights_error(root, label, source == "hub")
    rel = "" if folder == root else f"{folder.name}/"
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        if source == "hub" and not any(p.name.startswith("diffusion_pytorch_model") for p in folder.iterdir()):
            raise _no_weights_error(root, label, True)
        raise ModelError(f"{config_path}: missing (a diffusers model needs config.json beside {WEIGHTS_NAME})")
    model_config = _model_config(_read_json(config_path), str(config_path))

    scheduler_config: dict[str, Any] = {}
    scheduler_source = f"{label} (no {SCHEDULER_NAME}: defaults)"
    scheduler_files = []
    for p in (root / SCHEDULER_NAME, root / "scheduler" / SCHEDULER_NAME):
        if p.is_file():
            scheduler_config, scheduler_source = _read_json(p), str(p)
            scheduler_files.append(p)
            break
    named = pipeline.component("scheduler") if pipeline is not None else None
    if named is not None and "_class_name" not in scheduler_config:
        scheduler_config = {"_class_name": named[1], **scheduler_config}  # model_index.json names the class
    settings = SamplerSettings.from_config(scheduler_config, source=scheduler_source)  # refusals before weights

    component = _autoencoder_component(root, pipeline)
    ae_plan = None
    if component is not None:
        ae_folder = root / component
        ae_plan = _autoencoder_config_of(ae_folder)

    patterns = _weight_patterns(folder, rel, variant)
    if ae_plan is not None:
        patterns += _weight_patterns(ae_folder, f"{component}/", variant)
    fetch(patterns)
    where = f"{label}/{rel.rstrip('/')}" if rel else label
    weights = _select_weights(folder, variant, where, lambda: variants(folder))
    if weights is None:
        raise _no_weights_error(root, label, source == "hub")

    notes: list[str] = []
    metadata = _safetensors_metadata(weights.files[0])
    meta_path = root / META_NAME
    files = [config_path, *([weights.index] if weights.index else []), *weights.files, *scheduler_files]
    if meta_path.is_file():
        meta = _read_json(meta_path)
        files.append(meta_path)
    else:
        meta = _metadata_json(metadata, "ddimctl", weights.files[0]) or {}
    if pipeline is not None:
        files.append(pipeline.path)
    autoencoder = None
    if ae_plan is not None:
        trained = meta.get("autoencoder") if isinstance(meta.get("autoencoder"), dict) else {}
        autoencoder = _finish_autoencoder(
            ref, "pipeline", ae_folder, f"{label}/{component}", ae_plan, variant, None,
            lambda pats: fetch([f"{component}/{p}" for p in pats]), variants,
            trained_scale=trained.get("scaling_factor"),
        )
    notes += _unet_notes(model_config, str(config_path), settings)
    r = Resolved(ref, source, weights.files[0], model_config, scheduler_config, meta, files=files,
                 config_source=str(config_path), scheduler_source=scheduler_source, weight_files=list(weights.files),
                 weights_index=weights.index, variant=weights.variant, pipeline=pipeline, notes=notes)
    if autoencoder is not None:
        r = _attach_autoencoder(r, autoencoder)
    return r


def _no_weights_error(root: Path, label: str, hub: bool) -> ModelError:
    """Why a folder has no UNet weights ddimctl can load: a transformer model, pickles only, other files."""
    if (root / "transformer").is_dir():
        return ConfigError(
            f"{label}: transformer/ holds a transformer (DiT-style) denoiser, not a UNet2DModel; {_RUNS}"
        )
    if hub:
        return ModelError(
            f"{label}: no {WEIGHTS_NAME} at the root or in unet/ (ddimctl loads only safetensors weights; if the "
            "repo has only pickle .bin weights, convert them with diffusers' save_pretrained(dir, "
            "safe_serialization=True))"
        )
    _refuse_pickles_in(root, label)
    others = sorted(p.name for p in root.glob("*.safetensors")) if root.is_dir() else []
    if others:
        return ModelError(
            f"{label}: no {WEIGHTS_NAME} here or in unet/ (found {others[0]}: pass that file itself if it "
            "carries its config)"
        )
    return ModelError(f"{label}: no {WEIGHTS_NAME} here or in unet/ (not a diffusers model directory)")


def _refuse_pickles_in(root: Path, label: str) -> None:
    """Raise the pickle refusal when a directory without safetensors holds pickle weights."""
    for folder in (root, root / "unet"):
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
            if found:
                raise ModelError(
                    f"{found[0]}: refusing to load a pickle checkpoint (it can run arbitrary code) and {label} has no "
                    f"{WEIGHTS_NAME}; {_CONVERT_HINT}"
                )


def _unet_notes(cfg: Mapping[str, Any], source: str, settings: SamplerSettings) -> list[str]:
    """Notes about the UNet: learned variance (its variance half unused), class conditioning; and the scheduler's
    notes (less its variance_type one when the UNet's note says it)."""
    notes = []
    c, out = cfg["in_channels"], cfg["out_channels"]
    learned = out == 2 * c
    if learned:
        notes.append(
            f"{source}: out_channels {out} = 2 x in_channels (learned variance): ddimctl uses the first {c} channels, "
            f"the {settings.prediction_type} prediction; the variance channels are not used (exact at eta 0; at "
            "eta > 0 DDIM's sigma_t(eta) replaces them)"
        )
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        kind = cfg.get("class_embed_type")
        what = (f"class ids 0..{cfg['num_class_embeds'] - 1}" if kind is None
                else f"class_embed_type {kind!r}")
        notes.append(f"{source}: class-conditional ({what}): samples are conditioned on a class label")
    for line in settings.notes:
        if learned and " variance_type " in line:
            continue
        notes.append(line)
    return notes


def _resolve_file(ref: str, path: Path) -> Resolved:
    """A single .safetensors file with its configs in the metadata (or a config.json beside it)."""
    metadata = _safetensors_metadata(path)
    files = [path]
    raw = _metadata_json(metadata, "config", path)
    config_source = f"{path} (metadata 'config')"
    if raw is None:
        beside = path.parent / CONFIG_NAME
        if _SHARD.fullmatch(path.name):
            raise ModelError(f"{path}: one shard of a sharded checkpoint; pass its folder ({path.parent})")
        if not beside.is_file():
            raise ModelError(
                f"{path}: no model config (expected a 'config' entry in the safetensors metadata, or a config.json "
                "beside the file)"
            )
        raw, config_source = _read_json(beside), str(beside)
        files.append(beside)
    model_config = _model_config(raw, config_source)

    scheduler_config = _metadata_json(metadata, "scheduler_config", path)
    scheduler_source = f"{path} (metadata 'scheduler_config')"
    if scheduler_config is None:
        scheduler_config, scheduler_source = {}, f"{path} (no scheduler config: defaults)"
        for p in (path.parent / SCHEDULER_NAME, path.parent.parent / "scheduler" / SCHEDULER_NAME):
            if p.is_file():
                scheduler_config, scheduler_source = _read_json(p), str(p)
                files.append(p)
                break
    settings = SamplerSettings.from_config(scheduler_config, source=scheduler_source)
    meta = _metadata_json(metadata, "ddimctl", path) or {}
    return Resolved(ref, "file", path, model_config, scheduler_config, meta, files=files,
                    config_source=config_source, scheduler_source=scheduler_source,
                    notes=_unet_notes(model_config, config_source, settings))


# ----------------------------------------------------------------------------------------------------------------
# Autoencoders: a latent pipeline's own, or one paired with a UNet


@dataclass(frozen=True)
class _AutoencoderPlan:
    raw: dict[str, Any]
    source: str
    path: Path | None


def _autoencoder_config_of(folder: Path) -> _AutoencoderPlan:
    """Read (and check the class of) an autoencoder folder's config.json."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{path}: missing (an autoencoder needs config.json beside its weights)")
    raw = _read_json(path)
    _autoencoder_config(raw, str(path), None)  # refusals (class, keys) before any weights are fetched
    return _AutoencoderPlan(raw, str(path), path)


def _autoencoder_config(
    raw: Mapping[str, Any], source: str, scaling_factor: float | None, trained_scale: float | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The validated config of an autoencoder with ddimctl's scaling policy applied, and its notes.

    * ``scaling_factor`` given: it replaces the config's (a note names both);
    * the config's ``scaling_factor`` is ``trained_scale``, the scale ddimctl's training recorded for the UNet
      beside it (``ddimctl.json``): kept, and none of the guesses below applies;
    * a ``VQModel`` config without ``scaling_factor``: 1.0, the scale of LDM's VQ first stages (CompVis'
      LatentDiffusion default; CompVis/ldm-celebahq-256), not diffusers' class default 0.18215, with which
      diffusers' LDMPipeline decodes such a model wrongly (diffusers issue #6725);
    * a ``VQModel`` config that says 0.18215 (diffusers writes its default into every config it saves, so a
      re-saved LDM says it too): kept, with a note;
    * an ``AutoencoderKL`` config without one: diffusers' default 0.18215 (Stable Diffusion's VAE), with a note.
    """
    import torch as _torch

    from .nets.autoencoders import autoencoder_from_config

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    cls = raw.get("_class_name")
    cfg = dict(raw)
    notes: list[str] = []
    if scaling_factor is not None:
        if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) or not scaling_factor > 0:
            raise ConfigError(f"autoencoder scaling_factor {scaling_factor!r}: expected a positive number")
        said = raw.get("scaling_factor", f"none (default {DIFFUSERS_DEFAULT_SCALING})")
        cfg["scaling_factor"] = float(scaling_factor)
        notes.append(f"{source}: scaling_factor {float(scaling_factor)} as given (the config says {said})")
    elif trained_scale is not None and raw.get("scaling_factor") == trained_scale:
        pass  # ddimctl trained the UNet at this scale: nothing to guess
    elif cls == "VQModel" and "scaling_factor" not in raw:
        cfg["scaling_factor"] = 1.0
        notes.append(
            f"{source}: no scaling_factor; ddimctl uses 1.0, the scale LDM's VQ models were trained with, not "
            f"diffusers' default {DIFFUSERS_DEFAULT_SCALING} (which decodes them wrongly: diffusers issue #6725); "
            "set autoencoder_scaling_factor to override"
        )
    elif cls == "VQModel" and raw.get("scaling_factor") == DIFFUSERS_DEFAULT_SCALING:
        notes.append(
            f"{source}: scaling_factor {DIFFUSERS_DEFAULT_SCALING} is diffusers' default, which save_pretrained "
            "writes into every VQModel config; CompVis' LDM VQ models use 1.0 (diffusers issue #6725): set "
            "autoencoder_scaling_factor 1.0 if this is one"
        )
    elif cls == "AutoencoderKL" and "scaling_factor" not in raw:
        notes.append(
            f"{source}: no scaling_factor; diffusers' default {DIFFUSERS_DEFAULT_SCALING} (Stable Diffusion's VAE) "
            "applies; set autoencoder_scaling_factor to override"
        )
    with _torch.device("meta"):  # validates every key; builds no real weights
        model = autoencoder_from_config(cfg, source)
    return dict(model.config), notes


def _finish_autoencoder(
    ref: str, source: str, folder: Path, where: str, plan: _AutoencoderPlan, variant: str | None,
    scaling_factor: float | None, fetch: Fetch, variants: Callable[[Path], list[str]],
    trained_scale: float | None = None,
) -> ResolvedAutoencoder:
    """Pick an autoencoder folder's weights (its variant when asked; else, or when it has none, the default
    weights with a note) and apply the scaling policy (``trained_scale``: see :func:`_autoencoder_config`)."""
    config, notes = _autoencoder_config(plan.raw, plan.source, scaling_factor, trained_scale)
    weights = _find_weights(folder, variant) if variant is not None else None
    if weights is None:
        if variant is not None:
            fetch(_weight_patterns(folder, "", None))
        weights = _select_weights(folder, None, where, lambda: variants(folder))
        if weights is None:
            _refuse_pickles_in_folder(folder, where)
            raise ModelError(f"{where}: no {WEIGHTS_NAME} for the autoencoder (ddimctl loads only safetensors weights)")
        if variant is not None:
            notes.append(f"{where}: no {variant!r} variant of the autoencoder; loaded its default weights")
    files = [p for p in (plan.path,) if p is not None]
    files += ([weights.index] if weights.index else []) + list(weights.files)
    return ResolvedAutoencoder(ref, source, config, dict(plan.raw), plan.source, weights, files, notes=notes)


def _refuse_pickles_in_folder(folder: Path, where: str) -> None:
    if folder.is_dir():
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
        if found:
            raise ModelError(
                f"{found[0]}: refusing to load a pickle checkpoint (it can run arbitrary code) and {where} has no "
                f"{WEIGHTS_NAME}; {_CONVERT_HINT}"
            )


def _autoencoder_folder(root: Path, label: str) -> tuple[Path, str]:
    """Where a reference's autoencoder is: a pipeline's vqvae/ or vae/ component, or the folder itself."""
    pipeline = _read_pipeline_loosely(root)
    component = _autoencoder_component(root, pipeline)
    if component is not None:
        return root / component, f"{component}/"
    config = root / CONFIG_NAME
    if config.is_file():
        cls = _read_json(config).get("_class_name")
        if cls in _UNET_CLASSES:
            supported = ", ".join(AUTOENCODER_CLASSES)
            raise ConfigError(f"{config}: a {cls}, not an autoencoder (supported: {supported})")
        return root, ""  # any other class: autoencoder_from_config says what it is
    raise ModelError(f"{label}: no autoencoder here (expected config.json, or a pipeline's vqvae/ or vae/ folder)")


def _read_pipeline_loosely(root: Path) -> PipelineIndex | None:
    """model_index.json for finding an autoencoder component: other components do not matter there."""
    path = root / PIPELINE_INDEX
    if not path.is_file():
        return None
    raw = _read_json(path)
    comps = {k: (v[0], str(v[1])) for k, v in raw.items()
             if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[1] is not None}
    name = raw.get("_class_name")
    return PipelineIndex(path, name if isinstance(name, str) else None, comps)


def resolve_autoencoder(
    ref: str | os.PathLike, *, variant: str | None = None, scaling_factor: float | None = None
) -> ResolvedAutoencoder:
    """Resolve an autoencoder reference: a folder with an ``AutoencoderKL``/``VQModel`` config.json and its
    weights, a pipeline folder (its ``vqvae/`` or ``vae/``), a ``.safetensors`` file with its config in the
    metadata (or a config.json beside it), or a Hub repo of either kind. ``variant``: its variant weights when it
    has them (else the default weights, with a note); ``scaling_factor`` overrides the config's."""
    _check_variant(variant)
    ref = os.fspath(ref)
    path = Path(ref).expanduser()
    if ref and path.exists():
        if path.is_dir():
            folder, rel = _autoencoder_folder(path, str(path))
            plan = _autoencoder_config_of(folder)
            return _finish_autoencoder(ref, "dir", folder, str(folder), plan, variant, scaling_factor, _no_fetch,
                                       _variants_in)
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise _pickle_error(path)
        if suffix != ".safetensors":
            raise ModelError(f"{path}: not an autoencoder checkpoint (expected a folder or a .safetensors file)")
        raw = _metadata_json(_safetensors_metadata(path), "config", path)
        source = f"{path} (metadata 'config')"
        config_path = None
        if raw is None:
            config_path = path.parent / CONFIG_NAME
            if not config_path.is_file():
                raise ModelError(f"{path}: no autoencoder config (metadata 'config' or a config.json beside the file)")
            raw, source = _read_json(config_path), str(config_path)
        config, notes = _autoencoder_config(raw, source, scaling_factor)
        files = [path] + ([config_path] if config_path else [])
        return ResolvedAutoencoder(ref, "file", config, dict(raw), source, Weights((path,)), files, notes=notes)
    if ref in BUILTIN_MODELS:
        raise ModelError(f"{ref}: a built-in diffusion model, not an autoencoder")
    hub = parse_hub_ref(ref)
    if hub is None:
        raise ModelError(f"{ref}: no such autoencoder file, directory or Hub repo")
    repo_id, revision = hub
    snapshot = _hub_fetch(ref, repo_id, revision, HUB_CONFIG_FILES)
    commit = snapshot.name
    label = f"{repo_id}@{commit}"
    folder, rel = _autoencoder_folder(snapshot, label)
    plan = _autoencoder_config_of(folder)
    _hub_fetch(ref, repo_id, commit, _weight_patterns(folder, rel, variant))
    ae = _finish_autoencoder(ref, "hub", folder, f"{label}/{rel}".rstrip("/"), plan, variant, scaling_factor,
                             lambda pats: _hub_fetch(ref, repo_id, commit, [rel + p for p in pats]),
                             lambda f: _hub_variants(repo_id, commit, f, rel))
    ae.repo_id, ae.revision = repo_id, commit
    return ae


def with_autoencoder(
    r: Resolved,
    autoencoder: str | os.PathLike | ResolvedAutoencoder | None = None,
    scaling_factor: float | None = None,
    variant: str | None = None,
) -> Resolved:
    """``r`` with ``autoencoder`` (a reference or a :class:`ResolvedAutoencoder`) decoding its latents instead of
    its own, and/or its autoencoder's ``scaling_factor`` replaced. Returns ``r`` itself when both are None."""
    if autoencoder is None and scaling_factor is None:
        return r
    if autoencoder is None:
        own = r.autoencoder
        if own is None:
            raise ModelError(f"{r.ref}: autoencoder scaling_factor given, but this model has no autoencoder")
        config, notes = _autoencoder_config(own.raw_config, own.config_source, scaling_factor)
        ae = replace(own, config=config, notes=[n for n in own.notes if "scaling_factor" not in n] + notes)
    elif isinstance(autoencoder, ResolvedAutoencoder):
        ae = autoencoder
        if scaling_factor is not None:
            config, notes = _autoencoder_config(ae.raw_config, ae.config_source, scaling_factor)
            ae = replace(ae, config=config, notes=[n for n in ae.notes if "scaling_factor" not in n] + notes)
    else:
        ae = resolve_autoencoder(autoencoder, variant=variant, scaling_factor=scaling_factor)
    replaced = r.autoencoder is not None and r.autoencoder is not ae and autoencoder is not None
    out = _attach_autoencoder(replace(r, notes=[n for n in r.notes if not _is_autoencoder_note(n, r)]), ae)
    if replaced:
        own = r.autoencoder.config_source
        out.notes.append(f"{r.ref}: the autoencoder from {ae.ref} replaces the pipeline's own ({own})")
    return out


def _is_autoencoder_note(note: str, r: Resolved) -> bool:
    return r.autoencoder is not None and note in r.autoencoder.notes


def _attach_autoencoder(r: Resolved, ae: ResolvedAutoencoder) -> Resolved:
    """``r`` with ``ae`` as its autoencoder, checked to take the UNet's latents; its notes added to ``r``'s."""
    c = int(r.model_config["in_channels"])
    if ae.latent_channels != c:
        raise ModelError(
            f"{r.config_source}: in_channels {c}, but the autoencoder ({ae.config_source}) makes latents with "
            f"{ae.latent_channels} channels: they do not belong together"
        )
    r = replace(r, autoencoder=ae, notes=list(r.notes) + list(ae.notes), files=list(r.files))
    for p in ae.files:
        if p not in r.files:
            r.files.append(p)
    return r


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face Hub


def _hub_fetch(ref: str, repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` of the files matching ``patterns`` (or find them in the cache); the snapshot folder."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from . import __version__

    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, library_name="ddimctl", library_version=__version__
        )
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":
            raise ModelError(f"{ref}: the cached snapshot is incomplete; run once online, or `{download}`") from None
        if constants.HF_HUB_OFFLINE:
            raise ModelError(
                f"{ref}: not in the Hugging Face cache and HF_HUB_OFFLINE is set (run once online, or `{download}`)"
            ) from None
        raise ModelError(
            f"{ref}: cannot reach the Hugging Face Hub and it is not in the cache (check the connection; {download})"
        ) from None
    except GatedRepoError:
        raise ModelError(f"{ref}: gated repo (accept its terms on huggingface.co and set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{ref}: repository not found on the Hugging Face Hub (check the name; a private repo needs HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{ref}: revision {revision!r} not found in {repo_id}") from None
    except HFValidationError as e:
        raise ModelError(f"{ref}: not a valid Hub repo id ({first_line(e)})") from None
    except HfHubHTTPError as e:
        raise ModelError(f"{ref}: Hugging Face Hub error ({first_line(e)})") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{ref}: cannot fetch from the Hugging Face Hub ({first_line(e)})") from None
    return Path(folder)


def _hub_variants(repo_id: str, commit: str, folder: Path, rel: str) -> list[str]:
    """Variants of the weights in a repo folder: those in the cached snapshot, and (online) the repo's listing,
    so that a repo with only fp16 weights says so without downloading them."""
    found = set(_variants_in(folder))
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            import huggingface_hub

            names = huggingface_hub.list_repo_files(repo_id, revision=commit)
        except Exception:  # only for a better message: a failed listing leaves the cached view
            names = []
        single = re.compile(re.escape(rel) + r"diffusion_pytorch_model\.([A-Za-z0-9_-]+)\.safetensors")
        index = re.compile(re.escape(rel) + r"diffusion_pytorch_model\.safetensors\.index\.([A-Za-z0-9_-]+)\.json")
        for name in names:
            if _SHARD.fullmatch(name.rpartition("/")[2]):
                continue
            m = single.fullmatch(name) or index.fullmatch(name)
            if m:
                found.add(m.group(1))
    return sorted(found)


def _resolve_hub(ref: str, repo_id: str, revision: str | None, variant: str | None = None) -> Resolved:
    """Fetch (or find in the cache) a Hub repo's configs, check them, then fetch the weights they call for; the
    revision becomes the snapshot's commit."""
    snapshot = _hub_fetch(ref, repo_id, revision, HUB_CONFIG_FILES)
    commit = snapshot.name
    label = f"{repo_id}@{commit}"

    def fetch(patterns: list[str]) -> None:
        _hub_fetch(ref, repo_id, commit, patterns)

    def variants(folder: Path) -> list[str]:
        rel = "" if folder == snapshot else f"{folder.relative_to(snapshot).as_posix()}/"
        return _hub_variants(repo_id, commit, folder, rel)

    resolved = _resolve_dir(ref, snapshot, "hub", label, variant, fetch, variants)
    resolved.repo_id, resolved.revision = repo_id, commit
    if resolved.autoencoder is not None and resolved.autoencoder.source == "pipeline":
        resolved.autoencoder.repo_id, resolved.autoencoder.revision = repo_id, commit
    return resolved


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def _read_json(path: Path) -> dict[str, Any]:
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


_OTHER_MODEL_CLASSES = {
    "AutoencoderKL": "an autoencoder, not a diffusion model: pair it with a latent UNet as its autoencoder",
    "VQModel": "an autoencoder, not a diffusion model: pair it with a latent UNet as its autoencoder",
    "DiTTransformer2DModel": "a transformer (DiT-style) denoiser",
    "Transformer2DModel": "a transformer (DiT-style) denoiser",
    **{k: v for k, v in _UNET_CLASSES.items() if v},
}


def _model_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate a UNet config (errors are ConfigError prefixed with ``source``)."""
    from .nets.unet2d import normalize_config

    cls = raw.get("_class_name")
    if cls is not None and cls != "UNet2DModel":
        why = _OTHER_MODEL_CLASSES.get(cls) if isinstance(cls, str) else None
        if why is None and isinstance(cls, str) and "Transformer" in cls:
            why = "a transformer denoiser"
        detail = f"{why}; " if why else ""
        raise ConfigError(f"{source}: unsupported _class_name {cls!r} ({detail}ddimctl runs UNet2DModel checkpoints)")
    return normalize_config(raw, source)


def _open_safetensors(path: Path):
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


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its header only."""
    with _open_safetensors(path) as f:
        return dict(f.metadata() or {})


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header (no tensor data is read)."""
    with _open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _count_elements(paths: Sequence[Path]) -> int:
    """Total elements of every tensor in ``paths`` (headers only)."""
    total = 0
    for path in paths:
        for shape in _tensor_shapes(path).values():
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


def _metadata_json(metadata: Mapping[str, str], key: str, path: Path) -> dict[str, Any] | None:
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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Loading


class PredictionChannels(torch.nn.Module):
    """``model(x, t, ...)[:, :channels]``: the prediction half of a learned-variance UNet's output (diffusers'
    schedulers split it the same way: prediction first, variance second)."""

    def __init__(self, model: torch.nn.Module, channels: int):
        super().__init__()
        self.model = model
        self.channels = channels

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(sample, timestep, *args, **kwargs)[:, : self.channels]  # (B, C, H, W)


@dataclass
class Checkpoint:
    """A loaded model: ``model`` (the UNet, eval mode, on the requested device and dtype), its sampler
    ``settings``, where it came from, and shapes.

    ``channels``, ``image_size``: the images the checkpoint makes, (``channels``, ``image_size``, ``image_size``)
    = :attr:`image_shape`: decoded by ``autoencoder`` for a latent pipeline. The UNet works on
    :attr:`sample_shape` (its ``in_channels`` and ``sample_size``): the same as ``image_shape`` for a pixel model,
    the latents (:attr:`latent_shape`) for a latent one. ``autoencoder``: the loaded AutoencoderKL/VQModel
    (``decode(latents)`` applies its scaling) or None. ``prediction_channels``: how many of the UNet's output
    channels are its prediction (:meth:`prediction_model` keeps just those). ``num_class_embeds``,
    ``class_embed_type``: the UNet's class conditioning (None, None for an unconditional one).
    ``notes``: one line each about what ddimctl reads differently from diffusers or does not use.
    """

    model: torch.nn.Module
    settings: SamplerSettings
    resolved: Resolved
    channels: int
    image_size: int
    parameters: int
    autoencoder: torch.nn.Module | None = None
    prediction_channels: int = 0
    num_class_embeds: int | None = None
    class_embed_type: str | None = None
    sample_size: int = 0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prediction_channels = self.prediction_channels or self.channels
        self.sample_size = self.sample_size or self.image_size

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the UNet takes and the sampler draws x_T in."""
        return (int(self.resolved.model_config["in_channels"]), self.sample_size, self.sample_size)

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        return self.sample_shape if self.autoencoder is not None else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def is_class_conditional(self) -> bool:
        return self.num_class_embeds is not None or self.class_embed_type is not None

    @property
    def learned_variance(self) -> bool:
        return self.resolved.learned_variance

    def prediction_model(self) -> torch.nn.Module:
        """The UNet as a sampler calls it: its output cut to the :attr:`prediction_channels` (shaped like its
        input) for a learned-variance UNet, the UNet itself otherwise."""
        if self.learned_variance:
            return PredictionChannels(self.model, self.prediction_channels)
        return self.model


def _image_size(cfg: Mapping[str, Any], source: str) -> int:
    size = cfg.get("sample_size")
    if isinstance(size, list):
        if len(size) == 2 and size[0] != size[1]:
            raise ModelError(f"{source}: non-square sample_size {size} is not supported")
        size = size[0]
    if size is None:
        raise ModelError(f"{source}: sample_size is null (ddimctl needs the model's image size)")
    return int(size)


def load(
    ref: str | os.PathLike | Resolved,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    variant: str | None = None,
    autoencoder: str | os.PathLike | ResolvedAutoencoder | bool | None = None,
    autoencoder_scaling_factor: float | None = None,
) -> Checkpoint:
    """Resolve ``ref`` (or take a :class:`Resolved`) and load its UNet from safetensors (one file or shards) with
    strict key and shape checks; the weights are cast to ``dtype`` and moved to ``device``.

    ``variant``: diffusers' variant files (``"fp16"``); see :func:`resolve`.
    ``autoencoder``: what to do about latents.

    * None (the default, for callers that only handle pixel images): a pixel model loads; a latent pipeline (one
      with a vqvae/vae) is a :class:`ModelError` saying so, rather than latents the caller would take for images;
    * True: load the pipeline's autoencoder too (``Checkpoint.autoencoder``); a pixel model loads as with None;
    * False: the UNet alone, even of a latent pipeline (its samples are latents; a note says so);
    * a reference (see :func:`resolve_autoencoder`) or a :class:`ResolvedAutoencoder`: pair the UNet with that
      autoencoder (replacing a pipeline's own).

    ``autoencoder_scaling_factor`` overrides the autoencoder's latent scale (see the module docstring).
    """
    from .nets.unet2d import UNet2DModel, count_parameters

    pair = autoencoder if not isinstance(autoencoder, bool) else None
    if isinstance(ref, Resolved):
        if variant is not None and variant != ref.variant:
            raise ModelError(f"{ref.ref}: already resolved with variant {ref.variant!r}, not {variant!r}")
        r = with_autoencoder(ref, pair, autoencoder_scaling_factor, variant)
    else:
        r = resolve(ref, variant=variant, autoencoder=pair, autoencoder_scaling_factor=autoencoder_scaling_factor)
    settings = r.settings()
    cfg = r.model_config
    channels, size = int(cfg["in_channels"]), _image_size(cfg, r.config_source)
    if cfg["out_channels"] not in (channels, 2 * channels):
        raise ModelError(
            f"{r.config_source}: out_channels {cfg['out_channels']} differs from in_channels {channels} (ddimctl needs "
            f"a model whose prediction is shaped like its input, or {2 * channels} channels: prediction and learned "
            "variance)"
        )
    notes = list(r.notes)
    if r.autoencoder is not None and autoencoder is None:
        ae = r.autoencoder
        c, h, w = r.image_shape
        raise ModelError(
            f"{r.ref}: a latent-diffusion model (its UNet makes {channels}x{size}x{size} latents that the "
            f"{ae.class_name} in {ae.config_source} decodes to {c}x{h}x{w} images); this caller handles pixel "
            "models only (load with autoencoder=True to get both)"
        )
    if r.autoencoder is not None and autoencoder is False:
        notes = [n for n in notes if n not in r.autoencoder.notes]
        notes.append(f"{r.ref}: autoencoder not loaded: the model's samples are {channels}x{size}x{size} latents")
        r = replace(r, autoencoder=None, notes=notes)

    model = _load_module(
        lambda: UNet2DModel.from_config(cfg, source=r.config_source), r.weight_files, r.weights_index, dtype, device
    )
    ae_model = load_autoencoder(r.autoencoder, device, dtype) if r.autoencoder is not None else None
    image_c, image_h, _ = r.image_shape
    return Checkpoint(
        model, settings, r, image_c, image_h, count_parameters(model), autoencoder=ae_model,
        prediction_channels=channels, num_class_embeds=cfg.get("num_class_embeds"),
        class_embed_type=cfg.get("class_embed_type"), sample_size=size, notes=notes,
    )


def load_autoencoder(
    ae: ResolvedAutoencoder, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Load a resolved autoencoder (see :func:`resolve_autoencoder`) from safetensors with strict key and shape
    checks, cast to ``dtype`` on ``device``, in eval mode; its config (scaling included) is ``ae.config``."""
    from .nets.autoencoders import autoencoder_from_config

    return _load_module(lambda: autoencoder_from_config(ae.config, ae.config_source), list(ae.weights.files),
                        ae.weights.index, dtype, device)


def _load_module(
    build: Callable[[], torch.nn.Module], files: Sequence[Path], index: Path | None, dtype: torch.dtype,
    device: torch.device | str,
) -> torch.nn.Module:
    """Build a module on the meta device, adopt the weights of ``files`` (strict), cast, move, eval."""
    from .nets.unet2d import convert_legacy_attention_keys

    with torch.device("meta"):  # no random init: the weights come from the file
        model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = convert_legacy_attention_keys(_load_weights(files, index))
    _check_state_dict(index or files[0], state, expected)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # a buffer not in the state dict
        model = build().to(dtype)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _load_weights(files: Sequence[Path], index: Path | None) -> dict[str, torch.Tensor]:
    """Every tensor of ``files``; for shards, checked against the index: each tensor in the shard the index
    names, none twice, none missing."""
    if index is None:
        return _load_tensors(files[0])
    weight_map, _ = _read_index(index)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = _load_tensors(path)
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


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except safetensors.SafetensorError as e:
        raise ModelError(f"{path}: not a valid safetensors file ({first_line(e)})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None


def _check_state_dict(path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _ddimctl_meta(model_config: Mapping[str, Any], settings: SamplerSettings, meta: Mapping[str, Any] | None,
                  autoencoder: torch.nn.Module | None = None) -> dict:
    """ddimctl's metadata: the caller's ``meta`` plus version, objective and the images the model makes (decoded by
    ``autoencoder`` for a latent model, whose UNet's shape is then ``latent_shape``)."""
    from . import __version__

    size = model_config.get("sample_size")
    channels = model_config.get("in_channels")
    shape: dict[str, Any] = {"image_channels": channels, "image_size": size}
    if autoencoder is not None and isinstance(size, int):
        f = autoencoder.downscale_factor
        shape = {"image_channels": autoencoder.config["out_channels"], "image_size": size * f,
                 "latent_shape": [channels, size, size]}
    return {
        **dict(meta or {}),
        "ddimctl_version": __version__,
        "objective": (meta or {}).get("objective", settings.prediction_type),
        "prediction_type": settings.prediction_type,
        "kind": settings.kind,
        "data_range": [-1, 1],
        **shape,
    }


def autoencoder_component(config: Mapping[str, Any]) -> str:
    """The pipeline component a saved latent model gives its autoencoder: ``vqvae``, the name diffusers'
    ``LDMPipeline`` loads (an ``AutoencoderKL`` there too, with a type warning, decoding ``latents /
    scaling_factor`` as ddimctl does), except for an ``AutoencoderKL`` with a ``shift_factor`` or
    ``latents_mean``/``latents_std``, which ``LDMPipeline`` would decode wrongly: ``vae``, which ddimctl loads and
    diffusers' ``LDMPipeline`` refuses."""
    if config.get("_class_name") == "AutoencoderKL" and (
        config.get("shift_factor") is not None or config.get("latents_mean") is not None
    ):
        return "vae"
    return "vqvae"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The UNet inside a torch.compile or DistributedDataParallel wrapper (their state_dict keys are prefixed)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save(
    out_dir: Path | str,
    model: torch.nn.Module,
    settings: SamplerSettings,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    autoencoder: torch.nn.Module | None = None,
) -> Path:
    """Write ``model`` in diffusers' layout (``config.json``, ``diffusion_pytorch_model.safetensors``,
    ``scheduler_config.json``) plus ``ddimctl.json``, as one atomic directory (:func:`ddimctl.fsutil.atomic_dir`:
    an existing ``out_dir`` is an :class:`~ddimctl.errors.OutputExistsError` unless ``overwrite``). A torch.compile
    or DDP wrapper is unwrapped. Returns ``out_dir``.

    With an ``autoencoder`` (a :mod:`ddimctl.nets.autoencoders` model whose latents ``model`` works on) the directory is a
    latent pipeline that loads as one model: ``model_index.json`` (``LDMPipeline``), ``unet/``, ``scheduler/``,
    the autoencoder's config (its ``scaling_factor`` the one it encodes with) and weights in ``vqvae/`` (or
    ``vae/``, see :func:`autoencoder_component`), and ``ddimctl.json`` at the root."""
    from .fsutil import atomic_dir, safetensors_bytes

    out_dir = Path(out_dir)
    model = _unwrap(model)
    config = dict(model.config)
    doc = _ddimctl_meta(config, settings, meta, autoencoder)
    scheduler = settings.to_diffusers_config()
    with atomic_dir(out_dir, overwrite) as tmp:
        unet_dir = sched_dir = tmp
        if autoencoder is not None:
            ae_config = dict(autoencoder.config)
            component = autoencoder_component(ae_config)
            unet_dir, sched_dir, ae_dir = tmp / "unet", tmp / "scheduler", tmp / component
            for d in (unet_dir, sched_dir, ae_dir):
                d.mkdir()
            _write_json(tmp / PIPELINE_INDEX, {
                "_class_name": "LDMPipeline",
                "scheduler": ["diffusers", scheduler["_class_name"]],
                "unet": ["diffusers", "UNet2DModel"],
                component: ["diffusers", ae_config["_class_name"]],
            })
            _write_json(ae_dir / CONFIG_NAME, ae_config)
            (ae_dir / WEIGHTS_NAME).write_bytes(safetensors_bytes(_state_for_saving(autoencoder), {"format": "pt"}))
        _write_json(unet_dir / CONFIG_NAME, config)
        metadata = {"format": "pt", "ddimctl": json.dumps(doc, default=str)}  # diffusers needs "format": "pt"
        (unet_dir / WEIGHTS_NAME).write_bytes(safetensors_bytes(_state_for_saving(model), metadata))
        _write_json(sched_dir / SCHEDULER_NAME, scheduler)
        _write_json(tmp / META_NAME, doc)
    return out_dir


def save_file(
    path: Path | str,
    model: torch.nn.Module,
    settings: SamplerSettings,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a single ``.safetensors`` file carrying its UNet config, scheduler config and ddimctl metadata as JSON
    in the file's metadata, atomically. Returns ``path``."""
    from .fsutil import refuse_existing, save_safetensors_atomic

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise OutputError(f"{path}: a single-file checkpoint must end in .safetensors")
    refuse_existing(path, overwrite)
    model = _unwrap(model)
    config = dict(model.config)
    metadata = {
        "format": "pt",
        "config": json.dumps(config),
        "scheduler_config": json.dumps(settings.to_diffusers_config()),
        "ddimctl": json.dumps(_ddimctl_meta(config, settings, meta), default=str),
    }
    return save_safetensors_atomic(path, _state_for_saving(model), metadata)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
