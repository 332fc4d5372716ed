"""ddimctl.fsutil: atomic writes, error mapping to OutputError, writable-directory checks, overwrite policy."""

from __future__ import annotations

import errno
import os
import sys

import pytest
import torch

from ddimctl import fsutil
from ddimctl.cli.errors import error_line
from ddimctl.errors import DdimctlError, OutputError
from ddimctl.fsutil import (
    atomic_path,
    atomic_write,
    check_writable_dir,
    plan_output,
    save_safetensors_atomic,
    write_bytes_atomic,
)


def listing(d) -> list[str]:
    return sorted(os.listdir(d))


def skip_unless_permissions_enforced(read_only_dir) -> None:
    """Skip when the OS lets us write into a 0o555 directory anyway (root with CAP_DAC_OVERRIDE)."""
    if os.access(read_only_dir, os.W_OK):
        read_only_dir.chmod(0o755)
        pytest.skip("directory permissions are not enforced for this user (root with CAP_DAC_OVERRIDE)")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def write_error(p, data: bytes = b"data") -> str:
    """The one-line OutputError of ``write_bytes_atomic(p, data)``."""
    with pytest.raises(OutputError) as e:
        write_bytes_atomic(p, data)
    return one_line(e)


def failing_os(monkeypatch, name: str, error: type[OSError], code: int, message: str) -> None:
    """fsutil's ``os.<name>`` raises ``error(code, message)``."""

    def fail(*args):
        raise error(code, message)

    monkeypatch.setattr(fsutil.os, name, fail)


def read_only_file_system(monkeypatch) -> None:
    """fsutil's ``os.open`` refuses to create a file (EROFS) and opens existing ones."""
    real_open = os.open

    def ro_open(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(fsutil.os, "open", ro_open)


# ------------------------------------------------------------------------------------------------------------
# atomic_write / atomic_path / write_bytes_atomic


def test_atomic_write_writes_and_leaves_no_temp(tmp_path):
    p = tmp_path / "000001.png"
    assert atomic_write(p, lambda f: f.write(b"hello")) == p
    assert p.read_bytes() == b"hello"
    assert listing(tmp_path) == ["000001.png"]


def test_atomic_write_replaces_existing(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    write_bytes_atomic(p, b"new")
    assert p.read_bytes() == b"new"
    assert listing(tmp_path) == ["a.bin"]


def test_atomic_path_temp_name_is_hidden_next_to_destination(tmp_path):
    p = tmp_path / "000017.png"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".000017.png.") and tmp.name.endswith(".tmp")
        assert tmp.exists() and not p.exists()
        tmp.write_bytes(b"x")
    assert p.read_bytes() == b"x" and listing(tmp_path) == ["000017.png"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_nothing_new_and_destination_untouched(tmp_path, exc):
    fresh, existing = tmp_path / "fresh.png", tmp_path / "existing.png"
    existing.write_bytes(b"keep me")

    def write_fn(f):
        f.write(b"partial data")
        raise exc

    for p in (fresh, existing):
        with pytest.raises(type(exc)):
            atomic_write(p, write_fn)
    assert not fresh.exists()
    assert existing.read_bytes() == b"keep me"
    assert listing(tmp_path) == ["existing.png"]


def test_interrupt_inside_atomic_path_removes_temp(tmp_path):
    p = tmp_path / "x.png"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_disk_full_on_os_write_is_an_output_error(tmp_path, monkeypatch):
    p = tmp_path / "out" / "000001.png"
    p.parent.mkdir()
    p.write_bytes(b"previous")

    failing_os(monkeypatch, "write", OSError, errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert write_error(p, b"x" * 100_000) == f"{p}: no space left on device"
    assert p.read_bytes() == b"previous"
    assert listing(p.parent) == ["000001.png"]


def test_disk_full_in_write_fn_and_on_fsync(tmp_path, monkeypatch):
    p = tmp_path / "a.png"

    def write_fn(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError) as e:
        atomic_write(p, write_fn)
    assert one_line(e) == f"{p}: no space left on device"

    failing_os(monkeypatch, "fsync", OSError, errno.EDQUOT, "Disk quota exceeded")
    assert write_error(p) == f"{p}: disk quota exceeded"
    assert listing(tmp_path) == []


def test_failed_rename_removes_temp(tmp_path, monkeypatch):
    p = tmp_path / "a.png"

    failing_os(monkeypatch, "replace", PermissionError, errno.EACCES, "Permission denied")
    assert write_error(p) == f"{p}: permission denied"
    assert listing(tmp_path) == []


def test_read_only_file_system_when_creating_temp(tmp_path, monkeypatch):
    read_only_file_system(monkeypatch)
    assert write_error(tmp_path / "a.png") == f"{tmp_path / 'a.png'}: read-only file system"


def test_missing_parent_and_parent_that_is_a_file(tmp_path):
    missing = tmp_path / "nope" / "a.png"
    assert write_error(missing, b"x") == f"{missing}: parent directory does not exist"

    (tmp_path / "file").write_bytes(b"")
    under_file = tmp_path / "file" / "a.png"
    with pytest.raises(OutputError) as e:
        atomic_write(under_file, lambda f: f.write(b"x"))
    assert one_line(e) == f"{under_file}: a parent is not a directory"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_new_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_bytes_atomic(tmp_path / "a.png", b"x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_permission_denied_for_real(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    skip_unless_permissions_enforced(d)
    try:
        assert write_error(d / "a.png", b"x") == f"{d / 'a.png'}: permission denied"
        with pytest.raises(OutputError) as e:
            check_writable_dir(d)
        assert one_line(e) == f"{d}: not writable (permission denied)"
    finally:
        d.chmod(0o755)


# ------------------------------------------------------------------------------------------------------------
# check_writable_dir


def test_check_writable_dir_creates_parents_and_leaves_no_probe(tmp_path):
    d = tmp_path / "a" / "b" / "out"
    assert check_writable_dir(d) == d
    assert d.is_dir() and listing(d) == []
    check_writable_dir(d)  # existing is fine
    check_writable_dir(str(d))


def test_check_writable_dir_refuses_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_bytes(b"")
    with pytest.raises(OutputError) as e:
        check_writable_dir(f)
    assert one_line(e) == f"{f}: exists and is not a directory"


def test_check_writable_dir_under_a_file(tmp_path):
    # works as root too: no permission can make a regular file a directory
    (tmp_path / "file").write_bytes(b"")
    d = tmp_path / "file" / "out"
    with pytest.raises(OutputError) as e:
        check_writable_dir(d)
    assert one_line(e) == f"{d}: cannot create directory (a parent is not a directory)"


def test_check_writable_dir_read_only(tmp_path, monkeypatch):
    read_only_file_system(monkeypatch)
    with pytest.raises(OutputError) as e:
        check_writable_dir(tmp_path)
    assert one_line(e) == f"{tmp_path}: not writable (read-only file system)"


def test_check_writable_dir_permission_denied_simulated(tmp_path, monkeypatch):
    failing_os(monkeypatch, "open", PermissionError, errno.EACCES, "Permission denied")
    with pytest.raises(OutputError) as e:
        check_writable_dir(tmp_path)
    assert one_line(e) == f"{tmp_path}: not writable (permission denied)"


# ------------------------------------------------------------------------------------------------------------
# plan_output


def test_plan_output_policy(tmp_path):
    p = tmp_path / "000001.png"
    assert plan_output(p, overwrite=False, skip_existing=False) == "write"
    p.write_bytes(b"x")
    with pytest.raises(OutputError) as e:
        plan_output(p, overwrite=False, skip_existing=False)
    assert one_line(e) == f"{p}: already exists"  # the library's words; the command line adds its flags:
    assert error_line(e.value) == (f"{p}: already exists (use --overwrite to replace it or --skip-existing to keep it)", 1)
    assert plan_output(p, overwrite=True, skip_existing=False) == "write"
    assert plan_output(p, overwrite=False, skip_existing=True) == "skip"
    with pytest.raises(DdimctlError, match="choose one"):
        plan_output(p, overwrite=True, skip_existing=True)


def test_plan_output_directory_and_dangling_link(tmp_path):
    d = tmp_path / "000001.png"
    d.mkdir()
    for flags in [(False, False), (True, False), (False, True)]:
        with pytest.raises(OutputError, match="exists and is a directory"):
            plan_output(d, *flags)
    link = tmp_path / "link.png"
    try:
        link.symlink_to(tmp_path / "missing-target.png")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    with pytest.raises(OutputError, match="already exists"):
        plan_output(link, overwrite=False, skip_existing=False)


# ------------------------------------------------------------------------------------------------------------
# save_safetensors_atomic


def test_save_safetensors_atomic_round_trip(tmp_path):
    from safetensors import safe_open

    x = torch.randn(4, 3, 8, 8)
    p = save_safetensors_atomic(tmp_path / "a.latent.safetensors", {"latents": x[1:2]}, {"seed": "7", "model": "m"})
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"seed": "7", "model": "m"}
        assert torch.equal(f.get_tensor("latents"), x[1:2])
    assert listing(tmp_path) == ["a.latent.safetensors"]

    q = save_safetensors_atomic(tmp_path / "b.safetensors", {"t": x.transpose(2, 3)})  # non-contiguous, no metadata
    with safe_open(str(q), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), x.transpose(2, 3))


def test_save_safetensors_atomic_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError, match="str"):
        save_safetensors_atomic(tmp_path / "a.safetensors", {"t": torch.zeros(2)}, {"seed": 7})  # type: ignore[dict-item]
    assert listing(tmp_path) == []


def test_save_safetensors_atomic_disk_full(tmp_path, monkeypatch):
    failing_os(monkeypatch, "write", OSError, errno.ENOSPC, "full")
    p = tmp_path / "a.safetensors"
    with pytest.raises(OutputError) as e:
        save_safetensors_atomic(p, {"t": torch.zeros(10)})
    assert one_line(e) == f"{p}: no space left on device"
    assert listing(tmp_path) == []
