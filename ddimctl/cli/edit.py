"""``ddimctl edit``: change an image's class (DDIM editing): exact inversion under the source class, sampling under
the target class."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import DEFAULT_MODEL
from .app import command
from .common import finite_or_note, plan_outputs
from .inverting import ImagesArg, _InversionJob
from .options import (
    AutoencoderOpt, AutoencoderScaleOpt, VariantOpt,
    DEFAULT_BATCH_SIZE, DEFAULT_STEPS, BatchSizeOpt, ClassLabelOpt, DeterministicOpt, DeviceOpt, DtypeOpt,
    GuidanceOpt, JsonOpt, MaxIterOpt, ModelOpt, OutOpt, OverwriteOpt, QuietOpt, SamplerOpt, SkipExistingOpt,
    SpacingOpt, StepsOpt, TolOpt,
)
from .output import Reporter


@command
def edit(
    images: ImagesArg,
    class_label: ClassLabelOpt = None,
    to_class_label: Annotated[str, typer.Option("--to-class-label", help="The class to turn each image into (an integer, or a file with one label per line).")] = ...,
    strength: Annotated[float, typer.Option("--strength", help="Share of the trajectory regenerated under the new class: 1 inverts all the way to x_T; less keeps more of the image.")] = 1.0,
    model: ModelOpt = DEFAULT_MODEL,
    variant: VariantOpt = None,
    autoencoder: AutoencoderOpt = None,
    autoencoder_scaling_factor: AutoencoderScaleOpt = None,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
    guidance_scale: GuidanceOpt = 1.0,
    tol: TolOpt = 3e-3,
    max_iter: MaxIterOpt = 50,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    out: OutOpt = Path("edits"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    deterministic: DeterministicOpt = False,
    overwrite: OverwriteOpt = False,
    skip_existing: SkipExistingOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Turn images of one class into another: invert each exactly under --class-label, decode under
    --to-class-label. Writes NAME.png (the edit) and NAME.compare.png (source | edit)."""
    from ..images import save_png, side_by_side
    from ..pipeline import labels_for, parse_class_labels

    rep = Reporter(json_out, quiet)
    job = _InversionJob(images, out, ".png", rep)
    compares = [out / f"{p.stem}.compare.png" for p in job.paths]
    engine = job.start(model, device, dtype, batch_size, overwrite, skip_existing, steps=steps, spacing=spacing,
                       sampler=sampler, inversion="exact", tol=tol, max_iter=max_iter, deterministic=deterministic,
                       guidance_scale=guidance_scale, labels=class_label,
                       loading=dict(variant=variant, autoencoder=autoencoder,
                                    autoencoder_scaling_factor=autoencoder_scaling_factor))
    if job.labels is None:
        engine.class_labels(None)  # an unconditional model: no class to change (refused in one line)
    targets = labels_for(parse_class_labels(to_class_label), len(job.paths), to_class_label)
    engine.class_labels(targets, field="to_class_label")
    regenerated = engine.edit_steps(strength)  # refuses a strength outside (0, 1] before any work
    plan_outputs([compares[i] for i in job.work], overwrite, False)
    with rep.progress("editing", job.computed * 2 * len(engine.plan)) as bar:
        for chunk, x0, infos, labels in job.run():
            result = engine.edit(x0, labels, engine.class_labels([targets[i] for i in chunk]), strength,
                                 lambda info: bar.advance(len(chunk)))
            ok = finite_or_note(result.edited, [str(job.paths[i]) for i in chunk], rep)
            edited = result.edited.float().cpu()
            for j, i in enumerate(chunk):
                if job.keep(ok[j], i, j, infos[j], result.stats.model_calls + result.steps, result.stats,
                            to_class_label=targets[i], mse_to_source=float(result.mse[j]), compare=str(compares[i])):
                    save_png(edited[j], job.targets[i])
                    save_png(side_by_side(x0[j], edited[j]), compares[i])
                    rep.output(job.targets[i])
                    rep.output(compares[i])
    job.finish("edit", strength=strength, steps_regenerated=regenerated)
