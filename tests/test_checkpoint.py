"""ddimctl.checkpoint: every reference form, save/load round trips, diffusers interop, and one-line errors."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ddimctl import checkpoint, families
from ddimctl.checkpoint import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    parse_hub_ref,
    save,
    save_file,
)
from ddimctl.families import resolve
from ddimctl.cli.errors import error_line
from ddimctl.errors import ConfigError, ModelError, OutputError
from ddimctl.settings import SamplerSettings
from ddimctl.nets.unet2d import UNet2DModel

from hubcache import add_snapshot, offline_cache
from tinymodels import DDPM_TIME, TINY_UNET_RGB, unet_out, with_legacy_attention_keys

TINY = {**TINY_UNET_RGB, **DDPM_TIME}

# google/ddpm-cifar10-32's scheduler_config.json as it has existed: legacy keys, then DDPMScheduler.
CIFAR10_LEGACY_SCHEDULER = {
    "_class_name": "GaussianDDPMScheduler", "_diffusers_version": "0.0.4", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "clip_predicted_image": True, "timestep_values": None,
    "timesteps": 1000, "variance_type": "fixed_small",
}
CIFAR10_DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
    "variance_type": "fixed_small",
}


def tiny_model(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel.from_config({**TINY, **overrides}).eval()


@pytest.fixture(scope="module")
def model() -> UNet2DModel:
    return tiny_model()


@pytest.fixture
def saved(tmp_path, model) -> Path:
    settings = SamplerSettings.from_config({"prediction_type": "v_prediction", "timestep_spacing": "trailing"})
    return save(tmp_path / "ckpt", model, settings, {"objective": "v_prediction", "note": "test"})


def outputs(m: torch.nn.Module, size: int = 8, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, size, size, generator=g)
    return unet_out(m, x, torch.tensor([3, 700]))


def one_line_error(ref, *needles, cls=ModelError, fn=None) -> str:
    """Assert that loading ``ref`` fails with a one-line ``cls`` containing every needle; return the message."""
    with pytest.raises(cls) as info:
        (fn or families.load)(ref)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_directory_round_trip_gives_identical_outputs(saved, model):
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "ddimctl.json"]
    )
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]  # no temporary siblings left behind
    ckpt = families.load(saved)
    assert torch.equal(outputs(ckpt.model), outputs(model))
    assert not ckpt.model.training
    assert ckpt.resolved.source == "dir" and ckpt.resolved.revision is None and ckpt.resolved.repo_id is None
    assert ckpt.image_shape == (3, 8, 8)
    assert ckpt.parameters == sum(p.numel() for p in model.parameters())
    assert ckpt.settings.prediction_type == "v_prediction" and ckpt.settings.timestep_spacing == "trailing"
    meta = json.loads((saved / "ddimctl.json").read_text())
    assert meta["note"] == "test" and meta["objective"] == "v_prediction" and meta["data_range"] == [-1, 1]
    assert (meta["image_channels"], meta["image_size"]) == (3, 8) and meta["ddimctl_version"]
    assert ckpt.resolved.meta == meta
    with safetensors.safe_open(saved / "diffusion_pytorch_model.safetensors", "pt") as f:
        header = f.metadata()
    assert header["format"] == "pt" and json.loads(header["ddimctl"])["note"] == "test"
    assert json.loads((saved / "config.json").read_text())["_class_name"] == "UNet2DModel"


def test_single_file_round_trip_carries_configs_in_metadata(tmp_path, model):
    settings = SamplerSettings.from_config(CIFAR10_DDPM_SCHEDULER)
    path = save_file(tmp_path / "m.safetensors", model, settings, {"objective": "epsilon"})
    r = resolve(str(path))
    assert r.source == "file" and r.files == [path] and r.meta["objective"] == "epsilon"
    ckpt = families.load(r)
    assert torch.equal(outputs(ckpt.model), outputs(model))
    assert ckpt.settings == settings
    with pytest.raises(OutputError):
        save_file(path, model, settings)
    save_file(path, tiny_model(seed=5), settings, overwrite=True)
    assert not torch.equal(outputs(families.load(path).model), outputs(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_refuses_to_overwrite_and_swaps_with_overwrite(saved, model):
    settings = SamplerSettings()
    with pytest.raises(OutputError) as info:
        save(saved, model, settings, {})
    assert str(info.value) == f"{saved}: already exists"  # the library's words; the command line adds its flag:
    assert error_line(info.value) == (f"{saved}: already exists (use --overwrite to replace it)", 1)
    other = tiny_model(seed=3)
    save(saved, other, settings, {"v": 2}, overwrite=True)
    assert torch.equal(outputs(families.load(saved).model), outputs(other))
    assert json.loads((saved / "ddimctl.json").read_text())["v"] == 2
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]


def test_failed_save_leaves_the_old_checkpoint_and_no_debris(saved, model, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    one_line_error(saved, "no space left on device", str(saved), cls=OutputError,
                   fn=lambda p: save(p, tiny_model(seed=9), SamplerSettings(), {}, overwrite=True))
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]


def test_load_casts_to_the_requested_dtype(saved, model):
    ckpt = families.load(str(saved), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in ckpt.model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in ckpt.model.parameters())
    ref = outputs(model)
    assert (outputs(ckpt.model.float()) - ref).abs().max() < 0.1 * ref.abs().max()


def test_weights_stored_in_half_precision_are_cast(tmp_path, model):
    out = save(tmp_path / "half", model, SamplerSettings())
    state = safetensors.torch.load_file(out / "diffusion_pytorch_model.safetensors")
    safetensors.torch.save_file({k: v.half() for k, v in state.items()}, out / "diffusion_pytorch_model.safetensors")
    ckpt = families.load(out)
    assert {p.dtype for p in ckpt.model.parameters()} == {torch.float32}
    assert torch.allclose(outputs(ckpt.model), outputs(model), atol=0.05)


def test_pipeline_layout_with_unet_and_scheduler_folders(tmp_path, saved, model):
    root = tmp_path / "pipe"
    (root / "unet").mkdir(parents=True)
    (root / "scheduler").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (root / "unet" / name).write_bytes((saved / name).read_bytes())
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler",
                                                                          "prediction_type": "sample"}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDIMPipeline",
                                                       "unet": ["diffusers", "UNet2DModel"],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    ckpt = families.load(root)
    assert ckpt.resolved.weights == root / "unet" / "diffusion_pytorch_model.safetensors"
    assert ckpt.settings.prediction_type == "sample"
    assert root / "model_index.json" in ckpt.resolved.files
    assert torch.equal(outputs(ckpt.model), outputs(model))


def test_missing_scheduler_config_means_defaults(tmp_path, saved):
    (saved / "scheduler_config.json").unlink()
    ckpt = families.load(saved)
    assert ckpt.resolved.scheduler_config == {} and ckpt.settings == SamplerSettings()


@pytest.mark.parametrize("scheduler", [CIFAR10_LEGACY_SCHEDULER, CIFAR10_DDPM_SCHEDULER], ids=["legacy", "ddpm"])
def test_ddpm_cifar10_scheduler_configs(saved, scheduler):
    (saved / "scheduler_config.json").write_text(json.dumps(scheduler))
    settings = families.load(saved).settings
    assert settings.num_train_timesteps == 1000 and settings.clip_sample is True
    assert settings.prediction_type == "epsilon" and settings.beta_schedule == "linear"


def test_legacy_attention_key_names_load(saved, model):
    weights = saved / "diffusion_pytorch_model.safetensors"
    state = with_legacy_attention_keys(safetensors.torch.load_file(weights))
    assert any(".query." in k for k in state)
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
    assert torch.equal(outputs(families.load(saved).model), outputs(model))


def test_describe_summarizes_without_loading(saved, model):
    doc = resolve(saved).describe()
    json.dumps(doc)  # JSON-able
    weights = saved / "diffusion_pytorch_model.safetensors"
    assert doc["source"] == "dir" and doc["revision"] is None
    assert doc["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert doc["parameters"] == sum(p.numel() for p in model.parameters())
    assert (doc["image_size"], doc["channels"], doc["prediction_type"]) == (8, 3, "v_prediction")
    assert doc["model_config"]["block_out_channels"] == [16, 32]
    assert doc["scheduler"]["timestep_spacing"] == "trailing"
    assert str(weights) in doc["files"]


# ----------------------------------------------------------------------------------------------------------------
# diffusers interop (dev-only dependency)


def test_diffusers_save_pretrained_output_loads(diffusers, tmp_path):
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY.items()}
    ref = diffusers.UNet2DModel(**cfg).eval()
    ref.save_pretrained(tmp_path / "d")  # safetensors by default
    diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False).save_pretrained(tmp_path / "d")
    ckpt = families.load(tmp_path / "d")
    assert ckpt.settings.prediction_type == "v_prediction" and ckpt.settings.clip_sample is False
    torch.testing.assert_close(outputs(ckpt.model), outputs(ref), atol=1e-5, rtol=1e-5)


def test_diffusers_loads_what_ddimctl_saves(diffusers, saved, model):
    theirs = diffusers.UNet2DModel.from_pretrained(saved).eval()
    torch.testing.assert_close(outputs(theirs), outputs(model), atol=1e-5, rtol=1e-5)
    scheduler = diffusers.DDIMScheduler.from_pretrained(saved)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing"


# ----------------------------------------------------------------------------------------------------------------
# Built-in models and reference parsing


def test_builtin_models(tmp_path, monkeypatch, saved):
    assert DEFAULT_MODEL in BUILTIN_MODELS and set(BUILTIN_MODELS) == {"mnist", "mnist-flow", "mnist-cond"}
    monkeypatch.setattr(checkpoint.references, "BUILTIN_ROOT", tmp_path / "models")  # where locate() reads it
    msg = one_line_error("mnist", "mnist", "not installed", fn=resolve)
    assert "reinstall" in msg
    (tmp_path / "models").mkdir()
    saved.rename(tmp_path / "models" / "mnist")
    r = resolve("mnist")
    assert r.source == "builtin" and r.weights.parent == tmp_path / "models" / "mnist"
    # an existing local path wins over the built-in name
    work = tmp_path / "work"
    (work / "mnist").mkdir(parents=True)
    monkeypatch.chdir(work)
    one_line_error("mnist", "no diffusion_pytorch_model.safetensors", fn=resolve)


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("google/ddpm-cifar10-32", ("google/ddpm-cifar10-32", None)),
        ("google/ddpm-cifar10-32@main", ("google/ddpm-cifar10-32", "main")),
        ("hf://owner/name", ("owner/name", None)),
        ("hf://owner/name@" + "a" * 40, ("owner/name", "a" * 40)),
        ("owner/name@refs/pr/1", ("owner/name", "refs/pr/1")),
        ("owner/name.v2", ("owner/name.v2", None)),
        ("hf://owner/model.safetensors", ("owner/model.safetensors", None)),
        ("owner/model.safetensors", None),
        ("owner/model.ckpt", None),
        ("a/b/c", None),
        ("./a/b", None),
        ("/abs/path", None),
        ("~/x", None),
        ("owner/name@", None),
        ("name", None),
    ],
)
def test_parse_hub_ref(ref, expected):
    assert parse_hub_ref(ref) == expected


@pytest.mark.parametrize("ref", ["nonexistent", "missing/dir/x", "./nope/m.safetensors", "owner/model.safetensors",
                                 "hf://not a repo"])
def test_unknown_references(ref):
    msg = one_line_error(ref, ref, fn=resolve)
    assert "no such file" in msg or "not a Hub repo" in msg


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face Hub, against a real cache layout, offline


@pytest.fixture
def hub(tmp_path, monkeypatch, saved):
    cache = offline_cache(monkeypatch, tmp_path / "hf-cache")
    files = {name: saved / name for name in ("config.json", "diffusion_pytorch_model.safetensors",
                                             "scheduler_config.json")}
    rev = add_snapshot(cache, "owner/tiny-ddpm", files)
    return cache, rev


@pytest.mark.parametrize("form", ["{repo}", "{repo}@{rev}", "hf://{repo}", "hf://{repo}@{rev}", "{repo}@main"])
def test_hub_reference_forms_resolve_offline_from_the_cache(hub, model, form):
    cache, rev = hub
    ref = form.format(repo="owner/tiny-ddpm", rev=rev)
    r = resolve(ref)
    assert (r.source, r.repo_id, r.revision, r.ref) == ("hub", "owner/tiny-ddpm", rev, ref)
    assert r.weights.parent == cache / "models--owner--tiny-ddpm" / "snapshots" / rev
    ckpt = families.load(r)
    assert torch.equal(outputs(ckpt.model), outputs(model))
    assert ckpt.settings.prediction_type == "v_prediction"
    assert r.describe()["revision"] == rev


def test_hub_branch_and_pipeline_layout(hub, saved, model):
    cache, _ = hub
    files = {f"unet/{n}": saved / n for n in ("config.json", "diffusion_pytorch_model.safetensors")}
    files["scheduler/scheduler_config.json"] = json.dumps(CIFAR10_LEGACY_SCHEDULER).encode()
    files["model_index.json"] = b'{"_class_name": "DDPMPipeline"}'
    rev = add_snapshot(cache, "owner/pipe", files, ref="v1")
    r = resolve("owner/pipe@v1")
    assert r.revision == rev and r.weights.parent.name == "unet"
    ckpt = families.load(r)
    assert ckpt.settings.num_train_timesteps == 1000 and ckpt.settings.clip_sample
    one_line_error("owner/pipe", "owner/pipe", "HF_HUB_OFFLINE", fn=resolve)  # no refs/main for this repo


def test_hub_offline_and_not_cached_is_one_fast_line(hub):
    start = time.perf_counter()
    msg = one_line_error("google/ddpm-cifar10-32", "google/ddpm-cifar10-32: not in the Hugging Face cache",
                         "HF_HUB_OFFLINE is set", "hf download google/ddpm-cifar10-32", fn=resolve)
    assert time.perf_counter() - start < 5, msg
    one_line_error("hf://google/ddpm-cifar10-32@" + "b" * 40, "--revision " + "b" * 40, fn=resolve)


def test_hub_snapshot_without_safetensors_is_refused(hub):
    cache, _ = hub
    add_snapshot(cache, "owner/pickled", {"config.json": json.dumps(TINY).encode()})
    one_line_error("owner/pickled", "owner/pickled", "no diffusion_pytorch_model.safetensors", "pickle", fn=resolve)


def _http_error(cls, message: str):
    httpx = pytest.importorskip("httpx2")  # the HTTP client of this huggingface_hub
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/x/y"))
    return cls(message, response=response)


@pytest.mark.parametrize(
    "error, needle",
    [
        ("RepositoryNotFoundError", "repository not found"),
        ("RevisionNotFoundError", "revision 'nope' not found"),
        ("HfHubHTTPError", "Hugging Face Hub error (500 Server Error"),
    ],
)
def test_hub_errors_are_one_line_naming_the_ref(monkeypatch, error, needle):
    import huggingface_hub
    from huggingface_hub import utils

    exc = _http_error(getattr(utils, error), "500 Server Error: boom\n\nRequest ID: 123\nmore details")

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    one_line_error("owner/name@nope", "owner/name@nope", needle, fn=resolve)


# ----------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the file


def test_truncated_safetensors(saved, tmp_path, model):
    weights = saved / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    one_line_error(saved, weights, "not a valid safetensors file", "truncated")
    single = save_file(tmp_path / "one.safetensors", model, SamplerSettings())
    single.write_bytes(single.read_bytes()[:5000])
    one_line_error(single, single, "not a valid safetensors file")


def test_png_renamed_to_safetensors(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    path = tmp_path / "photo.safetensors"
    path.write_bytes(buf.getvalue())
    one_line_error(path, path, "not a valid safetensors file", "header too large")


def test_config_json_problems(saved):
    config = saved / "config.json"
    text = config.read_text()
    config.write_text("{not json")
    one_line_error(saved, config, "not JSON")
    config.write_text("[1, 2]")
    one_line_error(saved, config, "expected a JSON object")
    config.write_text(json.dumps({**json.loads(text), "time_embedding_type": "sinusoidal"}))
    one_line_error(saved, config, "time_embedding_type", cls=ConfigError)
    config.write_text(json.dumps({**json.loads(text), "_class_name": "UNet2DConditionModel"}))
    one_line_error(saved, config, "UNet2DConditionModel", cls=ConfigError)
    config.unlink()
    one_line_error(saved, config, "missing")


def test_configs_ddimctl_cannot_sample_with(saved):
    config = saved / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "sample_size": None}))
    one_line_error(saved, config, "sample_size is null")
    config.write_text(json.dumps({**cfg, "out_channels": 5}))  # neither the input's channels nor twice them
    one_line_error(saved, config, "out_channels 5 differs from in_channels 3")
    # 6 = 2 x 3 is a learned-variance model (tests/test_formats.py); these 3-channel weights do not fit it
    config.write_text(json.dumps({**cfg, "out_channels": 6}))
    one_line_error(saved, "conv_out.weight has shape [3, 16, 3, 3] but the config needs [6, 16, 3, 3]")


def test_scheduler_config_problems(saved):
    sched = saved / "scheduler_config.json"
    sched.write_text("nope")
    one_line_error(saved, sched, "not JSON")
    sched.write_text(json.dumps({"prediction_type": "x_start"}))
    one_line_error(saved, sched, "prediction_type", cls=ConfigError)


def test_single_file_without_config(tmp_path, model):
    path = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(dict(model.state_dict()), path)
    one_line_error(path, path, "no model config")
    safetensors.torch.save_file(dict(model.state_dict()), path, metadata={"config": "{oops"})
    one_line_error(path, path, "metadata 'config' is not JSON")
    # a config.json beside a bare weights file is used
    safetensors.torch.save_file(dict(model.state_dict()), path)
    (tmp_path / "config.json").write_text(json.dumps(model.config))
    assert torch.equal(outputs(families.load(path).model), outputs(model))


def test_missing_and_unexpected_keys(saved):
    weights = saved / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    dropped = sorted(k for k in state if k.startswith("up_blocks.0."))
    extra = {"extra.weight": torch.zeros(1), "extra.bias": torch.zeros(1)}
    safetensors.torch.save_file({**{k: v for k, v in state.items() if k not in dropped}, **extra}, weights)
    msg = one_line_error(saved, weights, f"{len(dropped)} missing", "2 unexpected", dropped[0], "extra.bias")
    assert f"({len(dropped) - 3} more)" in msg


def test_shapes_that_disagree_with_the_config(saved):
    weights = saved / "diffusion_pytorch_model.safetensors"
    wide = tiny_model(block_out_channels=[16, 48])
    safetensors.torch.save_file(dict(wide.state_dict()), weights)
    msg = one_line_error(saved, weights, "has shape", "but the config needs")
    key = msg.split(": ")[1].split(" has shape")[0]
    assert tuple(wide.state_dict()[key].shape) != tuple(tiny_model().state_dict()[key].shape)


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".pkl"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    one_line_error(path, path, "refusing to load a pickle checkpoint", "arbitrary code", "safetensors")


def test_directory_with_only_pickle_weights_is_refused(tmp_path, model):
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.config))
    (d / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    one_line_error(d, d / "diffusion_pytorch_model.bin", "refusing to load a pickle checkpoint")


def test_directory_without_weights(tmp_path):
    one_line_error(tmp_path, tmp_path, "no diffusion_pytorch_model.safetensors")


def test_non_model_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    one_line_error(path, path, "not a model checkpoint")


def test_save_unwraps_a_compiled_model(tmp_path, model):
    class Compiled(torch.nn.Module):  # what torch.compile returns: the model as _orig_mod, keys prefixed
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    compiled = Compiled(model)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    out = save(tmp_path / "c", compiled, SamplerSettings())
    assert torch.equal(outputs(families.load(out).model), outputs(model))
