"""Class-conditional models and classifier-free guidance: the formula, the refusals, diffusers parity, exact
inversion under guidance, and class-conditional training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddimctl.checkpoint import save
from ddimctl.conditioning import ClassLabels, guide
from ddimctl.engine import Engine, SamplingOptions
from ddimctl.prediction import Denoiser
from ddimctl.settings import SamplerSettings
from ddimctl.nets.unet2d import UNet2DModel
from tinymodels import TINY_UNET, TRAIN_TINY

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("DDIMCTL_DEBUG", None)
TINY = {**TINY_UNET, "num_class_embeds": 4}


def tiny_conditional(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    model = UNet2DModel.from_config(TINY).eval()
    with torch.no_grad():
        model.class_embedding.weight.mul_(3.0)  # classes that really change the output
        model.conv_out.weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory) -> Path:
    """3 classes + null class 3, as ddimctl's own training writes it."""
    d = tmp_path_factory.mktemp("cond") / "m"
    save(d, tiny_conditional(), SamplerSettings.from_config({"clip_sample": True}),
         {"num_classes": 3, "null_class_label": 3})
    return d


def run(*args):
    return subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_guidance_is_one_forward_of_2b_combined_by_the_formula():
    calls = []

    def network(x, t, class_labels):
        calls.append(class_labels.tolist())
        return x * 0.5 + class_labels.view(-1, 1).double()  # each class its own output

    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([10.0])
    labels = ClassLabels(4, 3)
    cond, null = labels.encode([0, 2, 1], 3, "cpu"), labels.null(None, 3, "cpu")
    w = 2.5
    out = Denoiser(guide(network, labels, cond, null, w)).model_output(x, t)
    assert calls == [[0, 2, 1, 3, 3, 3]]  # one call: the B conditional samples, then the same B with the null class
    c, u = network(x, t, torch.tensor([0, 2, 1])), network(x, t, torch.full((3,), 3))
    torch.testing.assert_close(out, u + w * (c - u), rtol=0, atol=0)
    # w = 1 is the plain conditional model (one forward of B)
    calls.clear()
    torch.testing.assert_close(Denoiser(guide(network, labels, cond, null, 1.0)).model_output(x, t), c, rtol=0, atol=0)
    assert calls == [[0, 2, 1]]
    # a guided denoiser keeps its guidance for the images it selects
    calls.clear()
    part = Denoiser(guide(network, labels, cond, null, w)).select(torch.tensor([1]))
    torch.testing.assert_close(part.model_output(x[1:2], t), out[1:2], rtol=0, atol=0)
    assert calls == [[2, 3]] and part.guidance_gain == w + (w - 1)


@pytest.mark.parametrize("args,needle", [
    (["--class-label", "7"], "--class-label 7: the model has classes 0 .. 3; 3 is its null class"),
    (["--guidance-scale", "2", "--model", "mnist"], "--guidance-scale 2.0: the model is not class-conditional"),
    (["--class-label", "1", "--model", "mnist"], "--class-label 1: the model is not class-conditional"),
])
def test_label_and_guidance_refusals_are_one_line(cond_dir, tmp_path, args, needle):
    full = ["sample", "--n", 2, "--steps", 3, "--out", tmp_path / "o"]
    if "--model" not in args:
        full += ["--model", cond_dir]
    r = run(*full, *args)
    assert r.returncode == 1 and r.stderr.strip() == f"ddimctl: {needle}", r.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_guidance_needs_a_declared_null_class(tmp_path):
    d = tmp_path / "m"
    save(d, tiny_conditional(), SamplerSettings(), {})  # class-conditional, but no null_class_label
    r = run("sample", "--model", d, "--n", 1, "--steps", 2, "--guidance-scale", 3, "--out", tmp_path / "o")
    assert r.returncode == 1 and "--guidance-scale 3.0: the model declares no null" in r.stderr
    r = run("invert", tmp_path / "none.png", "--model", d, "--steps", 2, "--out", tmp_path / "l")
    assert r.returncode == 1  # a missing image, named first
    ok = run("sample", "--model", d, "--n", 1, "--steps", 2, "--class-label", 2, "--out", tmp_path / "o2")
    assert ok.returncode == 0, ok.stderr


def test_guidance_on_a_checkpoint_that_clips_gets_a_note(cond_dir, tmp_path):
    """cond_dir's scheduler clips x0: under guidance that derails the samples, so the run says so once (and not
    when clipping is turned off, nor without guidance)."""
    from ddimctl.engine import GUIDED_CLIP_NOTE

    common = ["--model", cond_dir, "--n", 1, "--steps", 2, "--class-label", 1]
    guided = run("sample", *common, "--guidance-scale", 2, "--out", tmp_path / "a")
    unclipped = run("sample", *common, "--guidance-scale", 2, "--no-clip-sample", "--out", tmp_path / "b")
    unguided = run("sample", *common, "--out", tmp_path / "c")
    for r in (guided, unclipped, unguided):
        assert r.returncode == 0, r.stderr
    assert guided.stderr.count(GUIDED_CLIP_NOTE) == 1, guided.stderr
    assert GUIDED_CLIP_NOTE not in unclipped.stderr + unguided.stderr


def test_class_conditional_sampling_equals_diffusers(diffusers, cond_dir):
    """diffusers' UNet2DModel with class labels under its DDIMScheduler, stepped by hand, from the same x_T."""
    unet = diffusers.UNet2DModel.from_pretrained(cond_dir).eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(cond_dir)
    scheduler.set_timesteps(6)
    engine = Engine.load(cond_dir, SamplingOptions(steps=6))
    labels = torch.tensor([0, 1, 2, 2])
    x_T = engine.noise([0, 1, 2, 3])
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    _, ours = engine.generate([0, 1, 2, 3], x_T, conditions=labels.tolist())
    assert float((ours - x).abs().max()) <= 1e-4
    _, other = engine.generate([0, 1, 2, 3], x_T, conditions=[1, 0, 0, 1])
    assert float((other - x).abs().max()) > 1e-2  # the labels matter


def test_exact_inversion_under_guidance_gives_the_image_back(cond_dir):
    engine = Engine.load(cond_dir, SamplingOptions(steps=8, guidance_scale=3.0, inverting=True, tol=1e-5))
    labels = [0, 2]
    _, x0 = engine.generate([5, 6], conditions=labels)
    x0 = x0.clamp(-1, 1)
    exact = engine.reconstruct(x0, conditions=labels)
    plain = Engine.load(cond_dir, SamplingOptions(steps=8, guidance_scale=3.0, inverting=True,
                                                  inversion="plain")).reconstruct(x0, conditions=labels)
    assert float(exact.mse.max()) <= 1e-8 < float(plain.mse.max())
    # decoding the same latents under another class gives another image: the label is in the inversion
    other = engine.decode(exact.x_T, conditions=[1, 1])
    assert float((other - exact.x0).abs().max()) > 1e-2


def test_class_conditional_training_records_the_null_class_and_starts_from_an_unconditional_model(tmp_path):
    from typer.testing import CliRunner

    from ddimctl.cli import app

    tiny = [*TRAIN_TINY, "--attention-resolutions", "4"]
    r = CliRunner().invoke(app, ["train", "digits", "--out", str(tmp_path / "u"), "--train-steps", "4", *tiny])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", "digits", "--out", str(tmp_path / "c"), "--train-steps", "1", "--lr", "0",
                                 "--class-conditional", "--init", str(tmp_path / "u" / "checkpoint"), *tiny])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "c" / "checkpoint" / "ddimctl.json").read_text())
    assert meta["num_classes"] == 10 and meta["null_class_label"] == 10 and meta["class_names"][3] == "3"
    # clipping x0 derails guided sampling: a class-conditional run saves it off, an unconditional one on
    for run_dir, clips in (("u", True), ("c", False)):
        config = json.loads((tmp_path / run_dir / "checkpoint" / "scheduler_config.json").read_text())
        assert config["clip_sample"] is clips
    from ddimctl.families import load

    u, c = load(tmp_path / "u" / "checkpoint").model, load(tmp_path / "c" / "checkpoint").model
    assert c.num_class_embeds == 11
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([300.0])
    with torch.inference_mode():  # lr 0: still the unconditional model, whatever the class
        assert torch.equal(c(x, t, torch.tensor([4, 10])), u(x, t))


def test_edit_changes_the_class_and_editing_to_the_same_class_gives_the_image_back(cond_dir, tmp_path):
    from ddimctl.images import save_png

    engine = Engine.load(cond_dir, SamplingOptions(steps=6))
    _, x0 = engine.generate([1], conditions=[0])
    save_png(x0[0].clamp(-1, 1), tmp_path / "a.png")
    common = ["--model", cond_dir, "--steps", 6, "--class-label", 0, "--tol", 1e-5, "--json", "--quiet"]
    same = run("edit", tmp_path / "a.png", *common, "--to-class-label", 0, "--out", tmp_path / "same")
    other = run("edit", tmp_path / "a.png", *common, "--to-class-label", 2, "--out", tmp_path / "other")
    half = run("edit", tmp_path / "a.png", *common, "--to-class-label", 2, "--strength", 0.5, "--out", tmp_path / "half")
    for r in (same, other, half):
        assert r.returncode == 0, r.stderr
    docs = [json.loads(r.stdout) for r in (same, other, half)]
    mses = [d["images"][0]["mse_to_source"] for d in docs]
    assert mses[0] <= 1e-6 < mses[1]  # the same class: an exact round trip; another class: another image
    assert mses[2] < mses[1]  # regenerating half the trajectory keeps more of the source
    assert docs[2]["steps_regenerated"] == 3 and docs[1]["images"][0]["to_class_label"] == 2
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["a.compare.png", "a.png"]
    r = run("edit", tmp_path / "a.png", "--model", "mnist", "--to-class-label", 1, "--out", tmp_path / "x")
    assert r.returncode == 1 and r.stderr.strip() == "ddimctl: --to-class-label 1: the model is not class-conditional"
