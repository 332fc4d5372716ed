"""Inversion anchors for guided DDIM (issue 30, item 3; docs/inversion.md): negative-prompt inversion (Miyake et al.
2023: the null condition := the source condition) and null-text inversion (Mokady et al. 2022: the null condition
optimised per step), on the built-in class-conditional ``mnist-cond`` and held-out digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ddimctl.conditioning import ClassifierFreeGuidance, Cond
from ddimctl.engine import Engine, SamplingOptions
from ddimctl.errors import SettingError
from ddimctl.prediction import Denoiser
from ddimctl.sampler import sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """Two held-out digits (images (2, 1, 32, 32) in [-1, 1]) and their labels."""
    from ddimctl.data import load_builtin_dataset

    xt, yt = load_builtin_dataset("mnist-test", 32, with_labels=True)
    return xt[[0, 200]], [int(v) for v in yt[[0, 200]]]


def engine(**kw) -> Engine:
    return Engine.load("mnist-cond", SamplingOptions(inverting=True, **kw))


def test_unet_class_emb_is_the_looked_up_row():
    e = engine(steps=2)
    unet = e.model.model
    x, t, labels = torch.randn(3, 1, 32, 32), torch.tensor([400.0]), torch.tensor([1, 7, 10])
    with torch.inference_mode():
        assert torch.equal(unet(x, t, class_labels=labels), unet(x, t, class_emb=unet.class_embedding(labels)))
        with pytest.raises(ValueError):
            unet(x, t, class_labels=labels, class_emb=unet.class_embedding(labels))


def test_negative_prompt_round_trip_is_the_unguided_conditional_ones(digits):
    """At w = 3, with the null condition := the source, inversion and decode are those of the conditional model
    alone: the same latents, reconstructions and solver accounting as exact inversion at w = 1; and true guidance
    with uncond = cond (a batched call of 2B) decodes the same latent as w = 1 to float rounding."""
    x, y = digits
    neg = engine(steps=5, guidance_scale=3.0, inversion="negative-prompt")
    unguided = engine(steps=5)
    assert neg.guidance_scale == 3.0 and unguided.guidance_scale == 1.0
    r3, r1 = neg.reconstruct(x, conditions=y), unguided.reconstruct(x, conditions=y)
    assert torch.equal(r3.x_T, r1.x_T) and torch.equal(r3.x0, r1.x0) and torch.equal(r3.mse, r1.mse)
    assert r3.stats.image_calls == r1.stats.image_calls and r3.stats.image_residuals == r1.stats.image_residuals
    assert r3.model_calls == r1.model_calls
    assert float(r3.mse.max()) < 1e-4
    assert neg.provenance()["inversion"] == "negative-prompt"

    cond = neg.conditioner.encode(y, 2, "cpu")
    guided = Denoiser(ClassifierFreeGuidance(neg._call_network, cond, cond, 3.0))
    with torch.inference_mode():
        dec3 = sample(guided, r3.x_T, neg.plan)
        dec1 = unguided.decode(r3.x_T, conditions=y)
    torch.testing.assert_close(dec3, dec1, atol=1e-5, rtol=0)


def test_negative_prompt_edit_guides_away_from_the_source(digits):
    """The method's editing recipe: decode under cond = target, null = source at w."""
    x, y = digits
    neg = engine(steps=3, guidance_scale=3.0, inversion="negative-prompt")
    target = [(v + 1) % 10 for v in y]
    result = neg.edit(x, y, target)
    cfg = ClassifierFreeGuidance(neg._call_network, neg.conditioner.encode(target, 2, "cpu"),
                                 neg.conditioner.encode(y, 2, "cpu"), 3.0)
    with torch.inference_mode():
        expected = sample(neg.ode_settings.denoiser(cfg), result.x_mid, neg.plan)
    assert torch.equal(result.edited, expected)


def test_null_text_reconstructs_under_guidance_far_closer_than_plain_inversion(digits):
    """10 steps at w = 3. Measured (mnist-test images 0 and 200): null-text reconstruction MSE ([0, 1]) about
    1e-3 and 3.4e-3, plain inversion decoded at w = 3 about 0.10 and 0.077 (23x to 100x further)."""
    x, y = digits
    nt = engine(steps=10, guidance_scale=3.0, inversion="null-text")
    inv = nt.invert(x, conditions=y)
    S = len(nt.plan)
    assert inv.nulls is not None and len(inv.nulls) == S
    assert set(inv.nulls[0].tensors) == {"class_emb"}
    decoded = nt.decode(inv.x_T, conditions=y, nulls=inv.nulls)
    assert torch.equal(decoded, inv.reached)  # the decode retraces the optimisation's walk exactly

    its = inv.stats.image_iterations
    assert len(its) == S and all(1 <= i <= 10 for step in its for i in step)
    # per image: S pivot calls, then per step the condition, each Adam iteration's null forward, the step taken
    assert inv.stats.image_calls == [S + sum(step[i] + 2 for step in its) for i in range(2)]

    from ddimctl.images import mse

    nt_mse = mse(decoded, x)
    rec = nt.reconstruct(x, conditions=y)
    assert torch.equal(rec.x0, decoded) and rec.decode_calls == 2 * S
    plain = engine(steps=10, guidance_scale=3.0, inversion="plain").reconstruct(x, conditions=y)
    assert bool((nt_mse < 0.1 * plain.mse).all()), (nt_mse, plain.mse)
    assert float(nt_mse.max()) < 1e-2


def test_null_text_and_negative_prompt_refusals():
    with pytest.raises(SettingError, match="ddim sampler"):
        SamplingOptions(inversion="null-text", sampler="dpm++2m").check()
    for mode in ("null-text", "negative-prompt"):
        with pytest.raises(SettingError, match="classifier-free guidance") as e:
            Engine.load("mnist", SamplingOptions(steps=3, inverting=True, inversion=mode))
        assert "\n" not in str(e.value) and "inversion" in str(e.value)
    with pytest.raises(SettingError, match="guidance scale other than 1"):
        engine(steps=3, inversion="null-text")  # w = 1, the inverting default: nothing to optimise


def _ddimctl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_negative_prompt_reconstruct_and_refusals(digits, tmp_path):
    from ddimctl.images import save_png

    images = tmp_path / "digits"
    images.mkdir()
    save_png(digits[0][0], images / "d0.png")
    r = _ddimctl("reconstruct", images, "--model", "mnist-cond", "--class-label", 3, "--guidance-scale", 3,
                 "--steps", 5, "--inversion", "negative-prompt", "--json", "--out", tmp_path / "rec", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["inversion"] == "negative-prompt" and report["settings"]["guidance_scale"] == 3.0
    (image,) = report["images"]
    assert image["class_label"] == 3 and image["mse"] < 1e-3 and "iterations" in image

    refusals = [
        ("reconstruct", images, "--model", "mnist", "--steps", 3, "--inversion", "negative-prompt",
         "--out", tmp_path / "r2"),
        ("reconstruct", images, "--model", "mnist-cond", "--class-label", 3, "--guidance-scale", 3, "--steps", 3,
         "--sampler", "dpm++2m", "--inversion", "null-text", "--out", tmp_path / "r3"),
    ]
    for args in refusals:
        r = _ddimctl(*args, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "inversion" in lines[0], lines[0]
