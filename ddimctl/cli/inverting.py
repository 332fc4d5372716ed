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
    finite_or_note, image_paths, load_engine, load_images, output_names, plan_batches, plan_outputs, report_doc,
    schedule_steps,
)
from .options import (
    AutoencoderOpt, AutoencoderScaleOpt, VariantOpt,
    DEFAULT_BATCH_SIZE, DEFAULT_STEPS, BatchSizeOpt, ClassLabelOpt, DeterministicOpt, DeviceOpt, DtypeOpt, GuidanceOpt,
    InversionOpt, JsonOpt,
    MaxIterOpt, ModelOpt, OutOpt, OverwriteOpt, QuietOpt, SamplerOpt, ScheduleOpt, SkipExistingOpt, SpacingOpt,
    StepsOpt, TolOpt,
)
from .output import Reporter

ImagesArg = Annotated[List[str], typer.Argument(help="Images: files, directories, globs, or - to read paths from stdin.")]


@command
def invert(
    images: ImagesArg,
    model: ModelOpt = DEFAULT_MODEL,
    variant: VariantOpt = None,
    autoencoder: AutoencoderOpt = None,
    autoencoder_scaling_factor: AutoencoderScaleOpt = None,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
    schedule: ScheduleOpt = None,
    inversion: InversionOpt = "exact",
    tol: TolOpt = 3e-3,
    max_iter: MaxIterOpt = 50,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    out: OutOpt = Path("latents"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    class_label: ClassLabelOpt = None,
    guidance_scale: GuidanceOpt = 1.0,
    deterministic: DeterministicOpt = False,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Invert images to the latents x_T that --sampler maps back to them, written as NAME.latent.safetensors."""
    from ..latents import SUFFIX, save_latents

    rep = Reporter(json_out, quiet)
    job = _InversionJob(images, out, SUFFIX, rep)
    engine = job.start(model, device, dtype, batch_size, overwrite, skip_existing,
                       steps=schedule_steps(steps, schedule), spacing=spacing,
                       sampler=sampler, inversion=inversion, tol=tol, max_iter=max_iter, deterministic=deterministic,
                       guidance_scale=guidance_scale, labels=class_label, schedule=schedule,
                       loading=dict(variant=variant, autoencoder=autoencoder,
                                    autoencoder_scaling_factor=autoencoder_scaling_factor))
    with rep.progress("inverting", job.computed * len(engine.plan)) as bar:
        for chunk, x0, infos, labels in job.run():
            x_T, stats = engine.invert(x0, lambda info: bar.advance(len(chunk)), labels)
            x_T = x_T.float().cpu()
            ok = finite_or_note(x_T, [str(job.paths[i]) for i in chunk], rep)
            x_prev = None if stats.latents_prev is None else stats.latents_prev.float().cpu()
            for j, i in enumerate(chunk):
                if job.keep(ok[j], i, j, infos[j], stats.model_calls, stats):
                    save_latents(job.targets[i], x_T[j : j + 1], {**engine.provenance(), **infos[j]},
                                 latents_prev=None if x_prev is None else x_prev[j : j + 1])
                    rep.output(job.targets[i])
    job.finish("invert")


@command
def reconstruct(
    images: ImagesArg,
    model: ModelOpt = DEFAULT_MODEL,
    variant: VariantOpt = None,
    autoencoder: AutoencoderOpt = None,
    autoencoder_scaling_factor: AutoencoderScaleOpt = None,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
    schedule: ScheduleOpt = None,
    inversion: InversionOpt = "exact",
    tol: TolOpt = 3e-3,
    max_iter: MaxIterOpt = 50,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    out: OutOpt = Path("reconstructions"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    class_label: ClassLabelOpt = None,
    guidance_scale: GuidanceOpt = 1.0,
    deterministic: DeterministicOpt = False,
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
    engine = job.start(model, device, dtype, batch_size, overwrite, skip_existing,
                       steps=schedule_steps(steps, schedule), spacing=spacing,
                       sampler=sampler, inversion=inversion, tol=tol, max_iter=max_iter, deterministic=deterministic,
                       guidance_scale=guidance_scale, labels=class_label, schedule=schedule,
                       loading=dict(variant=variant, autoencoder=autoencoder,
                                    autoencoder_scaling_factor=autoencoder_scaling_factor))
    plan_outputs([compares[i] for i in job.work], overwrite, False)
    with rep.progress("reconstructing", job.computed * 2 * len(engine.plan)) as bar:
        for chunk, x0, infos, labels in job.run():
            rec = engine.reconstruct(x0, lambda info: bar.advance(len(chunk)), labels)
            names = [str(job.paths[i]) for i in chunk]
            ok = [a and b for a, b in zip(finite_or_note(rec.x_T, names, rep), finite_or_note(rec.x0, names, rep))]
            x_rec = rec.x0.float().cpu()
            for j, i in enumerate(chunk):
                extra = {} if rec.autoencoder_mse is None else {"autoencoder_mse": float(rec.autoencoder_mse[j])}
                if job.keep(ok[j], i, j, infos[j], rec.model_calls, rec.stats,
                            mse=float(rec.mse[j]), psnr=float(rec.psnr[j]), compare=str(compares[i]), **extra):
                    save_png(x_rec[j], job.targets[i])
                    save_png(side_by_side(x0[j], x_rec[j]), compares[i])
                    rep.output(job.targets[i])
                    rep.output(compares[i])
    metrics = mean_metrics([r["mse"] for r in job.records])
    for r in job.records:
        ae = f" (the autoencoder alone: mse {r['autoencoder_mse']:.3g})" if "autoencoder_mse" in r else ""
        rep.note(f"{r['source']}: mse {r['mse']:.3g}, psnr {r['psnr']:.2f} dB{ae}")
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

    def start(self, model: str, device: str, dtype: str, batch_size: int, overwrite: bool, skip_existing: bool,
              labels: str | None = None, loading: dict | None = None, schedule: Path | None = None, **options: Any):
        """Build the engine and plan the outputs, refusing whatever cannot be done before any work."""
        from ..fsutil import check_writable_dir
        from ..pipeline import SamplingOptions, labels_for, parse_class_labels

        self.options = SamplingOptions(**options, inverting=True,
                                       schedule_file=None if schedule is None else str(schedule))
        self.engine = load_engine(model, device, dtype, self.options, False, self.rep, **(loading or {}))
        self.engine.check_invertible()
        self.labels = labels_for(parse_class_labels(labels) if labels is not None else None, len(self.paths), labels)
        self.engine.class_labels(self.labels)  # a label the model cannot take, or none for one that needs it
        check_writable_dir(self.out)
        self.batches, self.work = plan_batches(self.targets, overwrite, skip_existing, batch_size)
        self.writes = set(self.work)
        self.computed = sum(map(len, self.batches))
        return self.engine

    def run(self):
        """(indices, images (B, C, H, W), infos, class labels or None) for each batch this process computes."""
        for chunk in self.batches:
            x0, infos = load_images([self.paths[i] for i in chunk], self.engine, self.rep)
            labels = None
            if self.labels is not None:
                labels = self.engine.class_labels([self.labels[i] for i in chunk])
                for info, i in zip(infos, chunk):
                    info["class_label"] = self.labels[i]
            yield chunk, x0, infos, labels

    def keep(self, ok: bool, i: int, j: int, info: dict, calls: int, stats, **extra: Any) -> bool:
        """Record image i's result, j-th of its batch (calls: batched model evaluations for its batch); False when
        it failed or was computed only to keep its batch as the run being completed had it (its output exists).
        Exact inversion adds, per inverse step from the clean end, the iterations the image took and the RMS
        residual it reached."""
        if i not in self.writes:
            return False
        if not ok:
            self.failed.append(str(self.paths[i]))
            return False
        record = {**info, "output": str(self.targets[i]), "model_calls": calls}
        if self.options.inversion == "exact" and not self.engine.pair_latents:
            record["max_residual"] = max(r[j] for r in stats.image_residuals)
            record["iterations"] = [it[j] for it in stats.image_iterations]
            record["residuals"] = [r[j] for r in stats.image_residuals]
            if stats.image_plain_kept is not None:  # a multistep sampler: its solve checked against plain inversion
                record["plain_inversion_kept"] = stats.image_plain_kept[j]
                record["round_trip_rms"] = stats.image_round_trip[j]
        self.records.append({**record, **extra})
        return True

    def finish(self, command_name: str, **fields: Any) -> None:
        if self.failed:
            raise NumericsError(f"{len(self.failed)} images gave NaN or inf values and were not written: "
                                f"{', '.join(self.failed[:5])}")
        self.rep.finish(report_doc(command_name, self.engine, inversion=self.options.inversion, images=self.records,
                                   **fields))
