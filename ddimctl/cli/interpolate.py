"""``ddimctl interpolate``: slerp between two x_T and decode the frames with eta = 0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import DEFAULT_MODEL
from ..errors import NumericsError
from .app import command
from .common import finite_or_note, load_engine, plan_outputs, report_doc, schedule_steps
from .options import (
    DEFAULT_BATCH_SIZE, DEFAULT_STEPS, BatchSizeOpt, DeviceOpt, DtypeOpt, InversionOpt, JsonOpt, ModelOpt, OutOpt,
    OverwriteOpt, QuietOpt, SamplerOpt, ScheduleOpt, SpacingOpt, StepsOpt,
)
from .output import Reporter


@command
def interpolate(
    a: Annotated[str, typer.Argument(help="Start: a latent file, an image (inverted first) or seed:N.")],
    b: Annotated[str, typer.Argument(help="End: a latent file, an image (inverted first) or seed:N.")],
    model: ModelOpt = DEFAULT_MODEL,
    frames: Annotated[int, typer.Option("--frames", "-k", min=2, help="Frames, both ends included.")] = 8,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
    schedule: ScheduleOpt = None,
    inversion: InversionOpt = "exact",
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    out: OutOpt = Path("interpolation"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Slerp between two latents and decode each frame with eta = 0; writes the frames, a strip PNG and a GIF.

    Frames are decoded without clipping x0 (as inversion needs), so an end given as seed:N is the image
    `ddimctl sample --seed N --no-clip-sample` makes.
    """
    import torch

    from ..fsutil import check_writable_dir
    from ..images import make_grid, save_gif, save_png
    from ..pipeline import SamplingOptions, batches, parse_end
    from ..sampler import slerp

    rep = Reporter(json_out, quiet)
    engine = load_engine(model, device, dtype, SamplingOptions(steps=schedule_steps(steps, schedule), sampler=sampler,
                                                               spacing=spacing, inversion=inversion,
                                                               schedule_file=None if schedule is None else str(schedule)),
                         False, rep)
    ends = [parse_end(spec, engine.image_shape) for spec in (a, b)]
    for end in ends:
        for n in end.notes:
            rep.note(f"{end.spec}: {n}")
    if any(end.kind == "image" for end in ends):
        engine.check_invertible()
    check_writable_dir(out)
    frame_paths = [out / f"frame_{k:03d}.png" for k in range(frames)]
    strip, gif = out / "strip.png", out / "interpolation.gif"
    plan_outputs(frame_paths + [strip, gif], overwrite, False)  # refuse before any work (inverting included)

    x_ends = [engine.end_latent(end) for end in ends]
    alphas = [k / (frames - 1) for k in range(frames)]
    x_T = torch.cat([slerp(x_ends[0], x_ends[1], t) for t in alphas])  # (K, C, H, W)
    decoded = []
    with rep.progress("decoding", frames * len(engine.plan)) as bar:
        for chunk in batches(list(range(frames)), batch_size):
            x0 = engine.decode(x_T[list(chunk)], lambda info: bar.advance(len(chunk))).float().cpu()
            if not all(finite_or_note(x0, [str(frame_paths[i]) for i in chunk], rep)):
                raise NumericsError("the model produced NaN or inf values while decoding; nothing written")
            decoded.append(x0)
    x0 = torch.cat(decoded)
    for k, p in enumerate(frame_paths):
        save_png(x0[k], p)
        rep.output(p)
    save_png(make_grid(x0, nrow=frames), strip)
    rep.output(strip)
    save_gif(list(x0), gif, boomerang=True)
    rep.output(gif)
    rep.finish(report_doc("interpolate", engine, endpoints=[a, b], alphas=alphas))
