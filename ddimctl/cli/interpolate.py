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
    AutoencoderOpt, AutoencoderScaleOpt, VariantOpt,
    DEFAULT_BATCH_SIZE, DEFAULT_STEPS, BatchSizeOpt, ClassLabelOpt, DeterministicOpt, DeviceOpt, DtypeOpt,
    GuidanceOpt, InversionOpt, JsonOpt,
    ModelOpt, OutOpt, OverwriteOpt, QuietOpt, SamplerOpt, ScheduleOpt, SpacingOpt, StepsOpt,
)
from .output import Reporter


@command
def interpolate(
    a: Annotated[str, typer.Argument(help="Start: a latent file, an image (inverted first) or seed:N.")],
    b: Annotated[str, typer.Argument(help="End: a latent file, an image (inverted first) or seed:N.")],
    model: ModelOpt = DEFAULT_MODEL,
    variant: VariantOpt = None,
    autoencoder: AutoencoderOpt = None,
    autoencoder_scaling_factor: AutoencoderScaleOpt = None,
    frames: Annotated[int, typer.Option("--frames", "-k", min=2, help="Frames, both ends included: the frame files, the strip and the GIF each hold this many.")] = 8,
    boomerang: Annotated[bool, typer.Option("--boomerang", help="The GIF also plays the way back (2 x frames - 2 frames, looping smoothly).")] = False,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
    schedule: ScheduleOpt = None,
    inversion: InversionOpt = "exact",
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    out: OutOpt = Path("interpolation"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    class_label: ClassLabelOpt = None,
    guidance_scale: GuidanceOpt = 1.0,
    deterministic: DeterministicOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Slerp between two latents and decode each frame with eta = 0; writes the frames, a strip PNG and a GIF.

    The GIF holds the frames once, forward (--boomerang adds the way back); like any GIF writer, Pillow stores two
    identical consecutive frames as one frame shown twice as long.

    Frames are decoded without clipping x0 (as inversion needs), so an end given as seed:N is the image
    `ddimctl sample --seed N --no-clip-sample` makes.
    """
    import torch

    from ..fsutil import check_writable_dir
    from ..images import make_grid, save_gif, save_png
    from ..latents import read_metadata, recorded_spacing
    from ..pipeline import SamplingOptions, batches, end_kind, labels_for, parse_class_labels, parse_end
    from ..sampler import slerp

    rep = Reporter(json_out, quiet)
    kinds = [end_kind(spec) for spec in (a, b)]
    if spacing is None and schedule is None:  # decode with the plan a latent-file end was made with
        spacing = next((recorded_spacing(read_metadata(spec)) for spec, k in zip((a, b), kinds) if k == "latent"),
                       None)
    options = SamplingOptions(steps=schedule_steps(steps, schedule), sampler=sampler, spacing=spacing,
                              inversion=inversion, inverting="image" in kinds, deterministic=deterministic,
                              guidance_scale=guidance_scale, schedule_file=None if schedule is None else str(schedule))
    engine = load_engine(model, device, dtype, options, False, rep,
                         variant=variant, autoencoder=autoencoder,
                         autoencoder_scaling_factor=autoencoder_scaling_factor)
    labels = engine.class_labels(labels_for(parse_class_labels(class_label), 1, class_label)
                                 if class_label is not None else None)
    ends = [parse_end(spec, engine.image_shape, engine.latent_shape) for spec in (a, b)]
    for end in ends:
        for n in end.notes:
            rep.note(f"{end.spec}: {n}")
    if any(end.kind == "image" for end in ends):
        engine.check_invertible()
    check_writable_dir(out)
    frame_paths = [out / f"frame_{k:03d}.png" for k in range(frames)]
    strip, gif = out / "strip.png", out / "interpolation.gif"
    plan_outputs(frame_paths + [strip, gif], overwrite, False)  # refuse before any work (inverting included)

    x_ends = [engine.end_latent(end, labels) for end in ends]  # (x_T, x_T-1 or None) each
    alphas = [k / (frames - 1) for k in range(frames)]
    x_T = torch.cat([slerp(x_ends[0][0], x_ends[1][0], t) for t in alphas])  # (K, C, H, W)
    # a pair sampler's second states are interpolated alongside (the ends stay exact)
    x_prev = torch.cat([slerp(x_ends[0][1], x_ends[1][1], t) for t in alphas]) if engine.pair_latents else None
    decoded = []
    with rep.progress("decoding", frames * len(engine.plan)) as bar:
        for chunk in batches(list(range(frames)), batch_size):
            prev = None if x_prev is None else x_prev[list(chunk)]
            frame_labels = None if labels is None else labels.expand(len(chunk))
            x0 = engine.decode(x_T[list(chunk)], lambda info: bar.advance(len(chunk)), prev,
                               labels=frame_labels).float().cpu()
            if not all(finite_or_note(x0, [str(frame_paths[i]) for i in chunk], rep)):
                raise NumericsError("the model produced NaN or inf values while decoding; nothing written")
            decoded.append(x0)
    x0 = torch.cat(decoded)
    for k, p in enumerate(frame_paths):
        save_png(x0[k], p)
        rep.output(p)
    save_png(make_grid(x0, nrow=frames), strip)
    rep.output(strip)
    save_gif(list(x0), gif, boomerang=boomerang)
    rep.output(gif)
    rep.finish(report_doc("interpolate", engine, endpoints=[a, b], alphas=alphas))
