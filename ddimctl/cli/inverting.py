"""``ddimctl invert`` (images -> latent files) and ``ddimctl reconstruct`` (images -> latents -> images, with the
error): the same inputs, options and batching, different outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, List

import typer

from ..errors import NumericsError
from .app import command
from .common import conditions_for, finite_or_note, image_paths, load_images, output_names, plan_batches, plan_outputs, report_doc
from .options import Conditioning, Group, Inversion, ModelLoading, OutOpt, Outputs, Sampling
from .output import Reporter

ImagesArg = Annotated[List[str], typer.Argument(help="Images: files, directories, globs, or - to read paths from stdin.")]
#: The sampling options of the commands that invert: eta = 0 (an ODE), unclipped (invertible).
InvertingSampling = Annotated[Sampling, Group(exclude=("eta", "clip_sample"))]


@command
def invert(
    *,
    images: ImagesArg,
    loading: ModelLoading,
    sampling: InvertingSampling,
    inversion: Inversion,
    conditioning: Conditioning,
    out: OutOpt = Path("latents"),
    outputs: Outputs,
) -> None:
    """Invert images to the latents x_T that --sampler maps back to them, written as NAME.latent.safetensors."""
    from ..inversion import select_offsets
    from ..latents import SUFFIX, save_latents

    rep = outputs.reporter()
    job = _InversionJob(images, out, SUFFIX, rep)
    engine = job.start(loading, sampling, inversion, conditioning, outputs)
    with rep.progress("inverting", job.computed * len(engine.plan)) as bar:
        for chunk, x0, infos, conditions in job.run():
            inv = engine.invert(x0, lambda info: bar.advance(len(chunk)), conditions)
            job.count(inv.stats.model_calls, inv.stats.evaluations)
            x_T = inv.x_T.float().cpu()
            ok = finite_or_note(x_T, [str(job.paths[i]) for i in chunk], rep)
            x_prev = None if inv.x_prev is None else inv.x_prev.float().cpu()
            for j, i in enumerate(chunk):
                if job.keep(ok[j], i, j, infos[j], inv.stats.image_calls[j], inv.stats, offsets=inv.offsets):
                    save_latents(job.targets[i], x_T[j : j + 1], {**engine.provenance(), **infos[j]},
                                 latents_prev=None if x_prev is None else x_prev[j : j + 1],
                                 offsets=select_offsets(inv.offsets, slice(j, j + 1)),
                                 nulls=None if inv.nulls is None else [n.select(slice(j, j + 1)).tensors for n in inv.nulls])
                    rep.output(job.targets[i])
    job.finish("invert")


@command
def reconstruct(
    *,
    images: ImagesArg,
    loading: ModelLoading,
    sampling: InvertingSampling,
    inversion: Inversion,
    conditioning: Conditioning,
    out: OutOpt = Path("reconstructions"),
    outputs: Outputs,
) -> None:
    """Invert images, regenerate them with the same settings, and report per-dimension MSE ([0, 1]) and PSNR."""
    from ..images import mean_metrics, save_png, side_by_side

    rep = outputs.reporter()
    job = _InversionJob(images, out, ".png", rep)
    compares = [out / f"{p.stem}.compare.png" for p in job.paths]
    engine = job.start(loading, sampling, inversion, conditioning, outputs)
    plan_outputs([compares[i] for i in job.work], outputs.overwrite, False)
    with rep.progress("reconstructing", job.computed * 2 * len(engine.plan)) as bar:
        for chunk, x0, infos, conditions in job.run():
            rec = engine.reconstruct(x0, lambda info: bar.advance(len(chunk)), conditions)
            job.count(rec.model_calls, sum(rec.image_calls))
            names = [str(job.paths[i]) for i in chunk]
            ok = [a and b for a, b in zip(finite_or_note(rec.x_T, names, rep), finite_or_note(rec.x0, names, rep))]
            x_rec = rec.x0.float().cpu()
            for j, i in enumerate(chunk):
                extra = {} if rec.autoencoder_mse is None else {"autoencoder_mse": float(rec.autoencoder_mse[j]),
                                                                "inversion_mse": float(rec.inversion_mse[j])}
                if job.keep(ok[j], i, j, infos[j], rec.image_calls[j], rec.stats, offsets=rec.offsets,
                            mse=float(rec.mse[j]), psnr=float(rec.psnr[j]), compare=str(compares[i]), **extra):
                    save_png(x_rec[j], job.targets[i])
                    save_png(side_by_side(x0[j], x_rec[j]), compares[i])
                    rep.output(job.targets[i])
                    rep.output(compares[i])
    metrics = mean_metrics([r["mse"] for r in job.records])
    for r in job.records:
        ae = (f" (the autoencoder alone: mse {r['autoencoder_mse']:.3g}; the inversion against it: "
              f"{r['inversion_mse']:.3g})" if "autoencoder_mse" in r else "")
        rep.note(f"{r['source']}: mse {r['mse']:.3g}, psnr {r['psnr']:.2f} dB{ae}")
    if metrics:
        rep.note(f"mean over {len(job.records)} images: mse {metrics['mean_mse']:.3g}, psnr {metrics['mean_psnr']:.2f} dB")
    job.finish("reconstruct", metrics=metrics)


class _InversionJob:
    """What ``invert``, ``reconstruct`` and ``edit`` share: the inputs, one output per input (``out/STEM{suffix}``),
    the engine, each rank's share of the work, and the per-image records of the JSON report."""

    def __init__(self, specs: list[str], out: Path, suffix: str, rep: Reporter):
        self.paths = image_paths(specs)
        self.out, self.rep = out, rep
        self.targets = output_names(self.paths, out, suffix)
        self.records: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self.batch_calls = self.evaluations = 0

    def start(self, loading: ModelLoading, sampling: Sampling, inversion: Inversion, conditioning: Conditioning,
              outputs: Outputs):
        """Build the engine and plan the outputs, refusing whatever cannot be done before any work."""
        from ..fsutil import check_writable_dir

        self.options = sampling.options(conditioning, inverting=True, **inversion.options())
        self.engine = loading.engine(self.options, self.rep)
        self.engine.check_invertible()
        self.conditions = conditions_for(self.engine, conditioning.options(), len(self.paths), self.rep)
        check_writable_dir(self.out)
        self.batches, self.work = plan_batches(self.targets, outputs.overwrite, outputs.skip_existing,
                                               sampling.batch_size)
        self.writes = set(self.work)
        self.computed = sum(map(len, self.batches))
        return self.engine

    def run(self):
        """(indices, images (B, C, H, W), infos, conditions or None) for each batch this process computes."""
        for chunk in self.batches:
            x0, infos = load_images([self.paths[i] for i in chunk], self.engine, self.rep)
            conditions = None
            if self.conditions is not None:
                conditions = [self.conditions[i] for i in chunk]
                for info, value in zip(infos, conditions):
                    info.update(self.engine.record(value))
            yield chunk, x0, infos, conditions

    def count(self, batch_calls: int, evaluations: int) -> None:
        """Add one batch's cost: the model calls it launched (each evaluates only the images still solving) and
        the evaluations of single images they made."""
        self.batch_calls += batch_calls
        self.evaluations += evaluations

    def keep(self, ok: bool, i: int, j: int, info: dict, calls: int, stats, offsets=None, **extra: Any) -> bool:
        """Record image i's result, j-th of its batch (calls: the model evaluations the image caused); False when
        it failed or was computed only to keep its batch as the run being completed had it (its output exists).
        Exact inversion adds, per inverse step from the clean end, the iterations the image took and the RMS
        residual it reached; null-text inversion, per step from x_T, its Adam iterations and the RMS by which the
        step taken misses the pivot trajectory, and ``evaluations``: the inversion's forwards of the image alone;
        ``offsets`` (:attr:`~ddimctl.engine.Inverted.offsets`) add the plan steps the image carries an offset on
        and the largest offset's RMS (model units)."""
        if i not in self.writes:
            return False
        if not ok:
            self.failed.append(str(self.paths[i]))
            return False
        record = {**info, "output": str(self.targets[i]), "model_calls": calls}
        if self.options.inversion in ("exact", "negative-prompt", "null-text") and not self.engine.pair_latents:
            record["max_residual"] = max(r[j] for r in stats.image_residuals)
            record["iterations"] = [it[j] for it in stats.image_iterations]
            record["residuals"] = [r[j] for r in stats.image_residuals]
            if self.options.inversion == "null-text":
                record["evaluations"] = stats.image_calls[j]
            if self.engine.keeps_offsets:
                from ..inversion import select_offsets

                mine = select_offsets(offsets, slice(j, j + 1)) or []
                steps = [k for k, o in enumerate(mine) if o is not None and bool(o.ne(0).any())]
                record["offset_steps"] = steps
                record["offset_rms"] = max((float(mine[k].double().pow(2).mean().sqrt()) for k in steps), default=0.0)
            if stats.image_plain_kept is not None:  # a multistep sampler: its solve checked against plain inversion
                record["plain_inversion_kept"] = stats.image_plain_kept[j]
                record["round_trip_rms"] = stats.image_round_trip[j]
        self.records.append({**record, **extra})
        return True

    def finish(self, command_name: str, **fields: Any) -> None:
        if self.failed:
            raise NumericsError(f"{len(self.failed)} images gave NaN or inf values and were not written: "
                                f"{', '.join(self.failed[:5])}")
        self.rep.finish(report_doc(command_name, self.engine, inversion=self.options.inversion,
                                   model_calls=self.batch_calls, image_evaluations=self.evaluations,
                                   images=self.records, **fields))
