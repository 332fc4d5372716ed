"""``ddimctl sample``: images from noise, image i from seed + i whatever the batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import DEFAULT_MODEL
from ..errors import DdimctlError, NumericsError
from .app import command
from .common import finite_or_note, load_engine, my_share, plan_outputs, report_doc, schedule_steps
from .options import (
    DEFAULT_BATCH_SIZE, DEFAULT_STEPS, BatchSizeOpt, ChannelsLastOpt, ClipOpt, CompileOpt, DeviceOpt, DtypeOpt,
    EtaOpt, JsonOpt, ModelOpt, OutOpt, OverwriteOpt, QuietOpt, SamplerOpt, ScheduleOpt, SeedOpt, SkipExistingOpt,
    SpacingOpt, StepsOpt,
)
from .output import Reporter


@command
def sample(
    model: ModelOpt = DEFAULT_MODEL,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Number of images.")] = 16,
    steps: StepsOpt = DEFAULT_STEPS,
    eta: EtaOpt = 0.0,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
    schedule: ScheduleOpt = None,
    clip_sample: ClipOpt = None,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    out: OutOpt = Path("samples"),
    fmt: Annotated[str, typer.Option("--format", help="png (one file per image) or safetensors (samples.safetensors).")] = "png",
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Also write a contact sheet PNG here.")] = None,
    latents: Annotated[Optional[Path], typer.Option("--latents", help="Start from x_T in this .safetensors file (tensor 'latents', (N, C, H, W)).")] = None,
    save_latents: Annotated[bool, typer.Option("--save-latents", help="Also write each x_T as NAME.latent.safetensors.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    compile_model: CompileOpt = False,
    channels_last: ChannelsLastOpt = False,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from noise: image i uses seed + i, whatever --batch-size."""
    from ..devices import rank_world
    from ..pipeline import SamplingOptions

    if fmt not in ("png", "safetensors"):
        raise typer.BadParameter(f"{fmt!r} is not png or safetensors", param_hint="--format")
    rep = Reporter(json_out, quiet)
    if rank_world()[1] > 1 and (fmt == "safetensors" or grid is not None):
        raise DdimctlError("--format safetensors and --grid need every image in one process; run without torchrun")
    x_given = None
    if latents is not None:
        from ..latents import load_latents

        x_given, _ = load_latents(latents)
        n = x_given.shape[0]
    options = SamplingOptions(steps=schedule_steps(steps, schedule), eta=eta, sampler=sampler, spacing=spacing,
                              clip_sample=clip_sample, channels_last=channels_last,
                              schedule_file=None if schedule is None else str(schedule))
    engine = load_engine(model, device, dtype, options, compile_model, rep)
    if x_given is not None:
        from ..latents import check_shape

        check_shape(x_given, engine.image_shape, latents)
    job = _SampleJob(engine, rep, out, [f"{i:06d}" for i in range(n)], seed, fmt, grid, save_latents)
    job.plan(overwrite, skip_existing)
    job.run(batch_size, x_given)
    job.finish()


class _SampleJob:
    """The outputs of one ``sample`` run: planned (and refused if they exist) before the model runs, then
    written image by image as each batch finishes."""

    def __init__(self, engine, rep: Reporter, out: Path, names: list[str], seed: int, fmt: str,
                 grid: Path | None, save_latents: bool):
        self.engine, self.rep, self.out, self.names, self.seed = engine, rep, out, names, seed
        self.fmt, self.grid, self.save_latents = fmt, grid, save_latents
        self.pngs = [out / f"{nm}.png" for nm in names]
        self.stacked = out / "samples.safetensors"
        self.kept: dict[int, Any] = {}
        self.failed: list[str] = []

    def plan(self, overwrite: bool, skip_existing: bool) -> None:
        from ..fsutil import check_writable_dir

        check_writable_dir(self.out)
        if self.fmt == "png":
            self.work = my_share(self.pngs, overwrite, skip_existing)
        else:
            self.work = list(range(len(self.names))) if plan_outputs([self.stacked], overwrite, skip_existing)[0] else []
        if self.save_latents:
            plan_outputs([self._latent_path(i) for i in self.work], overwrite, False)
        if self.grid is not None:
            plan_outputs([self.grid], overwrite, False)

    def _latent_path(self, i: int) -> Path:
        from ..latents import SUFFIX

        return self.out / f"{self.names[i]}{SUFFIX}"

    def run(self, batch_size: int, x_given) -> None:
        from ..pipeline import batches

        with self.rep.progress("sampling", len(self.work) * len(self.engine.plan)) as bar:
            for chunk in batches(self.work, batch_size):
                given = x_given[list(chunk)] if x_given is not None else None
                x_T, x0 = self.engine.generate([self.seed + i for i in chunk], given, lambda info: bar.advance(len(chunk)))
                self._write(chunk, x_T, x0.float().cpu())

    def _write(self, chunk, x_T, x0) -> None:
        from ..images import save_png
        from ..latents import save_latents

        ok = finite_or_note(x0, [f"image {self.names[i]} (seed {self.seed + i})" for i in chunk], self.rep)
        for j, i in enumerate(chunk):
            if not ok[j]:
                self.failed.append(self.names[i])
                continue
            if self.save_latents:
                save_latents(self._latent_path(i), x_T[j : j + 1], {**self.engine.provenance(), "seed": self.seed + i})
            if self.fmt == "png":
                save_png(x0[j], self.pngs[i])
                self.rep.output(self.pngs[i])
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
        self.rep.finish(report_doc("sample", self.engine, seeds=[self.seed + i for i in self.work], failed=self.failed))
        if self.failed:
            raise NumericsError(f"{len(self.failed)} of {len(self.work)} images had NaN or inf values and were not "
                                f"written: {', '.join(self.failed[:5])}")
