"""Components of the big pipeline families (Stable Diffusion, SD3, Flux): diffusers' and transformers' own
classes, imported lazily from the ``text`` extra, resolved (configs read, weight files picked and fetched) before
any weights are loaded, then loaded with strict checks; and what ddimctl puts around them (an autoencoder that
scales its latents as the pipeline does, prompt encoding with diffusers' truncation).

    pip install "ddimctl[text]"      # diffusers, transformers, accelerate
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint.files import CONFIG_NAME, read_json
from ..checkpoint.model_index import ModelIndex, describe_class
from ..checkpoint.references import Location
from ..checkpoint.weights import (
    DIFFUSERS_STEM, TRANSFORMERS_STEM, Weights, find_weights, refuse_pickles_in, select_weights, weight_patterns,
    weights_name,
)
from ..errors import ConfigError, ModelError, first_line

EXTRA = 'pip install "ddimctl[text]"'
#: Tokenizer files a Hub snapshot fetches with the configs (small).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.json",
                   "spiece.model", "added_tokens.json")


def library(name: str, needed_by: str):
    """``diffusers`` or ``transformers``, imported now (only when such a model is loaded), quiet; a one-line
    ModelError naming the install command when the extra is missing."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ModelError(f"{needed_by} needs {name}, which is not installed: {EXTRA}") from None
    module.logging.set_verbosity_error()  # their warnings are not ours to print; refusals are one line each
    if hasattr(module.utils.logging, "disable_progress_bar"):
        module.utils.logging.disable_progress_bar()
    return module


@dataclass
class Part:
    """One component of a pipeline folder: ``name`` (its folder, e.g. ``text_encoder_2``), its ``library`` and
    ``class_name`` (from model_index.json), ``config`` (its config.json; {} for a tokenizer), and for a model its
    ``weights``. ``notes``: a variant fallback."""

    name: str
    library: str
    class_name: str
    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    weights: Weights | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        cfg = self.folder / CONFIG_NAME
        out = [cfg] if cfg.is_file() else []
        if self.weights is not None:
            out += ([self.weights.index] if self.weights.index else []) + list(self.weights.files)
        return out


def check_pipeline(index: ModelIndex, runs: tuple[str, str], refused: dict[str, str],
                   image_parts: dict[str, str]) -> str:
    """The pipeline's class name, after refusing in one line what the family ``runs`` (its two pipeline classes)
    cannot: a ``refused`` pipeline (name -> why), a component of ``image_parts`` (name -> why), or another class."""
    pipeline = index.class_name or "this pipeline"
    family = f"ddimctl runs {runs[0]} and {runs[1]}"
    if pipeline in refused:
        raise ConfigError(f"{index.path}: {pipeline} is {refused[pipeline]}; {family}")
    for part, why in image_parts.items():
        if index.component(part) is not None:
            raise ConfigError(f"{index.path}: component {part} ({why}); {family} without it")
    if pipeline not in runs:
        raise ConfigError(f"{index.path}: {pipeline} is not a pipeline ddimctl runs (this family: {runs[0]}, {runs[1]})")
    return pipeline


def component(index: ModelIndex, name: str, expected: tuple[str, ...], pipeline: str) -> tuple[str, str]:
    """(library, class) of component ``name``, refused in one line when missing or not one of ``expected``."""
    entry = index.component(name)
    if entry is None:
        raise ConfigError(f"{index.path}: {pipeline} has no {name} component (a {' or '.join(expected)})")
    if entry[1] not in expected:
        raise ConfigError(f"{index.path}: component {name} is {describe_class(entry)}; ddimctl runs {pipeline} with "
                          f"a {' or '.join(expected)} there")
    return entry[0] or "diffusers", entry[1]


def config_part(loc: Location, index: ModelIndex, name: str, expected: tuple[str, ...], pipeline: str) -> Part:
    """Component ``name`` with its config read (no weights yet)."""
    lib, cls = component(index, name, expected, pipeline)
    folder = loc.root / name
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{loc.label}/{name}: missing {CONFIG_NAME}")
    return Part(name, lib, cls, folder, read_json(path))


def tokenizer_part(loc: Location, index: ModelIndex, name: str, expected: tuple[str, ...], pipeline: str) -> Part:
    lib, cls = component(index, name, expected, pipeline)
    folder = loc.root / name
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ModelError(f"{loc.label}/{name}: missing (the {cls} files)")
    return Part(name, lib, cls, folder)


def fetch_weights(loc: Location, parts: list[Part], variant: str | None, denoiser: str) -> None:
    """Fetch (a Hub snapshot) and pick each model part's weights: ``variant``'s, which the ``denoiser`` part must
    have (else a one-line ModelError naming what it has), while any other part without it loads its default weights
    with a note (text encoders and autoencoders often come without the variant the denoiser has)."""
    chosen: dict[str, str | None] = {}
    for part in parts:
        stem = _stem(part)
        has = variant is not None and (find_weights(part.folder, variant, stem) is not None
                                       or variant in loc.variants(part.folder, stem))
        chosen[part.name] = variant if has or part.name == denoiser else None
    loc.fetch([p for part in parts for p in weight_patterns(part.folder, f"{part.name}/", chosen[part.name],
                                                             _stem(part))])
    for part in parts:
        stem, where = _stem(part), f"{loc.label}/{part.name}"
        weights = select_weights(part.folder, chosen[part.name], where, lambda f=part.folder, s=stem: loc.variants(f, s),
                                 stem)
        if weights is None:
            refuse_pickles_in(part.folder, where, stem)
            raise ModelError(f"{where}: no {weights_name(stem)} (ddimctl loads only safetensors weights)")
        if variant is not None and chosen[part.name] is None:
            part.notes.append(f"{where}: no {variant!r} variant; loaded its default weights")
        part.weights = weights


def _stem(part: Part) -> str:
    return TRANSFORMERS_STEM if part.library == "transformers" else DIFFUSERS_STEM


def load_part(part: Part, dtype: torch.dtype, device: torch.device | str, needed_by: str):
    """Load a model part with its library's own class (strict: a tensor its class needs and the files lack is a
    one-line ModelError), in ``dtype`` on ``device``, eval mode."""
    lib = library(part.library, needed_by)
    cls = getattr(lib, part.class_name, None)
    if cls is None:
        raise ModelError(f"{part.folder}: {part.library} {lib.__version__} has no class {part.class_name} ({EXTRA} "
                         "with a newer version)")
    variant = part.weights.variant if part.weights is not None else None
    kwargs: dict[str, Any] = {"use_safetensors": True, "variant": variant, "output_loading_info": True}
    kwargs["dtype" if part.library == "transformers" else "torch_dtype"] = dtype
    try:
        model, info = cls.from_pretrained(str(part.folder), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise ModelError(f"{part.folder}: cannot load {part.class_name} ({first_line(e)})") from None
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        what = f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else f"{len(mismatched)} of another shape"
        raise ModelError(f"{part.folder}: weights do not match {CONFIG_NAME}: {what}")
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(part: Part, needed_by: str):
    lib = library("transformers", needed_by)
    cls = getattr(lib, part.class_name, None) or lib.AutoTokenizer
    try:
        return cls.from_pretrained(str(part.folder))
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{part.folder}: cannot load the tokenizer ({first_line(e)})") from None


def tokenize(tokenizer, texts: list[str], max_length: int, where: str) -> tuple[torch.Tensor, list[str]]:
    """Token ids (P, max_length) as diffusers' pipelines make them (padded to ``max_length``, truncated), and a note
    per text that was truncated (diffusers warns the same)."""
    ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    notes = []
    for text, row in zip(texts, ids):
        full = tokenizer(text, truncation=False).input_ids
        if len(full) > max_length:
            notes.append(f"{where}: the prompt {_short(text)} is {len(full)} tokens; truncated to {max_length}, as "
                         "diffusers does")
    return ids, notes


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


class ScaledAutoencoder(torch.nn.Module):
    """diffusers' ``AutoencoderKL`` with the latent scaling its pipelines apply: ``encode(images)`` -> the
    posterior mean, shifted and scaled (``(z - shift_factor) * scaling_factor``), ``decode(latents)`` the inverse
    (``vae.decode(latents / scaling_factor + shift_factor)``), images in [-1, 1]; the interface of ddimctl's own
    autoencoders (:mod:`ddimctl.nets.autoencoders`)."""

    def __init__(self, vae: torch.nn.Module, scaling_factor: float, shift_factor: float | None):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)
        self.downscale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.config = dict(vae.config)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(images).latent_dist.mean  # (B, C, h, w)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample  # (B, 3, H, W)


def load_autoencoder(part: Part, dtype: torch.dtype, device: torch.device | str, needed_by: str,
                     shift: bool) -> ScaledAutoencoder:
    """The pipeline's ``AutoencoderKL`` (in float32 when ``dtype`` is float16 and its config says
    ``force_upcast``, as diffusers' pipelines decode), with its scaling (and ``shift_factor`` where ``shift``)."""
    upcast = dtype == torch.float16 and bool(part.config.get("force_upcast", True))
    vae = load_part(part, torch.float32 if upcast else dtype, device, needed_by)
    return ScaledAutoencoder(vae, vae.config.scaling_factor, vae.config.get("shift_factor") if shift else None)


def notes_for_unused(index: ModelIndex, unused: dict[str, str]) -> list[str]:
    """A note for each component that is present but not run (a safety checker, ...): ``unused`` maps the
    component name to why."""
    return [f"{index.path}: component {name} ({describe_class(index.components[name])}) is not run ({why})"
            for name, why in unused.items() if name in index.components]


Offload = Callable[[], None]
