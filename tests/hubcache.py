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
