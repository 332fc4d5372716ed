"""``ddimctl invert`` (images -> latent files) and ``ddimctl reconstruct`` (images -> latents -> images, with the
error): the same inputs, options and batching, different outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List

import typer

from .. import DEFAULT_MODEL
from ..errors import NumericsError
from .app import command
from .common import (
    finite_or_note, image_paths, load_engine, load_images, my_share, output_names, plan_outputs, report_doc, schedule_steps,
)
from .options import (
    DEFAULT_BATCH_SIZE, DEFAULT_STEPS, BatchSizeOpt, DeviceOpt, DtypeOpt, InversionOpt, JsonOpt, MaxIterOpt,
    ModelOpt, OutOpt, OverwriteOpt, QuietOpt, SamplerOpt, ScheduleOpt, SkipExistingOpt, SpacingOpt, StepsOpt, TolOpt,
)
from .output import Reporter

ImagesArg = Annotated[List[str], typer.Argument(help="Images: files, directories, globs, or - to read paths from stdin.")]


@command
def invert(
    images: ImagesArg,
    model: ModelOpt = DEFAULT_MODEL,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
    schedule: ScheduleOpt = None,
    inversion: InversionOpt = "exact",
    tol: TolOpt = 1e-5,
    max_iter: MaxIterOpt = 50,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    out: OutOpt = Path("latents"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """DDIM-invert images to their latents x_T, written as NAME.latent.safetensors."""
    from ..latents import SUFFIX, save_latents

    rep = Reporter(json_out, quiet)
    job = _InversionJob(images, out, SUFFIX, rep)
    engine = job.start(model, device, dtype, schedule_steps(steps, schedule), spacing, sampler, inversion, tol, max_iter,
                       overwrite, skip_existing, schedule)
    with rep.progress("inverting", len(job.work) * len(engine.plan)) as bar:
        for chunk, x0, infos in job.batches(batch_size):
            x_T, stats = engine.invert(x0, lambda info: bar.advance(len(chunk)))
            x_T = x_T.float().cpu()
            ok = finite_or_note(x_T, [str(job.paths[i]) for i in chunk], rep)
            for j, i in enumerate(chunk):
                if job.keep(ok[j], i, infos[j], stats.model_calls, stats):
                    save_latents(job.targets[i], x_T[j : j + 1], {**engine.provenance(), **infos[j]})
                    rep.output(job.targets[i])
    job.finish("invert")


@command
def reconstruct(
    images: ImagesArg,
    model: ModelOpt = DEFAULT_MODEL,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
    schedule: ScheduleOpt = None,
    inversion: InversionOpt = "exact",
    tol: TolOpt = 1e-5,
    max_iter: MaxIterOpt = 50,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    out: OutOpt = Path("reconstructions"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Invert images, regenerate them with the same settings, and report per-dimension MSE ([0, 1]) and PSNR."""
    from ..images import mean_metrics, save_png, side_by_side

    rep = Reporter(json_out, quiet)
    job = _InversionJob(images, out, ".png", rep)
    compares = [out / f"{p.stem}.compare.png" for p in job.paths]
    engine = job.start(model, device, dtype, schedule_steps(steps, schedule), spacing, sampler, inversion, tol, max_iter,
                       overwrite, skip_existing, schedule)
    plan_outputs([compares[i] for i in job.work], overwrite, False)
    with rep.progress("reconstructing", len(job.work) * 2 * len(engine.plan)) as bar:
        for chunk, x0, infos in job.batches(batch_size):
            rec = engine.reconstruct(x0, lambda info: bar.advance(len(chunk)))
            names = [str(job.paths[i]) for i in chunk]
            ok = [a and b for a, b in zip(finite_or_note(rec.x_T, names, rep), finite_or_note(rec.x0, names, rep))]
            x_rec = rec.x0.float().cpu()
            for j, i in enumerate(chunk):
                if job.keep(ok[j], i, infos[j], rec.model_calls, rec.stats,
                            mse=float(rec.mse[j]), psnr=float(rec.psnr[j]), compare=str(compares[i])):
                    save_png(x_rec[j], job.targets[i])
                    save_png(side_by_side(x0[j], x_rec[j]), compares[i])
                    rep.output(job.targets[i])
                    rep.output(compares[i])
    metrics = mean_metrics([r["mse"] for r in job.records])
    for r in job.records:
        rep.note(f"{r['source']}: mse {r['mse']:.3g}, psnr {r['psnr']:.2f} dB")
    if metrics:
        rep.note(f"mean over {len(job.records)} images: mse {metrics['mean_mse']:.3g}, psnr {metrics['mean_psnr']:.2f} dB")
    job.finish("reconstruct", metrics=metrics)


class _InversionJob:
    """What ``invert`` and ``reconstruct`` share: the inputs, one output per input (``out/STEM{suffix}``), the
    engine, each rank's share of the work, and the per-image records of the JSON report."""

    def __init__(self, specs: list[str], out: Path, suffix: str, rep: Reporter):
        self.paths = image_paths(specs)
        self.out, self.rep = out, rep
        self.targets = output_names(self.paths, out, suffix)
        self.records: list[dict[str, Any]] = []
        self.failed: list[str] = []

    def start(self, model, device, dtype, steps, spacing, sampler, inversion, tol, max_iter, overwrite, skip_existing,
              schedule=None):
        """Build the engine and plan the outputs, refusing whatever cannot be done before any work."""
        from ..fsutil import check_writable_dir
        from ..pipeline import SamplingOptions

        options = SamplingOptions(steps=steps, sampler=sampler, spacing=spacing, inversion=inversion, tol=tol,
                                  max_iter=max_iter, schedule_file=None if schedule is None else str(schedule))
        self.options = options
        self.engine = load_engine(model, device, dtype, options, False, self.rep)
        self.engine.check_invertible()
        check_writable_dir(self.out)
        self.work = my_share(self.targets, overwrite, skip_existing)
        return self.engine

    def batches(self, batch_size: int):
        """(indices, images (B, C, H, W), infos) for each batch of this process's work."""
        from ..pipeline import batches

        for chunk in batches(self.work, batch_size):
            x0, infos = load_images([self.paths[i] for i in chunk], self.engine, self.rep)
            yield chunk, x0, infos

    def keep(self, ok: bool, i: int, info: dict, calls: int, stats, **extra: Any) -> bool:
        """Record image i's result (calls: batched model evaluations for its batch); False when it failed."""
        if not ok:
            self.failed.append(str(self.paths[i]))
            return False
        record = {**info, "output": str(self.targets[i]), "model_calls": calls}
        if self.options.inversion == "exact":
            record["max_residual"] = stats.max_residual
        self.records.append({**record, **extra})
        return True

    def finish(self, command_name: str, **fields: Any) -> None:
        if self.failed:
            raise NumericsError(f"{len(self.failed)} images gave NaN or inf values and were not written: "
                                f"{', '.join(self.failed[:5])}")
        self.rep.finish(report_doc(command_name, self.engine, inversion=self.options.inversion, images=self.records,
                                   **fields))
