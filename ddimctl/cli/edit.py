"""``ddimctl edit``: change what an image is conditioned on (DDIM editing): exact inversion under the source
condition, sampling under the target one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SettingError
from .app import command
from .common import conditions_for, finite_or_note, plan_outputs
from .inverting import ImagesArg, InvertingSampling, _InversionJob
from .options import Conditioning, EditTarget, Inversion, ModelLoading, OutOpt, Outputs


@command
def edit(
    *,
    images: ImagesArg,
    conditioning: Conditioning,
    target: EditTarget,
    strength: Annotated[float, typer.Option("--strength", help="Share of the trajectory regenerated under the new class: 1 inverts all the way to x_T; less keeps more of the image.")] = 1.0,
    loading: ModelLoading,
    sampling: InvertingSampling,
    inversion: Inversion,
    out: OutOpt = Path("edits"),
    outputs: Outputs,
) -> None:
    """Turn images of one class into another: invert each exactly under --class-label, decode under
    --to-class-label. Writes NAME.png (the edit) and NAME.compare.png (source | edit)."""
    from ..images import save_png, side_by_side

    rep = outputs.reporter()
    job = _InversionJob(images, out, ".png", rep)
    compares = [out / f"{p.stem}.compare.png" for p in job.paths]
    engine = job.start(loading, sampling, inversion, conditioning, outputs)
    targets = conditions_for(engine, target.options(conditioning), len(job.paths), rep, role="to_")
    if targets is None:  # an unconditional model (a conditional one refused a missing target above)
        raise SettingError(("to_class_label", "none"), "the model is not conditioned: there is nothing to edit")
    regenerated = engine.edit_steps(strength)  # refuses a strength outside (0, 1] before any work
    plan_outputs([compares[i] for i in job.work], outputs.overwrite, False)
    with rep.progress("editing", job.computed * 2 * len(engine.plan)) as bar:
        for chunk, x0, infos, conditions in job.run():
            result = engine.edit(x0, conditions, [targets[i] for i in chunk], strength,
                                 lambda info: bar.advance(len(chunk)))
            job.count(result.stats.model_calls + result.steps,
                      result.stats.evaluations + result.steps * len(chunk))
            ok = finite_or_note(result.edited, [str(job.paths[i]) for i in chunk], rep)
            edited = result.edited.float().cpu()
            for j, i in enumerate(chunk):
                to = {f"to_{k}": v for k, v in engine.record(targets[i]).items()}
                if job.keep(ok[j], i, j, infos[j], result.stats.image_calls[j] + result.steps, result.stats,
                            **to, mse_to_source=float(result.mse[j]), compare=str(compares[i])):
                    save_png(edited[j], job.targets[i])
                    save_png(side_by_side(x0[j], edited[j]), compares[i])
                    rep.output(job.targets[i])
                    rep.output(compares[i])
    job.finish("edit", strength=strength, steps_regenerated=regenerated)
