"""The UNet family: diffusers' ``UNet2DModel`` checkpoints run by ddimctl's own port
(:mod:`ddimctl.nets.unet2d`) -- pixel models (``DDPMPipeline``, google/ddpm-cifar10-32), latent models with a
``vqvae``/``vae`` autoencoder (``LDMPipeline``, CompVis/ldm-celebahq-256) and class-conditional ones
(``num_class_embeds``; ddimctl's ``mnist-cond``).

Folders: weights with ``config.json`` beside them, at the root or in ``unet/``; ``scheduler_config.json`` at the
root or in ``scheduler/``; ``ddimctl.json`` for ddimctl's own metadata; or a single ``.safetensors`` file with its
configs in its metadata. This is the registry's last family: it judges every folder that no other family
recognises, and refuses in one line any component it cannot run (a transformer, a text encoder, a conditional
UNet, ...).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoint.autoencoders import (
    AUTOENCODER_CLASSES, AUTOENCODER_COMPONENTS, ResolvedAutoencoder, autoencoder_component,
    autoencoder_config_of, finish_autoencoder, load_autoencoder, resolve_autoencoder,
)
from ..checkpoint.files import (
    CONFIG_NAME, META_NAME, SCHEDULER_NAME, WEIGHTS_NAME, count_elements, metadata_json,
    read_json, safetensors_metadata, sha256_file, tensor_shapes,
)
from ..checkpoint.model_index import ModelIndex, describe_class, read_model_index
from ..checkpoint.references import Location, read_scheduler_config
from ..checkpoint.weights import is_shard, load_module, refuse_pickles_in, select_weights, weight_patterns
from ..conditioning import ClassLabels, Conditioner, Unconditioned
from ..errors import ConfigError, ModelError, SettingError
from ..settings import SamplerSettings
from . import LoadedModel, Resolved

name = "unet2d"
_RUNS = "ddimctl runs UNet2DModel pipelines: unet + scheduler, optionally with a vqvae/vae autoencoder"
# What a Hub snapshot fetches first: configs and shard indexes (every variant's: they are small), at the root and
# in the component folders read here; transformer/config.json only to say why such a repo is refused.
config_patterns = ["model_index.json", SCHEDULER_NAME, META_NAME, f"scheduler/{SCHEDULER_NAME}",
                   f"transformer/{CONFIG_NAME}"] + [
    f"{folder}{p}" for folder in ("", "unet/", "vae/", "vqvae/")
    for p in (CONFIG_NAME, "diffusion_pytorch_model.safetensors.index*.json")]

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
_OTHER_MODEL_CLASSES = {
    "AutoencoderKL": "an autoencoder, not a diffusion model: pair it with a latent UNet as its autoencoder",
    "VQModel": "an autoencoder, not a diffusion model: pair it with a latent UNet as its autoencoder",
    "DiTTransformer2DModel": "a transformer (DiT-style) denoiser",
    "Transformer2DModel": "a transformer (DiT-style) denoiser",
    **{k: v for k, v in _UNET_CLASSES.items() if v},
}


def recognises(index: ModelIndex | None, root: Path) -> bool:
    return True  # the fallback family: judges (and refuses) whatever no other family recognises


# ----------------------------------------------------------------------------------------------------------------
# Resolution


def check_components(p: ModelIndex) -> None:
    """Refuse, in one ConfigError naming it, every component of a pipeline this family cannot run."""
    pname = p.name
    where = str(p.path)
    if p.class_name in _REFUSED_PIPELINES:
        raise ConfigError(f"{where}: {p.class_name} is {_REFUSED_PIPELINES[p.class_name]}; {_RUNS}")
    for key, entry in p.components.items():
        if key == "transformer" or ("Transformer" in entry[1] and not key.startswith("text_encoder")):
            raise ConfigError(
                f"{where}: {pname}'s denoiser is a transformer ({key}: {describe_class(entry)}, DiT-style), "
                f"not a UNet2DModel; {_RUNS}"
            )
    for key, entry in p.components.items():
        if key.startswith(("text_encoder", "tokenizer")) or key in ("bert", "image_encoder", "prior"):
            raise ConfigError(
                f"{where}: {pname} is conditioned on text or images (component {key}: {describe_class(entry)}); "
                f"{_RUNS}, unconditional or class-conditional"
            )
    unet = p.component("unet")
    if unet is not None and unet[1] != "UNet2DModel":
        why = _UNET_CLASSES.get(unet[1])
        raise ConfigError(f"{where}: component unet is {describe_class(unet)}{f' ({why})' if why else ''}; {_RUNS}")
    present = [k for k in AUTOENCODER_COMPONENTS if k in p.components]
    if len(present) > 1:
        raise ConfigError(f"{where}: both vqvae and vae components: cannot tell which decodes the latents")
    for key in present:
        cls = p.components[key][1]
        if cls not in AUTOENCODER_CLASSES:
            from ..nets.autoencoders import autoencoder_from_config

            autoencoder_from_config({"_class_name": cls}, f"{where} (component {key})")  # raises, naming the class
    for key, entry in p.components.items():
        if key not in ("unet", "scheduler", *AUTOENCODER_COMPONENTS):
            raise ConfigError(f"{where}: component {key} ({describe_class(entry)}) is not one ddimctl uses; {_RUNS}")


def resolve(location: Location, variant: str | None) -> Resolved:
    """A model folder, a pipeline folder (unet/ + scheduler/ [+ vqvae/ or vae/]), a Hub snapshot of either, or a
    single .safetensors file; a unet/ folder or weights file named inside a pipeline is read as the pipeline."""
    if location.file is not None and location.part is None:
        return _resolve_file(location.ref, location.file)
    if location.part is None:
        return _resolve_dir(location, variant)
    r = _resolve_dir(location, location.variant if location.file is not None else variant)
    if location.file is not None and (r.weights != location.file or r.weights_index is not None):
        return _resolve_file(location.ref, location.file)  # another file than the pipeline's own weights
    r.notes.insert(0, f"{location.part}: read as part of the pipeline {location.root} (its scheduler and components)")
    return r


def _looks_like_model(folder: Path) -> bool:
    """A folder holding a model: a config.json or any diffusers weights file (any variant, shards, pickles)."""
    if not folder.is_dir():
        return False
    if (folder / CONFIG_NAME).is_file():
        return True
    return any(p.name.startswith("diffusion_pytorch_model") for p in folder.iterdir())


def _unet_folder(root: Path, index: ModelIndex | None) -> Path | None:
    if index is not None and index.component("unet") is not None and (root / "unet").is_dir():
        return root / "unet"
    return next((f for f in (root, root / "unet") if _looks_like_model(f)), None)


def _resolve_dir(loc: Location, variant: str | None) -> Resolved:
    """A diffusers-layout directory (model dir, pipeline dir, or a Hub snapshot). Every config is read and checked
    before any weights: ``loc.fetch(repo paths)`` is called once the configs say which weight files are needed (a
    Hub snapshot downloads them then; local folders have them)."""
    root, label, hub = loc.root, loc.label, loc.source == "hub"
    index = read_model_index(root)
    if index is not None:
        check_components(index)
    folder = _unet_folder(root, index)
    if folder is None:
        raise _no_weights_error(root, label, hub)
    rel = "" if folder == root else f"{folder.name}/"
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        if hub and not any(p.name.startswith("diffusion_pytorch_model") for p in folder.iterdir()):
            raise _no_weights_error(root, label, True)
        raise ModelError(f"{config_path}: missing (a diffusers model needs config.json beside {WEIGHTS_NAME})")
    model_config = model_config_of(read_json(config_path), str(config_path))
    scheduler_config, scheduler_source, scheduler_files = read_scheduler_config(root, index, label)
    settings = SamplerSettings.from_config(scheduler_config, source=scheduler_source)  # refusals before weights

    component = autoencoder_component(root, index)
    ae_plan = None
    if component is not None:
        ae_folder = root / component
        ae_plan = autoencoder_config_of(ae_folder)

    patterns = weight_patterns(folder, rel, variant)
    if ae_plan is not None:
        patterns += weight_patterns(ae_folder, f"{component}/", variant)
    loc.fetch(patterns)
    where = f"{label}/{rel.rstrip('/')}" if rel else label
    weights = select_weights(folder, variant, where, lambda: loc.variants(folder))
    if weights is None:
        raise _no_weights_error(root, label, hub)

    metadata = safetensors_metadata(weights.files[0])
    meta_path = root / META_NAME
    files = [config_path, *([weights.index] if weights.index else []), *weights.files, *scheduler_files]
    if meta_path.is_file():
        meta = read_json(meta_path)
        files.append(meta_path)
    else:
        meta = metadata_json(metadata, "ddimctl", weights.files[0]) or {}
    if index is not None:
        files.append(index.path)
    autoencoder = None
    if ae_plan is not None:
        trained = meta.get("autoencoder") if isinstance(meta.get("autoencoder"), dict) else {}
        autoencoder = finish_autoencoder(
            loc.ref, "pipeline", ae_folder, f"{label}/{component}", ae_plan, variant, None,
            lambda pats: loc.fetch([f"{component}/{p}" for p in pats]), loc.variants,
            trained_scale=trained.get("scaling_factor"),
        )
    r = Resolved(loc.ref, loc.source, weights.files[0], model_config, scheduler_config, meta, files=files,
                 config_source=str(config_path), scheduler_source=scheduler_source, weight_files=list(weights.files),
                 weights_index=weights.index, variant=weights.variant, index=index,
                 notes=_unet_notes(model_config, str(config_path), settings), family=name)
    if autoencoder is not None:
        r = _attach_autoencoder(r, autoencoder)
    return r


def _no_weights_error(root: Path, label: str, hub: bool) -> ModelError:
    """Why a folder has no UNet weights ddimctl can load: a transformer model, pickles only, other files."""
    if (root / "transformer").is_dir():
        return ConfigError(f"{label}: transformer/ holds a transformer (DiT-style) denoiser, not a UNet2DModel; {_RUNS}")
    if hub:
        return ModelError(
            f"{label}: no {WEIGHTS_NAME} at the root or in unet/ (ddimctl loads only safetensors weights; if the "
            "repo has only pickle .bin weights, convert them with diffusers' save_pretrained(dir, "
            "safe_serialization=True))"
        )
    for folder in (root, root / "unet"):
        refuse_pickles_in(folder, label)  # pickle weights only: that refusal, not this one
    others = sorted(p.name for p in root.glob("*.safetensors")) if root.is_dir() else []
    if others:
        return ModelError(
            f"{label}: no {WEIGHTS_NAME} here or in unet/ (found {others[0]}: pass that file itself if it "
            "carries its config)"
        )
    return ModelError(f"{label}: no {WEIGHTS_NAME} here or in unet/ (not a diffusers model directory)")


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
    metadata = safetensors_metadata(path)
    files = [path]
    raw = metadata_json(metadata, "config", path)
    config_source = f"{path} (metadata 'config')"
    if raw is None:
        beside = path.parent / CONFIG_NAME
        if is_shard(path.name):
            raise ModelError(f"{path}: one shard of a sharded checkpoint; pass its folder ({path.parent})")
        if not beside.is_file():
            raise ModelError(
                f"{path}: no model config (expected a 'config' entry in the safetensors metadata, or a config.json "
                "beside the file)"
            )
        raw, config_source = read_json(beside), str(beside)
        files.append(beside)
    model_config = model_config_of(raw, config_source)

    scheduler_config = metadata_json(metadata, "scheduler_config", path)
    scheduler_source = f"{path} (metadata 'scheduler_config')"
    if scheduler_config is None:
        scheduler_config, scheduler_source = {}, f"{path} (no scheduler config: defaults)"
        for p in (path.parent / SCHEDULER_NAME, path.parent.parent / "scheduler" / SCHEDULER_NAME):
            if p.is_file():
                scheduler_config, scheduler_source = read_json(p), str(p)
                files.append(p)
                break
    settings = SamplerSettings.from_config(scheduler_config, source=scheduler_source)
    meta = metadata_json(metadata, "ddimctl", path) or {}
    return Resolved(ref, "file", path, model_config, scheduler_config, meta, files=files,
                    config_source=config_source, scheduler_source=scheduler_source,
                    notes=_unet_notes(model_config, config_source, settings), family=name)


def model_config_of(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate a UNet config (errors are ConfigError prefixed with ``source``)."""
    from ..nets.unet2d import normalize_config

    cls = raw.get("_class_name")
    if cls is not None and cls != "UNet2DModel":
        why = _OTHER_MODEL_CLASSES.get(cls) if isinstance(cls, str) else None
        if why is None and isinstance(cls, str) and "Transformer" in cls:
            why = "a transformer denoiser"
        detail = f"{why}; " if why else ""
        raise ConfigError(f"{source}: unsupported _class_name {cls!r} ({detail}ddimctl runs UNet2DModel checkpoints)")
    return normalize_config(raw, source)


# ----------------------------------------------------------------------------------------------------------------
# Autoencoders: a latent pipeline's own, or one paired with the UNet


def pair_autoencoder(r: Resolved, autoencoder: str | ResolvedAutoencoder | None = None,
                     scaling_factor: float | None = None, variant: str | None = None) -> Resolved:
    """``r`` with ``autoencoder`` (a reference or a :class:`ResolvedAutoencoder`) decoding its latents instead of
    its own, and/or its autoencoder's ``scaling_factor`` replaced. Returns ``r`` itself when both are None."""
    if autoencoder is None and scaling_factor is None:
        return r
    if autoencoder is None:
        if r.autoencoder is None:
            raise ModelError(f"{r.ref}: autoencoder scaling_factor given, but this model has no autoencoder")
        return replace(r, autoencoder=r.autoencoder.with_scaling_factor(scaling_factor))
    if isinstance(autoencoder, ResolvedAutoencoder):
        ae = autoencoder if scaling_factor is None else autoencoder.with_scaling_factor(scaling_factor)
    else:
        ae = resolve_autoencoder(autoencoder, variant=variant, scaling_factor=scaling_factor)
    out = _attach_autoencoder(r, ae)
    if r.autoencoder is not None and r.autoencoder is not ae:
        out.pairing_notes = [f"{r.ref}: the autoencoder from {ae.ref} replaces the pipeline's own "
                             f"({r.autoencoder.config_source})"]
    return out


def _attach_autoencoder(r: Resolved, ae: ResolvedAutoencoder) -> Resolved:
    """``r`` with ``ae`` as its autoencoder, checked to take the UNet's latents."""
    c = int(r.model_config["in_channels"])
    if ae.latent_channels != c:
        raise ModelError(
            f"{r.config_source}: in_channels {c}, but the autoencoder ({ae.config_source}) makes latents with "
            f"{ae.latent_channels} channels: they do not belong together"
        )
    files = list(r.files) + [p for p in ae.files if p not in r.files]
    return replace(r, autoencoder=ae, files=files)


# ----------------------------------------------------------------------------------------------------------------
# Shapes and the summary


def sample_size(cfg: Mapping[str, Any], source: str) -> int:
    size = cfg.get("sample_size")
    if isinstance(size, list):
        if len(size) == 2 and size[0] != size[1]:
            raise ModelError(f"{source}: non-square sample_size {size} is not supported")
        size = size[0]
    if size is None:
        raise ModelError(f"{source}: sample_size is null (ddimctl needs the model's image size)")
    return int(size)


def shapes(r: Resolved) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(image_shape, sample_shape): the images the model makes (decoded by its autoencoder, if any) and what the
    UNet works on, each (C, H, W)."""
    size = sample_size(r.model_config, r.config_source)
    c = int(r.model_config["in_channels"])
    sample = (c, size, size)
    if r.autoencoder is None:
        return sample, sample
    f = r.autoencoder.downscale_factor
    return (r.autoencoder.image_channels, size * f, size * f), sample


def _learned_variance(cfg: Mapping[str, Any]) -> bool:
    return cfg["out_channels"] == 2 * cfg["in_channels"]


def describe(r: Resolved) -> dict[str, Any]:
    """A JSON-able summary for ``ddimctl info``; reads the weights' headers and hashes the files, loads nothing.

    ``image_size``/``channels`` are the images the model makes (decoded, for a latent pipeline);
    ``latent_shape`` the UNet's latents (null for a pixel model).
    """
    cfg = r.model_config
    settings = r.settings()
    scheduler = settings.to_diffusers_config()
    if scheduler.get("trained_betas") is not None:
        scheduler["trained_betas"] = f"<{len(scheduler['trained_betas'])} values>"
    summary_keys = (
        "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
        "down_block_types", "up_block_types", "mid_block_type", "attention_head_dim", "norm_num_groups",
        "act_fn", "time_embedding_type", "flip_sin_to_cos", "freq_shift", "resnet_time_scale_shift",
        "num_class_embeds", "class_embed_type",
    )
    sharded = r.weights_index is not None
    image, sample = shapes(r)
    return {
        "ref": r.ref,
        "source": r.source,
        "family": name,
        "repo_id": r.repo_id,
        "revision": r.revision,
        "weights": str(r.weights_index if sharded else r.weights),
        "weights_sha256": None if sharded else sha256_file(r.weights),
        "shards": [{"file": str(p), "sha256": sha256_file(p)} for p in r.weight_files] if sharded else None,
        "variant": r.variant,
        "files": [str(p) for p in r.files],
        "parameters": count_elements(r.weight_files),
        "tensors": sum(len(tensor_shapes(p)) for p in r.weight_files),
        "image_size": image[1],
        "channels": image[0],
        "latent_shape": list(sample) if r.autoencoder is not None else None,
        "prediction_type": settings.prediction_type,
        "prediction_channels": int(cfg["in_channels"]),
        "learned_variance": _learned_variance(cfg),
        "num_class_embeds": cfg.get("num_class_embeds"),
        "kind": settings.kind,
        "pipeline": None if r.index is None else {
            "class": r.index.class_name,
            "components": {k: list(v) for k, v in r.index.components.items()},
        },
        "autoencoder": r.autoencoder.describe() if r.autoencoder is not None else None,
        "model_config": {k: cfg.get(k) for k in summary_keys},
        "scheduler": scheduler,
        "scheduler_class": settings.scheduler_class,
        "meta": r.meta,
        "notes": r.all_notes,
    }


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


class _ClassValues(Conditioner):
    """A UNet whose class embedding is not a table of integer ids (diffusers' ``class_embed_type`` ``timestep`` /
    ``identity``): ddimctl cannot condition it."""

    kind = "class"
    fields = ("class_label",)

    def __init__(self, embed_type: str):
        self.refusal = SettingError(("class_embed_type", embed_type), "ddimctl conditions on integer class ids "
                                    "(num_class_embeds); this embedding is not supported")


def conditioner_of(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> Conditioner:
    """Integer class ids (``num_class_embeds``; the null label from ``null_class_label`` in ddimctl's metadata,
    None when the checkpoint declares none, as diffusers' UNet2DModel configs do), or none."""
    if cfg.get("num_class_embeds") is not None:
        null = meta.get("null_class_label")
        return ClassLabels(int(cfg["num_class_embeds"]), int(null) if null is not None else None)
    if cfg.get("class_embed_type") is not None:
        return _ClassValues(cfg["class_embed_type"])
    return Unconditioned()


def load(r: Resolved, device: torch.device, dtype: torch.dtype, autoencoder: Any = None) -> LoadedModel:
    """Load the UNet (and, with ``autoencoder`` true or a reference, the autoencoder; see
    :func:`ddimctl.families.load`) with strict key and shape checks, cast to ``dtype``, on ``device``."""
    from ..nets.unet2d import UNet2DModel, convert_legacy_attention_keys, count_parameters

    cfg = r.model_config
    image_shape, sample_shape = shapes(r)
    channels = int(cfg["in_channels"])
    if cfg["out_channels"] not in (channels, 2 * channels):
        raise ModelError(
            f"{r.config_source}: out_channels {cfg['out_channels']} differs from in_channels {channels} (ddimctl needs "
            f"a model whose prediction is shaped like its input, or {2 * channels} channels: prediction and learned "
            "variance)"
        )
    notes = r.all_notes
    if r.autoencoder is not None and autoencoder is None:
        ae = r.autoencoder
        c, h, w = image_shape
        raise ModelError(
            f"{r.ref}: a latent-diffusion model (its UNet makes {'x'.join(map(str, sample_shape))} latents that the "
            f"{ae.class_name} in {ae.config_source} decodes to {c}x{h}x{w} images); this caller handles pixel "
            "models only (load with autoencoder=True to get both)"
        )
    if r.autoencoder is not None and autoencoder is False:
        notes = [*r.notes, *r.pairing_notes,
                 f"{r.ref}: autoencoder not loaded: the model's samples are {'x'.join(map(str, sample_shape))} latents"]
        r = replace(r, autoencoder=None, pairing_notes=[])
        image_shape = sample_shape
    unet = load_module(lambda: UNet2DModel.from_config(cfg, source=r.config_source),
                       _weights_of(r), dtype, device, convert=convert_legacy_attention_keys)
    ae_model = load_autoencoder(r.autoencoder, device, dtype) if r.autoencoder is not None else None
    conditioner = conditioner_of(cfg, r.meta)
    kind = ("latent " if ae_model is not None else "pixel ") + (
        "class-conditional" if conditioner.kind == "class" else "unconditional")
    network = PredictionChannels(unet, channels) if _learned_variance(cfg) else unet
    return LoadedModel(name, kind, unet, network, r.settings(), conditioner, r, image_shape, sample_shape,
                       autoencoder=ae_model, parameters=count_parameters(unet), notes=notes)


def _weights_of(r: Resolved):
    from ..checkpoint.weights import Weights

    return Weights(tuple(r.weight_files), r.weights_index, r.variant)


def in_memory(unet: torch.nn.Module, settings: SamplerSettings, autoencoder: torch.nn.Module | None = None,
              conditioner: Conditioner | None = None) -> LoadedModel:
    """A :class:`LoadedModel` of a UNet (and autoencoder) in memory rather than on disk (training previews,
    tests); ``conditioner``: how it is conditioned (default: from its config, with no null label)."""
    from ..nets.unet2d import count_parameters

    cfg = dict(unet.config)
    size = sample_size(cfg, "the model's config")
    c = int(cfg["in_channels"])
    sample = image = (c, size, size)
    if autoencoder is not None:
        f = autoencoder.downscale_factor
        image = (int(autoencoder.config["out_channels"]), size * f, size * f)
    conditioner = conditioner if conditioner is not None else conditioner_of(cfg, {})
    kind = ("latent " if autoencoder is not None else "pixel ") + (
        "class-conditional" if conditioner.kind == "class" else "unconditional")
    network = PredictionChannels(unet, c) if _learned_variance(cfg) else unet
    return LoadedModel(name, kind, unet, network, settings, conditioner, None, image, sample,
                       autoencoder=autoencoder, parameters=count_parameters(unet))
