"""Model families: how to recognise a model folder, resolve and load its parts, call its network and shape its
latents; what comes back is a family-neutral :class:`LoadedModel`.

The registry :data:`FAMILIES` is tried in order: the first family that recognises a folder (by its
``model_index.json``, or its config when it has none) resolves it, or refuses it in one line with its reason. A new
family is a module here with the :class:`Family` interface and one entry in :data:`FAMILIES`; the samplers, the
inversion, tuning and the command bodies do not change.

    model = load("mnist-cond")                  # a LoadedModel: network, settings, conditioner, autoencoder, shapes
    plan = model.plan(10)                       # the sampling plan for 10 steps at the model's default size
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..checkpoint.autoencoders import ResolvedAutoencoder
from ..checkpoint.model_index import ModelIndex, read_model_index
from ..checkpoint.files import CONFIG_NAME, SCHEDULER_NAME
from ..checkpoint.references import Location, check_variant_for, locate
from ..conditioning import Conditioner
from ..errors import ModelError
from ..schedule import SamplingPlan
from ..settings import SamplerSettings


@dataclass
class Resolved:
    """What a model reference points to, before any weights are read, as its family resolved it.

    ``family``: the name of the :mod:`ddimctl.families` family that reads it. The denoiser network:
    ``model_config`` (its config, validated and complete), ``weights`` (the first safetensors file),
    ``weight_files`` (all of them: the shards, in order, when ``weights_index`` names a sharded checkpoint) and
    ``variant`` (None: the default weights). ``scheduler_config``: the raw diffusers scheduler config ({} when
    there is none: defaults apply); ``meta``: ddimctl's own metadata ({} when absent); ``revision``: the 40-hex
    commit for Hub refs, else None. ``config_source``/``scheduler_source`` name where the configs came from, for
    messages. ``index``: the ``model_index.json`` read, if any; ``autoencoder``: the autoencoder that decodes the
    network's latents (a latent pipeline's own, or one paired with it), None for a pixel-space model; ``parts``:
    any further components the family reads (text encoders, tokenizers, ...), by component name.

    Notes, one line each about what ddimctl reads differently from diffusers or does not use: ``notes`` (the
    model's), the autoencoder's own, then ``pairing_notes`` (how an autoencoder from elsewhere was paired with it):
    :attr:`all_notes` in that order.
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
    index: ModelIndex | None = None
    autoencoder: ResolvedAutoencoder | None = None
    parts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pairing_notes: list[str] = field(default_factory=list)
    family: str = "unet2d"

    def __post_init__(self) -> None:
        if not self.weight_files:
            self.weight_files = [self.weights]

    @property
    def all_notes(self) -> list[str]:
        ae = self.autoencoder.notes if self.autoencoder is not None else []
        return [*self.notes, *ae, *self.pairing_notes]

    def settings(self) -> SamplerSettings:
        """The sampler settings of the scheduler config (missing keys: the named class's defaults, see
        :meth:`SamplerSettings.from_config`)."""
        return SamplerSettings.from_config(self.scheduler_config, source=self.scheduler_source)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for ``ddimctl info`` (the family's); reads headers and hashes files, loads nothing."""
        return family(self.family).describe(self)


@dataclass
class LoadedModel:
    """A model ready for the sampler core, whatever its family.

    ``network(x_t, t, **cond)``: the denoiser's raw prediction, shaped like ``x_t`` (B, C, h, w); ``t`` is the
    plan's model time (``time_input`` says what the network receives: ``"timestep"`` -- DDPM's integer t, or
    sigma * T for flow models, as ddimctl's plans give it). ``model``: the network's module(s) as loaded (for
    their parameters, dtype and ``torch.compile``). ``settings``: the sampler settings (prediction type, noise
    schedule, spacing, clipping). ``conditioner``: how its conditions are read and encoded. ``autoencoder``:
    images <-> latents (``encode``/``decode``, scaled as diffusers' pipelines scale them), None for a pixel model.
    ``image_shape``/``sample_shape``: (C, H, W) of the images it makes and of what the sampler works on, at its
    default size (:meth:`shapes` for another size where the family allows). ``kind``: a short description
    ("pixel", "latent", "class-conditional", ...). ``notes``: one line each about what ddimctl reads differently
    from diffusers or does not use.
    """

    family: str
    kind: str
    model: torch.nn.Module
    network: Callable[..., torch.Tensor]
    settings: SamplerSettings
    conditioner: Conditioner
    resolved: Resolved
    image_shape: tuple[int, int, int]
    sample_shape: tuple[int, int, int]
    autoencoder: torch.nn.Module | None = None
    parameters: int = 0
    notes: list[str] = field(default_factory=list)
    time_input: str = "timestep"
    #: (height, width) -> (image_shape, sample_shape); None: only the default size
    resize: Callable[[int, int], tuple[tuple[int, int, int], tuple[int, int, int]]] | None = None
    #: (settings, steps, sample_shape) -> plan, where the plan depends on the size (a resolution-dependent shift)
    plan_for_shape: Callable[[SamplerSettings, int, tuple[int, int, int]], SamplingPlan] | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """What the sampler works on when an autoencoder decodes it; None for a pixel model."""
        return self.sample_shape if self.autoencoder is not None else None

    def shapes(self, height: int | None = None, width: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(image_shape, sample_shape) for images of ``height`` x ``width`` (None: the default size)."""
        from ..errors import SettingError

        if height is None and width is None:
            return self.image_shape, self.sample_shape
        h = self.image_shape[1] if height is None else int(height)
        w = self.image_shape[2] if width is None else int(width)
        if (h, w) == self.image_shape[1:]:
            return self.image_shape, self.sample_shape
        if self.resize is None:
            raise SettingError([("height", h), ("width", w)],
                               f"the model makes {self.image_shape[1]}x{self.image_shape[2]} images only")
        return self.resize(h, w)

    def plan(self, steps: int, settings: SamplerSettings | None = None,
             sample_shape: tuple[int, ...] | None = None) -> SamplingPlan:
        """The sampling plan for ``steps`` steps with ``settings`` (default: the model's) for samples of
        ``sample_shape`` (default: the model's own size)."""
        settings = settings or self.settings
        if self.plan_for_shape is not None:
            return self.plan_for_shape(settings, steps, tuple(sample_shape or self.sample_shape))
        return settings.plan(steps)


class Family(Protocol):
    """What a model family provides (a module of this package)."""

    name: str
    #: repo-relative patterns of the configs a Hub snapshot of such a model fetches before any weights
    config_patterns: list[str]

    def recognises(self, index: ModelIndex | None, root: Path) -> bool:
        """Whether this family judges the folder (it may still refuse it, in :meth:`resolve`)."""

    def resolve(self, location: Location, variant: str | None) -> Resolved:
        """Read and check every config, fetch and pick the weight files; refuse in one line what it cannot run."""

    def pair_autoencoder(self, r: Resolved, autoencoder: Any, scaling_factor: float | None,
                         variant: str | None) -> Resolved:
        """``r`` with another autoencoder and/or latent scale (``--autoencoder``, ``--autoencoder-scaling-factor``)."""

    def load(self, r: Resolved, device: torch.device, dtype: torch.dtype, autoencoder: Any) -> LoadedModel:
        """Load the weights onto ``device`` in ``dtype``."""

    def describe(self, r: Resolved) -> dict[str, Any]:
        """A JSON-able summary for ``ddimctl info``."""


def _registry() -> list[Family]:
    from . import flow_transformers, stable_diffusion, unet

    # unet last: it judges every folder no other family recognises (and refuses what it cannot run)
    return [flow_transformers, stable_diffusion, unet]


def family(name: str) -> Family:
    """The registered family called ``name``."""
    for fam in _registry():
        if fam.name == name:
            return fam
    raise ModelError(f"no model family {name!r}")


def config_patterns() -> list[str]:
    """What a Hub snapshot fetches first: every family's configs (small files), before any weights."""
    out: list[str] = []
    for fam in _registry():
        out += [p for p in fam.config_patterns if p not in out]
    return out


def resolve(
    ref: str | os.PathLike,
    *,
    variant: str | None = None,
    autoencoder: str | os.PathLike | ResolvedAutoencoder | None = None,
    autoencoder_scaling_factor: float | None = None,
) -> Resolved:
    """Resolve a model reference (see :func:`ddimctl.checkpoint.references.locate`) with the family that
    recognises it. Raises :class:`~ddimctl.errors.ModelError` (one line) when it cannot.

    ``variant``: load diffusers' variant files (``"fp16"``: ``diffusion_pytorch_model.fp16.safetensors`` or its
    shards) instead of the default weights. ``autoencoder``: a reference to an autoencoder (see
    :func:`ddimctl.checkpoint.autoencoders.resolve_autoencoder`) that decodes the model's latents, instead of the
    pipeline's own. ``autoencoder_scaling_factor``: use this latent scale instead of the autoencoder config's.
    """
    from ..checkpoint.weights import check_variant

    check_variant(variant)
    location = locate(ref, config_patterns())
    check_variant_for(location, variant)
    fam = _family_of(location)
    r = fam.resolve(location, variant)
    if location.repo_id is not None:
        r.repo_id, r.revision = location.repo_id, location.revision
        if r.autoencoder is not None and r.autoencoder.source == "pipeline":
            r.autoencoder.repo_id, r.autoencoder.revision = location.repo_id, location.revision
    if autoencoder is None and autoencoder_scaling_factor is None:
        return r
    return fam.pair_autoencoder(r, autoencoder, autoencoder_scaling_factor, variant)


def _family_of(location: Location) -> Family:
    index = read_model_index(location.root) if location.file is None or location.part is not None else None
    families = _registry()
    for fam in families:
        if fam.recognises(index, location.root):
            return fam
    return families[-1]


def load(
    ref: str | os.PathLike | Resolved,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    variant: str | None = None,
    autoencoder: str | os.PathLike | ResolvedAutoencoder | bool | None = None,
    autoencoder_scaling_factor: float | None = None,
) -> LoadedModel:
    """Resolve ``ref`` (or take a :class:`Resolved`) and load it onto ``device`` in ``dtype``.

    ``variant``: diffusers' variant files (``"fp16"``); see :func:`resolve`. ``autoencoder``: what to do about
    latents:

    * None (the default, for callers that only handle pixel images): a pixel model loads; a latent model is a
      :class:`~ddimctl.errors.ModelError` saying so, rather than latents the caller would take for images;
    * True: load the model's autoencoder too (``LoadedModel.autoencoder``); a pixel model loads as with None;
    * False: the denoiser alone, even of a latent model (its samples are latents; a note says so);
    * a reference (see :func:`ddimctl.checkpoint.autoencoders.resolve_autoencoder`) or a ``ResolvedAutoencoder``:
      pair the model with that autoencoder (replacing a pipeline's own).

    ``autoencoder_scaling_factor`` overrides the autoencoder's latent scale.
    """
    pair = autoencoder if not isinstance(autoencoder, bool) else None
    if isinstance(ref, Resolved):
        if variant is not None and variant != ref.variant:
            raise ModelError(f"{ref.ref}: already resolved with variant {ref.variant!r}, not {variant!r}")
        r = ref
        if pair is not None or autoencoder_scaling_factor is not None:
            r = family(r.family).pair_autoencoder(r, pair, autoencoder_scaling_factor, variant)
    else:
        r = resolve(ref, variant=variant, autoencoder=pair, autoencoder_scaling_factor=autoencoder_scaling_factor)
    return family(r.family).load(r, torch.device(device), dtype, autoencoder)
