"""The Hugging Face Hub: ``owner/name[@revision]`` references, fetched into the normal Hugging Face cache by
``huggingface_hub.snapshot_download`` (which honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_TOKEN``), only
the files asked for; every failure a one-line :class:`~ddimctl.errors.ModelError` with the command that fixes it."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelError, first_line
from .files import PICKLE_SUFFIXES
from .weights import DIFFUSERS_STEM, is_shard, variants_in

_HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for ``owner/name``, ``owner/name@rev`` and ``hf://...``; None if ``ref`` is not one.

    A name ending in ``.safetensors`` or a pickle suffix is taken for a missing file, not a repo.
    """
    text = ref[len("hf://"):] if ref.startswith("hf://") else ref
    repo_id, at, revision = text.partition("@")
    if not _HUB_REPO.fullmatch(repo_id) or (at and not revision):
        return None
    if not ref.startswith("hf://") and repo_id.lower().endswith((".safetensors",) + PICKLE_SUFFIXES):
        return None
    return repo_id, (revision or None)


def hub_fetch(ref: str, repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` of the files matching ``patterns`` (or find them in the cache); the snapshot folder."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .. import __version__

    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, library_name="ddimctl", library_version=__version__
        )
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":
            raise ModelError(f"{ref}: the cached snapshot is incomplete; run once online, or `{download}`") from None
        if constants.HF_HUB_OFFLINE:
            raise ModelError(
                f"{ref}: not in the Hugging Face cache and HF_HUB_OFFLINE is set (run once online, or `{download}`)"
            ) from None
        raise ModelError(
            f"{ref}: cannot reach the Hugging Face Hub and it is not in the cache (check the connection; {download})"
        ) from None
    except GatedRepoError:
        raise ModelError(f"{ref}: gated repo (accept its terms on huggingface.co and set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{ref}: repository not found on the Hugging Face Hub (check the name; a private repo needs HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{ref}: revision {revision!r} not found in {repo_id}") from None
    except HFValidationError as e:
        raise ModelError(f"{ref}: not a valid Hub repo id ({first_line(e)})") from None
    except HfHubHTTPError as e:
        raise ModelError(f"{ref}: Hugging Face Hub error ({first_line(e)})") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{ref}: cannot fetch from the Hugging Face Hub ({first_line(e)})") from None
    return Path(folder)


def hub_variants(repo_id: str, commit: str, folder: Path, rel: str, stem: str = DIFFUSERS_STEM) -> list[str]:
    """Variants of the weights in a repo folder: those in the cached snapshot, and (online) the repo's listing,
    so that a repo with only fp16 weights says so without downloading them."""
    found = set(variants_in(folder, stem))
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            import huggingface_hub

            names = huggingface_hub.list_repo_files(repo_id, revision=commit)
        except Exception:  # only for a better message: a failed listing leaves the cached view
            names = []
        single = re.compile(re.escape(rel) + re.escape(stem) + r"\.([A-Za-z0-9_-]+)\.safetensors")
        index = re.compile(re.escape(rel) + re.escape(stem) + r"\.safetensors\.index\.([A-Za-z0-9_-]+)\.json")
        for name in names:
            if is_shard(name.rpartition("/")[2], stem):
                continue
            m = single.fullmatch(name) or index.fullmatch(name)
            if m:
                found.add(m.group(1))
    return sorted(found)
