"""Steps several commands share: planning outputs before any work, reading input images, reporting. No tensor
math, file format or metric lives here: those are the library's."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .output import Reporter

if TYPE_CHECKING:
    from ..conditioning import ConditionOptions
    from ..engine import Engine


def plan_outputs(paths: list[Path], overwrite: bool, skip_existing: bool) -> list[bool]:
    """For each planned output, whether to produce it; refuses up front (before any work) to overwrite."""
    from ..fsutil import plan_output

    return [plan_output(p, overwrite, skip_existing) == "write" for p in paths]


def plan_batches(paths: list[Path], overwrite: bool, skip_existing: bool, batch_size: int
                 ) -> tuple[list[list[int]], list[int]]:
    """This process's batches (lists of indices into ``paths``) and the indices whose outputs it writes.

    The share is by index under torchrun; each rank checks only its own (the others may be writing theirs).
    Batches are cut from the whole share *before* existing outputs are skipped, so a run completed with
    ``--skip-existing`` computes every image in the very batch, of the same size and at the same position, as the
    run it completes, and writes only the missing ones: byte-identical even where the model's arithmetic depends on
    its batch. A batch whose outputs all exist is not computed.
    """
    from ..devices import rank_world
    from ..engine import batches, shard

    mine = shard(list(range(len(paths))), *rank_world())
    todo = [i for i, go in zip(mine, plan_outputs([paths[i] for i in mine], overwrite, skip_existing)) if go]
    wanted = set(todo)
    return [list(c) for c in batches(mine, batch_size) if wanted.intersection(c)], todo


def image_paths(specs: list[str]) -> list[Path]:
    """Expand image arguments (files, folders, globs, ``-`` for stdin)."""
    from ..images import iter_image_paths

    return iter_image_paths(specs, stdin=sys.stdin if "-" in specs else None)


def output_names(paths: list[Path], out: Path, suffix: str) -> list[Path]:
    """``out/STEM{suffix}`` for each input; two inputs with one name are refused."""
    targets = [out / f"{p.stem}{suffix}" for p in paths]
    seen: dict[Path, Path] = {}
    for src, t in zip(paths, targets):
        if t in seen:
            raise InputError(f"{src}: same output name as {seen[t]} ({t}); invert them into different --out folders")
        seen[t] = src
    return targets


def load_images(paths: list[Path], engine: "Engine", rep: Reporter):
    """Load and fit each image to the model's channels and size: ((B, C, H, W) in [-1, 1], infos); notes go to
    stderr."""
    import torch

    from ..images import load_image

    tensors, infos = [], []
    for p in paths:
        img = load_image(p, engine.image_shape[0], tuple(engine.image_shape[1:]))
        for n in img.notes:
            rep.note(f"{p}: {n}")
        tensors.append(img.tensor)
        infos.append({"source": str(p), "original_size": list(img.original_size)})
    return torch.cat(tensors), infos


def finite_or_note(x, names: list[str], rep: Reporter) -> list[bool]:
    """Which samples of ``x`` are finite; a note names each that is not (nothing is written for it)."""
    from ..engine import finite_mask

    ok = finite_mask(x).tolist()
    for good, name in zip(ok, names):
        if not good:
            rep.note(f"{name}: the model produced NaN or inf values; nothing written for it")
    return ok


def report_doc(command: str, engine: "Engine", **fields: Any) -> dict[str, Any]:
    """The JSON document of a command: its name, the model and settings, then its own fields."""
    return {"command": command, **engine.describe(), **fields}


def conditions_for(engine: "Engine", options: "ConditionOptions", n: int, rep: Reporter, role: str = "",
                   default: bool = False) -> list[Any] | None:
    """The conditions of ``n`` images from the command's options (``default``: the model's defaults where none are
    given, as ``sample`` does), refused before any work when the model cannot take them; what encoding them
    changed (an over-long prompt truncated) is noted once the work starts."""
    values = engine.conditions(options, n, role)
    if values is None and default:
        values = engine.default_conditions(n)
    engine.check_conditions(values, role)
    for line in engine.conditioner.notes:
        rep.note_later(line)
    return values
