"""Stable Diffusion 3 and Flux: tiny random-weight pipelines built here (tests/t2i.py) against diffusers' own
StableDiffusion3Pipeline / FluxPipeline from the same latents; the default plan's sigmas against diffusers' at two
resolutions; exact inversion under the prompt through `ddimctl reconstruct`; the refusals; and every command through
the CLI (subprocesses where the process matters: the Hub cache offline), from a Hugging Face cache built here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
import t2i  # noqa: E402  (tests/t2i.py)
from typer.testing import CliRunner  # noqa: E402

from ddimctl.cli import app  # noqa: E402
from ddimctl.conditioning import Prompt  # noqa: E402
from ddimctl.engine import Engine, SamplingOptions  # noqa: E402
from ddimctl.sampler import SAMPLERS, sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("DDIMCTL_DEBUG", None)
H, W = 32, 48  # non-square: latents 16 x 24 through the tiny autoencoders (factor 2); Flux packs them to 8 x 12 tokens
NAMES = ("sd3", "sd3-no-t5", "flux-dev", "flux-schnell")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """name -> (diffusers pipeline, its saved folder): SD3 with and without T5, Flux dev and schnell."""
    root = tmp_path_factory.mktemp("sd3-flux")
    return t2i.built(NAMES, root)


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    """The round-trip variants of tests/t2i.py (latents of about unit std, the transformer's output scaled by 0.1)."""
    root = tmp_path_factory.mktemp("sd3-flux-unit")
    return {name: t2i.save(t2i.BUILDERS[name](**t2i.UNIT_STD[name.split("-")[0]]), root / name)
            for name in ("sd3", "flux-dev")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return t2i.photos(tmp_path_factory.mktemp("photos"))


def run(*args, env=ENV):
    return t2i.run_cli(*args, env=env, timeout=600)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def engine(folder: Path, steps: int, w: float | None = None, height: int = H, width: int = W, **kw) -> Engine:
    return Engine.load(folder, SamplingOptions(steps=steps, guidance_scale=w, height=height, width=width, **kw))


def ours(folder: Path, prompts: list[str], negative: str | None, latents: torch.Tensor, steps: int,
         w: float | None) -> torch.Tensor:
    """ddimctl's final latents (what the pipeline returns with output_type="latent", unpacked), ddim (Euler)."""
    e = engine(folder, steps, w)
    conditions = [Prompt(p, negative) for p in prompts]
    e.check_conditions(conditions)
    denoiser, _ = e.denoisers(conditions, len(prompts))
    with torch.inference_mode():
        return sample(denoiser, latents, e.plan, "ddim")


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers' pipelines


@pytest.mark.parametrize("name,w,negative", [
    ("sd3", 3.0, None), ("sd3", 3.0, "blurry, ugly"), ("sd3-no-t5", 3.0, None),
    ("flux-dev", 2.0, None), ("flux-schnell", 1.0, None),
])
def test_sampling_equals_diffusers_pipeline_from_the_same_latents(pipes, name, w, negative):
    """The pipeline (its own FlowMatchEulerDiscreteScheduler and sigmas) and ddimctl's ddim sampler with no
    --spacing, from the same initial latents, two prompts, 4 steps, a non-square image: the final latents agree to
    1e-4 (values ~5; measured ~1e-6). SD3: classifier-free guidance w = 3; Flux-dev: the embedded guidance value 2."""
    pipe, folder = pipes[name]
    latents = t2i.noise(pipe, 2, H, W, seed=0)
    prompts = ["a photo of a cat", "an astronaut riding a horse"]
    theirs = t2i.reference_latents(pipe, prompts, negative, latents, 4, w, H, W)
    mine = ours(folder, prompts, negative, latents, 4, w)
    diff = float((mine - theirs).abs().max())
    assert diff <= 1e-4, diff
    assert float(theirs.abs().max()) > 1.0  # not a constant that would match anything
    other = ours(folder, prompts[::-1], negative, latents, 4, w)
    assert float((other - theirs).abs().max()) > 1e-2  # the prompt matters
    if name == "flux-dev":  # and so does the embedded guidance value
        assert float((ours(folder, prompts, None, latents, 4, 5.0) - theirs).abs().max()) > 1e-3


def _pipeline_sigmas(pipe, steps: int, height: int, width: int) -> np.ndarray:
    """The sigmas diffusers' pipeline itself set for a run of ``steps`` at this size (its scheduler keeps them)."""
    t2i.reference_latents(pipe, "a cat", None, t2i.noise(pipe, 1, height, width), steps, 1.0, height, width)
    return pipe.scheduler.sigmas.numpy()


@pytest.mark.parametrize("name", ["flux-dev", "sd3"])
def test_the_default_plan_is_diffusers_own_sigmas_at_two_resolutions(pipes, name):
    """No --spacing: the plan's sigmas, rounded to float32, are exactly the ones diffusers' pipeline walks through.
    Flux-dev's shift depends on the image's token count (mu = 0.473 at 32 x 48: 96 tokens; 0.5 at 64 x 64: 256),
    so its plans differ between the sizes; SD3's double static shift does not."""
    pipe, folder = pipes[name]
    plans = []
    for height, width in ((32, 48), (64, 64)):
        theirs = _pipeline_sigmas(pipe, 7, height, width)
        plan = engine(folder, 7, height=height, width=width).plan
        np.testing.assert_array_equal(plan.b.astype(np.float32), theirs)
        np.testing.assert_allclose(plan.timesteps, plan.b[:-1] * 1000)  # the model is called at sigma * T
        plans.append(plan.b)
    assert (not np.array_equal(*plans)) == (name == "flux-dev")
    if name == "sd3":  # diffusers' double shift: the last sigma is shift(shift(1/T)), not shift(1/T)
        assert plans[0][-2] == pytest.approx(0.0089285, abs=1e-6)


@pytest.mark.parametrize("name", ["flux-dev", "sd3"])
def test_an_explicit_spacing_gets_the_same_shift(pipes, name):
    """--spacing trailing places its unshifted sigmas (1, 1 - 1/S, ..) and shifts them as diffusers' scheduler shifts
    sigmas it is given: by mu at this size (Flux-dev), by the static shift (SD3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddimctl.schedule import flow_schedule, make_plan

    pipe, folder = pipes[name]
    unshifted = make_plan(flow_schedule(1000, 1.0), 6, "trailing").b[:-1]
    for height, width in ((32, 48), (64, 64)):
        plan = engine(folder, 6, height=height, width=width, spacing="trailing").plan
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        mu = None
        if name == "flux-dev":
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift((height // 4) * (width // 4))
        sched.set_timesteps(sigmas=list(unshifted), mu=mu)
        np.testing.assert_allclose(plan.b, sched.sigmas.double().numpy(), rtol=0, atol=1e-6)
        assert not np.allclose(plan.b, engine(folder, 6, height=height, width=width).plan.b)  # not the default


def test_flux_packing_inside_the_network_is_diffusers(pipes):
    """The adapter's 2 x 2 packing, unpacking and position ids are FluxPipeline's, for a non-square latent."""
    from diffusers import FluxPipeline

    from ddimctl.families.flow_transformers import image_ids, pack, unpack

    x = torch.randn(2, 4, 16, 24)
    packed = FluxPipeline._pack_latents(x, 2, 4, 16, 24)
    assert torch.equal(pack(x), packed)
    assert torch.equal(unpack(packed, 16, 24), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 8, 12, "cpu", torch.float32)
    assert torch.equal(image_ids(16, 24, torch.device("cpu"), torch.float32), ids)


def test_the_cli_writes_the_pipelines_images_from_unpacked_latents(pipes, tmp_path):
    """`ddimctl sample --latents` with a file holding the unpacked (N, C, h, w) latents writes the images FluxPipeline
    decodes from the same latents packed (its own `latents=` layout); the default w is Flux-dev's 3.5."""
    from safetensors.torch import load_file, save_file

    pipe, folder = pipes["flux-dev"]
    latents = t2i.noise(pipe, 2, H, W, seed=3)  # (2, 4, 16, 24)
    save_file({"latents": latents.contiguous()}, tmp_path / "x_T.safetensors")
    with torch.inference_mode():
        images = pipe(["a red apple"] * 2, latents=t2i.pack(latents), num_inference_steps=5, height=H, width=W,
                      output_type="pt").images  # (2, 3, H, W) in [0, 1]
    r = cli("sample", "--model", folder, "--latents", tmp_path / "x_T.safetensors", "--prompt", "a red apple",
            "--steps", 5, "--height", H, "--width", W, "--format", "safetensors", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["settings"]["guidance_scale"] == 3.5 and doc["settings"]["spacing"] == "pipeline"
    got = (load_file(tmp_path / "o" / "samples.safetensors")["samples"] / 2 + 0.5).clamp(0, 1)
    assert got.shape == images.shape and float((got - images).abs().max()) <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Inversion and edits


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_exact_inversion_through_reconstruct_gives_the_autoencoders_round_trip_back(unit, photos, name, tmp_path):
    """Photos through `ddimctl reconstruct` at 10 steps on the unit-std variants (SD3: w = 1, invert's default for
    classifier-free guidance; Flux-dev: its embedded guidance value 3.5, which is a condition, not a second call): the
    decoded reconstruction is the autoencoder's own round trip to 1e-5 per-dimension MSE."""
    r = run("reconstruct", *photos, "--model", unit[name], "--prompt", "a photo", "--steps", 10, "--height", 32,
            "--width", 32, "--tol", 1e-3, "--json", "--quiet", "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["settings"]["guidance_scale"] == (1.0 if name == "sd3" else 3.5)
    assert doc["settings"]["spacing"] == "logsnr"  # inversion's default, under the family's shift
    assert max(i["inversion_mse"] for i in doc["images"]) <= 1e-5, doc["images"]
    assert min(i["autoencoder_mse"] for i in doc["images"]) > 1e-3  # the autoencoder's error is not the inversion's


@pytest.mark.parametrize("name", ["sd3", "flux-schnell"])
def test_on_the_full_scale_random_transformers_exact_inversion_converges_where_plain_does_not(pipes, photos, name):
    """The parity pipelines (the real models' latent scales, the transformers' output unscaled): exact inversion at
    10 steps gives the autoencoder's round trip back to 1e-5 while plain DDIM (Euler) inversion misses it by far."""
    from ddimctl.images import load_image

    images = torch.cat([load_image(p, 3, (32, 32)).tensor for p in photos])
    conditions = [Prompt("a photo")] * len(photos)
    errors = {}
    for inversion in ("exact", "plain"):
        e = engine(pipes[name][1], 10, height=32, width=32, inverting=True, inversion=inversion, tol=1e-3)
        e.check_conditions(conditions)
        errors[inversion] = e.reconstruct(images, conditions=conditions).inversion_mse
    assert float(errors["exact"].max()) <= 1e-5, errors
    assert float(errors["plain"].min()) > 1e-4, errors


def test_latent_files_hold_unpacked_latents_and_edits_change_the_prompt(pipes, photos, tmp_path):
    folder = pipes["flux-dev"][1]
    r = cli("invert", photos[0], "--model", folder, "--prompt", "a photo", "--steps", 4, "--height", 32, "--width",
            48, "--inversion", "plain", "--out", tmp_path / "l")
    assert r.exit_code == 0, r.stderr
    from ddimctl.latents import load_latents

    x, meta = load_latents(tmp_path / "l" / "astronaut.latent.safetensors")
    assert x.shape == (1, 4, 16, 24)  # (N, C, h, w): not the packed (N, 96, 16) tokens
    assert (meta["prompt"], meta["guidance_scale"], meta["spacing"]) == ("a photo", "3.5", "logsnr")
    r = cli("edit", photos[0], "--model", folder, "--prompt", "a photo", "--to-prompt", "a drawing", "--steps", 4,
            "--height", 32, "--width", 48, "--strength", 0.5, "--inversion", "plain", "--out", tmp_path / "e", "--json")
    assert r.exit_code == 0, r.stderr
    record = json.loads(r.stdout)["images"][0]
    assert record["prompt"] == "a photo" and record["to_prompt"] == "a drawing" and record["mse_to_source"] > 0


# ----------------------------------------------------------------------------------------------------------------
# The Hub, info, refusals


def test_hub_repo_from_the_cache_through_sample_interpolate_tune_and_info(pipes, tmp_path):
    """owner/tiny-sd3 from a Hugging Face cache built here (HF_HUB_OFFLINE, in subprocesses)."""
    cache = tmp_path / "hub"
    commit = t2i.to_hub_cache(cache, "owner/tiny-sd3", pipes["sd3"][1])
    env = {**ENV, "HF_HUB_CACHE": str(cache)}
    common = ["--model", "owner/tiny-sd3", "--prompt", "a cat", "--height", H, "--width", W]
    r = run("sample", *common, "--n", 2, "--steps", 2, "--out", tmp_path / "s", "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"]["revision"] == commit and doc["settings"]["guidance_scale"] == 7.0  # SD3's default w
    i = run("interpolate", "seed:0", "seed:1", *common, "--frames", 3, "--steps", 2, "--out", tmp_path / "i", env=env)
    assert i.returncode == 0, i.stderr
    t = run("tune", *common, "--steps", 2, "--noises", 2, "--heldout", 0, "--iterations", 1, "--reference-steps", 4,
            "--out", tmp_path / "t.json", env=env)
    assert t.returncode == 0, t.stderr
    info = run("info", "owner/tiny-sd3", "--json", env=env)
    assert info.returncode == 0, info.stderr
    desc = json.loads(info.stdout)
    assert desc["pipeline"] == "StableDiffusion3Pipeline" and desc["revision"] == commit
    assert desc["text_encoders"] == ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert desc["image_size"] == [32, 32] and desc["latent_shape"] == [4, 16, 16]  # sample_size 16 x factor 2
    assert desc["shift"] == {"dynamic": False, "shift": 3.0} and desc["guidance"] == "classifier-free"


@pytest.mark.parametrize("name,guidance,encoders", [
    ("flux-dev", "embedded", ["CLIPTextModel", "T5EncoderModel"]),
    ("flux-schnell", None, ["CLIPTextModel", "T5EncoderModel"]),
    ("sd3-no-t5", "classifier-free", ["CLIPTextModelWithProjection"] * 2),
])
def test_info_describes_guidance_encoders_and_shift(pipes, name, guidance, encoders):
    r = cli("info", pipes[name][1], "--json")
    assert r.exit_code == 0, r.stderr
    desc = json.loads(r.stdout)
    assert (desc["family"], desc["guidance"], desc["text_encoders"]) == ("flow-transformer", guidance, encoders)
    assert desc["default_spacing"] == "pipeline" and desc["prediction_type"] == "flow"
    if name == "flux-dev":  # diffusers' default size 128 x factor; mu for its 64 x 64 tokens: 1.15
        assert desc["image_size"] == [256, 256] and desc["shift"]["mu_at_default_size"] == pytest.approx(1.15)
    # the generic "use_dynamic_shifting ignored" note is gone: this family follows it
    assert not [n for n in desc["notes"] if "use_dynamic_shifting" in n], desc["notes"]


def _sd3_img2img(pipes, folder: Path) -> Path:
    import shutil

    shutil.copytree(pipes["sd3"][1], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Img2ImgPipeline"}))
    return folder


def _flux_fill_transformer(pipes, folder: Path) -> Path:
    """A FluxPipeline folder whose transformer takes 384 input channels (FLUX.1-Fill's), under the plain class name."""
    import shutil

    shutil.copytree(pipes["flux-dev"][1], folder)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**cfg, "in_channels": 384, "out_channels": 64}))
    return folder


@pytest.mark.parametrize("fixture,needle", [
    ("flux-fill", "FluxFillPipeline is Fill"),
    ("flux-kontext", "FluxKontextPipeline is Kontext"),
    ("flux-redux", "FluxPriorReduxPipeline is Redux: an image prior (image_encoder, image_embedder)"),
    ("flux-controlnet", "FluxControlNetPipeline is ControlNet: a control image conditions it (component controlnet)"),
    ("sd3-img2img", "StableDiffusion3Img2ImgPipeline is img2img"),
    ("fill-transformer", "in_channels 384 is not 4 x the autoencoder's latent_channels 4"),
])
def test_image_conditioned_pipelines_are_refused_in_one_line(pipes, tmp_path, fixture, needle):
    if fixture == "sd3-img2img":
        folder = _sd3_img2img(pipes, tmp_path / fixture)
    elif fixture == "fill-transformer":
        folder = _flux_fill_transformer(pipes, tmp_path / fixture)
    else:
        folder = t2i.refusal_fixture(fixture, tmp_path / fixture)
    r = cli("sample", "--model", folder, "--prompt", "x", "--steps", 2, "--out", tmp_path / "o")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_condition_and_size_refusals_are_one_line(pipes, tmp_path):
    sd3, dev, schnell = pipes["sd3"][1], pipes["flux-dev"][1], pipes["flux-schnell"][1]
    cases = [
        (["--model", dev, "--prompt", "a", "--negative-prompt", "b"],
         "--negative-prompt b: the model has no negative prompt"),
        (["--model", schnell, "--prompt", "a", "--guidance-scale", 3.5],
         "--guidance-scale 3.5: the model takes no guidance"),
        (["--model", sd3, "--prompt", "a", "--height", 30], "--height 30: must be a multiple of 4"),
        (["--model", dev, "--prompt", "a", "--width", 34], "--width 34: must be a multiple of 4"),
        (["--model", sd3, "--prompt", "a", "--height", 160], "--height 160: at most 128 (the transformer's "
                                                            "pos_embed_max_size 32)"),
        (["--model", sd3, "--class-label", 3], "--class-label 3: the model is conditioned on text, not on a class"),
        (["--model", dev], "--prompt none: the model is conditioned on text"),
    ]
    for args, needle in cases:
        r = cli("sample", *args, "--steps", 2, "--out", tmp_path / "o")
        assert r.exit_code == 1 and r.stderr.startswith(f"ddimctl: {needle}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_pipeline_spacing_is_refused_for_a_model_without_one(tmp_path):
    r = cli("sample", "--model", "mnist-flow", "--spacing", "pipeline", "--steps", 2, "--n", 1, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "the pipeline spacing is the time steps of a model family's own pipeline" in r.stderr


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_samples_and_inverts_flux(unit, photos, sampler):
    """Each sampler of the core on Flux-dev (unit-std variant, a non-square image, 6 steps, its default spacing):
    finite samples, and an exact round trip through the autoencoder's latents (bdia's by construction)."""
    from ddimctl.images import load_image

    conditions = [Prompt("a photo")]
    e = engine(unit["flux-dev"], 6, sampler=sampler)
    e.check_conditions(conditions)
    _, x0 = e.generate([0], conditions=conditions)
    assert x0.shape == (1, 3, H, W) and bool(torch.isfinite(x0).all())
    inv = engine(unit["flux-dev"], 6, sampler=sampler, inverting=True, tol=1e-4)
    inv.check_conditions(conditions)
    rec = inv.reconstruct(load_image(photos[0], 3, (H, W)).tensor, conditions=conditions)
    assert float(rec.inversion_mse.max()) <= 1e-5, float(rec.inversion_mse.max())
