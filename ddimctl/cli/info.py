"""``ddimctl info``: what a model reference resolves to, without loading the weights."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from .. import DEFAULT_MODEL
from .app import command
from .options import Group, JsonOpt, ModelLoading
from .output import write_json


@command
def info(
    *,
    model: Annotated[str, typer.Argument(help="A model reference (as --model takes).")] = DEFAULT_MODEL,
    loading: Annotated[ModelLoading, Group(exclude=("model", "device", "dtype", "compile_model"))],
    json_out: JsonOpt = False,
) -> None:
    """Show what a model reference resolves to: files, revision, config, parameters, size, prediction type, and
    for latent diffusion the autoencoder that decodes its latents."""
    from ..families import resolve

    desc = resolve(model, **loading.references()).describe()
    if json_out:
        write_json(desc)
        return
    for key, value in desc.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        sys.stdout.write(f"{key}: {value}\n")
