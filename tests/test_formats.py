"""diffusers formats beyond a plain pixel UNet folder: pipelines (model_index.json) and the components ddimctl runs
or refuses, latent pipelines with their autoencoder (and pairing one from elsewhere), the VQ scaling policy,
learned-variance and class-conditional UNets, sharded and variant weights on disk and on the Hub.

Every model is built here with diffusers and random weights and saved with ``save_pretrained``; nothing is
downloaded (Hub tests use a hand-built offline cache, or a fake online Hub serving local folders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ddimctl import families
from ddimctl.nets.autoencoders import VQModel as OurVQModel
from ddimctl.checkpoint import resolve_autoencoder
from ddimctl.families import Resolved, resolve
from ddimctl.errors import ConfigError, ModelError

from hubcache import add_snapshot, fake_hub, fetched, folder_files, offline_cache
from tinymodels import TINY_UNET_RGB, VQ, max_diff, unet_out, with_legacy_attention_keys
from tinymodels import randomize as _randomize
from tinymodels import tiny_kl as _kl
from tinymodels import tiny_vq as _vq

UNET = {**TINY_UNET_RGB, "sample_size": 4}  # its samples: 3x4x4 latents
RUNS = "ddimctl runs UNet2DModel pipelines: unet + scheduler, optionally with a vqvae/vae autoencoder"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _unet(diffusers, seed: int = 0, **overrides):
    return _randomize(diffusers.UNet2DModel(**{**UNET, **overrides}), seed)


def _one_line(fn, cls=ModelError) -> str:
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
T = torch.tensor([10, 600])


# ----------------------------------------------------------------------------------------------------------------
# Latent diffusion: LDMPipeline


@pytest.fixture(scope="module")
def ldm(diffusers, tmp_path_factory):
    """A small LDMPipeline (VQModel f=2 with 3 latent channels, UNet on 3x4x4 latents), saved by diffusers."""
    root = tmp_path_factory.mktemp("ldm") / "pipe"
    pipe = diffusers.LDMPipeline(vqvae=_vq(diffusers), unet=_unet(diffusers),
                                 scheduler=diffusers.DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear",
                                                                   beta_start=0.0015, beta_end=0.0195))
    pipe.save_pretrained(root)
    return root, pipe


def test_latent_pipeline_is_refused_to_a_pixel_only_caller(ldm):
    root, _ = ldm
    msg = _one_line(lambda: families.load(root))
    assert msg == (
        f"{root}: a latent-diffusion model (its UNet makes 3x4x4 latents that the VQModel in "
        f"{root}/vqvae/config.json decodes to 3x8x8 images); this caller handles pixel models only (load with "
        "autoencoder=True to get both)"
    )


def test_latent_pipeline_loads_unet_and_autoencoder_like_diffusers(ldm):
    root, pipe = ldm
    ckpt = families.load(root, autoencoder=True)
    assert isinstance(ckpt.autoencoder, OurVQModel) and not ckpt.autoencoder.training
    assert ckpt.sample_shape == ckpt.latent_shape == (3, 4, 4)
    assert ckpt.image_shape == (3, 8, 8)
    assert ckpt.resolved.autoencoder.weights.files == (root / "vqvae" / "diffusion_pytorch_model.safetensors",)
    assert ckpt.settings.clip_sample is False and ckpt.settings.beta_schedule == "scaled_linear"
    assert max_diff(unet_out(ckpt.model, X, T), unet_out(pipe.unet, X, T)) <= 1e-5
    # decode: what LDMPipeline hands the image processor, vqvae.decode(latents / scaling_factor) (quantised)
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        theirs = pipe.vqvae.decode(latents / pipe.vqvae.config.scaling_factor).sample
        ours = ckpt.autoencoder.decode(latents)
    assert ours.shape == (2, 3, 8, 8) and max_diff(ours, theirs) <= 1e-5
    # a re-saved VQModel config says diffusers' default 0.18215: kept, with a note
    assert ckpt.autoencoder.config["scaling_factor"] == 0.18215
    assert ckpt.notes == [
        f"{root}/vqvae/config.json: scaling_factor 0.18215 is diffusers' default, which save_pretrained writes into "
        "every VQModel config; CompVis' LDM VQ models use 1.0 (diffusers issue #6725): set "
        "autoencoder_scaling_factor 1.0 if this is one"
    ]


def test_latent_pipeline_unet_alone_on_request(ldm):
    root, pipe = ldm
    ckpt = families.load(root, autoencoder=False)
    assert ckpt.autoencoder is None and ckpt.latent_shape is None
    assert ckpt.sample_shape == ckpt.image_shape == (3, 4, 4)
    assert ckpt.notes == [f"{root}: autoencoder not loaded: the model's samples are 3x4x4 latents"]


def test_a_pipelines_unet_folder_or_file_is_read_with_its_pipeline(ldm):
    """ldm/unet alone would be a pixel model of 3x4x4 "images": it is read as part of its pipeline instead."""
    root, pipe = ldm
    for part in (root / "unet", root / "unet" / "diffusion_pytorch_model.safetensors"):
        assert "a latent-diffusion model" in _one_line(lambda: families.load(part))
        ckpt = families.load(part, autoencoder=True)
        assert ckpt.image_shape == (3, 8, 8) and ckpt.settings.beta_schedule == "scaled_linear"
        assert ckpt.notes[0] == f"{part}: read as part of the pipeline {root} (its scheduler and components)"
        assert max_diff(unet_out(ckpt.model, X, T), unet_out(pipe.unet, X, T)) <= 1e-5


def test_describe_reports_pipeline_components_and_autoencoder(ldm):
    root, _ = ldm
    doc = resolve(root).describe()
    json.dumps(doc)
    assert doc["pipeline"] == {"class": "LDMPipeline", "components": {
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"],
        "vqvae": ["diffusers", "VQModel"]}}
    assert (doc["image_size"], doc["channels"], doc["latent_shape"]) == (8, 3, [3, 4, 4])
    ae = doc["autoencoder"]
    assert (ae["class"], ae["scaling_factor"], ae["downscale_factor"], ae["latent_channels"]) == ("VQModel", 0.18215,
                                                                                                  2, 3)
    assert ae["parameters"] == sum(p.numel() for p in OurVQModel(VQ).parameters())
    assert len(doc["notes"]) == 1 and "scaling_factor 0.18215" in doc["notes"][0]
    assert str(root / "vqvae" / "diffusion_pytorch_model.safetensors") in doc["files"]
    assert doc["shards"] is None and doc["variant"] is None


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_latent_pipeline_end_to_end_through_the_cli_matches_diffusers(ldm, tmp_path):
    """sample writes decoded 8x8 images (not the 4x4 latents) and x_T files of the latent's shape; the images are
    what diffusers' LDM loop (DDIMScheduler steps on the UNet, then vqvae.decode(latents / scaling_factor)) makes
    from the same x_T; reconstruct reports the autoencoder's own round trip; info shows both parts."""
    import numpy as np
    from PIL import Image

    from ddimctl.latents import load_latents

    root, pipe = ldm
    out = tmp_path / "s"
    r = _cli("sample", "--model", root, "--n", 2, "--steps", 4, "--seed", 3, "--save-latents", "--out", out,
             "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    pngs = sorted(p for p in map(Path, doc["outputs"]) if p.suffix == ".png")
    lats = sorted(p for p in map(Path, doc["outputs"]) if p.suffix == ".safetensors")
    assert len(pngs) == len(lats) == 2
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    for png, lat in zip(pngs, lats):
        x_T, _ = load_latents(lat)
        assert tuple(x_T.shape) == (1, 3, 4, 4)
        latents = x_T.double()
        unet, vq = pipe.unet.double(), pipe.vqvae.double()
        with torch.no_grad():
            for t in sched.timesteps:
                latents = sched.step(unet(latents, t).sample, t, latents, eta=0.0).prev_sample
            theirs = vq.decode(latents / vq.config.scaling_factor).sample
        theirs = ((theirs[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
        ours = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
        assert ours.shape == (8, 8, 3)
        assert np.abs(ours - theirs).max() <= 1  # 8-bit rounding of float32 vs float64 near a level boundary
    pipe.unet.float(), pipe.vqvae.float()

    r = _cli("reconstruct", pngs[0], "--model", root, "--steps", 4, "--out", tmp_path / "r", "--device", "cpu",
             "--json")
    assert r.returncode == 0, r.stderr
    (record,) = json.loads(r.stdout)["images"]
    assert record["autoencoder_mse"] >= 0 and record["mse"] >= 0
    r = _cli("info", root, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["latent_shape"] == [3, 4, 4] and doc["autoencoder"]["class"] == "VQModel"
    r = _cli("info", root, "--autoencoder-scaling-factor", 1.0, "--json")
    assert json.loads(r.stdout)["autoencoder"]["scaling_factor"] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# The VQ scaling policy (CompVis/ldm-celebahq-256's vqvae/config.json has no scaling_factor)


@pytest.fixture
def ldm_without_scaling(ldm, tmp_path):
    root = tmp_path / "celebahq-like"
    shutil.copytree(ldm[0], root)
    config = root / "vqvae" / "config.json"
    cfg = json.loads(config.read_text())
    del cfg["scaling_factor"]
    config.write_text(json.dumps(cfg))
    return root


def test_vq_config_without_scaling_factor_decodes_at_scale_one(ldm, ldm_without_scaling):
    root = ldm_without_scaling
    _, pipe = ldm
    ckpt = families.load(root, autoencoder=True)
    assert ckpt.autoencoder.config["scaling_factor"] == 1.0
    assert ckpt.notes == [
        f"{root}/vqvae/config.json: no scaling_factor; ddimctl uses 1.0, the scale LDM's VQ models were trained "
        "with, not diffusers' default 0.18215 (which decodes them wrongly: diffusers issue #6725); set "
        "autoencoder_scaling_factor to override"
    ]
    latents = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = ckpt.autoencoder.decode(latents)
        at_one = pipe.vqvae.decode(latents).sample  # the latents as LDM's own decode_first_stage takes them
        diffusers_ldm = pipe.vqvae.decode(latents / 0.18215).sample  # diffusers' LDMPipeline on this config
    assert max_diff(ours, at_one) <= 1e-5
    assert max_diff(ours, diffusers_ldm) > 1e-2  # a thousand times the tolerance above
    assert resolve(root).describe()["autoencoder"]["scaling_factor"] == 1.0


def test_scaling_factor_override(ldm_without_scaling):
    root = ldm_without_scaling
    ckpt = families.load(root, autoencoder=True, autoencoder_scaling_factor=0.5)
    assert ckpt.autoencoder.config["scaling_factor"] == 0.5
    assert ckpt.notes == [f"{root}/vqvae/config.json: scaling_factor 0.5 as given (the config says none (default "
                          "0.18215))"]
    r = resolve(root)
    again = families.load(r, autoencoder=True, autoencoder_scaling_factor=0.25)  # on a Resolved too
    assert again.autoencoder.config["scaling_factor"] == 0.25 and len(again.notes) == 1
    assert r.autoencoder.scaling_factor == 1.0  # the Resolved given is not changed
    for bad in (0, -1.0, True):
        msg = _one_line(lambda: families.load(root, autoencoder=True, autoencoder_scaling_factor=bad), ConfigError)
        assert msg == f"autoencoder scaling_factor {bad!r}: expected a positive number"


def test_scaling_factor_without_an_autoencoder_is_refused(latent_unet):
    root = latent_unet[0] / "unet4"
    msg = _one_line(lambda: resolve(root, autoencoder_scaling_factor=2.0))
    assert msg == f"{root}: autoencoder scaling_factor given, but this model has no autoencoder"


def test_kl_config_without_scaling_factor_keeps_diffusers_default_with_a_note(diffusers, tmp_path):
    vae = _kl(diffusers)
    vae.save_pretrained(tmp_path / "vae")
    config = tmp_path / "vae" / "config.json"
    cfg = json.loads(config.read_text())
    del cfg["scaling_factor"]
    config.write_text(json.dumps(cfg))
    ae = resolve_autoencoder(tmp_path / "vae")
    assert ae.scaling_factor == 0.18215 and ae.class_name == "AutoencoderKL" and ae.latent_channels == 4
    assert ae.notes == [f"{config}: no scaling_factor; diffusers' default 0.18215 (Stable Diffusion's VAE) applies; "
                        "set autoencoder_scaling_factor to override"]


# ----------------------------------------------------------------------------------------------------------------
# Pairing a UNet with an autoencoder from elsewhere


@pytest.fixture(scope="module")
def latent_unet(diffusers, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    unet = _unet(diffusers, seed=3, in_channels=4, out_channels=4)
    unet.save_pretrained(root / "unet4")
    vae = _kl(diffusers)
    vae.save_pretrained(root / "kl")
    return root, unet, vae


def test_pair_with_an_autoencoder_folder(latent_unet):
    root, unet, vae = latent_unet
    bare = families.load(root / "unet4")  # a UNet alone: nothing says it is latent
    assert bare.autoencoder is None and bare.image_shape == (4, 4, 4)
    ckpt = families.load(root / "unet4", autoencoder=root / "kl")
    assert ckpt.sample_shape == (4, 4, 4) and ckpt.image_shape == (3, 8, 8)
    assert ckpt.resolved.autoencoder.source == "dir" and ckpt.resolved.autoencoder.ref == str(root / "kl")
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample
        assert max_diff(ckpt.autoencoder.decode(latents), expected) <= 1e-5
    assert resolve(root / "unet4", autoencoder=root / "kl").describe()["autoencoder"]["class"] == "AutoencoderKL"


def test_pair_with_a_pipeline_folder_or_a_single_file(ldm, diffusers, tmp_path):
    root, pipe = ldm
    unet = tmp_path / "u"
    _unet(diffusers, seed=4).save_pretrained(unet)
    ckpt = families.load(unet, autoencoder=root)  # a pipeline folder: its vqvae/
    assert ckpt.resolved.autoencoder.config_source == str(root / "vqvae" / "config.json")
    assert ckpt.image_shape == (3, 8, 8)
    # a single .safetensors file carrying its config in the metadata
    state = safetensors.torch.load_file(root / "vqvae" / "diffusion_pytorch_model.safetensors")
    single = tmp_path / "vq.safetensors"
    config = json.loads((root / "vqvae" / "config.json").read_text())
    safetensors.torch.save_file(state, single, metadata={"format": "pt", "config": json.dumps(config)})
    from_file = families.load(unet, autoencoder=single)
    latents = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(from_file.autoencoder.decode(latents), ckpt.autoencoder.decode(latents))


def test_pairing_replaces_a_pipelines_own_autoencoder(ldm, diffusers, tmp_path):
    root, _ = ldm
    other = tmp_path / "other-vq"
    _vq(diffusers, seed=9).save_pretrained(other)
    ckpt = families.load(root, autoencoder=other)
    assert ckpt.resolved.autoencoder.config_source == str(other / "config.json")
    assert ckpt.notes[-1] == (f"{root}: the autoencoder from {other} replaces the pipeline's own "
                              f"({root}/vqvae/config.json)")
    assert sum("0.18215" in n for n in ckpt.notes) == 1  # the replaced one's note is gone, the new one's kept


def test_pairing_checks_that_the_latents_fit(latent_unet, ldm):
    root, _, _ = latent_unet
    msg = _one_line(lambda: families.load(root / "unet4", autoencoder=ldm[0]))
    assert msg == (f"{root}/unet4/config.json: in_channels 4, but the autoencoder ({ldm[0]}/vqvae/config.json) makes "
                   "latents with 3 channels: they do not belong together")
    msg = _one_line(lambda: families.load(root / "unet4", autoencoder=root / "unet4"), ConfigError)
    assert msg == (f"{root}/unet4/config.json: a UNet2DModel, not an autoencoder (supported: AutoencoderKL, VQModel)")
    assert _one_line(lambda: families.load(root / "unet4", autoencoder="mnist")) == (
        "mnist: a built-in diffusion model, not an autoencoder")


def test_pair_with_a_hub_autoencoder(latent_unet, tmp_path, monkeypatch):
    root, _, vae = latent_unet
    cache = offline_cache(monkeypatch, tmp_path / "hf")
    rev = add_snapshot(cache, "owner/vae", folder_files(root / "kl"))
    ckpt = families.load(root / "unet4", autoencoder="owner/vae")
    ae = ckpt.resolved.autoencoder
    assert (ae.source, ae.repo_id, ae.revision) == ("hub", "owner/vae", rev)
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert max_diff(ckpt.autoencoder.decode(latents), vae.decode(latents / 0.18215).sample) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Pipelines and components ddimctl refuses


@pytest.fixture(scope="module")
def dit(diffusers, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit") / "pipe"
    transformer = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                  out_channels=8, num_layers=1, sample_size=4, patch_size=2,
                                                  num_embeds_ada_norm=10)
    diffusers.DiTPipeline(transformer=transformer, vae=_kl(diffusers), scheduler=diffusers.DDIMScheduler()
                          ).save_pretrained(root)
    return root


def test_dit_pipeline_is_refused_naming_the_transformer(dit, tmp_path):
    expected = (f"{dit}/model_index.json: DiTPipeline's denoiser is a transformer (transformer: diffusers "
                f"DiTTransformer2DModel, DiT-style), not a UNet2DModel; {RUNS}")
    assert _one_line(lambda: families.load(dit), ConfigError) == expected
    assert _one_line(lambda: resolve(dit), ConfigError) == expected
    # without model_index.json: transformer/ says it (this used to read "no ... safetensors here or in unet/")
    bare = tmp_path / "bare"
    shutil.copytree(dit, bare)
    (bare / "model_index.json").unlink()
    assert _one_line(lambda: resolve(bare), ConfigError) == (
        f"{bare}: transformer/ holds a transformer (DiT-style) denoiser, not a UNet2DModel; {RUNS}")
    # the transformer folder itself
    assert _one_line(lambda: resolve(bare / "transformer"), ConfigError) == (
        f"{bare}/transformer/config.json: unsupported _class_name 'DiTTransformer2DModel' (a transformer (DiT-style) "
        "denoiser; ddimctl runs UNet2DModel checkpoints)")


def test_dit_on_the_hub_is_refused_without_downloading_weights(dit, tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch, tmp_path, {"facebook/dit-like": dit})
    msg = _one_line(lambda: resolve("facebook/dit-like"), ConfigError)
    assert "DiTPipeline's denoiser is a transformer" in msg and "pickle" not in msg
    assert len(calls["facebook/dit-like"]) == 1
    assert not [f for f in fetched(tmp_path, "facebook/dit-like") if f.endswith(".safetensors")]


def _pipeline_dir(tmp_path: Path, index: dict, unet_dir: Path | None = None) -> Path:
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    if unet_dir is not None:
        shutil.copytree(unet_dir, root / "unet")
    return root


@pytest.mark.parametrize(
    "components, message",
    [
        ({"unet": ["diffusers", "UNet2DConditionModel"]},
         "component unet is diffusers UNet2DConditionModel (a text/image-conditioned UNet with cross-attention); "
         + RUNS),
        ({"unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "AutoencoderTiny"]},
         "unsupported autoencoder class 'AutoencoderTiny' (TAESD, a different architecture; supported: "
         "AutoencoderKL, VQModel)"),
        ({"unet": ["diffusers", "UNet2DModel"], "vae": ["diffusers", "AutoencoderKL"],
          "vqvae": ["diffusers", "VQModel"]},
         "both vqvae and vae components: cannot tell which decodes the latents"),
        ({"unet": ["diffusers", "UNet2DModel"], "movq": ["diffusers", "VQModel"]},
         "component movq (diffusers VQModel) is not one ddimctl uses; " + RUNS),
        ({"unet": ["diffusers", "UNet2DModel"], "bert": ["diffusers", "LDMBertModel"],
          "tokenizer": ["transformers", "BertTokenizer"]},
         "this pipeline is conditioned on text or images (component bert: diffusers LDMBertModel); " + RUNS
         + ", unconditional or class-conditional"),
    ],
)
def test_components_ddimctl_cannot_use(tmp_path, latent_unet, components, message):
    root = _pipeline_dir(tmp_path, {**components, "scheduler": ["diffusers", "DDIMScheduler"]},
                         latent_unet[0] / "unet4")
    msg = _one_line(lambda: resolve(root), ConfigError)
    assert msg.startswith(f"{root}/model_index.json") and msg.endswith(message), msg


def test_super_resolution_pipeline_is_refused(tmp_path, latent_unet):
    root = _pipeline_dir(tmp_path, {"_class_name": "LDMSuperResolutionPipeline", "unet": ["diffusers", "UNet2DModel"],
                                    "vqvae": ["diffusers", "VQModel"]}, latent_unet[0] / "unet4")
    assert _one_line(lambda: resolve(root), ConfigError) == (
        f"{root}/model_index.json: LDMSuperResolutionPipeline is image-conditioned (super-resolution: the UNet takes "
        f"the low-resolution image); {RUNS}")


def test_scheduler_class_from_model_index_is_checked(tmp_path, latent_unet):
    """model_index.json names the scheduler class when scheduler_config.json does not."""
    root = _pipeline_dir(tmp_path, {"_class_name": "ScoreSdeVePipeline", "unet": ["diffusers", "UNet2DModel"],
                                    "scheduler": ["diffusers", "ScoreSdeVeScheduler"]}, latent_unet[0] / "unet4")
    msg = _one_line(lambda: resolve(root), ConfigError)
    assert "unsupported scheduler class 'ScoreSdeVeScheduler' (variance-exploding" in msg
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 2000}))
    assert "unsupported scheduler class 'ScoreSdeVeScheduler'" in _one_line(lambda: resolve(root), ConfigError)


def test_null_components_and_pipeline_arguments_are_ignored(tmp_path, latent_unet):
    root = _pipeline_dir(tmp_path, {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                    "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
                                    "requires_safety_checker": False, "id2label": {"0": "tench"}},
                         latent_unet[0] / "unet4")
    r = resolve(root)
    assert r.index.class_name == "DDPMPipeline" and set(r.index.components) == {"unet", "scheduler"}
    assert r.autoencoder is None and r.notes == []


# ----------------------------------------------------------------------------------------------------------------
# UNet variants: learned variance, class conditioning


def test_learned_variance_unet_loads_and_uses_the_prediction_half(diffusers, tmp_path):
    ref = _unet(diffusers, seed=11, out_channels=6, resnet_time_scale_shift="scale_shift")
    ref.save_pretrained(tmp_path / "iddpm")
    diffusers.DDPMScheduler(variance_type="learned_range", beta_schedule="squaredcos_cap_v2").save_pretrained(
        tmp_path / "iddpm")
    ckpt = families.load(tmp_path / "iddpm")
    assert ckpt.image_shape == (3, 4, 4)
    full = unet_out(ckpt.model, X, T)
    assert full.shape == (2, 6, 4, 4) and max_diff(full, unet_out(ref, X, T)) <= 1e-5
    pred = unet_out(ckpt.network, X, T)
    assert pred.shape == X.shape and torch.equal(pred, full[:, :3])
    assert ckpt.notes == [  # the UNet's note; the scheduler's variance_type note says the same, so it is dropped
        f"{tmp_path}/iddpm/config.json: out_channels 6 = 2 x in_channels (learned variance): ddimctl uses the first "
        "3 channels, the epsilon prediction; the variance channels are not used (exact at eta 0; at eta > 0 DDIM's "
        "sigma_t(eta) replaces them)"
    ]
    doc = resolve(tmp_path / "iddpm").describe()
    assert (doc["learned_variance"], doc["prediction_channels"], doc["channels"]) == (True, 3, 3)


def test_class_conditional_unet_records_its_classes(diffusers, tmp_path):
    ref = _unet(diffusers, seed=12, num_class_embeds=10)
    ref.save_pretrained(tmp_path / "cls")
    ckpt = families.load(tmp_path / "cls")
    assert ckpt.conditioner.kind == "class" and ckpt.conditioner.num_classes == 10 and ckpt.conditioner.null_label is None
    labels = torch.tensor([3, 7])
    assert max_diff(unet_out(ckpt.model, X, T, class_labels=labels), unet_out(ref, X, T, class_labels=labels)) <= 1e-5
    assert ckpt.notes == [f"{tmp_path}/cls/config.json: class-conditional (class ids 0..9): samples are "
                          "conditioned on a class label"]
    assert resolve(tmp_path / "cls").describe()["num_class_embeds"] == 10
    _unet(diffusers, seed=13, class_embed_type="timestep").save_pretrained(tmp_path / "cts")
    timestep = families.load(tmp_path / "cts")
    assert timestep.conditioner.refusal.fields == [("class_embed_type", "timestep")]
    assert timestep.notes == [f"{tmp_path}/cts/config.json: class-conditional (class_embed_type 'timestep'): "
                              "samples are conditioned on a class label"]


# ----------------------------------------------------------------------------------------------------------------
# Sharded checkpoints and variants


@pytest.fixture(scope="module")
def saves(diffusers, tmp_path_factory):
    """One UNet saved every way save_pretrained can: sharded, fp16 variant (weights in float16), both."""
    root = tmp_path_factory.mktemp("saves")
    ref = _unet(diffusers, seed=21)
    ref.save_pretrained(root / "sharded", max_shard_size="60KB")
    half = _unet(diffusers, seed=21).half()
    half.save_pretrained(root / "fp16", variant="fp16")
    half.save_pretrained(root / "fp16-sharded", variant="fp16", max_shard_size="60KB")
    ref.save_pretrained(root / "both")
    half.save_pretrained(root / "both", variant="fp16")
    return root, ref


def test_sharded_checkpoint_loads(saves):
    root, ref = saves
    d = root / "sharded"
    shards = sorted(d.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 2
    ckpt = families.load(d)
    assert ckpt.resolved.weight_files == shards
    assert ckpt.resolved.weights_index == d / "diffusion_pytorch_model.safetensors.index.json"
    assert max_diff(unet_out(ckpt.model, X, T), unet_out(ref, X, T)) <= 1e-5
    assert ckpt.network is ckpt.model
    doc = resolve(d).describe()
    assert doc["weights"] == str(d / "diffusion_pytorch_model.safetensors.index.json") and doc["weights_sha256"] is None
    assert [s["file"] for s in doc["shards"]] == [str(p) for p in shards]
    assert doc["parameters"] == sum(p.numel() for p in ref.parameters())


def test_variant_only_folder_says_so_and_loads_when_asked(saves):
    root, ref = saves
    d = root / "fp16"
    assert _one_line(lambda: families.load(d)) == (
        f"{d}: no diffusion_pytorch_model.safetensors, only the 'fp16' variant of the weights "
        "(diffusion_pytorch_model.fp16.safetensors); load it with variant 'fp16'")
    ckpt = families.load(d, variant="fp16")
    assert ckpt.resolved.weights == d / "diffusion_pytorch_model.fp16.safetensors"
    assert ckpt.resolved.variant == "fp16" and {p.dtype for p in ckpt.model.parameters()} == {torch.float32}
    assert max_diff(unet_out(ckpt.model, X, T), unet_out(ref, X, T)) < 0.05
    assert resolve(d, variant="fp16").describe()["variant"] == "fp16"


def test_sharded_variant(saves):
    root, ref = saves
    d = root / "fp16-sharded"
    assert "only the 'fp16' variant" in _one_line(lambda: resolve(d))
    r = resolve(d, variant="fp16")
    assert r.weights_index == d / "diffusion_pytorch_model.safetensors.index.fp16.json" and len(r.weight_files) > 2
    assert all(p.name.startswith("diffusion_pytorch_model.fp16-") for p in r.weight_files)
    assert max_diff(unet_out(families.load(r).model, X, T), unet_out(ref, X, T)) < 0.05


def test_default_and_variant_side_by_side(saves):
    root, _ = saves
    d = root / "both"
    assert families.resolve(d).weights.name == "diffusion_pytorch_model.safetensors"
    assert families.resolve(d, variant="fp16").weights.name == "diffusion_pytorch_model.fp16.safetensors"
    assert _one_line(lambda: resolve(d, variant="bf16")) == (
        f"{d}: no 'bf16' variant of the weights (diffusion_pytorch_model.bf16.safetensors or "
        "diffusion_pytorch_model.safetensors.index.bf16.json); the default weights are "
        "diffusion_pytorch_model.safetensors: load without a variant; variants here: fp16")
    assert _one_line(lambda: resolve(d, variant="../x")) == (
        "variant '../x': not a variant name (letters, digits, '_' and '-', e.g. fp16)")
    r = resolve(d)
    assert _one_line(lambda: families.load(r, variant="fp16")) == (
        f"{d}: already resolved with variant None, not 'fp16'")


def test_broken_shard_indexes_are_one_line(saves, tmp_path):
    root, _ = saves
    d = tmp_path / "s"
    shutil.copytree(root / "sharded", d)
    index = d / "diffusion_pytorch_model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shards = sorted(set(doc["weight_map"].values()))
    (d / shards[1]).rename(d / "moved.safetensors")
    assert _one_line(lambda: resolve(d)) == f"{index}: shard {shards[1]} is missing"
    (d / "moved.safetensors").rename(d / shards[1])
    key = next(k for k, v in doc["weight_map"].items() if v == shards[0])
    for bad, message in [
        ({**doc["weight_map"], key: "../" + shards[0]}, f"shard name '../{shards[0]}' is not a plain file name"),
        ({**doc["weight_map"], key: "x.bin"}, "refusing to load a pickle checkpoint"),
        ({**doc["weight_map"], key: shards[1]}, f"holds tensor {key}, which {index.name} lists in {shards[1]}"),
        ({**doc["weight_map"], "extra.weight": shards[0]}, "lists 1 tensors no shard holds (extra.weight)"),
    ]:
        index.write_text(json.dumps({**doc, "weight_map": bad}))
        msg = _one_line(lambda: families.load(d))
        assert message in msg, msg
    index.write_text("{}")
    assert _one_line(lambda: resolve(d)) == f"{index}: not a shard index (no 'weight_map' object)"
    # one shard passed as a file
    assert _one_line(lambda: resolve(d / shards[0])) == (
        f"{d / shards[0]}: one shard of a sharded checkpoint; pass its folder ({d})")


def test_pipeline_variant_falls_back_for_the_autoencoder_with_a_note(ldm, tmp_path, diffusers):
    root = tmp_path / "ldm16"
    shutil.copytree(ldm[0], root)
    unet = root / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    ckpt = families.load(root, variant="fp16", autoencoder=True)
    assert ckpt.resolved.weights.name == "diffusion_pytorch_model.fp16.safetensors"
    assert ckpt.resolved.autoencoder.weights.files[0].name == "diffusion_pytorch_model.safetensors"
    assert f"{root}/vqvae: no 'fp16' variant of the autoencoder; loaded its default weights" in ckpt.notes
    assert _one_line(lambda: resolve(root)) == (
        f"{root}/unet: no diffusion_pytorch_model.safetensors, only the 'fp16' variant of the weights "
        "(diffusion_pytorch_model.fp16.safetensors); load it with variant 'fp16'")


def test_sharded_and_variant_weights_from_the_offline_hub_cache(saves, tmp_path, monkeypatch):
    root, ref = saves
    cache = offline_cache(monkeypatch, tmp_path / "hf")
    rev = add_snapshot(cache, "owner/sharded", folder_files(root / "sharded"))
    r = resolve("owner/sharded")
    assert r.revision == rev and r.weights_index.name == "diffusion_pytorch_model.safetensors.index.json"
    assert max_diff(unet_out(families.load(r).model, X, T), unet_out(ref, X, T)) <= 1e-5
    files = {f"unet/{k}": v for k, v in folder_files(root / "fp16-sharded").items()}
    files["model_index.json"] = json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                            "scheduler": ["diffusers", "DDPMScheduler"]}).encode()
    add_snapshot(cache, "owner/fp16", files)
    assert "only the 'fp16' variant" in _one_line(lambda: resolve("owner/fp16"))
    r16 = resolve("owner/fp16", variant="fp16")
    assert r16.variant == "fp16" and len(r16.weight_files) > 2
    assert max_diff(unet_out(families.load(r16).model, X, T), unet_out(ref, X, T)) < 0.05
    add_snapshot(cache, "owner/single16", folder_files(root / "fp16"))
    assert "only the 'fp16' variant" in _one_line(lambda: resolve("owner/single16"))  # seen in the cached snapshot
    assert resolve("owner/single16", variant="fp16").weights.name == "diffusion_pytorch_model.fp16.safetensors"


def test_hub_fetches_only_the_weights_asked_for(saves, tmp_path, monkeypatch):
    """Online, the configs come first; then only the requested variant's shards (never the other variant's)."""
    root, ref = saves
    both = tmp_path / "repo"
    shutil.copytree(root / "sharded", both / "unet")
    for p in (root / "fp16-sharded").iterdir():
        if p.name != "config.json":
            shutil.copyfile(p, both / "unet" / p.name)
    (both / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                       "unet": ["diffusers", "UNet2DModel"]}))
    calls = fake_hub(monkeypatch, tmp_path, {"owner/both": both})
    r = resolve("owner/both", variant="fp16")
    got = fetched(tmp_path, "owner/both")
    weights = [f for f in got if f.endswith(".safetensors")]
    assert weights and all(f.startswith("unet/diffusion_pytorch_model.fp16-") for f in weights)
    assert sorted(weights) == sorted(f"unet/{p.name}" for p in r.weight_files)
    assert len(calls["owner/both"]) == 2 and "model_index.json" in calls["owner/both"][0]
    # the default weights, asked for after: the default shards come, still none of a third kind
    r32 = resolve("owner/both")
    assert all(p.exists() for p in r32.weight_files)
    assert max_diff(unet_out(families.load(r32).model, X, T), unet_out(ref, X, T)) <= 1e-5


def test_hub_variant_only_repo_says_so_without_downloading_it(saves, tmp_path, monkeypatch):
    root, _ = saves
    fake_hub(monkeypatch, tmp_path, {"owner/single16": root / "fp16"})
    msg = _one_line(lambda: resolve("owner/single16"))
    assert msg.startswith("owner/single16@") and msg.endswith(
        ": no diffusion_pytorch_model.safetensors, only the 'fp16' variant of the weights "
        "(diffusion_pytorch_model.fp16.safetensors); load it with variant 'fp16'")
    assert fetched(tmp_path, "owner/single16") == ["config.json"]


def test_hub_latent_pipeline_fetches_unet_and_autoencoder(ldm, tmp_path, monkeypatch):
    root, pipe = ldm
    calls = fake_hub(monkeypatch, tmp_path, {"CompVis/ldm-like": root})
    ckpt = families.load("CompVis/ldm-like", autoencoder=True)
    assert ckpt.resolved.autoencoder.repo_id == "CompVis/ldm-like"
    assert sorted(f for f in fetched(tmp_path, "CompVis/ldm-like") if f.endswith(".safetensors")) == [
        "unet/diffusion_pytorch_model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"]
    latents = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert max_diff(ckpt.autoencoder.decode(latents), pipe.vqvae.decode(latents / 0.18215).sample) <= 1e-5
    assert len(calls["CompVis/ldm-like"]) == 2


def test_resolved_keeps_its_old_positional_form(tmp_path, saves):
    """Code that built a Resolved by position (ref, source, weights, configs) still works."""
    root, _ = saves
    d = root / "both"
    r = Resolved("x", "dir", d / "diffusion_pytorch_model.safetensors", resolve(d).model_config, {})
    assert r.weight_files == [r.weights] and r.autoencoder is None and r.notes == []
    assert families.load(r).parameters > 0


def test_autoencoder_with_legacy_attention_key_names_loads(ldm, tmp_path):
    """A vqvae saved before diffusers 0.14 names its mid-block attention query/key/value/proj_attn."""
    root, pipe = ldm
    copy = tmp_path / "old"
    shutil.copytree(root, copy)
    weights = copy / "vqvae" / "diffusion_pytorch_model.safetensors"
    state = with_legacy_attention_keys(safetensors.torch.load_file(weights))
    assert sum(k.endswith(".query.weight") for k in state) == 2  # encoder and decoder mid blocks
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
    ckpt = families.load(copy, autoencoder=True)
    latents = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert max_diff(ckpt.autoencoder.decode(latents), pipe.vqvae.decode(latents / 0.18215).sample) <= 1e-5
