"""Checkpoints on disk and on the Hugging Face Hub: where a reference's files are, reading them, and saving.

* :mod:`.references`: model references (a folder, a ``.safetensors`` file, a built-in name, a Hub repo
  ``owner/name[@rev]``) -> a :class:`Location`;
* :mod:`.model_index`: diffusers' ``model_index.json`` (:class:`ModelIndex`);
* :mod:`.weights`: safetensors weights, shards and variants, loaded with strict checks;
* :mod:`.autoencoders`: latent-diffusion autoencoders and their scaling policy;
* :mod:`.hub`: fetching into the Hugging Face cache; :mod:`.files`: JSON, safetensors headers, hashes;
* :mod:`.save`: saving a UNet (and its autoencoder) in diffusers' layout.

Which family runs a model, what it makes of its files (``Resolved``) and loading it is :mod:`ddimctl.families`
(``families.resolve``, ``families.load``).
"""

from __future__ import annotations

from .. import BUILTIN_MODELS, DEFAULT_MODEL
from .autoencoders import ResolvedAutoencoder, load_autoencoder, resolve_autoencoder
from .files import sha256_file
from .hub import parse_hub_ref
from .model_index import ModelIndex
from .references import BUILTIN_ROOT, Location, locate
from .save import save, save_file
from .weights import Weights

__all__ = [
    "BUILTIN_MODELS", "BUILTIN_ROOT", "DEFAULT_MODEL", "Location", "ModelIndex", "ResolvedAutoencoder",
    "Weights", "load_autoencoder", "locate", "parse_hub_ref", "resolve_autoencoder", "save", "save_file",
    "sha256_file",
]
