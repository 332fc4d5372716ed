"""Autoencoders of latent diffusion (diffusers' ``AutoencoderKL`` and ``VQModel``): a latent pipeline's own, or
one paired with a UNet from elsewhere, resolved before any weights are read, with ddimctl's scaling policy.

Scaling: a ``VQModel`` config without ``scaling_factor`` (CompVis/ldm-celebahq-256's ``vqvae``) uses 1.0, the scale
LDM's VQ first stages were trained with, not diffusers' default 0.18215 (with which diffusers' own LDMPipeline decodes
that model wrongly, diffusers issue #6725); a note says so, and ``scaling_factor`` overrides any config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import BUILTIN_MODELS
from ..errors import ConfigError, ModelError
from .files import CONFIG_NAME, PICKLE_SUFFIXES, count_elements, metadata_json, pickle_error, read_json, safetensors_metadata
from .hub import hub_fetch, hub_variants, parse_hub_ref
from .model_index import ModelIndex, read_model_index
from .weights import (
    Weights, check_variant, find_weights, load_module, refuse_pickles_in, select_weights, variants_in, weight_patterns,
    weights_name,
)

AUTOENCODER_COMPONENTS = ("vqvae", "vae")  # the component names diffusers' latent pipelines give the autoencoder
AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")
# VQModel's and AutoencoderKL's default scaling_factor in diffusers (written into every config it saves)
DIFFUSERS_DEFAULT_SCALING = 0.18215
#: What a Hub repo of an autoencoder (or a pipeline holding one) fetches before its weights.
CONFIG_PATTERNS = ["model_index.json", CONFIG_NAME, "diffusion_pytorch_model.safetensors.index*.json"] + [
    f"{c}/{p}" for c in AUTOENCODER_COMPONENTS for p in (CONFIG_NAME, "diffusion_pytorch_model.safetensors.index*.json")]

Fetch = Callable[[list[str]], None]


def no_fetch(patterns: list[str]) -> None:
    """The fetch of a local folder: its files are all there."""
    return None


@dataclass
class ResolvedAutoencoder:
    """An autoencoder (diffusers ``AutoencoderKL`` or ``VQModel``) before its weights are read.

    ``config``: validated and complete, with the scaling policy applied (see the module docstring);
    ``raw_config``: as the file has it; ``weights``: its safetensors file(s); ``folder``: where its config is
    (a pipeline's ``vqvae/``, a model folder, ...). Notes, one line each: ``scaling_notes`` from the scaling
    policy (made anew whenever the scale is set again), ``weight_notes`` (a variant fallback); :attr:`notes` is both.
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
    scaling_notes: list[str] = field(default_factory=list)
    weight_notes: list[str] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return [*self.scaling_notes, *self.weight_notes]

    def with_scaling_factor(self, scaling_factor: float | None) -> "ResolvedAutoencoder":
        """The same autoencoder at another latent scale (None: the config's, by the scaling policy)."""
        from dataclasses import replace

        config, notes = autoencoder_config(self.raw_config, self.config_source, scaling_factor)
        return replace(self, config=config, scaling_notes=notes)

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
            "parameters": count_elements(self.weights.files),
        }


@dataclass(frozen=True)
class AutoencoderPlan:
    raw: dict[str, Any]
    source: str
    path: Path | None


def autoencoder_config_of(folder: Path) -> AutoencoderPlan:
    """Read (and check the class of) an autoencoder folder's config.json."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{path}: missing (an autoencoder needs config.json beside its weights)")
    raw = read_json(path)
    autoencoder_config(raw, str(path), None)  # refusals (class, keys) before any weights are fetched
    return AutoencoderPlan(raw, str(path), path)


def autoencoder_config(
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

    from ..nets.autoencoders import autoencoder_from_config

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


def finish_autoencoder(
    ref: str, source: str, folder: Path, where: str, plan: AutoencoderPlan, variant: str | None,
    scaling_factor: float | None, fetch: Fetch, variants: Callable[[Path], list[str]],
    trained_scale: float | None = None,
) -> ResolvedAutoencoder:
    """Pick an autoencoder folder's weights (its variant when asked; else, or when it has none, the default
    weights with a note) and apply the scaling policy (``trained_scale``: see :func:`autoencoder_config`)."""
    config, scaling_notes = autoencoder_config(plan.raw, plan.source, scaling_factor, trained_scale)
    notes: list[str] = []
    weights = find_weights(folder, variant) if variant is not None else None
    if weights is None:
        if variant is not None:
            fetch(weight_patterns(folder, "", None))
        weights = select_weights(folder, None, where, lambda: variants(folder))
        if weights is None:
            refuse_pickles_in(folder, where)
            raise ModelError(f"{where}: no {weights_name()} for the autoencoder (ddimctl loads only safetensors weights)")
        if variant is not None:
            notes.append(f"{where}: no {variant!r} variant of the autoencoder; loaded its default weights")
    files = [p for p in (plan.path,) if p is not None]
    files += ([weights.index] if weights.index else []) + list(weights.files)
    return ResolvedAutoencoder(ref, source, config, dict(plan.raw), plan.source, weights, files,
                               scaling_notes=scaling_notes, weight_notes=notes)


def autoencoder_folder(root: Path, label: str) -> tuple[Path, str]:
    """Where a reference's autoencoder is: a pipeline's vqvae/ or vae/ component, or the folder itself."""
    pipeline = read_model_index(root)
    component = autoencoder_component(root, pipeline)
    if component is not None:
        return root / component, f"{component}/"
    config = root / CONFIG_NAME
    if config.is_file():
        cls = read_json(config).get("_class_name")
        if isinstance(cls, str) and cls.startswith("UNet"):
            supported = ", ".join(AUTOENCODER_CLASSES)
            raise ConfigError(f"{config}: a {cls}, not an autoencoder (supported: {supported})")
        return root, ""  # any other class: autoencoder_from_config says what it is
    raise ModelError(f"{label}: no autoencoder here (expected config.json, or a pipeline's vqvae/ or vae/ folder)")


def resolve_autoencoder(
    ref: str | os.PathLike, *, variant: str | None = None, scaling_factor: float | None = None
) -> ResolvedAutoencoder:
    """Resolve an autoencoder reference: a folder with an ``AutoencoderKL``/``VQModel`` config.json and its
    weights, a pipeline folder (its ``vqvae/`` or ``vae/``), a ``.safetensors`` file with its config in the
    metadata (or a config.json beside it), or a Hub repo of either kind. ``variant``: its variant weights when it
    has them (else the default weights, with a note); ``scaling_factor`` overrides the config's."""
    check_variant(variant)
    ref = os.fspath(ref)
    path = Path(ref).expanduser()
    if ref and path.exists():
        if path.is_dir():
            folder, rel = autoencoder_folder(path, str(path))
            plan = autoencoder_config_of(folder)
            return finish_autoencoder(ref, "dir", folder, str(folder), plan, variant, scaling_factor, no_fetch,
                                       variants_in)
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise pickle_error(path)
        if suffix != ".safetensors":
            raise ModelError(f"{path}: not an autoencoder checkpoint (expected a folder or a .safetensors file)")
        raw = metadata_json(safetensors_metadata(path), "config", path)
        source = f"{path} (metadata 'config')"
        config_path = None
        if raw is None:
            config_path = path.parent / CONFIG_NAME
            if not config_path.is_file():
                raise ModelError(f"{path}: no autoencoder config (metadata 'config' or a config.json beside the file)")
            raw, source = read_json(config_path), str(config_path)
        config, notes = autoencoder_config(raw, source, scaling_factor)
        files = [path] + ([config_path] if config_path else [])
        return ResolvedAutoencoder(ref, "file", config, dict(raw), source, Weights((path,)), files, scaling_notes=notes)
    if ref in BUILTIN_MODELS:
        raise ModelError(f"{ref}: a built-in diffusion model, not an autoencoder")
    hub = parse_hub_ref(ref)
    if hub is None:
        raise ModelError(f"{ref}: no such autoencoder file, directory or Hub repo")
    repo_id, revision = hub
    snapshot = hub_fetch(ref, repo_id, revision, CONFIG_PATTERNS)
    commit = snapshot.name
    label = f"{repo_id}@{commit}"
    folder, rel = autoencoder_folder(snapshot, label)
    plan = autoencoder_config_of(folder)
    hub_fetch(ref, repo_id, commit, weight_patterns(folder, rel, variant))
    ae = finish_autoencoder(ref, "hub", folder, f"{label}/{rel}".rstrip("/"), plan, variant, scaling_factor,
                             lambda pats: hub_fetch(ref, repo_id, commit, [rel + p for p in pats]),
                             lambda f: hub_variants(repo_id, commit, f, rel))
    ae.repo_id, ae.revision = repo_id, commit
    return ae


def autoencoder_component(root: Path, index: ModelIndex | None) -> str | None:
    """The name of a pipeline folder's autoencoder component (vqvae/ or vae/), from model_index.json or, without
    one, from a vqvae/ or vae/ folder holding a config.json."""
    if index is not None:
        named = [k for k in AUTOENCODER_COMPONENTS if index.component(k) is not None]
        if named:
            return named[0]
    present = [k for k in AUTOENCODER_COMPONENTS if (root / k / CONFIG_NAME).is_file()]
    if len(present) > 1:
        raise ConfigError(f"{root}: both vqvae/ and vae/ hold a config.json: cannot tell which decodes the latents")
    return present[0] if present else None


def load_autoencoder(
    ae: ResolvedAutoencoder, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Load a resolved autoencoder (see :func:`resolve_autoencoder`) from safetensors with strict key and shape
    checks, cast to ``dtype`` on ``device``, in eval mode; its config (scaling included) is ``ae.config``."""
    from ..nets.autoencoders import autoencoder_from_config
    from ..nets.unet2d import convert_legacy_attention_keys

    return load_module(lambda: autoencoder_from_config(ae.config, ae.config_source), ae.weights, dtype, device,
                       convert=convert_legacy_attention_keys)
