"""``ddimctl interpolate``: slerp between two x_T and decode the frames with eta = 0."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import NumericsError
from .app import command
from .common import conditions_for, finite_or_note, plan_outputs, report_doc
from .inverting import InvertingSampling
from .options import Conditioning, Group, Inversion, ModelLoading, OutOpt, Outputs


@command
def interpolate(
    *,
    a: Annotated[str, typer.Argument(help="Start: a latent file, an image (inverted first) or seed:N.")],
    b: Annotated[str, typer.Argument(help="End: a latent file, an image (inverted first) or seed:N.")],
    loading: ModelLoading,
    frames: Annotated[int, typer.Option("--frames", "-k", min=2, help="Frames, both ends included: the frame files, the strip and the GIF each hold this many.")] = 8,
    boomerang: Annotated[bool, typer.Option("--boomerang", help="The GIF also plays the way back (2 x frames - 2 frames, looping smoothly).")] = False,
    sampling: InvertingSampling,
    inversion: Inversion,
    conditioning: Conditioning,
    out: OutOpt = Path("interpolation"),
    outputs: Annotated[Outputs, Group(exclude=("skip_existing",))],
) -> None:
    """Slerp between two latents and decode each frame with eta = 0; writes the frames, a strip PNG and a GIF.

    The GIF holds the frames once, forward (--boomerang adds the way back); like any GIF writer, Pillow stores two
    identical consecutive frames as one frame shown twice as long.

    Frames are decoded without clipping x0 (as inversion needs), so an end given as seed:N is the image
    `ddimctl sample --seed N --no-clip-sample` makes.
    """
    import torch

    from ..engine import batches, end_kind, parse_end
    from ..inversion import select_offsets
    from ..fsutil import check_writable_dir
    from ..images import make_grid, save_gif, save_png
    from ..latents import read_metadata, recorded_spacing

    rep = outputs.reporter()
    kinds = [end_kind(spec) for spec in (a, b)]
    if sampling.spacing is None and sampling.schedule is None:  # decode with the plan a latent-file end was made with
        sampling.spacing = next((recorded_spacing(read_metadata(spec)) for spec, k in zip((a, b), kinds)
                                 if k == "latent"), None)
    options = sampling.options(conditioning, inverting="image" in kinds, **inversion.options())
    engine = loading.engine(options, rep)
    condition = conditions_for(engine, conditioning.options(), 1, rep)  # the frames' condition (one for all)
    ends = [parse_end(spec, engine.image_shape, engine.latent_shape) for spec in (a, b)]
    for end in ends:
        for n in end.notes:
            rep.note(f"{end.spec}: {n}")
    if any(end.kind == "image" for end in ends):
        engine.check_invertible()
    check_writable_dir(out)
    frame_paths = [out / f"frame_{k:03d}.png" for k in range(frames)]
    strip, gif = out / "strip.png", out / "interpolation.gif"
    plan_outputs(frame_paths + [strip, gif], outputs.overwrite, False)  # refuse before any work (inverting included)

    alphas = [k / (frames - 1) for k in range(frames)]
    lat = engine.interpolation(ends[0], ends[1], alphas, condition)  # (K, C, h, w) each
    x_T, x_prev, offsets = lat.x_T, lat.x_prev, lat.offsets
    for note in lat.notes:
        rep.note(note)
    decoded = []
    with rep.progress("decoding", frames * len(engine.plan)) as bar:
        for chunk in batches(list(range(frames)), sampling.batch_size):
            prev = None if x_prev is None else x_prev[list(chunk)]
            x0 = engine.decode(x_T[list(chunk)], lambda info: bar.advance(len(chunk)), prev,
                               conditions=None if condition is None else condition * len(chunk),
                               offsets=select_offsets(offsets, list(chunk))).float().cpu()
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
