"""Steps several commands share: building the engine from the options, planning outputs before any work, and
reading input images. No tensor math, file format or metric lives here: those are the library's."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .output import Reporter

if TYPE_CHECKING:
    from ..pipeline import Engine, SamplingOptions


def load_engine(model: str, device: str, dtype: str, options: "SamplingOptions", compile_model: bool,
                rep: Reporter, variant: str | None = None, autoencoder: str | None = None,
                autoencoder_scaling_factor: float | None = None) -> "Engine":
    """Resolve ``--device`` and ``--dtype`` and load the model into an :class:`~ddimctl.pipeline.Engine`; the
    loader's notes go to stderr when the work starts."""
    import gc

    from ..devices import resolve_device, resolve_dtype
    from ..pipeline import Engine

    # torch and the modules just imported live until the process exits: take their objects out of the cyclic
    # collector's walks, one of which would otherwise cost ~0.1 s of a 4 s `sample` (benchmarks/first_run.py)
    gc.freeze()
    dev = resolve_device(device)
    return Engine.load(model, options, dev, resolve_dtype(dtype, dev), compile=compile_model, note=rep.note_later,
                       variant=variant, autoencoder=autoencoder, autoencoder_scaling_factor=autoencoder_scaling_factor)


def schedule_steps(steps: int, schedule: Path | None) -> int:
    """``--steps``, or the number of steps of the ``--schedule`` file when ``--steps`` was left at its default (a
    ``--steps`` given that differs from the file's is refused when the engine loads the schedule)."""
    if schedule is None or _given("steps"):
        return steps
    from ..tuning import read_schedule

    return read_schedule(schedule).steps


def _given(param: str) -> bool:
    """Whether the running command's ``param`` came from the command line or the environment (not its default)."""
    import importlib

    import typer

    package = typer.BadParameter.__module__.rsplit(".", 1)[0]  # click, or the click Typer vendors
    ctx = importlib.import_module(package + ".globals").get_current_context(silent=True)
    if ctx is None:
        return True
    source = ctx.get_parameter_source(param)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


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
    from ..pipeline import batches, shard

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
        img = load_image(p, engine.image_shape[0], engine.image_shape[1])
        for n in img.notes:
            rep.note(f"{p}: {n}")
        tensors.append(img.tensor)
        infos.append({"source": str(p), "original_size": list(img.original_size)})
    return torch.cat(tensors), infos


def finite_or_note(x, names: list[str], rep: Reporter) -> list[bool]:
    """Which samples of ``x`` are finite; a note names each that is not (nothing is written for it)."""
    from ..pipeline import finite_mask

    ok = finite_mask(x).tolist()
    for good, name in zip(ok, names):
        if not good:
            rep.note(f"{name}: the model produced NaN or inf values; nothing written for it")
    return ok


def report_doc(command: str, engine: "Engine", **fields: Any) -> dict[str, Any]:
    """The JSON document of a command: its name, the model and settings, then its own fields."""
    return {"command": command, **engine.describe(), **fields}
