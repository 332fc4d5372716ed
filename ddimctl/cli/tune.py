"""``ddimctl tune``: learn the noise levels at which a sampler should call a model, for a number of calls, and
write them as a schedule file that ``sample``, ``invert``, ``reconstruct``, ``interpolate`` and ``edit`` take with
``--schedule``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import command
from .common import conditions_for, plan_outputs, report_doc
from .options import Conditioning, Group, ModelLoading, Outputs, Sampling, SeedOpt


@command
def tune(
    *,
    loading: ModelLoading,
    sampling: Annotated[Sampling, Group(exclude=("eta", "schedule", "clip_sample", "deterministic", "channels_last"),
                                        defaults={"sampler": "unipc", "steps": 10, "batch_size": 64})],
    out: Annotated[Path, typer.Option("--out", "-o", help="The schedule file to write (JSON).")] = Path("schedule.json"),
    noises: Annotated[int, typer.Option("--noises", min=1, help="Training noises (seeds --seed ...).")] = 64,
    heldout: Annotated[int, typer.Option("--heldout", min=0, help="Held-out noises to check on (the seeds after the training ones).")] = 32,
    method: Annotated[str, typer.Option("--method", help="ld3: gradient descent through the sampler, from the GITS "
                                        "schedule; gits: dynamic programming over the reference's steps only (no gradient).")] = "ld3",
    iterations: Annotated[int, typer.Option("--iterations", min=0, help="ld3: gradient iterations.")] = 20,
    reference_steps: Annotated[int, typer.Option("--reference-steps", min=2, help="Model calls of the reference (unipc, logsnr spacing).")] = 200,
    seed: SeedOpt = 0,
    conditioning: Conditioning,
    outputs: Annotated[Outputs, Group(exclude=("skip_existing",))],
) -> None:
    """Tune the noise levels of --steps calls of --sampler for a model: the schedule whose samples land closest to
    a many-call reference on seeded noises, checked on held-out seeds. The file names the model and its revision;
    commands refuse it for another model or sampler. A conditioned model is tuned under --class-label (default:
    noise i gets class i mod the number of classes) and --guidance-scale."""
    from ..errors import SettingError
    from ..schedule_files import save_schedule
    from ..tuning import METHODS

    if method not in METHODS:
        raise SettingError(("method", method), f"expected one of {', '.join(METHODS)}")
    rep = outputs.reporter()
    plan_outputs([out], outputs.overwrite, False)  # refuse before any work
    engine = loading.engine(sampling.options(conditioning), rep)
    conditions = conditions_for(engine, conditioning.options(), noises + heldout, rep, default=True)
    seeds = list(range(seed, seed + noises))
    held = list(range(seed + noises, seed + noises + heldout))
    bars: dict[str, object] = {}
    batch_size = sampling.batch_size
    totals = {"reference": reference_steps * -(-noises // batch_size), "tuning": iterations,
              "held-out": reference_steps * -(-heldout // batch_size)}

    def progress(info: dict) -> None:
        phase = info["phase"]
        if phase not in bars:
            for bar in bars.values():
                bar.__exit__(None, None, None)
            bars.clear()
            bars[phase] = rep.progress(phase, totals[phase]).__enter__()
        bars[phase].advance(1)

    try:
        tuned = engine.tune(seeds, held, method=method, iterations=iterations, reference_steps=reference_steps,
                            batch_size=batch_size, callback=progress, conditions=conditions)
    finally:
        for bar in bars.values():
            bar.__exit__(None, None, None)
    save_schedule(out, tuned)
    rep.output(out)
    if method == "ld3":
        rep.note(f"LD3 started from {tuned.tuning['init']} (train error {tuned.tuning['initial_error']:.3g}), the best "
                 f"of {', '.join(tuned.tuning['init_errors'])}")
    for part, errs in tuned.errors.items():
        rep.note(f"{part} ({len(seeds) if part == 'train' else len(held)} noises): RMS error against the "
                 f"{reference_steps}-call reference {errs['tuned']:.3g} tuned, {errs['untuned']:.3g} with "
                 f"{engine.spacing} spacing ({errs['untuned'] / errs['tuned']:.2f}x)")
    rep.finish(report_doc("tune", engine, schedule=str(out), errors=tuned.errors, method=method,
                          timesteps=tuned.timesteps))
