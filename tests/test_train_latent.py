"""`ddimctl train --autoencoder`: a UNet learns a frozen autoencoder's latents; its checkpoint is a latent pipeline
that every command loads as one model; exact resume; refusals.

The autoencoders are tiny random diffusers models (f = 2, see tinymodels.py) saved with ``save_pretrained``; the
data is the built-in ``digits`` at 8x8, as 3-channel images (4x4 latents)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ddimctl.cli import app
from tinymodels import TRAIN_TINY, tiny_kl, tiny_vq

TINY = [*TRAIN_TINY, "--channels", "3", "--attention-resolutions", "2", "--warmup-steps", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def aes(diffusers, tmp_path_factory):
    """Saved tiny autoencoders: a VQModel, an AutoencoderKL, and an AutoencoderKL with a shift (saved under vae/)."""
    root = tmp_path_factory.mktemp("ae")
    models = {"vq": tiny_vq(diffusers), "kl": tiny_kl(diffusers),
              "kl-shift": tiny_kl(diffusers, seed=3, scaling_factor=0.5, shift_factor=0.1)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: (root / name, model) for name, model in models.items()}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def unet_weights(run: Path) -> dict:
    return load_file(run / "checkpoint" / "unet" / "diffusion_pytorch_model.safetensors")


def digits_rgb() -> torch.Tensor:
    from ddimctl.data import load_training_data

    return load_training_data("digits", 8, 3).images  # (1797, 3, 8, 8) in [-1, 1]


def diffusers_latents(model, x: torch.Tensor) -> torch.Tensor:
    """The reference: what diffusers' pipelines feed the UNet for images x (KL: the posterior mode; VQ: the
    pre-quantisation latent; minus the shift, times the scale)."""
    cfg = model.config
    with torch.no_grad():
        if type(model).__name__ == "VQModel":
            z = model.encode(x).latents
        else:
            z = model.encode(x).latent_dist.mode()
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (z - shift) * cfg.scaling_factor


# ----------------------------------------------------------------------------------------------------------------
# The run's checkpoint: one model for every command


@pytest.mark.parametrize("kind,component", [("vq", "vqvae"), ("kl-shift", "vae")])
def test_trained_latent_checkpoint_samples_pixels_and_names_both_parts(aes, kind, component, tmp_path):
    ae, model = aes[kind]
    run = tmp_path / "run"
    r = run_cli("train", "digits", "--out", run, "--autoencoder", ae, "--train-steps", 4, "--save-every", 4,
                "--sample-every", 4, "--device", "cpu", *[a for a in TINY if a != "--quiet"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(run / "checkpoint")]
    latents = 3 if kind == "vq" else 4
    assert f"{latents}x4x4 latents, scaling factor {model.config.scaling_factor:g}" in r.stderr
    ckpt = run / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["ddimctl.json", "model_index.json", "scheduler", "unet", component])
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index == {"_class_name": "LDMPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                     "unet": ["diffusers", "UNet2DModel"], component: ["diffusers", type(model).__name__]}
    unet_cfg = json.loads((ckpt / "unet" / "config.json").read_text())
    assert (unet_cfg["in_channels"], unet_cfg["out_channels"], unet_cfg["sample_size"]) == (latents, latents, 4)
    ae_cfg = json.loads((ckpt / component / "config.json").read_text())
    assert ae_cfg["scaling_factor"] == model.config.scaling_factor
    assert json.loads((ckpt / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False
    ours = load_file(ckpt / component / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())  # the autoencoder, unchanged
    meta = json.loads((ckpt / "ddimctl.json").read_text())
    assert (meta["image_channels"], meta["image_size"], meta["latent_shape"]) == (3, 8, [latents, 4, 4])
    assert meta["autoencoder"]["ref"] == str(ae) and meta["autoencoder"]["class"] == type(model).__name__
    # the preview grid holds 16 decoded 8x8 images (4 x (8 + 2) + 2 pixels a side), not 4x4 latents
    assert Image.open(run / "samples" / "step_0000004.png").size == (42, 42)

    r = run_cli("sample", "--model", ckpt, "--n", 2, "--steps", 3, "--out", tmp_path / "s", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no notes: the scale is the one the UNet was trained with
    for png in r.stdout.split():
        with Image.open(png) as im:
            assert im.size == (8, 8) and im.mode == "RGB"
    r = CliRunner().invoke(app, ["info", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["pipeline"]["components"]["unet"] == ["diffusers", "UNet2DModel"]
    assert doc["pipeline"]["components"][component] == ["diffusers", type(model).__name__]
    assert doc["autoencoder"]["class"] == type(model).__name__ and doc["latent_shape"] == [latents, 4, 4]
    assert (doc["image_size"], doc["channels"]) == (8, 3)
    png = tmp_path / "s" / "000000.png"
    r = CliRunner().invoke(app, ["reconstruct", str(png), "--model", str(ckpt), "--steps", 3, "--out",
                                 str(tmp_path / "r"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"][0]["autoencoder_mse"] >= 0


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_diffusers_ldm_pipeline_loads_the_checkpoint(aes, diffusers, kind, tmp_path):
    """An autoencoder without a shift is saved as LDMPipeline's vqvae (an AutoencoderKL too: LDMPipeline decodes
    latents / scaling_factor, as ddimctl does); diffusers loads and runs it."""
    ae, model = aes[kind]
    assert train("digits", "--out", tmp_path / "run", "--autoencoder", ae, "--train-steps", 2, *TINY).exit_code == 0
    pipe = diffusers.LDMPipeline.from_pretrained(tmp_path / "run" / "checkpoint")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vqvae) is type(model) and pipe.unet.config.sample_size == 4
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


# ----------------------------------------------------------------------------------------------------------------
# What the UNet learns: the autoencoder's encoding


@pytest.mark.parametrize("kind,scale", [("vq", None), ("kl", None), ("kl-shift", None), ("vq", 0.7)])
def test_the_unet_learns_the_autoencoders_latents(aes, kind, scale, monkeypatch, tmp_path):
    """Every batch the UNet saw is diffusers' encoding of those images (KL mode / VQ pre-quantisation latent,
    shifted and scaled); the scale given is the one used and recorded; the loaded checkpoint encodes the same."""
    import ddimctl.train as training
    from ddimctl import Engine
    from ddimctl.train import TrainConfig, batch_indices

    ae, model = aes[kind]
    seen = []
    real = training.training_example

    def spy(x0, step, *args, **kwargs):
        seen.append((step, x0.clone()))
        return real(x0, step, *args, **kwargs)

    monkeypatch.setattr(training, "training_example", spy)
    cfg = TrainConfig(data="digits", image_size=8, channels=3, base_channels=8, channel_mult=(1, 2),
                      attention_resolutions=(2,), norm_num_groups=4, batch_size=8, train_steps=3, save_every=3,
                      autoencoder=str(ae), autoencoder_scaling_factor=scale)
    images = digits_rgb()
    training.train(cfg, tmp_path / "run", torch.device("cpu"), data=images)
    assert [s for s, _ in seen] == [0, 1, 2]

    used = scale if scale is not None else model.config.scaling_factor
    for step, x0 in seen:
        idx = batch_indices(step, len(images), cfg, 0, 1)
        want = diffusers_latents(model, images[idx]) * (used / model.config.scaling_factor)
        assert x0.shape == want.shape == (8, 4 if "kl" in kind else 3, 4, 4)
        assert (x0 - want).abs().max() <= 1e-5 * want.abs().max()
        assert want.abs().max() > 1e-3  # not trivially zero
    engine = Engine.load(tmp_path / "run" / "checkpoint", autoencoder_scaling_factor=None)
    assert engine.autoencoder.config["scaling_factor"] == used
    step, x0 = seen[-1]
    again = engine.to_latents(images[batch_indices(step, len(images), cfg, 0, 1)])
    assert (again - x0).abs().max() <= 1e-6 * x0.abs().max()
    meta = json.loads((tmp_path / "run" / "checkpoint" / "ddimctl.json").read_text())["autoencoder"]
    assert meta["scaling_factor"] == used
    all_latents = diffusers_latents(model, images) * (used / model.config.scaling_factor)
    assert meta["latent_std"] == pytest.approx(all_latents.std().item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Resume and init


def test_latent_resume_is_bit_identical_and_checks_the_autoencoder(aes, tmp_path):
    vq, kl = aes["vq"][0], aes["kl"][0]
    args = ["--autoencoder", vq, "--hflip", *TINY]
    assert train("digits", "--out", tmp_path / "full", "--train-steps", 8, "--save-every", 4, *args).exit_code == 0
    assert train("digits", "--out", tmp_path / "part", "--train-steps", 3, "--save-every", 3, *args).exit_code == 0
    r = train("digits", "--out", tmp_path / "part", "--train-steps", 8, "--save-every", 4, "--resume", *args)
    assert r.exit_code == 0, r.output
    full, part = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "part")
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)
    sf, sp = load_file(tmp_path / "full" / "state.safetensors"), load_file(tmp_path / "part" / "state.safetensors")
    assert all(torch.equal(sf[k], sp[k]) for k in sf)
    other = tmp_path / "other"  # another seed really differs (the comparison above can fail)
    assert train("digits", "--out", other, "--train-steps", 8, "--save-every", 8, "--seed", 1, *args).exit_code == 0
    assert not torch.equal(unet_weights(other)["conv_in.weight"], full["conv_in.weight"])

    before = (tmp_path / "part" / "state.json").read_text()

    def refused(*extra):
        r = train("digits", "--out", tmp_path / "part", "--train-steps", 10, "--resume", "--hflip", *extra, *TINY)
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert (tmp_path / "part" / "state.json").read_text() == before  # nothing written
        return r.stderr.strip()

    msg = refused("--autoencoder", aes["kl"][0])
    assert msg == (f"ddimctl: --resume {tmp_path / 'part'} with --autoencoder {kl}: the saved run learned the "
                   f"latents of {vq}")
    msg = refused()
    assert msg == (f"ddimctl: --resume {tmp_path / 'part'} with --autoencoder none: the saved run learned the "
                   f"latents of {vq}")
    assert "options differ from the saved run (autoencoder_scaling_factor)" in refused(
        "--autoencoder", vq, "--autoencoder-scaling-factor", 1.0)
    changed = tmp_path / "vq-changed"  # the same path, other weights
    shutil.copytree(vq, changed)
    assert train("digits", "--out", tmp_path / "p2", "--train-steps", 2, "--autoencoder", changed, *TINY).exit_code == 0
    weights = changed / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["quant_conv.bias"] = state["quant_conv.bias"] + 1
    save_file(state, weights, metadata={"format": "pt"})
    r = train("digits", "--out", tmp_path / "p2", "--train-steps", 4, "--resume", "--autoencoder", changed, *TINY)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "its weights or scale differ from the ones the saved run encoded with" in r.stderr


def test_init_from_a_latent_checkpoint(aes, tmp_path):
    vq, kl = aes["vq"][0], aes["kl"][0]
    assert train("digits", "--out", tmp_path / "a", "--autoencoder", vq, "--train-steps", 3, *TINY).exit_code == 0
    init = tmp_path / "a" / "checkpoint"
    # learning rate 0: the new run's UNet is exactly the one it started from
    r = train("digits", "--out", tmp_path / "b", "--autoencoder", vq, "--train-steps", 2, "--init", init, *TINY,
              "--lr", "0")
    assert r.exit_code == 0, r.output
    a, b = unet_weights(tmp_path / "a"), unet_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = train("digits", "--out", tmp_path / "c", "--train-steps", 2, "--init", init, *TINY)  # a pixel run
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    assert f"--init {init} with --autoencoder none: the checkpoint is a latent-diffusion model" in r.stderr
    r = train("digits", "--out", tmp_path / "d", "--autoencoder", kl, "--train-steps", 2, "--init", init, *TINY)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "d").exists()
    assert f"--init {init} with --autoencoder {kl}: the checkpoint's autoencoder" in r.stderr
    r = train("digits", "--out", tmp_path / "e", "--autoencoder", vq, "--autoencoder-scaling-factor", 1.0,
              "--train-steps", 2, "--init", init, *TINY)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
    assert r.stderr.strip() == (f"ddimctl: --init {init} with --autoencoder {vq}: the checkpoint's autoencoder "
                                f"({init / 'vqvae' / 'config.json'}) differs (weights or scale)")
    r = train("digits", "--out", tmp_path / "f", "--autoencoder", vq, "--train-steps", 2, "--init", init, *TINY,
              "--base-channels", "16")
    assert r.exit_code == 1 and "its UNet differs from the size options" in r.stderr and not (tmp_path / "f").exists()


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one line, exit 1, nothing written


def test_refusals_are_one_line_and_write_nothing(aes, tmp_path):
    vq = aes["vq"][0]
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    cases = [
        (["--autoencoder", tmp_path / "nope"], f"{tmp_path / 'nope'}: no such autoencoder file, directory or Hub repo"),
        (["--autoencoder", unet_dir], f"{unet_dir / 'config.json'}: a UNet2DModel, not an autoencoder"),
        (["--autoencoder", vq, "--channels", "1"], f"--channels 1: the autoencoder {vq} (VQModel) takes 3-channel "
                                                    "images"),
        (["--autoencoder", vq, "--image-size", "9"], f"--image-size 9: not divisible by 2, the downsampling factor "
                                                     f"of the autoencoder {vq}"),
        (["--variant", "fp16"], "--variant fp16: applies to an autoencoder, and none is given"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        r = train("digits", "--out", out, "--train-steps", 2, *TINY, *extra)
        assert r.exit_code == 1, (extra, r.output)
        assert r.stderr.startswith(f"ddimctl: {message}") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.output and not out.exists()
