"""``ddimctl sample``: images from noise, image i from seed + i whatever the batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import DdimctlError, NumericsError
from .app import command
from .common import conditions_for, finite_or_note, plan_batches, plan_outputs, report_doc
from .options import Conditioning, ModelLoading, OutOpt, Outputs, Sampling, SeedOpt
from .output import Reporter


@command
def sample(
    *,
    loading: ModelLoading,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Number of images.")] = 16,
    sampling: Sampling,
    seed: SeedOpt = 0,
    conditioning: Conditioning,
    out: OutOpt = Path("samples"),
    fmt: Annotated[str, typer.Option("--format", help="png (one file per image) or safetensors (samples.safetensors).")] = "png",
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Also write a contact sheet PNG here.")] = None,
    latents: Annotated[Optional[Path], typer.Option("--latents", help="Start from x_T in this .safetensors file (tensor 'latents', (N, C, H, W)).")] = None,
    save_latents: Annotated[bool, typer.Option("--save-latents", help="Also write each x_T as NAME.latent.safetensors.")] = False,
    outputs: Outputs,
) -> None:
    """Generate images from noise: image i uses seed + i, whatever --batch-size."""
    from ..devices import rank_world

    if fmt not in ("png", "safetensors"):
        raise typer.BadParameter(f"{fmt!r} is not png or safetensors", param_hint="--format")
    rep = outputs.reporter()
    if rank_world()[1] > 1 and (fmt == "safetensors" or grid is not None):
        raise DdimctlError("--format safetensors and --grid need every image in one process; run without torchrun")
    x_given = x_prev = offsets = nulls = latent = None
    if latents is not None:
        from ..latents import load_latent_file, recorded_spacing

        latent = load_latent_file(latents)
        x_given, x_prev, meta = latent.latents, latent.latents_prev, latent.metadata
        n = x_given.shape[0]
        if sampling.spacing is None and sampling.schedule is None and (recorded := recorded_spacing(meta)) is not None:
            sampling.spacing = recorded  # decode with the plan the latents were made with
            rep.note(f"{latents}: spacing {sampling.spacing}, as recorded in the file")
    engine = loading.engine(sampling.options(conditioning), rep)
    conditions = conditions_for(engine, conditioning.options(), n, rep, default=True)
    if x_given is not None:
        from ..latents import check_shape

        check_shape(x_given, engine.latent_shape, latents)
        if x_prev is not None:
            engine.check_latent_pair(latents, meta)
        (offsets, why_not), (nulls, why_no_nulls) = (engine.latent_offsets(latent, conditions),
                                                     engine.latent_nulls(latent, conditions))
        for why in (why_not, why_no_nulls):
            if why is not None:
                rep.note(f"{latents}: {why}")
    job = _SampleJob(engine, rep, out, [f"{i:06d}" for i in range(n)], seed, fmt, grid, save_latents, conditions)
    job.plan(outputs.overwrite, outputs.skip_existing, sampling.batch_size)
    job.run(x_given, x_prev, offsets, nulls)
    job.finish()


class _SampleJob:
    """The outputs of one ``sample`` run: planned (and refused if they exist) before the model runs, then
    written image by image as each batch finishes."""

    def __init__(self, engine, rep: Reporter, out: Path, names: list[str], seed: int, fmt: str,
                 grid: Path | None, save_latents: bool, conditions: list[Any] | None):
        self.engine, self.rep, self.out, self.names, self.seed = engine, rep, out, names, seed
        self.conditions = conditions
        self.fmt, self.grid, self.save_latents = fmt, grid, save_latents
        self.pngs = [out / f"{nm}.png" for nm in names]
        self.stacked = out / "samples.safetensors"
        self.kept: dict[int, Any] = {}
        self.failed: list[str] = []

    def plan(self, overwrite: bool, skip_existing: bool, batch_size: int) -> None:
        from ..fsutil import check_writable_dir
        from ..engine import batches

        check_writable_dir(self.out)
        if self.fmt == "png":
            self.batches, self.work = plan_batches(self.pngs, overwrite, skip_existing, batch_size)
        else:
            self.work = list(range(len(self.names))) if plan_outputs([self.stacked], overwrite, skip_existing)[0] else []
            self.batches = [list(c) for c in batches(self.work, batch_size)]
        self.writes = set(self.work)
        if self.save_latents:
            plan_outputs([self._latent_path(i) for i in self.work], overwrite, False)
        if self.grid is not None:
            plan_outputs([self.grid], overwrite, False)

    def _condition_meta(self, i: int) -> dict:
        return {} if self.conditions is None else self.engine.record(self.conditions[i])

    def _latent_path(self, i: int) -> Path:
        from ..latents import SUFFIX

        return self.out / f"{self.names[i]}{SUFFIX}"

    def run(self, x_given, x_prev=None, offsets=None, nulls=None) -> None:
        from ..inversion import select_offsets

        with self.rep.progress("sampling", sum(map(len, self.batches)) * len(self.engine.plan)) as bar:
            for chunk in self.batches:
                given = x_given[list(chunk)] if x_given is not None else None
                given_prev = x_prev[list(chunk)] if x_prev is not None else None
                given_offsets = select_offsets(offsets, list(chunk))
                given_nulls = None if nulls is None else [n.select(list(chunk)) for n in nulls]
                conditions = None if self.conditions is None else [self.conditions[i] for i in chunk]
                x_T, x0 = self.engine.generate([self.seed + i for i in chunk], given, lambda info: bar.advance(len(chunk)),
                                               given_prev, conditions, given_offsets, given_nulls)
                self._write(chunk, x_T, x0.float().cpu())

    def _write(self, chunk, x_T, x0) -> None:
        from ..images import save_png
        from ..latents import save_latents

        ok = finite_or_note(x0, [f"image {self.names[i]} (seed {self.seed + i})" for i in chunk], self.rep)
        for j, i in enumerate(chunk):
            if i not in self.writes:  # computed only to keep the batch the run being completed had
                continue
            if not ok[j]:
                self.failed.append(self.names[i])
                continue
            if self.save_latents:
                meta = {**self.engine.provenance(), "seed": self.seed + i, **self._condition_meta(i)}
                save_latents(self._latent_path(i), x_T[j : j + 1], meta)
            if self.fmt == "png":
                save_png(x0[j], self.pngs[i])
                self.rep.output(self.pngs[i])
            if self.save_latents:
                self.rep.output(self._latent_path(i))
            if self.fmt == "safetensors" or self.grid is not None:
                self.kept[i] = x0[j]

    def finish(self) -> None:
        import json

        import torch

        from ..fsutil import save_safetensors_atomic
        from ..images import make_grid, save_png

        if self.fmt == "safetensors" and self.work and not self.failed:
            stacked = torch.stack([self.kept[i] for i in range(len(self.names))])  # (N, C, H, W) float32, [-1, 1]
            seeds = json.dumps([self.seed + i for i in range(len(self.names))])
            save_safetensors_atomic(self.stacked, {"samples": stacked.contiguous()}, {"seeds": seeds})
            self.rep.output(self.stacked)
        if self.grid is not None and self.kept:
            save_png(make_grid(torch.stack([self.kept[i] for i in sorted(self.kept)])), self.grid)
            self.rep.output(self.grid)
        extra = {} if self.conditions is None else self.engine.conditioner.report([self.conditions[i] for i in self.work])
        self.rep.finish(report_doc("sample", self.engine, seeds=[self.seed + i for i in self.work], **extra,
                                   failed=self.failed))
        if self.failed:
            raise NumericsError(f"{len(self.failed)} of {len(self.work)} images had NaN or inf values and were not "
                                f"written: {', '.join(self.failed[:5])}")
