"""Image files <-> tensors, contact sheets, GIFs and the reconstruction metrics.

Conventions (the models' data range): an image tensor is float32, ``(C, H, W)`` or a batch ``(N, C, H, W)``,
with values in ``[-1, 1]``: ``x = 2 * u - 1`` where ``u`` in ``[0, 1]`` is ``pixel / 255`` for 8-bit images
and ``pixel / 65535`` for 16-bit ones. ``C`` is 1 (grayscale) or 3 (RGB).

Reading (:func:`load_image`) fits any Pillow-readable image to a model: it applies the EXIF orientation,
scales 16-bit samples (never clipping them at 255), composites transparency on a **white** background,
converts palette / CMYK / grayscale / RGB to the model's channel count, and resizes so the short side fits,
then center-crops. All of it is done in floating point, so 16-bit precision survives to the tensor. What was
done is returned as human-readable ``notes``; nothing here prints.

Writing is deterministic (identical tensors give byte-identical PNG files: Pillow writes no timestamps) and
atomic (through :mod:`ddimctl.fsutil`).

Every problem with an input file raises :class:`~ddimctl.errors.InputError` with one line naming the file,
e.g. ``photo.png: not an image (cannot identify image file)``.
"""

from __future__ import annotations

import glob
import io
import math
import os
import re
import struct
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, first_line
from .fsutil import write_bytes_atomic

if TYPE_CHECKING:
    from torch import Tensor

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions (lower case) that :func:`iter_image_paths` picks up in directories and globs.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: Transparent pixels are composited on this background (in [0, 1]): white.
BACKGROUND = 1.0

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, the weights of PIL's convert("L")


@dataclass
class LoadedImage:
    """An image fitted to a model.

    ``tensor``: (1, C, H, W) float32 in [-1, 1]. ``original_size``: (width, height) of the file's image as
    displayed (after EXIF orientation), before resizing. ``notes``: what was changed, for the user.
    """

    tensor: Tensor
    original_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# Reading


def _bomb_message(path: Path, e: Exception) -> str:
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(e))
    if m:
        detail = f"{int(m.group(1)):,} pixels, more than the limit of {Image.MAX_IMAGE_PIXELS:,}"
    else:
        detail = first_line(e)
    return f"{path}: image too large ({detail}; PIL.Image.MAX_IMAGE_PIXELS sets the limit)"


def _open_image(path: Path) -> tuple[Image.Image, list[str]]:
    """Open, fully decode and EXIF-orient ``path``; every failure becomes an InputError naming it.

    Decompression-bomb protection: Pillow only *warns* (``DecompressionBombWarning``) for images between
    ``MAX_IMAGE_PIXELS`` and twice that, and raises above. Both are refused here: no diffusion model needs an
    input that large, and decoding it could exhaust memory.
    """
    from .fsutil import describe_oserror

    notes: list[str] = []
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                im.load()
                if frames > 1:
                    notes.append(f"first of {frames} frames used")
                orientation = 1
                try:
                    orientation = int(im.getexif().get(0x0112, 1) or 1)
                except Exception:  # noqa: BLE001 - unreadable EXIF is not worth failing the image
                    notes.append("EXIF data unreadable; orientation ignored")
                if orientation != 1:
                    out = ImageOps.exif_transpose(im)
                    notes.append(f"EXIF orientation {orientation} applied")
                else:
                    out = im.copy()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise InputError(f"{path}: not readable (permission denied)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(_bomb_message(path, e)) from None
    except UnidentifiedImageError:
        try:
            empty = path.stat().st_size == 0
        except OSError:
            empty = False
        what = "empty file" if empty else "not an image (cannot identify image file)"
        raise InputError(f"{path}: {what}") from None
    except OSError as e:
        if e.errno is not None:
            raise InputError(f"{path}: cannot read ({describe_oserror(e)})") from None
        raise InputError(f"{path}: truncated or corrupt image ({first_line(e)})") from None
    except MemoryError:
        raise InputError(f"{path}: too large to decode (out of memory)") from None
    except (ValueError, EOFError, SyntaxError, struct.error, IndexError, KeyError, ZeroDivisionError) as e:
        # Pillow's format plugins raise these for some malformed files.
        raise InputError(f"{path}: corrupt image ({first_line(e)})") from None
    return out, notes


def _composite(color: np.ndarray, alpha: np.ndarray, notes: list[str]) -> np.ndarray:
    """Composite ``color`` (H, W, k) in [0, 1] with ``alpha`` (H, W) in [0, 1] over the white background."""
    if alpha.min() < 1.0:
        notes.append("composited alpha on white")
    a = alpha[..., None]
    return color * a + BACKGROUND * (1.0 - a)


def _to_unit_array(im: Image.Image, path: Path, notes: list[str]) -> np.ndarray:
    """The pixels as float64 (H, W, k) in [0, 1], k = 1 (gray) or 3 (RGB), transparency composited on white."""
    mode = im.mode
    transparency = im.info.get("transparency")
    if mode in _SIXTEEN_BIT:
        raw = np.asarray(im).astype(np.float64)
        if raw.min() < 0 or raw.max() > 65535:
            notes.append(f"{mode} values outside 0..65535 clipped")
        u = np.clip(raw / 65535.0, 0.0, 1.0)[..., None]
        notes.append("16-bit values scaled to [0, 1]")
        if isinstance(transparency, int):
            u = _composite(u, (raw != transparency).astype(np.float64), notes)
        return u
    if mode == "F":
        raw = np.asarray(im).astype(np.float64)
        if not np.isfinite(raw).all():
            raise InputError(f"{path}: floating-point image holds NaN or inf values")
        if raw.min() < 0 or raw.max() > 1:
            notes.append(f"float values outside [0, 1] clipped (range {raw.min():.3g}..{raw.max():.3g})")
        notes.append("32-bit float values read as [0, 1]")
        return np.clip(raw, 0.0, 1.0)[..., None]
    if mode in ("1", "L") and transparency is None:
        return np.asarray(im.convert("L")).astype(np.float64)[..., None] / 255.0
    if mode in ("1", "L", "LA", "La"):  # gray with alpha, or with a transparent gray level (tRNS)
        la = np.asarray(im.convert("LA")).astype(np.float64) / 255.0
        return _composite(la[..., :1], la[..., 1], notes)
    if mode in _ALPHA_MODES or transparency is not None:  # RGBA, palette with transparency, RGB with tRNS
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64) / 255.0
        return _composite(rgba[..., :3], rgba[..., 3], notes)
    if mode == "RGB":
        return np.asarray(im).astype(np.float64) / 255.0
    if mode == "CMYK":
        notes.append("CMYK converted to RGB (naive conversion, no color profile)")
    try:
        rgb = im.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: unsupported image mode {mode} ({first_line(e)})") from None
    return np.asarray(rgb).astype(np.float64) / 255.0


def _fit_channels(u: np.ndarray, channels: int, notes: list[str]) -> np.ndarray:
    k = u.shape[-1]
    if k == channels:
        return u
    if k == 1:  # gray into an RGB model
        notes.append(f"grayscale replicated to {channels} channels")
        return np.repeat(u, channels, axis=-1)
    # RGB into a grayscale model: ITU-R 601 luma (PIL's convert("L") weights), in float.
    if not (np.array_equal(u[..., 0], u[..., 1]) and np.array_equal(u[..., 0], u[..., 2])):
        notes.append("RGB converted to grayscale (ITU-R 601 luma)")
    return (u @ _LUMA)[..., None]


def _target_hw(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        hw = (size, size)
    else:
        hw = tuple(int(s) for s in size)
        if len(hw) != 2:
            raise ValueError(f"size must be an int or (height, width), not {size!r}")
    if min(hw) < 1:
        raise ValueError(f"size must be positive, not {size!r}")
    return hw  # type: ignore[return-value]


def _resize_center_crop(u: np.ndarray, hw: tuple[int, int], notes: list[str]) -> np.ndarray:
    """Scale (H, W, k) so it covers ``hw`` = (height, width) with its short side, keeping the center.

    Done in float (one Pillow 'F' image per channel, bicubic, antialiased when shrinking) with the crop given
    as Pillow's fractional ``box``, so the kept region is exactly centered and 16-bit precision is kept.
    """
    h, w = u.shape[:2]
    th, tw = hw
    if (h, w) == (th, tw):
        return u
    scale = max(tw / w, th / h)
    cw, ch = tw / scale, th / scale
    left, top = (w - cw) / 2, (h - ch) / 2
    box = (left, top, left + cw, top + ch)
    planes = []
    for c in range(u.shape[-1]):
        plane = Image.fromarray(np.ascontiguousarray(u[..., c], dtype=np.float32))
        planes.append(np.asarray(plane.resize((tw, th), Image.Resampling.BICUBIC, box=box), dtype=np.float64))
    cropped = cw < w - 1e-6 or ch < h - 1e-6
    notes.append(f"resized {w}x{h} -> {tw}x{th}" + (" (center crop)" if cropped else ""))
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)  # bicubic overshoots slightly at edges


def load_image(path: PathLike, channels: int, size: int | tuple[int, int] | None = None) -> LoadedImage:
    """Read an image file and fit it to a model with ``channels`` (1 or 3) channels and ``size``.

    ``size``: an int (square), ``(height, width)`` (the tensor's order), or None to keep the image's size.
    Returns a :class:`LoadedImage` whose tensor is (1, C, H, W) float32 in [-1, 1]. Raises
    :class:`InputError` naming ``path`` for a missing, unreadable, empty, truncated, non-image or oversized
    (decompression bomb) file.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    target = _target_hw(size)
    p = Path(path)
    im, notes = _open_image(p)
    original_size = im.size
    u = _to_unit_array(im, p, notes)
    u = _fit_channels(u, channels, notes)
    if target is not None:
        u = _resize_center_crop(u, target, notes)
    x = (u * 2.0 - 1.0).astype(np.float32).transpose(2, 0, 1)
    return LoadedImage(torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0), original_size, notes)


# ------------------------------------------------------------------------------------------------------------
# Tensors -> pixels


def to_unit(x: Tensor) -> Tensor:
    """Map [-1, 1] to [0, 1]: ``((x + 1) / 2).clamp(0, 1)``, any shape, same dtype (for metrics)."""
    return ((x + 1) / 2).clamp(0, 1)


def to_uint8(x: Tensor) -> np.ndarray:
    """Quantize [-1, 1] to uint8, elementwise, same shape: ``((x + 1) / 2 * 255).round().clamp(0, 255)``.

    Computed in float32 on the CPU; ``round`` is torch's round-half-to-even (a value landing exactly on
    k + 0.5 goes to the even neighbour). Values outside [-1, 1] (and ±inf) saturate at 0 or 255; NaN raises
    ``ValueError`` rather than turning into an arbitrary pixel.
    """
    y = x.detach().to("cpu", torch.float32)
    if torch.isnan(y).any():
        raise ValueError("cannot convert NaN values to pixels")
    return ((y + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def tensor_to_pil(x: Tensor) -> Image.Image:
    """A (C, H, W) tensor in [-1, 1] as a Pillow image: mode 'L' for C == 1, 'RGB' for C == 3."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a (C, H, W) tensor with C = 1 or 3, got shape {tuple(x.shape)}")
    arr = to_uint8(x)
    if arr.shape[0] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[0]))
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)))


def png_bytes(x: Tensor, pnginfo: Mapping[str, str] | None = None) -> bytes:
    """The PNG file for a (C, H, W) tensor in [-1, 1], with optional text chunks in ``pnginfo``'s order.

    Deterministic: the same tensor and ``pnginfo`` give the same bytes (no timestamps are written).
    """
    from PIL.PngImagePlugin import PngInfo

    info = None
    if pnginfo:
        info = PngInfo()
        for key, value in pnginfo.items():
            info.add_text(str(key), str(value))  # tEXt, or iTXt for text that is not Latin-1
    buf = io.BytesIO()
    tensor_to_pil(x).save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def save_png(x: Tensor, path: PathLike, pnginfo: Mapping[str, str] | None = None) -> Path:
    """Write a (C, H, W) tensor in [-1, 1] as an 8-bit PNG (see :func:`to_uint8`), atomically. Returns the path.

    Raises :class:`~ddimctl.errors.OutputError` when the file cannot be written.
    """
    return write_bytes_atomic(path, png_bytes(x, pnginfo))


# ------------------------------------------------------------------------------------------------------------
# Layouts and animations


def make_grid(
    x: Tensor | Sequence[Tensor], nrow: int | None = None, padding: int = 2, pad_value: float = 1.0
) -> Tensor:
    """Tile (N, C, H, W) images into one (C, H', W') image, row by row, like torchvision's ``make_grid``.

    ``nrow`` images per row (default ``ceil(sqrt(N))``); ``padding`` pixels around and between the tiles,
    filled with ``pad_value`` (1.0 is white in [-1, 1]). Output size: ``H' = rows * (H + padding) + padding``,
    ``W' = min(nrow, N) * (W + padding) + padding``. As in torchvision, a single image is returned as it is,
    without a border. Unlike torchvision, 1-channel images stay 1-channel.
    """
    if not isinstance(x, torch.Tensor):
        x = torch.stack(list(x))
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 1:
        return x[0]
    cols = min(nrow if nrow is not None else math.ceil(math.sqrt(n)), n)
    if cols < 1:
        raise ValueError(f"nrow must be at least 1, not {nrow}")
    rows = math.ceil(n / cols)
    hp, wp = h + padding, w + padding
    grid = x.new_full((c, rows * hp + padding, cols * wp + padding), pad_value)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[:, r * hp + padding : r * hp + padding + h, q * wp + padding : q * wp + padding + w] = x[k]
    return grid


def side_by_side(a: Tensor, b: Tensor, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """``a`` and ``b`` (both (C, H, W)) next to each other with a white border: (C, H + 2p, 2W + 3p)."""
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"side_by_side needs two (C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return make_grid(torch.stack([a, b.to(a.dtype)]), nrow=2, padding=padding, pad_value=pad_value)


def gif_bytes(
    frames: Sequence[Tensor], duration_ms: int = 100, loop: int | None = 0, boomerang: bool = False
) -> bytes:
    """An animated GIF of (C, H, W) frames in [-1, 1]; see :func:`save_gif`."""
    seq = list(frames)
    if not seq:
        raise ValueError("a GIF needs at least one frame")
    if boomerang and len(seq) > 2:
        seq = seq + seq[-2:0:-1]  # forward, then back without repeating either end
    images = [tensor_to_pil(f) for f in seq]
    kwargs: dict = {"duration": int(duration_ms)}
    if loop is not None:
        kwargs["loop"] = int(loop)
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], **kwargs)
    return buf.getvalue()


def save_gif(
    frames: Sequence[Tensor],
    path: PathLike,
    duration_ms: int = 100,
    loop: int | None = 0,
    boomerang: bool = False,
) -> Path:
    """Write (C, H, W) frames in [-1, 1] as an animated GIF, atomically. Returns the path.

    ``duration_ms`` per frame (GIF stores hundredths of a second); ``loop=0`` repeats forever, ``None`` plays
    once; ``boomerang`` plays the frames forward then backward (K frames give 2K - 2). RGB frames are reduced to
    a 256-colour palette each (GIF's limit). Pillow merges consecutive identical frames into one longer frame.
    """
    return write_bytes_atomic(path, gif_bytes(frames, duration_ms, loop, boomerang))


# ------------------------------------------------------------------------------------------------------------
# Metrics


def mse(a: Tensor, b: Tensor) -> float | Tensor:
    """Per-dimension mean squared error of images in [-1, 1], measured after mapping them to [0, 1].

    As in the DDIM paper's Table 2 (images in [0, 1], mean over C·H·W). (C, H, W) inputs give a float;
    (N, C, H, W) give a float64 tensor of shape (N,), one value per image.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (N, C, H, W), got shape {tuple(a.shape)}")
    ua = to_unit(a.detach().to("cpu", torch.float64))
    ub = to_unit(b.detach().to("cpu", torch.float64))
    d = (ua - ub).pow(2)
    if a.ndim == 4:
        return d.flatten(1).mean(1)
    return float(d.mean())


def psnr(a: Tensor, b: Tensor) -> float | Tensor:
    """PSNR in dB with data range 1 (images mapped from [-1, 1] to [0, 1]): ``-10 log10(mse)``, inf if equal.

    (C, H, W) inputs give a float; (N, C, H, W) give a float64 tensor of shape (N,).
    """
    m = mse(a, b)
    if isinstance(m, torch.Tensor):
        return -10.0 * torch.log10(m)
    return psnr_from_mse(m)


def psnr_from_mse(m: float) -> float:
    """``-10 log10(m)`` dB (data range 1); inf for m = 0."""
    return math.inf if m == 0 else -10.0 * math.log10(m)


def mean_metrics(mses: Sequence[float]) -> dict[str, float]:
    """The summary ``reconstruct`` reports: the mean per-dimension MSE over images and the PSNR of that mean
    (as the DDIM paper's Table 2 averages MSE). Empty input gives ``{}``."""
    if not mses:
        return {}
    mean = sum(mses) / len(mses)
    return {"mean_mse": mean, "mean_psnr": psnr_from_mse(mean)}


# ------------------------------------------------------------------------------------------------------------
# Finding input files


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _looked_for() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


def _images_in_dir(d: Path) -> list[Path]:
    """Images under ``d``, recursively, sorted; hidden files and folders are skipped, folder links not followed."""

    def fail(e: OSError) -> None:
        from .fsutil import describe_oserror

        where = e.filename if e.filename else d
        raise InputError(f"{where}: cannot list directory ({describe_oserror(e)})")

    found = []
    for root, dirs, files in os.walk(d, onerror=fail):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        found.extend(Path(root, f) for f in files if not f.startswith(".") and _is_image_name(f))
    return sorted(found)


def _has_magic(spec: str) -> bool:
    return re.search(r"[*?[]", spec) is not None


def _expand(spec: str, from_stdin: bool) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        found = _images_in_dir(p)
        if not found:
            raise InputError(f"{spec}: no images found (looked for {_looked_for()})")
        return found
    if os.path.lexists(p):  # a file (or a broken link: load_image reports it)
        return [p]
    if not from_stdin and _has_magic(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise InputError(f"{spec}: no files match this pattern")
        found = [Path(m) for m in matches if _is_image_name(m) and os.path.isfile(m)]
        if not found:
            raise InputError(f"{spec}: matches no images (looked for {_looked_for()})")
        return found
    where = " (read from stdin)" if from_stdin else ""
    raise InputError(f"{spec}: no such file or directory{where}")


def iter_image_paths(specs: Iterable[str], stdin: TextIO | None = None) -> list[Path]:
    """Expand image specs into a list of paths, in order, without duplicates.

    Each spec is a file (kept whatever its extension), a directory (its images, recursive, sorted; the
    extensions in :data:`IMAGE_EXTENSIONS`, any case; hidden entries skipped), a glob pattern (its image
    matches, sorted; ``**`` recurses) or ``-``: one file or directory per line from ``stdin`` (default
    ``sys.stdin``), blank lines skipped, each line taken literally (no globbing). Duplicates (the same file reached twice) keep
    their first place. Raises :class:`InputError` for a missing path, a pattern matching nothing, or a
    directory without images.
    """
    out: list[Path] = []
    seen: set[str] = set()

    def add(paths: list[Path]) -> None:
        for q in paths:
            key = os.path.normcase(os.path.realpath(q))
            if key not in seen:
                seen.add(key)
                out.append(q)

    for spec in specs:
        if spec == "-":
            stream = stdin if stdin is not None else sys.stdin
            for line in stream:
                line = line.rstrip("\r\n")
                if line.strip():
                    add(_expand(line, from_stdin=True))
        else:
            add(_expand(spec, from_stdin=False))
    return out
