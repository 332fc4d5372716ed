"""Build a real Hugging Face Hub cache by hand, so tests exercise huggingface_hub's own cache lookup offline.

Layout (as huggingface_hub writes it): ``<cache>/models--OWNER--NAME/blobs/<hash>``,
``snapshots/<40-hex commit>/<path>`` (a symlink to the blob, or a copy where symlinks are unavailable) and
``refs/main`` holding the commit with no trailing newline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path | bytes], ref: str | None = "main",
                 commit: str | None = None) -> str:
    """Put ``files`` ({path in repo: source file or bytes}) into ``cache`` as one commit; returns the commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    contents = {name: src if isinstance(src, bytes) else Path(src).read_bytes() for name, src in files.items()}
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for name in sorted(contents):
            h.update(name.encode() + hashlib.sha256(contents[name]).digest())
        commit = h.hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, data in contents.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(os.path.relpath(blob, target.parent), target)
        except OSError:
            shutil.copyfile(blob, target)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return commit


def offline_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    """Point huggingface_hub at ``cache`` with offline mode on (it read the environment at import: patch it)."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def folder_files(root: Path) -> dict[str, Path]:
    """Every file under ``root`` as ``{path in repo: file}``, for :func:`add_snapshot` and :func:`fake_hub`."""
    return {p.relative_to(root).as_posix(): p for p in sorted(Path(root).rglob("*")) if p.is_file()}


def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repos: dict[str, Path]) -> dict[str, list[list[str]]]:
    """Serve ``repos`` ({repo_id: folder}) as an online Hub: ``snapshot_download`` copies the files its
    ``allow_patterns`` match (huggingface_hub's own ``filter_repo_objects``) into a fresh snapshot folder, as the real
    one downloads them, and ``list_repo_files`` lists the repo. Returns ``{repo_id: [patterns of each call]}``;
    what was fetched is what the snapshot folder holds."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    calls: dict[str, list[list[str]]] = {repo: [] for repo in repos}

    def snapshot(repo_id: str) -> Path:
        return tmp_path / "fake-hub" / repo_id.replace("/", "--") / hashlib.sha1(repo_id.encode()).hexdigest()

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        assert repo_id in repos, f"unexpected repo {repo_id}"
        calls[repo_id].append(list(allow_patterns or []))
        folder = snapshot(repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        files = folder_files(repos[repo_id])
        for name in filter_repo_objects(sorted(files), allow_patterns=allow_patterns):
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[name], target)
        return str(folder)

    def list_repo_files(repo_id, revision=None, **kwargs):
        return sorted(folder_files(repos[repo_id]))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    return calls


def fetched(tmp_path: Path, repo_id: str) -> list[str]:
    """The files :func:`fake_hub` has put into ``repo_id``'s snapshot so far."""
    folder = tmp_path / "fake-hub" / repo_id.replace("/", "--") / hashlib.sha1(repo_id.encode()).hexdigest()
    return sorted(folder_files(folder)) if folder.is_dir() else []
