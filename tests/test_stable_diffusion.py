"""Stable Diffusion 1.x / 2.x / XL: tiny random-weight pipelines built here (tests/t2i.py) against diffusers' own
StableDiffusionPipeline / StableDiffusionXLPipeline from the same latents; exact inversion under the prompt; the
refusals; and every command through the CLI, in subprocesses, from a Hugging Face cache built here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import t2i  # noqa: E402  (tests/t2i.py)

from ddimctl.conditioning import Prompt  # noqa: E402
from ddimctl.engine import Engine, SamplingOptions  # noqa: E402
from ddimctl.sampler import sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("DDIMCTL_DEBUG", None)
H, W = 32, 48  # non-square: latents 16 x 24 through the tiny autoencoders (factor 2)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """name -> (diffusers pipeline, its saved folder) for SD 1.5 (epsilon), SD 2 (v-prediction) and SDXL."""
    root = tmp_path_factory.mktemp("sd")
    return t2i.built(("sd15", "sd2", "sdxl"), root)


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    """The round-trip variants (latents of about unit std, the UNet's output scaled by 0.1; FACTS.md)."""
    root = tmp_path_factory.mktemp("sd-unit")
    return {name: t2i.save(t2i.BUILDERS[name](**t2i.UNIT_STD[name]), root / name) for name in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return t2i.photos(tmp_path_factory.mktemp("photos"))


def run(*args, env=ENV):
    return t2i.run_cli(*args, env=env, timeout=300)


def ours(folder: Path, prompts: list[str], negative: str | None, latents: torch.Tensor, steps: int, w: float,
         dtype=torch.float32) -> torch.Tensor:
    """ddimctl's final latents (what the pipeline returns with output_type="latent"), DDIM eta 0."""
    engine = Engine.load(folder, SamplingOptions(steps=steps, guidance_scale=w, height=H, width=W), dtype=dtype)
    conditions = [Prompt(p, negative) for p in prompts]
    engine.check_conditions(conditions)
    denoiser, _ = engine.denoisers(conditions, len(prompts))
    with torch.inference_mode():
        return sample(denoiser, latents.to(dtype), engine.plan, "ddim").float()


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("negative", [None, "blurry, ugly"])
def test_sampling_equals_diffusers_pipeline_from_the_same_latents(diffusers, pipes, name, negative):
    """The pipeline with DDIMScheduler (clip_sample off: the latents are not images) and ddimctl's ddim sampler
    from the same initial latents, two prompts, w = 3, 4 steps: the final latents agree to 1e-4 (values ~20)."""
    pipe, folder = pipes[name]
    latents = t2i.noise(pipe, 2, H, W, seed=0)
    prompts = ["a photo of a cat", "an astronaut riding a horse"]
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    theirs = t2i.reference_latents(pipe, prompts, negative, latents, 4, 3.0, H, W, scheduler=scheduler)
    mine = ours(folder, prompts, negative, latents, 4, 3.0)
    diff = float((mine - theirs).abs().max())
    assert diff <= 1e-4, diff
    assert float(theirs.abs().max()) > 1.0  # not a constant that would match anything
    other = ours(folder, prompts[::-1], negative, latents, 4, 3.0)
    assert float((other - theirs).abs().max()) > 1e-2  # the prompt matters


def test_the_cli_writes_the_pipelines_images(diffusers, pipes, tmp_path):
    """`ddimctl sample --latents` from the pipeline's own latents writes the images the pipeline decodes."""
    from safetensors.torch import load_file, save_file

    pipe, folder = pipes["sd15"]
    latents = t2i.noise(pipe, 2, H, W, seed=3)
    save_file({"latents": latents.contiguous()}, tmp_path / "x_T.safetensors")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.inference_mode():
        images = pipe(["a red apple"] * 2, latents=latents, num_inference_steps=5, guidance_scale=7.5, height=H, width=W,
                      output_type="pt").images  # (2, 3, H, W) in [0, 1]
    r = run("sample", "--model", folder, "--latents", tmp_path / "x_T.safetensors", "--prompt", "a red apple",
            "--steps", 5, "--height", H, "--width", W, "--format", "safetensors", "--out", tmp_path / "o", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["settings"]["guidance_scale"] == 7.5 and doc["prompts"] == ["a red apple"] * 2  # SD's default w
    got = (load_file(tmp_path / "o" / "samples.safetensors")["samples"] / 2 + 0.5).clamp(0, 1)
    assert float((got - images).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_exact_inversion_under_the_prompt_gives_the_autoencoders_round_trip_back(unit, photos, name, tmp_path):
    """Photos through `ddimctl reconstruct` at 10 steps, w = 1 (invert's default for text models): the decoded
    reconstruction is the autoencoder's own round trip of the photo to 1e-5 per-dimension MSE; plain DDIM
    inversion is far off."""
    common = ["--model", unit[name], "--prompt", "a photo", "--steps", 10, "--json", "--quiet"]
    exact = run("reconstruct", *photos, *common, "--tol", 1e-3, "--out", tmp_path / "e")
    plain = run("reconstruct", *photos, *common, "--inversion", "plain", "--out", tmp_path / "p")
    assert exact.returncode == 0 and plain.returncode == 0, exact.stderr + plain.stderr
    e, p = json.loads(exact.stdout), json.loads(plain.stdout)
    assert e["settings"]["guidance_scale"] == 1.0
    assert max(i["inversion_mse"] for i in e["images"]) <= 1e-5, e["images"]
    assert min(i["inversion_mse"] for i in p["images"]) > 10 * max(i["inversion_mse"] for i in e["images"])


def test_latent_files_record_the_prompt_and_edits_change_it(pipes, photos, tmp_path):
    folder = pipes["sd15"][1]
    r = run("invert", photos[0], "--model", folder, "--prompt", "a photo", "--negative-prompt", "dark", "--steps", 4,
            "--inversion", "plain", "--out", tmp_path / "l")
    assert r.returncode == 0, r.stderr
    from ddimctl.latents import load_latents

    x, meta = load_latents(tmp_path / "l" / "astronaut.latent.safetensors")
    assert x.shape == (1, 4, 16, 16)
    assert (meta["prompt"], meta["negative_prompt"], meta["guidance_scale"]) == ("a photo", "dark", "1.0")
    r = run("edit", photos[0], "--model", folder, "--prompt", "a photo", "--to-prompt", "a drawing", "--steps", 4,
            "--strength", 0.5, "--inversion", "plain", "--out", tmp_path / "e", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)["images"][0]
    assert record["prompt"] == "a photo" and record["to_prompt"] == "a drawing" and record["mse_to_source"] > 0


def test_hub_repo_and_variant_from_the_cache_and_every_command(pipes, photos, tmp_path):
    """owner/sdxl from a Hugging Face cache built here (HF_HUB_OFFLINE), its fp16 variant, through sample,
    interpolate, tune and info."""
    pipe, _ = pipes["sdxl"]
    folder = t2i.save(pipe, tmp_path / "sdxl-fp16", variant="fp16")
    cache = tmp_path / "hub"
    commit = t2i.to_hub_cache(cache, "owner/tiny-sdxl", folder)
    env = {**ENV, "HF_HUB_CACHE": str(cache)}
    r = run("sample", "--model", "owner/tiny-sdxl", "--variant", "fp16", "--prompt", "a cat", "--n", 2, "--steps", 2,
            "--out", tmp_path / "s", "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"]["revision"] == commit and doc["settings"]["guidance_scale"] == 5.0  # SDXL's default w
    i = run("interpolate", "seed:0", "seed:1", "--model", "owner/tiny-sdxl", "--variant", "fp16", "--prompt", "a cat",
            "--frames", 3, "--steps", 2, "--out", tmp_path / "i", env=env)
    assert i.returncode == 0, i.stderr
    t = run("tune", "--model", "owner/tiny-sdxl", "--variant", "fp16", "--prompt", "a cat", "--steps", 2,
            "--noises", 2, "--heldout", 0, "--iterations", 1, "--reference-steps", 4, "--out", tmp_path / "t.json",
            env=env)
    assert t.returncode == 0, t.stderr
    info = run("info", "owner/tiny-sdxl", "--variant", "fp16", "--json", env=env)
    assert info.returncode == 0 and json.loads(info.stdout)["pipeline"] == "StableDiffusionXLPipeline", info.stderr


@pytest.mark.parametrize("fixture,needle", [
    ("sd-img2img", "StableDiffusionImg2ImgPipeline is img2img"),
    ("sd-inpaint", "StableDiffusionInpaintPipeline is inpainting"),
    ("sd-controlnet", "StableDiffusionControlNetPipeline is ControlNet"),
    ("sd-ip-adapter", "component image_encoder (IP-Adapter"),
    ("sdxl-refiner", "StableDiffusionXLImg2ImgPipeline is img2img (the SDXL refiner)"),
])
def test_image_conditioned_pipelines_are_refused_in_one_line(tmp_path, fixture, needle):
    folder = t2i.refusal_fixture(fixture, tmp_path / fixture)
    r = run("sample", "--model", folder, "--prompt", "x", "--steps", 2, "--out", tmp_path / "o")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_condition_refusals_are_one_line(pipes, tmp_path):
    folder = pipes["sd15"][1]
    cases = [
        (["--model", folder], "--prompt none: the model is conditioned on text"),
        (["--model", folder, "--class-label", 3], "--class-label 3: the model is conditioned on text, not on a class"),
        (["--model", "mnist", "--prompt", "a cat"], "--prompt a cat: the model is not conditioned on text"),
        (["--model", folder, "--prompt", "a", "--height", 33], "--height 33: must be a multiple of 2"),
        (["--model", "mnist", "--height", 64], "--height 64 with --width 32: the model makes 32x32 images only"),
    ]
    for args, needle in cases:
        r = run("sample", *args, "--steps", 2, "--out", tmp_path / "o")
        assert r.returncode == 1 and r.stderr.startswith(f"ddimctl: {needle}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_an_over_long_prompt_is_truncated_with_a_note_and_each_prompt_is_encoded_once(pipes):
    engine = Engine.load(pipes["sd15"][1], SamplingOptions(steps=2, height=H, width=W))
    seen = []
    encode = engine.conditioner.encode_texts
    engine.conditioner.encode_texts = lambda texts: (seen.append(list(texts)), encode(texts))[1]
    long = "a " * 100
    prompts = [Prompt(long), Prompt("a cat"), Prompt("a cat"), Prompt(long)]
    engine.check_conditions(prompts)
    assert [n for n in engine.conditioner.notes if "truncated to 77" in n]
    for chunk in (prompts[:2], prompts[2:]):  # two batches
        engine.generate([0, 1], conditions=chunk)
    assert sorted(t for call in seen for t in call) == sorted(["", long, "a cat"])  # once each, the null "" too


def test_without_the_text_extra_a_text_model_is_one_line_naming_the_install_command(pipes, tmp_path):
    """transformers hidden from the process (as on an install without the extra)."""
    code = ("import sys; sys.modules['transformers'] = None; sys.argv = ['ddimctl'] + sys.argv[1:]; "
            "from ddimctl.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "sample", "--model", str(pipes["sd15"][1]), "--prompt", "x",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1 and r.stderr.strip() == ('ddimctl: StableDiffusionPipeline needs transformers, which is '
                                                      'not installed: pip install "ddimctl[text]"'), r.stderr


def test_help_and_the_main_job_import_neither_diffusers_nor_transformers():
    code = ("import sys; from ddimctl.cli import app; from typer.testing import CliRunner; "
            "CliRunner().invoke(app, ['sample', '--help']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
