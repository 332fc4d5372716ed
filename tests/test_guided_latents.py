"""Latent files that keep an exact round trip under guidance (issue 30, item 2; docs/guided-inversion.md):
exact inversion keeps the per-step offsets of the steps its solve stopped short on, writes them beside x_T, and
``sample --latents``, ``interpolate`` and ``reconstruct`` decode with them on the plan they were made on.

The built-in ``mnist-cond`` at w = 3 (10 steps) on held-out digits that stop short without them; the file format's
bad inputs on hand-made files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ddimctl.cli import app
from ddimctl.data import load_builtin_dataset
from ddimctl.engine import Engine, SamplingOptions
from ddimctl.errors import InputError, SettingError
from ddimctl.images import mse, save_png
from ddimctl.latents import load_latent_file, load_latents, save_latents

#: two held-out test digits of one class (6; of the 16 that the guided benchmark picks first) whose 10-step solve at
#: w = 3 stops short of its tolerance at a fold (benchmarks/guided_inversion.py): their latents alone decode
#: 5e-4 and 1e-3 MSE away
SHORT = (310, 341)
W = ("--guidance-scale", "3", "--steps", "10")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(folder of the digit PNGs d0, d1, their labels file, images (2, 1, 32, 32) in [-1, 1], labels)."""
    folder = tmp_path_factory.mktemp("digits")
    xt, yt = load_builtin_dataset("mnist-test", 32, with_labels=True)
    for n, i in enumerate(SHORT):
        save_png(xt[i], folder / f"d{n}.png")
    (folder / "labels.txt").write_text("".join(f"{int(yt[i])}\n" for i in SHORT))
    return folder, folder / "labels.txt", xt[list(SHORT)], [int(yt[i]) for i in SHORT]


@pytest.fixture(scope="module")
def engine():
    return Engine.load("mnist-cond", SamplingOptions(steps=10, guidance_scale=3.0, inverting=True))


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


@pytest.fixture(scope="module")
def inverted(digits, tmp_path_factory):
    """``ddimctl invert`` of both digits under their label at w = 3: (latents folder, the JSON records)."""
    folder, labels, _, _ = digits
    out = tmp_path_factory.mktemp("inverted") / "lat"
    r = run("invert", folder / "d0.png", folder / "d1.png", "--model", "mnist-cond", "--class-label", labels, *W,
            "--out", out, "--json")
    return out, json.loads(r.stdout)["images"]


def test_a_latent_file_keeps_the_offsets_of_the_steps_the_solve_stopped_short_on(engine, digits, inverted):
    _, _, x, y = digits
    out, records = inverted
    for n, rec in enumerate(records):
        lf = load_latent_file(out / f"d{n}.latent.safetensors")
        assert rec["offset_steps"] and sorted(lf.offsets) == rec["offset_steps"] and "offsets" in lf.metadata
        biggest = max(float(o.double().pow(2).mean().sqrt()) for o in lf.offsets.values())
        assert biggest == pytest.approx(rec["offset_rms"], rel=1e-6)
    files = [load_latent_file(out / f"d{n}.latent.safetensors") for n in range(2)]
    x_T = torch.cat([f.latents for f in files])
    offsets = [None if all(f.offsets.get(k) is None for f in files) else
               torch.cat([f.offsets.get(k, torch.zeros_like(f.latents)) for f in files]) for k in range(10)]
    alone = mse(engine.decode(x_T, conditions=y), x)
    retraced = mse(engine.decode(x_T, conditions=y, offsets=offsets), x)
    assert bool((alone > 1e-4).all()), alone  # what the latents alone give back: the solve stopped short
    assert bool((retraced <= 1e-5).all()), retraced


def test_sample_interpolate_and_reconstruct_decode_with_the_offsets(digits, inverted, tmp_path):
    folder, labels, x, y = digits
    out, _ = inverted
    r = run("reconstruct", folder / "d0.png", folder / "d1.png", "--model", "mnist-cond", "--class-label", labels,
            *W, "--out", tmp_path / "rec", "--json")
    assert all(rec["mse"] <= 1e-5 and rec["offset_steps"] for rec in json.loads(r.stdout)["images"])
    for n in range(2):
        run("sample", "--model", "mnist-cond", "--latents", out / f"d{n}.latent.safetensors", "--class-label", y[n],
            *W, "--out", tmp_path / f"s{n}")
        assert np.abs(png(tmp_path / f"s{n}" / "000000.png") - png(tmp_path / "rec" / f"d{n}.png")).max() <= 1
    # the offsets belong to the source's trajectory: on another plan, at another w or under another class they are
    # not added (an edit regenerates from x_T alone, as `edit` does), the run says which, and decodes x_T alone
    for n, (changed, why) in enumerate([(("--steps", "5"), "made on 10 steps"),
                                        (("--guidance-scale", "5"), "made at guidance scale 3"),
                                        (("--class-label", (y[1] + 1) % 10), "belong to the source's condition")]):
        settings = {"--class-label": y[1], "--guidance-scale": "3", "--steps": "10", changed[0]: changed[1]}
        r = CliRunner().invoke(app, ["sample", "--model", "mnist-cond", "--latents", str(out / "d1.latent.safetensors"),
                                     *[str(v) for kv in settings.items() for v in kv], "--out", str(tmp_path / f"o{n}")])
        assert r.exit_code == 0 and why in r.stderr and "decoded without them" in r.stderr, r.output
        assert (tmp_path / f"o{n}" / "000000.png").exists()
    # interpolation blends the ends' offsets: its first and last frames are the ends' own decodes
    assert y[0] == y[1]
    run("interpolate", out / "d0.latent.safetensors", out / "d1.latent.safetensors", "--model", "mnist-cond",
        "--class-label", y[0], *W, "--frames", 3, "--out", tmp_path / "path")
    for frame, n in (("frame_000.png", 0), ("frame_002.png", 1)):
        assert np.abs(png(tmp_path / "path" / frame) - png(tmp_path / "rec" / f"d{n}.png")).max() <= 1


def test_a_null_text_latent_file_keeps_its_nulls_and_sample_retraces_the_walk(tmp_path):
    # test digit 0: at 5 steps and w = 3 null-text's walk holds there (on digits 200, 310 and 341 its decode
    # saturates, with the nulls or without them; at 10 steps all four reconstruct within 3e-3)
    xt, yt = load_builtin_dataset("mnist-test", 32, with_labels=True)
    x, y = xt[:1], [int(yt[0])]
    save_png(x[0], tmp_path / "d0.png")
    nt = ("--model", "mnist-cond", "--class-label", y[0], "--guidance-scale", "3", "--steps", "5")
    run("invert", tmp_path / "d0.png", *nt, "--inversion", "null-text", "--out", tmp_path / "lat")
    path = tmp_path / "lat" / "d0.latent.safetensors"
    lf = load_latent_file(path)
    assert lf.nulls is not None and len(lf.nulls) == 5 and set(lf.nulls[0]) == {"class_emb"}
    assert "nulls" in lf.metadata and lf.metadata["inversion"] == "null-text"
    five = Engine.load("mnist-cond", SamplingOptions(steps=5, guidance_scale=3.0, inverting=True))
    nulls, why_not = five.latent_nulls(lf)
    assert why_not is None
    with_nulls = five.decode(lf.latents, conditions=y, nulls=nulls)
    without = five.decode(lf.latents, conditions=y)
    assert float(mse(with_nulls, x)) < 0.2 * float(mse(without, x))  # the nulls are what makes it retrace
    run("sample", *nt, "--latents", path, "--out", tmp_path / "s")
    save_png(with_nulls[0].clamp(-1, 1), tmp_path / "ref.png")
    assert np.abs(png(tmp_path / "s" / "000000.png") - png(tmp_path / "ref.png")).max() <= 1
    # the nulls were optimised for w = 3: at another scale they are not used, and the run says so
    r = CliRunner().invoke(app, ["sample", "--model", "mnist-cond", "--latents", str(path), "--class-label",
                                 str(y[0]), "--steps", "5", "--guidance-scale", "5", "--out", str(tmp_path / "s5")])
    assert r.exit_code == 0 and "made at guidance scale 3" in r.stderr, r.output
    # the nulls belong to one image: interpolate refuses the file in one line, before writing anything
    r = CliRunner().invoke(app, ["interpolate", str(path), "seed:0", "--model", "mnist-cond", "--class-label",
                                 str(y[0]), "--guidance-scale", "3", "--steps", "5", "--out", str(tmp_path / "path")])
    assert r.exit_code != 0 and "cannot be interpolated" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "path").exists()


def test_offsets_file_round_trip_and_sparse_storage(tmp_path):
    x = torch.randn(1, 1, 4, 4)
    off = [None, torch.zeros(1, 1, 4, 4), torch.randn(1, 1, 4, 4), None]
    p = save_latents(tmp_path / "a.latent.safetensors", x, {"steps": 4}, offsets=off)
    lf = load_latent_file(p)
    assert list(lf.offsets) == [2]  # a zero offset is not written
    torch.testing.assert_close(lf.offsets[2], off[2])
    assert lf.offset_list(4) == [None, None, lf.offsets[2], None]
    torch.testing.assert_close(load_latents(p)[0], x)  # readers of x_T alone are unaffected


@pytest.mark.parametrize("tensors, problem", [
    ({"offsets": torch.zeros(1, 1, 1, 4, 4)}, "go together"),
    ({"offsets": torch.zeros(1, 1, 1, 4, 4), "offset_steps": torch.tensor([7])}, "not distinct steps of a 4-step plan"),
    ({"offsets": torch.zeros(2, 1, 1, 4, 4), "offset_steps": torch.tensor([1, 1])}, "not distinct"),
    ({"offsets": torch.zeros(1, 1, 1, 3, 3), "offset_steps": torch.tensor([1])}, "has shape"),
    ({"offsets": torch.zeros(1, 1, 1, 4, 4), "offset_steps": torch.tensor([1.0])}, "integer step indices"),
    ({"offsets": torch.full((1, 1, 1, 4, 4), float("nan")), "offset_steps": torch.tensor([1])}, "NaN or inf"),
    ({"nulls.class_emb": torch.zeros(3, 1, 8)}, "one null per plan step"),
    ({"nulls.class_emb": torch.zeros(4, 2, 8)}, "one null per plan step"),
    ({"nulls.class_emb": torch.full((4, 1, 8), float("inf"))}, "NaN or inf"),
])
def test_bad_offsets_are_one_line_errors_naming_the_file(tmp_path, tensors, problem):
    p = tmp_path / "bad.latent.safetensors"
    save_file({"latents": torch.zeros(1, 1, 4, 4), **tensors}, str(p), metadata={"steps": "4"})
    with pytest.raises(InputError) as e:
        load_latent_file(p)
    msg = str(e.value)
    assert str(p) in msg and problem in msg and "\n" not in msg


def test_offsets_decode_only_with_the_ddim_sampler_on_their_plan(engine):
    x_T = engine.noise([0])
    with pytest.raises(SettingError, match="offsets for 3 steps"):
        engine.decode(x_T, conditions=[1], offsets=[None] * 3)
    other = Engine.load("mnist-cond", SamplingOptions(steps=10, guidance_scale=3.0, inverting=True, sampler="dpm++2m"))
    with pytest.raises(SettingError, match="use the ddim sampler"):
        other.decode(x_T, conditions=[1], offsets=[None] * 10)
