"""Atomic output files and the overwrite policy every command shares.

Every output is written to a temporary file in the destination's own directory (named
``.NAME.<random>.tmp``, hidden and never matching an image extension), flushed and fsynced, then moved over
the destination with :func:`os.replace`. A reader therefore sees either the old file or the complete new
one, never a partial write; on any exception (KeyboardInterrupt included) the temporary file is removed and
the destination is left as it was.

Operating-system failures (disk full, permission denied, read-only file system, a missing parent directory,
...) become :class:`~ddimctl.errors.OutputError` with a one-line message naming the path, e.g.
``out/000001.png: no space left on device``.

Notes:

- New files get the usual mode (``0o666`` minus the umask), like ``open(path, "w")``; replacing a file does
  not keep the old file's mode or owner.
- If the destination is a symbolic link, the link itself is replaced by a regular file (``os.replace``
  semantics); its target is not touched.
- The file's data is fsynced before the rename, so a crash leaves the old or the new file, never a short one.
  The directory is not fsynced (a crash right after the rename may still show the old file), and a process
  killed with SIGKILL can leave a hidden ``.NAME.<random>.tmp`` behind.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Union

from .errors import OutputError, OutputExistsError, SettingError, first_line

if TYPE_CHECKING:
    from torch import Tensor

PathLike = Union[str, "os.PathLike[str]"]

_REASONS = {
    getattr(errno, name): reason
    for name, reason in [
        ("ENOSPC", "no space left on device"),
        ("EDQUOT", "disk quota exceeded"),
        ("EACCES", "permission denied"),
        ("EPERM", "operation not permitted"),
        ("EROFS", "read-only file system"),
        ("ENOENT", "parent directory does not exist"),
        ("ENOTDIR", "a parent is not a directory"),
        ("EISDIR", "is a directory"),
        ("EEXIST", "already exists"),
        ("ENAMETOOLONG", "file name too long"),
        ("EFBIG", "file too large"),
        ("EIO", "input/output error"),
        ("EMFILE", "too many open files"),
        ("ENFILE", "too many open files in the system"),
        ("ELOOP", "too many levels of symbolic links"),
        ("EBUSY", "device or resource busy"),
    ]
    if hasattr(errno, name)
}


def describe_oserror(e: OSError) -> str:
    """A short lower-case reason for an OSError, without the path (``"no space left on device"``)."""
    if e.errno in _REASONS:
        return _REASONS[e.errno]
    if e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return first_line(e)


def output_error(path: PathLike, e: OSError) -> OutputError:
    """The :class:`OutputError` for an OSError met while writing ``path``: ``"PATH: REASON"``."""
    return OutputError(f"{os.fspath(path)}: {describe_oserror(e)}")


def _tmp_name(dest: Path) -> Path:
    # Keep the name under the usual 255-byte limit even for long destination names.
    name = dest.name if len(dest.name) <= 200 else dest.name[:200]
    return dest.with_name(f".{name}.{secrets.token_hex(4)}.tmp")


def _create_tmp(dest: Path) -> tuple[Path, int]:
    """Create a fresh temp file next to ``dest``; return its path and an open write-only descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = _tmp_name(dest)
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", str(dest))


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic(dest: Path, sync_tmp: bool) -> Iterator[Path]:
    try:
        tmp, fd = _create_tmp(dest)
    except OSError as e:
        raise output_error(dest, e) from None
    os.close(fd)
    try:
        yield tmp
        if sync_tmp:
            _fsync_path(tmp)
        os.replace(tmp, dest)
    except BaseException as e:
        _unlink_quietly(tmp)
        if isinstance(e, OSError):
            raise output_error(dest, e) from None
        raise


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write the file there, and on a clean exit it becomes ``path``.

    The temporary file exists (empty) when the block starts, so writers that open it by name work. After the
    block it is fsynced and renamed over ``path``. On any exception the temporary file is removed and ``path``
    is untouched; an ``OSError`` (from the block or from the rename) is raised as :class:`OutputError` naming
    ``path`` (so an OSError about some *other* file inside the block is reported against ``path`` too). Other
    exceptions propagate unchanged.

        with atomic_path("out/000001.png") as tmp:
            image.save(tmp, format="PNG")   # give the format: the temp name ends in .tmp
    """
    with _atomic(Path(path), sync_tmp=True) as tmp:
        yield tmp


def atomic_write(path: PathLike, write_fn: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` atomically: ``write_fn`` gets a binary file open on a temp file next to ``path``.

    Example: ``atomic_write(p, lambda f: image.save(f, format="PNG"))``. Returns ``Path(path)``. Failure
    behaviour as :func:`atomic_path`: nothing is left behind and ``path`` is untouched.
    """
    dest = Path(path)
    with _atomic(dest, sync_tmp=False) as tmp:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
    return dest


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (with ``os.write`` on the raw descriptor). Returns ``Path(path)``."""
    dest = Path(path)
    with _atomic(dest, sync_tmp=False) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_BINARY", 0))
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:  # never expected from a regular file; avoid spinning
                    raise OSError(errno.EIO, "write returned 0 bytes")
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
    return dest


def check_writable_dir(path: PathLike) -> Path:
    """Make sure ``path`` is a directory we can create files in, creating it (and its parents) if needed.

    Raises :class:`OutputError`, e.g. ``out: exists and is not a directory`` or
    ``out: not writable (permission denied)``. The check creates and removes a hidden ``.tmp`` file, so it
    also catches read-only mounts and ACLs, and works the same for root. Returns ``Path(path)``.
    """
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise OutputError(f"{d}: exists and is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a dangling symlink, or created as a file meanwhile
        raise OutputError(f"{d}: exists and is not a directory") from None
    except OSError as e:
        raise OutputError(f"{d}: cannot create directory ({describe_oserror(e)})") from None
    probe = d / ".ddimctl-write-test"
    try:
        tmp, fd = _create_tmp(probe)
    except OSError as e:
        raise OutputError(f"{d}: not writable ({describe_oserror(e)})") from None
    os.close(fd)
    _unlink_quietly(tmp)
    return d


def plan_output(path: PathLike, overwrite: bool = False, skip_existing: bool = False) -> Literal["write", "skip"]:
    """The overwrite policy for every output file: ``"write"`` or ``"skip"`` (it exists and ``skip_existing``).

    A destination that exists (a dangling symlink counts) with neither flag raises
    :class:`~ddimctl.errors.OutputExistsError` (``PATH: already exists``). A destination that is a directory is
    never replaced by a file. Both flags at once is a :class:`~ddimctl.errors.SettingError`.
    """
    if overwrite and skip_existing:
        raise SettingError([("overwrite", True), ("skip_existing", True)], "choose one")
    p = Path(path)
    if not os.path.lexists(p):
        return "write"
    if p.is_dir():
        raise OutputError(f"{p}: exists and is a directory")
    if skip_existing:
        return "skip"
    refuse_existing(p, overwrite, SKIPPABLE)
    return "write"


OVERWRITE = (("overwrite", "replace it"),)
SKIPPABLE = OVERWRITE + (("skip_existing", "keep it"),)


def refuse_existing(path: PathLike, overwrite: bool, remedies: tuple[tuple[str, str], ...] = OVERWRITE) -> None:
    """Raise :class:`~ddimctl.errors.OutputExistsError` (with ``remedies``) when ``path`` exists and
    ``overwrite`` is off."""
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(Path(path), remedies)


@contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory atomically: yield an empty temporary sibling; on a clean exit it becomes ``path``.

    An existing ``path`` is refused (:class:`~ddimctl.errors.OutputExistsError`) unless ``overwrite``, checked
    before the block runs and again at the swap; with ``overwrite`` the old one is renamed aside, the new one
    renamed in, and the old one deleted (if the second rename fails the old one is put back). On any exception the
    temporary directory is removed; an ``OSError`` becomes :class:`~ddimctl.errors.OutputError` naming ``path``.
    """
    import shutil

    dest = Path(path)
    refuse_existing(dest, overwrite)
    tmp = _tmp_name(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        _swap_into_place(tmp, dest, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise output_error(dest, e) from None
        raise


def _swap_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``dest``; an existing ``dest`` is renamed aside first, then deleted."""
    import shutil

    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    refuse_existing(dest, overwrite)
    old = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.old")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        os.rename(old, dest)  # put the previous version back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def safetensors_bytes(tensors: Mapping[str, "Tensor"], metadata: Mapping[str, str] | None = None) -> bytes:
    """The ``.safetensors`` file for ``tensors`` (moved to CPU, made contiguous) and string ``metadata``, the same
    bytes for the same input.

    safetensors itself writes the metadata in an order that changes from process to process (a hash map), so two
    runs that compute the same tensors would write different files; the header is written again here with the
    metadata keys sorted. Metadata keys and values must be ``str``; anything else raises ``TypeError``.
    """
    import json

    import safetensors.torch

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; not so for {bad[:5]}")
        metadata = dict(metadata)
    plain = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    data = safetensors.torch.save(plain, metadata=metadata)
    n = int.from_bytes(data[:8], "little")  # layout: 8-byte header length, JSON header, tensor data
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to a multiple of 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def save_safetensors_atomic(
    path: PathLike, tensors: Mapping[str, "Tensor"], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write :func:`safetensors_bytes` of ``tensors`` and ``metadata`` to ``path`` atomically. Returns the path."""
    return write_bytes_atomic(path, safetensors_bytes(tensors, metadata))
