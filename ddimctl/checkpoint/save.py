"""Saving a UNet (and its autoencoder) in diffusers' layout, as one atomic directory or one ``.safetensors`` file
that carries its configs in its metadata; loadable by every command and by diffusers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import OutputError
from ..settings import SamplerSettings
from .files import CONFIG_NAME, META_NAME, MODEL_INDEX, SCHEDULER_NAME, WEIGHTS_NAME, write_json


def ddimctl_meta(model_config: Mapping[str, Any], settings: SamplerSettings, meta: Mapping[str, Any] | None,
                  autoencoder: torch.nn.Module | None = None) -> dict:
    """ddimctl's metadata: the caller's ``meta`` plus version, objective and the images the model makes (decoded by
    ``autoencoder`` for a latent model, whose UNet's shape is then ``latent_shape``)."""
    from .. import __version__

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


def saved_autoencoder_component(config: Mapping[str, Any]) -> str:
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The UNet inside a torch.compile or DistributedDataParallel wrapper (their state_dict keys are prefixed)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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
    ``vae/``, see :func:`saved_autoencoder_component`), and ``ddimctl.json`` at the root."""
    from ..fsutil import atomic_dir, safetensors_bytes

    out_dir = Path(out_dir)
    model = unwrap(model)
    config = dict(model.config)
    doc = ddimctl_meta(config, settings, meta, autoencoder)
    scheduler = settings.to_diffusers_config()
    with atomic_dir(out_dir, overwrite) as tmp:
        unet_dir = sched_dir = tmp
        if autoencoder is not None:
            ae_config = dict(autoencoder.config)
            component = saved_autoencoder_component(ae_config)
            unet_dir, sched_dir, ae_dir = tmp / "unet", tmp / "scheduler", tmp / component
            for d in (unet_dir, sched_dir, ae_dir):
                d.mkdir()
            write_json(tmp / MODEL_INDEX, {
                "_class_name": "LDMPipeline",
                "scheduler": ["diffusers", scheduler["_class_name"]],
                "unet": ["diffusers", "UNet2DModel"],
                component: ["diffusers", ae_config["_class_name"]],
            })
            write_json(ae_dir / CONFIG_NAME, ae_config)
            (ae_dir / WEIGHTS_NAME).write_bytes(safetensors_bytes(state_for_saving(autoencoder), {"format": "pt"}))
        write_json(unet_dir / CONFIG_NAME, config)
        metadata = {"format": "pt", "ddimctl": json.dumps(doc, default=str)}  # diffusers needs "format": "pt"
        (unet_dir / WEIGHTS_NAME).write_bytes(safetensors_bytes(state_for_saving(model), metadata))
        write_json(sched_dir / SCHEDULER_NAME, scheduler)
        write_json(tmp / META_NAME, doc)
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
    from ..fsutil import refuse_existing, save_safetensors_atomic

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise OutputError(f"{path}: a single-file checkpoint must end in .safetensors")
    refuse_existing(path, overwrite)
    model = unwrap(model)
    config = dict(model.config)
    metadata = {
        "format": "pt",
        "config": json.dumps(config),
        "scheduler_config": json.dumps(settings.to_diffusers_config()),
        "ddimctl": json.dumps(ddimctl_meta(config, settings, meta), default=str),
    }
    return save_safetensors_atomic(path, state_for_saving(model), metadata)
