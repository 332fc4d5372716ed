"""Model references -> checkpoint files -> a loaded UNet with its sampler settings; and saving in the same layout.

One function, :func:`resolve`, turns every reference a command accepts into files on disk:

* a local directory in diffusers' layout: ``diffusion_pytorch_model.safetensors`` with ``config.json`` beside it,
  at the root or in ``unet/``; ``scheduler_config.json`` at the root or in ``scheduler/`` (a pipeline directory
  with ``model_index.json``, ``unet/`` and ``scheduler/`` is one case of this); ``ddimctl.json`` for ddimctl's
  own metadata;
* a single ``.safetensors`` file that carries its configs as JSON in the file's metadata (keys ``config``,
  ``scheduler_config``, ``ddimctl``), read without loading the weights;
* a built-in model name (:data:`BUILTIN_MODELS`), shipped as a directory under ``ddimctl/models/``;
* a Hugging Face Hub repo ``owner/name[@revision]`` or ``hf://owner/name[@revision]``, fetched into the normal
  Hugging Face cache by ``huggingface_hub.snapshot_download`` (which honours ``HF_HUB_OFFLINE``,
  ``HF_HUB_CACHE`` and ``HF_TOKEN``).

A local path that exists wins over a built-in name, which wins over a Hub repo. Only safetensors are loaded:
pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``, ...) are refused, since unpickling can run arbitrary code.
Every problem is a one-line :class:`ModelError` naming the reference or file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import ModelError, OutputError, first_line
from .settings import SamplerSettings

from . import BUILTIN_MODELS, DEFAULT_MODEL  # noqa: E402,F401  (defined once, torch-free, in the package root)

BUILTIN_ROOT = Path(__file__).resolve().parent / "models"

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
SCHEDULER_NAME = "scheduler_config.json"
META_NAME = "ddimctl.json"
PIPELINE_INDEX = "model_index.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# What a Hub snapshot fetches: configs and safetensors weights at the root, in unet/ and in scheduler/.
HUB_FILES = [
    CONFIG_NAME, WEIGHTS_NAME, SCHEDULER_NAME, META_NAME, PIPELINE_INDEX,
    f"unet/{CONFIG_NAME}", f"unet/{WEIGHTS_NAME}", f"scheduler/{SCHEDULER_NAME}",
]
_HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_CONVERT_HINT = "convert it to .safetensors, e.g. diffusers' save_pretrained(dir, safe_serialization=True)"


def _pickle_error(path: Path | str) -> ModelError:
    return ModelError(f"{path}: refusing to load a pickle checkpoint (it can run arbitrary code); {_CONVERT_HINT}")


# ----------------------------------------------------------------------------------------------------------------
# Resolution


@dataclass
class Resolved:
    """What a model reference points to, before any weights are read.

    ``model_config``: the UNet config, validated and complete (``ddimctl.unet.normalize_config``);
    ``scheduler_config``: the raw diffusers scheduler config ({} when there is none: defaults apply);
    ``meta``: ddimctl's own metadata ({} when absent); ``revision``: the 40-hex commit for Hub refs, else None.
    ``config_source``/``scheduler_source`` name where the configs came from, for messages.
    """

    ref: str
    source: str  # "builtin" | "dir" | "file" | "hub"
    weights: Path
    model_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None
    revision: str | None = None
    files: list[Path] = field(default_factory=list)
    config_source: str = CONFIG_NAME
    scheduler_source: str = SCHEDULER_NAME

    def settings(self) -> SamplerSettings:
        """The sampler settings of the scheduler config (diffusers' DDIMScheduler defaults for missing keys)."""
        return SamplerSettings.from_config(self.scheduler_config, source=self.scheduler_source)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for ``ddimctl info``; reads the weights' header and hashes the file, loads nothing."""
        cfg = self.model_config
        settings = self.settings()
        scheduler = settings.to_diffusers_config()
        if scheduler.get("trained_betas") is not None:
            scheduler["trained_betas"] = f"<{len(scheduler['trained_betas'])} values>"
        shapes = _tensor_shapes(self.weights)
        parameters = 0
        for shape in shapes.values():
            n = 1
            for s in shape:
                n *= s
            parameters += n
        summary_keys = (
            "sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types", "mid_block_type", "attention_head_dim", "norm_num_groups",
            "act_fn", "time_embedding_type", "flip_sin_to_cos", "freq_shift",
        )
        return {
            "ref": self.ref,
            "source": self.source,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "weights": str(self.weights),
            "weights_sha256": sha256_file(self.weights),
            "files": [str(p) for p in self.files],
            "parameters": parameters,
            "tensors": len(shapes),
            "image_size": cfg.get("sample_size"),
            "channels": cfg.get("in_channels"),
            "prediction_type": settings.prediction_type,
            "kind": settings.kind,
            "model_config": {k: cfg.get(k) for k in summary_keys},
            "scheduler": scheduler,
            "meta": self.meta,
        }


def resolve(ref: str | os.PathLike) -> Resolved:
    """Resolve a model reference: an existing local path, then a built-in name, then a Hub repo ``owner/name``
    (``@revision`` and an ``hf://`` prefix allowed). Raises :class:`ModelError` (one line) when it cannot."""
    ref = os.fspath(ref)
    path = Path(ref).expanduser()
    if ref and path.exists():
        return _resolve_path(ref, path)
    if ref in BUILTIN_MODELS:
        return _resolve_builtin(ref)
    hub = parse_hub_ref(ref)
    if hub is not None:
        return _resolve_hub(ref, *hub)
    if ref.startswith("hf://"):
        raise ModelError(f"{ref}: not a Hub repo reference (expected hf://owner/name or hf://owner/name@revision)")
    raise ModelError(f"{ref}: no such file, directory, built-in model or Hub repo")


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


def _resolve_path(ref: str, path: Path) -> Resolved:
    if path.is_dir():
        return _resolve_dir(ref, path, "dir")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise _pickle_error(path)
    if suffix == ".safetensors":
        return _resolve_file(ref, path)
    raise ModelError(f"{path}: not a model checkpoint (expected a diffusers model directory or a .safetensors file)")


def _resolve_builtin(name: str) -> Resolved:
    root = BUILTIN_ROOT / name
    if not root.is_dir():
        raise ModelError(
            f"{name}: the built-in model is not installed ({root} is missing; reinstall ddimctl, or pass a model "
            "directory, .safetensors file or Hub repo with --model)"
        )
    return _resolve_dir(name, root, "builtin")


def _resolve_dir(ref: str, root: Path, source: str, label: str | None = None) -> Resolved:
    """A diffusers-layout directory (model dir, pipeline dir with unet/ + scheduler/, or a Hub snapshot)."""
    label = label or str(root)
    index = root / PIPELINE_INDEX
    if index.is_file():
        _read_json(index)  # a pipeline directory: its index must at least be JSON
    candidates = [root / WEIGHTS_NAME, root / "unet" / WEIGHTS_NAME]
    weights = next((p for p in candidates if p.is_file()), None)
    if weights is None:
        _refuse_pickles_in(root, label)
        others = sorted(p.name for p in root.glob("*.safetensors"))
        if others:
            raise ModelError(
                f"{label}: no {WEIGHTS_NAME} here or in unet/ (found {others[0]}: pass that file itself if it "
                "carries its config)"
            )
        raise ModelError(f"{label}: no {WEIGHTS_NAME} here or in unet/ (not a diffusers model directory)")
    config_path = weights.parent / CONFIG_NAME
    if not config_path.is_file():
        raise ModelError(f"{config_path}: missing (a diffusers model needs config.json beside {WEIGHTS_NAME})")
    model_config = _model_config(_read_json(config_path), str(config_path))
    files = [config_path, weights]

    scheduler_config: dict[str, Any] = {}
    scheduler_source = f"{label} (no {SCHEDULER_NAME}: defaults)"
    for p in (root / SCHEDULER_NAME, root / "scheduler" / SCHEDULER_NAME):
        if p.is_file():
            scheduler_config, scheduler_source = _read_json(p), str(p)
            files.append(p)
            break

    metadata = _safetensors_metadata(weights)
    meta_path = root / META_NAME
    if meta_path.is_file():
        meta = _read_json(meta_path)
        files.append(meta_path)
    else:
        meta = _metadata_json(metadata, "ddimctl", weights) or {}
    if index.is_file():
        files.append(index)
    return Resolved(ref, source, weights, model_config, scheduler_config, meta, files=files,
                    config_source=str(config_path), scheduler_source=scheduler_source)


def _refuse_pickles_in(root: Path, label: str) -> None:
    """Raise the pickle refusal when a directory without safetensors holds pickle weights."""
    for folder in (root, root / "unet"):
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
            if found:
                raise ModelError(
                    f"{found[0]}: refusing to load a pickle checkpoint (it can run arbitrary code) and {label} has no "
                    f"{WEIGHTS_NAME}; {_CONVERT_HINT}"
                )


def _resolve_file(ref: str, path: Path) -> Resolved:
    """A single .safetensors file with its configs in the metadata (or a config.json beside it)."""
    metadata = _safetensors_metadata(path)
    files = [path]
    raw = _metadata_json(metadata, "config", path)
    config_source = f"{path} (metadata 'config')"
    if raw is None:
        beside = path.parent / CONFIG_NAME
        if not beside.is_file():
            raise ModelError(
                f"{path}: no model config (expected a 'config' entry in the safetensors metadata, or a config.json "
                "beside the file)"
            )
        raw, config_source = _read_json(beside), str(beside)
        files.append(beside)
    model_config = _model_config(raw, config_source)

    scheduler_config = _metadata_json(metadata, "scheduler_config", path)
    scheduler_source = f"{path} (metadata 'scheduler_config')"
    if scheduler_config is None:
        scheduler_config, scheduler_source = {}, f"{path} (no scheduler config: defaults)"
        for p in (path.parent / SCHEDULER_NAME, path.parent.parent / "scheduler" / SCHEDULER_NAME):
            if p.is_file():
                scheduler_config, scheduler_source = _read_json(p), str(p)
                files.append(p)
                break
    meta = _metadata_json(metadata, "ddimctl", path) or {}
    return Resolved(ref, "file", path, model_config, scheduler_config, meta, files=files,
                    config_source=config_source, scheduler_source=scheduler_source)


def _resolve_hub(ref: str, repo_id: str, revision: str | None) -> Resolved:
    """Fetch (or find in the cache) the model files of a Hub repo; the revision becomes the snapshot's commit."""
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

    from . import __version__

    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_FILES, library_name="ddimctl", library_version=__version__
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
    snapshot = Path(folder)
    commit = snapshot.name
    label = f"{repo_id}@{commit}"
    if not any((snapshot / p).is_file() for p in (WEIGHTS_NAME, f"unet/{WEIGHTS_NAME}")):
        raise ModelError(
            f"{ref}: no {WEIGHTS_NAME} at the root or in unet/ of {label} (ddimctl loads only safetensors weights; "
            "if the repo has only pickle .bin weights, convert them with diffusers' save_pretrained(dir, "
            "safe_serialization=True))"
        )
    resolved = _resolve_dir(ref, snapshot, "hub", label)
    resolved.repo_id, resolved.revision = repo_id, commit
    return resolved


# ----------------------------------------------------------------------------------------------------------------
# Reading files


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; one-line ModelError when unreadable, not JSON or not an object."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not JSON (not UTF-8 text)") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _model_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate a UNet config (errors are ConfigError prefixed with ``source``)."""
    from .errors import ConfigError
    from .unet import normalize_config

    cls = raw.get("_class_name")
    if cls is not None and cls != "UNet2DModel":
        raise ConfigError(f"{source}: unsupported _class_name {cls!r} (ddimctl runs UNet2DModel checkpoints)")
    return normalize_config(raw, source)


def _open_safetensors(path: Path):
    import safetensors

    try:
        return safetensors.safe_open(str(path), framework="pt")
    except safetensors.SafetensorError as e:
        detail = first_line(e).removeprefix("Error while deserializing header: ")
        if "not fully covered" in detail or "invalid header length" in detail:
            detail += ": truncated?"
        raise ModelError(f"{path}: not a valid safetensors file ({detail})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its header only."""
    with _open_safetensors(path) as f:
        return dict(f.metadata() or {})


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header (no tensor data is read)."""
    with _open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _metadata_json(metadata: Mapping[str, str], key: str, path: Path) -> dict[str, Any] | None:
    """``metadata[key]`` parsed as a JSON object, or None when absent."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: metadata '{key}' is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: metadata '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Checkpoint:
    """A loaded model: ``model`` (eval mode, on the requested device and dtype), its sampler ``settings``,
    where it came from, and the image shape it works on: (``channels``, ``image_size``, ``image_size``)."""

    model: torch.nn.Module
    settings: SamplerSettings
    resolved: Resolved
    channels: int
    image_size: int
    parameters: int


def _image_size(cfg: Mapping[str, Any], source: str) -> int:
    size = cfg.get("sample_size")
    if isinstance(size, list):
        if len(size) == 2 and size[0] != size[1]:
            raise ModelError(f"{source}: non-square sample_size {size} is not supported")
        size = size[0]
    if size is None:
        raise ModelError(f"{source}: sample_size is null (ddimctl needs the model's image size)")
    return int(size)


def load(
    ref: str | os.PathLike | Resolved, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Checkpoint:
    """Resolve ``ref`` (or take a :class:`Resolved`) and load its UNet from safetensors with strict key and shape
    checks; the weights are cast to ``dtype`` and moved to ``device``."""
    from .unet import UNet2DModel, convert_legacy_attention_keys, count_parameters

    r = ref if isinstance(ref, Resolved) else resolve(ref)
    settings = r.settings()
    cfg = r.model_config
    channels, image_size = int(cfg["in_channels"]), _image_size(cfg, r.config_source)
    if cfg["out_channels"] != channels:
        raise ModelError(
            f"{r.config_source}: out_channels {cfg['out_channels']} differs from in_channels {channels} (ddimctl needs "
            "a model whose prediction is shaped like its input)"
        )
    with torch.device("meta"):  # no random init: the weights come from the file
        model = UNet2DModel.from_config(cfg, source=r.config_source)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = convert_legacy_attention_keys(_load_tensors(r.weights))
    _check_state_dict(r.weights, state, expected)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # a buffer not in the state dict
        model = UNet2DModel.from_config(cfg, source=r.config_source).to(dtype)
        model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    return Checkpoint(model, settings, r, channels, image_size, count_parameters(model))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    import safetensors
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except safetensors.SafetensorError as e:
        raise ModelError(f"{path}: not a valid safetensors file ({first_line(e)})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None


def _check_state_dict(path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Strict matching with a one-line message: missing/unexpected keys (a few named, with counts), or the first
    tensor whose shape disagrees with the config."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f", ... ({len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{more})")
        raise ModelError(f"{path}: weights do not match config.json: {'; '.join(parts)}")
    for k, shape in expected.items():
        got = tuple(state[k].shape)
        if got != shape:
            raise ModelError(f"{path}: {k} has shape {list(got)} but the config needs {list(shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _ddimctl_meta(model_config: Mapping[str, Any], settings: SamplerSettings, meta: Mapping[str, Any] | None) -> dict:
    from . import __version__

    size = model_config.get("sample_size")
    return {
        **dict(meta or {}),
        "ddimctl_version": __version__,
        "objective": (meta or {}).get("objective", settings.prediction_type),
        "prediction_type": settings.prediction_type,
        "kind": settings.kind,
        "data_range": [-1, 1],
        "image_channels": model_config.get("in_channels"),
        "image_size": size,
    }


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The UNet inside a torch.compile or DistributedDataParallel wrapper (their state_dict keys are prefixed)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save(
    out_dir: Path | str,
    model: torch.nn.Module,
    settings: SamplerSettings,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in diffusers' layout (``config.json``, ``diffusion_pytorch_model.safetensors``,
    ``scheduler_config.json``) plus ``ddimctl.json``, as one atomic directory (:func:`ddimctl.fsutil.atomic_dir`:
    an existing ``out_dir`` is an :class:`~ddimctl.errors.OutputExistsError` unless ``overwrite``). A torch.compile
    or DDP wrapper is unwrapped. Returns ``out_dir``."""
    from .fsutil import atomic_dir, safetensors_bytes

    out_dir = Path(out_dir)
    model = _unwrap(model)
    config = dict(model.config)
    doc = _ddimctl_meta(config, settings, meta)
    with atomic_dir(out_dir, overwrite) as tmp:
        _write_json(tmp / CONFIG_NAME, config)
        metadata = {"format": "pt", "ddimctl": json.dumps(doc, default=str)}  # diffusers needs "format": "pt"
        (tmp / WEIGHTS_NAME).write_bytes(safetensors_bytes(_state_for_saving(model), metadata))
        _write_json(tmp / SCHEDULER_NAME, settings.to_diffusers_config())
        _write_json(tmp / META_NAME, doc)
    return out_dir


def save_file(
    path: Path | str,
    model: torch.nn.Module,
    settings: SamplerSettings,
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a single ``.safetensors`` file carrying its UNet config, scheduler config and ddimctl metadata as JSON
    in the file's metadata, atomically. Returns ``path``."""
    from .fsutil import refuse_existing, save_safetensors_atomic

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise OutputError(f"{path}: a single-file checkpoint must end in .safetensors")
    refuse_existing(path, overwrite)
    model = _unwrap(model)
    config = dict(model.config)
    metadata = {
        "format": "pt",
        "config": json.dumps(config),
        "scheduler_config": json.dumps(settings.to_diffusers_config()),
        "ddimctl": json.dumps(_ddimctl_meta(config, settings, meta), default=str),
    }
    return save_safetensors_atomic(path, _state_for_saving(model), metadata)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
