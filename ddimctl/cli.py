"""The ``ddimctl`` command line: a thin Typer skin over the library.

Each command validates its options, calls the library and reports. Results go to stdout (one path per line,
or one JSON document with ``--json``); progress and notes go to stderr, and progress bars only when stderr is a
terminal. Handled errors are one line on stderr with exit code 1 (``DDIMCTL_DEBUG=1`` adds the traceback);
usage errors exit 2; an interrupt (SIGINT) exits 130 and SIGTERM 143, leaving only complete files.

Nothing heavy is imported at module level, so ``ddimctl --help`` answers without importing torch.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, List, Optional

import typer

from .errors import DdimctlError, InputError
from .options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_STEPS,
    BatchSizeOpt,
    ChannelsLastOpt,
    ClipOpt,
    DeviceOpt,
    DtypeOpt,
    CompileOpt,
    EtaOpt,
    InversionOpt,
    JsonOpt,
    MaxIterOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    SamplerOpt,
    SeedOpt,
    SkipExistingOpt,
    SpacingOpt,
    StepsOpt,
    TolOpt,
)

app = typer.Typer(
    name="ddimctl",
    help="DDIM sampling, inversion, reconstruction and interpolation for diffusion and rectified-flow models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_MODEL = "mnist"
class Terminated(BaseException):
    """SIGTERM, turned into an exception so that temporary files are cleaned up on the way out."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by a subprocess test
    raise Terminated()


def command(fn: Callable) -> Callable:
    """Map the library's errors to one line on stderr and an exit code; register the command."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DdimctlError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Terminated:
            _fail("terminated", 143)

    return app.command()(wrapper)


def _fail(message: str, code: int) -> None:
    if os.environ.get("DDIMCTL_DEBUG"):
        traceback.print_exc()
    sys.stderr.write(f"ddimctl: {message}\n")
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------------------------
# Reporting: data on stdout, messages on stderr.


class Reporter:
    """Writes result paths (or one JSON document) to stdout and notes and progress to stderr."""

    def __init__(self, json_mode: bool, quiet: bool):
        self.json_mode, self.quiet = json_mode, quiet
        self.outputs: list[str] = []

    def output(self, path: Path) -> None:
        self.outputs.append(str(path))
        if not self.json_mode:
            sys.stdout.write(f"{path}\n")
            sys.stdout.flush()

    def note(self, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"{message}\n")

    def finish(self, document: dict[str, Any]) -> None:
        if self.json_mode:
            document = _json_safe({"outputs": self.outputs, **document})
            sys.stdout.write(json.dumps(document, indent=2, default=str, allow_nan=False) + "\n")

    @property
    def progress_enabled(self) -> bool:
        return not self.quiet and sys.stderr.isatty()

    def progress(self, description: str, total: int):
        """A context manager yielding ``advance(n)``; a no-op when progress is off."""
        return _Progress(description, total, self.progress_enabled)


def _json_safe(value: Any) -> Any:
    """Strict JSON: infinite or NaN floats (a PSNR of identical images) become null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class _Progress:
    def __init__(self, description: str, total: int, enabled: bool):
        self.description, self.total, self.enabled = description, total, enabled

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n=1: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._bar.start()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n=1: self._bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()


# ------------------------------------------------------------------------------------------------------------
# Shared steps


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise. Work is split by index, so no collectives are needed."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _engine(model_ref, device, dtype, options, compile_model: bool, reporter: Reporter):
    """Load the checkpoint and build the Engine every sampling command uses."""
    from .checkpoint import load
    from .devices import resolve_device, resolve_dtype
    from .perf import prepare_model
    from .pipeline import Engine

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    ckpt = load(model_ref, device=dev, dtype=dt)
    model, _ = prepare_model(ckpt.model, options.channels_last, compile_model, note=reporter.note)
    engine = Engine(model, ckpt.settings, options, (ckpt.channels, ckpt.image_size, ckpt.image_size), dev, dt)
    return ckpt, engine


def _model_doc(ckpt, engine) -> dict[str, Any]:
    r = ckpt.resolved
    return {
        "model": {"ref": r.ref, "source": r.source, "repo_id": r.repo_id, "revision": r.revision},
        "settings": {
            "steps": engine.options.steps,
            "eta": engine.options.eta,
            "sampler": engine.options.sampler,
            "spacing": engine.spacing,
            "prediction_type": engine.settings.prediction_type,
            "clip_sample": engine.settings.clip_sample,
            "device": str(engine.device),
            "dtype": str(engine.model_dtype).replace("torch.", ""),
        },
    }


def _check_outputs(paths: list[Path], overwrite: bool, skip_existing: bool) -> list[bool]:
    """For each planned output, whether to produce it; refuses up front (before any work) to overwrite."""
    from .fsutil import plan_output

    return [plan_output(p, overwrite, skip_existing) == "write" for p in paths]


def _images_for(specs: list[str]) -> list[Path]:
    from .images import iter_image_paths

    return iter_image_paths(specs, stdin=sys.stdin if "-" in specs else None)


def _unique_names(paths: list[Path], out: Path, suffix: str) -> list[Path]:
    targets = [out / f"{p.stem}{suffix}" for p in paths]
    seen: dict[Path, Path] = {}
    for src, t in zip(paths, targets):
        if t in seen:
            raise InputError(f"{src}: same output name as {seen[t]} ({t}); invert them into different --out folders")
        seen[t] = src
    return targets


def _load_images(paths: list[Path], ckpt, reporter: Reporter):
    """Load and fit each image to the model's channels and size; notes go to stderr."""
    import torch

    from .images import load_image

    tensors, infos = [], []
    for p in paths:
        img = load_image(p, ckpt.channels, ckpt.image_size)
        for n in img.notes:
            reporter.note(f"{p}: {n}")
        tensors.append(img.tensor)
        infos.append({"source": str(p), "original_size": list(img.original_size)})
    return torch.cat(tensors) if tensors else None, infos


def _latent_metadata(ckpt, engine, info: dict[str, Any]) -> dict[str, str]:
    from . import __version__

    r = ckpt.resolved
    meta = {
        "ddimctl_version": __version__,
        "model": r.ref,
        "model_revision": r.revision or "",
        "steps": str(engine.options.steps),
        "spacing": engine.spacing,
        "sampler": engine.options.sampler,
        "inversion": engine.options.inversion,
        "prediction_type": engine.settings.prediction_type,
    }
    meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in info.items()})
    return meta


def _check_finite(x, names: list[str], reporter: Reporter) -> list[bool]:
    from .pipeline import finite_mask

    ok = finite_mask(x).tolist()
    for good, name in zip(ok, names):
        if not good:
            reporter.note(f"{name}: the model produced NaN or inf values; nothing written for it")
    return ok


# ------------------------------------------------------------------------------------------------------------
# Commands


@command
def sample(
    model: ModelOpt = DEFAULT_MODEL,
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Number of images.")] = 16,
    steps: StepsOpt = DEFAULT_STEPS,
    eta: EtaOpt = 0.0,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
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
    from .pipeline import SamplingOptions, batches, shard

    if fmt not in ("png", "safetensors"):
        raise typer.BadParameter(f"{fmt!r} is not png or safetensors", param_hint="--format")
    rep = Reporter(json_out, quiet)
    rank, world = _distributed()
    if world > 1 and (fmt == "safetensors" or grid is not None):
        raise DdimctlError("--format safetensors and --grid need every image in one process; run without torchrun")

    x_given = _read_latents(latents) if latents is not None else None
    if x_given is not None:
        n = x_given.shape[0]
    options = SamplingOptions(steps, eta, sampler, spacing, clip_sample=clip_sample, channels_last=channels_last)
    ckpt, engine = _engine(model, device, dtype, options, compile_model, rep)
    if x_given is not None and tuple(x_given.shape[1:]) != engine.image_shape:
        raise InputError(f"{latents}: latents of shape {tuple(x_given.shape[1:])}, the model needs {engine.image_shape}")

    from .fsutil import check_writable_dir

    check_writable_dir(out)
    indices = list(range(n))
    names = [f"{i:06d}" for i in indices]
    if fmt == "png":
        planned = [out / f"{nm}.png" for nm in names]
    else:
        planned = [out / "samples.safetensors"]
    # Each rank checks only its own share of the outputs (the others may be writing theirs meanwhile).
    mine = shard(indices, rank, world) if fmt == "png" else indices
    if fmt == "png":
        work = [i for i, go in zip(mine, _check_outputs([planned[i] for i in mine], overwrite, skip_existing)) if go]
    else:
        work = indices if _check_outputs(planned, overwrite, skip_existing)[0] else []
    if save_latents:
        _check_outputs([out / f"{names[i]}.latent.safetensors" for i in work], overwrite, False)
    if grid is not None:
        _check_outputs([grid], overwrite, False)

    import torch

    from .fsutil import save_safetensors_atomic
    from .images import make_grid, save_png

    failed: list[str] = []
    kept: dict[int, Any] = {}
    with rep.progress("sampling", len(work) * len(engine.plan)) as advance:
        for chunk in batches(work, batch_size):
            seeds = [seed + i for i in chunk]
            given = x_given[list(chunk)] if x_given is not None else None
            x_T, x0 = engine.generate(seeds, given, lambda info: advance(len(chunk)))
            x0 = x0.float().cpu()
            ok = _check_finite(x0, [f"image {names[i]} (seed {seed + i})" for i in chunk], rep)
            for j, i in enumerate(chunk):
                if not ok[j]:
                    failed.append(names[i])
                    continue
                if save_latents:
                    p = out / f"{names[i]}.latent.safetensors"
                    meta = _latent_metadata(ckpt, engine, {"seed": seed + i})
                    save_safetensors_atomic(p, {"latents": x_T[j : j + 1].float().cpu().contiguous()}, meta)
                if fmt == "png":
                    save_png(x0[j], planned[i])
                    rep.output(planned[i])
                if fmt == "safetensors" or grid is not None:
                    kept[i] = x0[j]
    if fmt == "safetensors" and work and not failed:
        stacked = torch.stack([kept[i] for i in indices])  # (N, C, H, W) float32 in [-1, 1]
        save_safetensors_atomic(planned[0], {"samples": stacked.contiguous()}, {"seeds": json.dumps([seed + i for i in indices])})
        rep.output(planned[0])
    if grid is not None and kept:
        save_png(make_grid(torch.stack([kept[i] for i in sorted(kept)])), grid)
        rep.output(grid)
    rep.finish({"command": "sample", **_model_doc(ckpt, engine), "seeds": [seed + i for i in work], "failed": failed})
    if failed:
        raise DdimctlError(f"{len(failed)} of {len(work)} images had NaN or inf values and were not written: {', '.join(failed[:5])}")


def _read_latents(path: Path):
    """Load the 'latents' tensor (N, C, H, W) of a .safetensors file as float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None
    if "latents" not in tensors:
        raise InputError(f"{path}: no tensor named 'latents' (found: {', '.join(sorted(tensors)) or 'none'})")
    x = tensors["latents"].float()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise InputError(f"{path}: 'latents' has shape {tuple(x.shape)}, expected (N, C, H, W)")
    import torch

    if not torch.isfinite(x).all():
        raise InputError(f"{path}: 'latents' holds NaN or inf values")
    return x


ImagesArg = Annotated[List[str], typer.Argument(help="Images: files, directories, globs, or - to read paths from stdin.")]


@command
def invert(
    images: ImagesArg,
    model: ModelOpt = DEFAULT_MODEL,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
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
    rep = Reporter(json_out, quiet)
    results = _invert_many(images, model, steps, spacing, sampler, inversion, tol, max_iter, batch_size, out,
                           device, dtype, overwrite, skip_existing, rep, ".latent.safetensors", write_latent=True)
    ckpt, engine, records = results
    rep.finish({"command": "invert", **_model_doc(ckpt, engine), "inversion": inversion, "images": records})


@command
def reconstruct(
    images: ImagesArg,
    model: ModelOpt = DEFAULT_MODEL,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
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
    rep = Reporter(json_out, quiet)
    ckpt, engine, records = _invert_many(images, model, steps, spacing, sampler, inversion, tol, max_iter, batch_size,
                                         out, device, dtype, overwrite, skip_existing, rep, ".png", write_latent=False)
    done = [r for r in records if "mse" in r]
    summary = {}
    if done:
        import math

        mean_mse = sum(r["mse"] for r in done) / len(done)
        summary = {"mean_mse": mean_mse, "mean_psnr": (math.inf if mean_mse == 0 else -10 * math.log10(mean_mse))}
        for r in done:
            rep.note(f"{r['source']}: mse {r['mse']:.3g}, psnr {r['psnr']:.2f} dB")
        rep.note(f"mean over {len(done)} images: mse {summary['mean_mse']:.3g}, psnr {summary['mean_psnr']:.2f} dB")
    rep.finish({"command": "reconstruct", **_model_doc(ckpt, engine), "inversion": inversion, "images": records,
                "metrics": summary})


def _invert_many(specs, model, steps, spacing, sampler, inversion, tol, max_iter, batch_size, out, device, dtype,
                 overwrite, skip_existing, rep, suffix, write_latent):
    """The shared body of invert and reconstruct."""
    from .fsutil import check_writable_dir, save_safetensors_atomic
    from .images import mse, psnr, save_png, side_by_side
    from .pipeline import SamplingOptions, batches, shard

    if inversion not in ("exact", "plain"):
        raise typer.BadParameter(f"{inversion!r} is not exact or plain", param_hint="--inversion")
    if sampler != "ddim":
        raise DdimctlError(f"--sampler {sampler}: inversion inverts the DDIM step; use --sampler ddim")
    paths = _images_for(specs)
    options = SamplingOptions(steps, 0.0, sampler, spacing, inversion, tol, max_iter)
    ckpt, engine = _engine(model, device, dtype, options, False, rep)
    check_writable_dir(out)
    targets = _unique_names(paths, out, suffix)
    compares = [out / f"{p.stem}.compare.png" for p in paths] if not write_latent else []
    rank, world = _distributed()
    mine = shard(list(range(len(paths))), rank, world)  # each rank checks and writes only its share
    work = [i for i, go in zip(mine, _check_outputs([targets[i] for i in mine], overwrite, skip_existing)) if go]
    if compares:
        _check_outputs([compares[i] for i in work], overwrite, False)
    records: list[dict[str, Any]] = []
    calls_per_image = len(engine.plan) if write_latent else 2 * len(engine.plan)
    failed = []
    with rep.progress("inverting" if write_latent else "reconstructing", len(work) * calls_per_image) as advance:
        for chunk in batches(work, batch_size):
            x0, infos = _load_images([paths[i] for i in chunk], ckpt, rep)
            cb = lambda info: advance(len(chunk))  # noqa: E731
            x_T, stats = engine.invert(x0, cb)
            x_T = x_T.float().cpu()
            ok = _check_finite(x_T, [str(paths[i]) for i in chunk], rep)
            if not write_latent:
                rec = engine.decode(x_T, cb).float().cpu()
                ok = [a and b for a, b in zip(ok, _check_finite(rec, [str(paths[i]) for i in chunk], rep))]
                mses, psnrs = mse(rec, x0).tolist(), psnr(rec, x0).tolist()
            for j, i in enumerate(chunk):
                # model calls made for this image's batch (every call evaluates the whole batch)
                calls = stats.model_calls + (0 if write_latent else len(engine.plan))
                info = {**infos[j], "output": str(targets[i]), "model_calls": calls}
                if inversion == "exact":
                    info["max_residual"] = stats.max_residual
                if not ok[j]:
                    failed.append(str(paths[i]))
                    continue
                if write_latent:
                    meta = _latent_metadata(ckpt, engine, {k: v for k, v in infos[j].items()})
                    save_safetensors_atomic(targets[i], {"latents": x_T[j : j + 1].contiguous()}, meta)
                    rep.output(targets[i])
                else:
                    save_png(rec[j], targets[i])
                    save_png(side_by_side(x0[j], rec[j]), compares[i])
                    info.update(mse=mses[j], psnr=psnrs[j], compare=str(compares[i]))
                    rep.output(targets[i])
                    rep.output(compares[i])
                records.append(info)
    if failed:
        raise DdimctlError(f"{len(failed)} images gave NaN or inf values and were not written: {', '.join(failed[:5])}")
    return ckpt, engine, records


@command
def interpolate(
    a: Annotated[str, typer.Argument(help="Start: a latent file, an image (inverted first) or seed:N.")],
    b: Annotated[str, typer.Argument(help="End: a latent file, an image (inverted first) or seed:N.")],
    model: ModelOpt = DEFAULT_MODEL,
    frames: Annotated[int, typer.Option("--frames", "-k", min=2, help="Frames, both ends included.")] = 8,
    steps: StepsOpt = DEFAULT_STEPS,
    spacing: SpacingOpt = None,
    sampler: SamplerOpt = "ddim",
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

    from .fsutil import check_writable_dir
    from .images import make_grid, save_gif, save_png
    from .pipeline import SamplingOptions, batches
    from .sampler import slerp

    rep = Reporter(json_out, quiet)
    options = SamplingOptions(steps, 0.0, sampler, spacing, inversion)
    ckpt, engine = _engine(model, device, dtype, options, False, rep)
    ends = [_endpoint(spec, ckpt, engine, rep) for spec in (a, b)]
    check_writable_dir(out)
    frame_paths = [out / f"frame_{k:03d}.png" for k in range(frames)]
    strip, gif = out / "strip.png", out / "interpolation.gif"
    _check_outputs(frame_paths + [strip, gif], overwrite, False)
    alphas = [k / (frames - 1) for k in range(frames)]
    x_T = torch.cat([slerp(ends[0], ends[1], t) for t in alphas])  # (K, C, H, W)
    decoded = []
    with rep.progress("decoding", frames * len(engine.plan)) as advance:
        for chunk in batches(list(range(frames)), batch_size):
            x0 = engine.decode(x_T[list(chunk)], lambda info: advance(len(chunk))).float().cpu()
            if not all(_check_finite(x0, [str(frame_paths[i]) for i in chunk], rep)):
                raise DdimctlError("the model produced NaN or inf values while decoding; nothing written")
            decoded.append(x0)
    x0 = torch.cat(decoded)
    for k, p in enumerate(frame_paths):
        save_png(x0[k], p)
        rep.output(p)
    save_png(make_grid(x0, nrow=frames), strip)
    rep.output(strip)
    save_gif(list(x0), gif, boomerang=True)
    rep.output(gif)
    rep.finish({"command": "interpolate", **_model_doc(ckpt, engine), "endpoints": [a, b], "alphas": alphas})


def _endpoint(spec: str, ckpt, engine, rep: Reporter):
    """x_T (1, C, H, W) for an interpolation end: seed:N, a .safetensors latent, or an image to invert."""
    if spec.startswith("seed:"):
        try:
            return engine.noise([int(spec[5:])])
        except ValueError:
            raise InputError(f"{spec}: expected seed:N with an integer N") from None
    path = Path(spec)
    if path.suffix == ".safetensors":
        x = _read_latents(path)
        if tuple(x.shape[1:]) != engine.image_shape:
            raise InputError(f"{path}: latents of shape {tuple(x.shape[1:])}, the model needs {engine.image_shape}")
        return x[:1].to(engine.device)
    x0, _ = _load_images(_images_for([spec]), ckpt, rep)
    x_T, _ = engine.invert(x0[:1])
    return x_T


@command
def info(
    model: Annotated[str, typer.Argument(help="A model reference (as --model takes).")] = DEFAULT_MODEL,
    json_out: JsonOpt = False,
) -> None:
    """Show what a model reference resolves to: files, revision, config, parameters, size, prediction type."""
    from .checkpoint import resolve

    desc = resolve(model).describe()
    if json_out:
        sys.stdout.write(json.dumps(desc, indent=2, default=str) + "\n")
        return
    for key, value in desc.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        sys.stdout.write(f"{key}: {value}\n")


from .cli_train import train  # noqa: E402  (its own module: many options, same app)

command(train)


def _version_callback(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"ddimctl {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version.")] = False,
) -> None:
    """DDIM sampling, inversion, reconstruction and interpolation for diffusion and rectified-flow models."""


def main() -> None:
    """Console-script entry point: usage errors become one line too (exit 2)."""
    # The click exception classes Typer uses (Typer >= 0.16 vendors click as typer._click).
    exc = sys.modules[typer.BadParameter.__module__]
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False)
    except exc.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare `ddimctl`: show the help
            e.show()
            code = 2
        else:
            name = e.ctx.command_path if e.ctx is not None else "ddimctl"
            sys.stderr.write(f"{name}: {e.format_message()} (see '{name} --help')\n")
            code = 2
    except exc.ClickException as e:
        sys.stderr.write(f"ddimctl: {e.format_message()}\n")
        code = e.exit_code
    except (getattr(exc, "Abort", typer.Abort), typer.Abort, KeyboardInterrupt):
        sys.stderr.write("ddimctl: interrupted\n")
        code = 130
    except Terminated:
        sys.stderr.write("ddimctl: terminated\n")
        code = 143
    except BrokenPipeError:
        code = 1
    except Exception as e:  # a bug, not a bad input: still one line for pipelines, the traceback on request
        if os.environ.get("DDIMCTL_DEBUG"):
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        sys.stderr.write(f"ddimctl: unexpected error: {type(e).__name__}: {first} (DDIMCTL_DEBUG=1 shows the traceback)\n")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
