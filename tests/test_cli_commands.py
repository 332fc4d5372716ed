"""The commands end to end as users run them (sample, invert, reconstruct, interpolate, info; --compile, --dtype,
--channels-last, torchrun): Typer's CliRunner in-process, real subprocesses where it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ddimctl.cli import app
from ddimctl.sampler import SAMPLERS
from tinymodels import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def tiny_rgb(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-rgb", channels=3, size=16, clip_sample=False)


def cli(*args, input=None):
    r = CliRunner().invoke(app, [str(a) for a in args], input=input)
    return r


def ok(*args, **kw):
    r = cli(*args, **kw)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_writes_indexed_pngs_and_is_batch_size_independent(tiny, tmp_path):
    r = ok("sample", "--model", tiny, "--n", 5, "--steps", 4, "--seed", 7, "--batch-size", 2, "--out", tmp_path / "a")
    lines = r.stdout.strip().splitlines()
    assert lines == [str(tmp_path / "a" / f"{i:06d}.png") for i in range(5)]
    ok("sample", "--model", tiny, "--n", 5, "--steps", 4, "--seed", 7, "--batch-size", 5, "--out", tmp_path / "b")
    # image i uses seed + i: image 2 of seed 7 is image 0 of seed 9
    ok("sample", "--model", tiny, "--n", 1, "--steps", 4, "--seed", 9, "--out", tmp_path / "c")
    for i in range(5):
        assert (tmp_path / "a" / f"{i:06d}.png").read_bytes() == (tmp_path / "b" / f"{i:06d}.png").read_bytes()
    assert (tmp_path / "a" / "000002.png").read_bytes() == (tmp_path / "c" / "000000.png").read_bytes()
    assert png(tmp_path / "a" / "000000.png").shape == (8, 8)
    assert not np.array_equal(png(tmp_path / "a" / "000000.png"), png(tmp_path / "a" / "000001.png"))


def test_sample_eta_one_is_batch_size_independent_and_differs_from_eta_zero(tiny, tmp_path):
    for bs in (1, 3):
        ok("sample", "-m", tiny, "--n", 3, "--steps", 5, "--eta", 1, "--batch-size", bs, "--out", tmp_path / f"e{bs}")
    ok("sample", "-m", tiny, "--n", 3, "--steps", 5, "--eta", 0, "--out", tmp_path / "z")
    for i in range(3):
        name = f"{i:06d}.png"
        assert (tmp_path / "e1" / name).read_bytes() == (tmp_path / "e3" / name).read_bytes()
    assert any((tmp_path / "e1" / f"{i:06d}.png").read_bytes() != (tmp_path / "z" / f"{i:06d}.png").read_bytes() for i in range(3))


def test_sample_json_document(tiny, tmp_path):
    r = ok("sample", "-m", tiny, "--n", 2, "--steps", 3, "--seed", 11, "--out", tmp_path, "--json")
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert doc["outputs"] == [str(tmp_path / "000000.png"), str(tmp_path / "000001.png")]
    assert doc["seeds"] == [11, 12]
    assert doc["settings"]["steps"] == 3 and doc["settings"]["eta"] == 0 and doc["settings"]["sampler"] == "ddim"
    assert doc["settings"]["spacing"] == "leading"
    assert doc["model"]["ref"] == str(tiny) and doc["model"]["source"] == "dir"


def test_sample_safetensors_format_holds_exact_values(tiny, tmp_path):
    ok("sample", "-m", tiny, "--n", 3, "--steps", 3, "--format", "safetensors", "--out", tmp_path / "st")
    ok("sample", "-m", tiny, "--n", 3, "--steps", 3, "--out", tmp_path / "png")
    t = load_file(tmp_path / "st" / "samples.safetensors")["samples"]
    assert t.shape == (3, 1, 8, 8) and t.dtype == torch.float32
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0  # clip_sample is on by default (DDIM defaults)
    quantized = ((t + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    for i in range(3):
        assert np.array_equal(quantized[i, 0].numpy(), png(tmp_path / "png" / f"{i:06d}.png"))


def test_grid_and_saved_latents_reproduce_the_run(tiny, tmp_path):
    ok("sample", "-m", tiny, "--n", 4, "--steps", 4, "--eta", 0.5, "--seed", 3, "--out", tmp_path / "a",
       "--save-latents", "--grid", tmp_path / "grid.png")
    grid = png(tmp_path / "grid.png")
    assert grid.shape == (2 + 2 * (8 + 2), 2 + 2 * (8 + 2))  # 2x2 grid, padding 2
    lat = load_file(tmp_path / "a" / "000001.latent.safetensors")["latents"]
    assert lat.shape == (1, 1, 8, 8)
    stacked = torch.cat([load_file(tmp_path / "a" / f"{i:06d}.latent.safetensors")["latents"] for i in range(4)])
    save_file({"latents": stacked}, tmp_path / "all.safetensors")
    ok("sample", "-m", tiny, "--steps", 4, "--eta", 0.5, "--seed", 3, "--latents", tmp_path / "all.safetensors", "--out", tmp_path / "b")
    for i in range(4):
        assert (tmp_path / "a" / f"{i:06d}.png").read_bytes() == (tmp_path / "b" / f"{i:06d}.png").read_bytes()


def test_existing_outputs_are_never_overwritten_silently(tiny, tmp_path):
    out = tmp_path / "o"
    ok("sample", "-m", tiny, "--n", 3, "--steps", 3, "--out", out)
    (out / "000001.png").unlink()
    (out / "000002.png").write_bytes(b"mine")
    r = cli("sample", "-m", tiny, "--n", 3, "--steps", 3, "--out", out)
    assert r.exit_code == 1 and "000000.png: already exists" in r.stderr
    assert (out / "000002.png").read_bytes() == b"mine" and not (out / "000001.png").exists()  # nothing done
    r = ok("sample", "-m", tiny, "--n", 3, "--steps", 3, "--out", out, "--skip-existing")
    assert r.stdout.strip().splitlines() == [str(out / "000001.png")]
    assert (out / "000002.png").read_bytes() == b"mine"
    ok("sample", "-m", tiny, "--n", 3, "--steps", 3, "--out", tmp_path / "ref")
    assert (out / "000001.png").read_bytes() == (tmp_path / "ref" / "000001.png").read_bytes()
    ok("sample", "-m", tiny, "--n", 3, "--steps", 3, "--out", out, "--overwrite")
    assert (out / "000002.png").read_bytes() == (tmp_path / "ref" / "000002.png").read_bytes()


def _photo(tmp_path, name="photo.jpg", size=(96, 64)):
    skimage_data = pytest.importorskip("skimage.data")
    img = Image.fromarray(skimage_data.astronaut()).resize(size)
    img.save(tmp_path / name, quality=95)
    return tmp_path / name


def test_invert_writes_latents_with_metadata(tiny_rgb, tmp_path):
    photo = _photo(tmp_path)
    r = ok("invert", photo, "-m", tiny_rgb, "--steps", 5, "--out", tmp_path / "lat")
    target = tmp_path / "lat" / "photo.latent.safetensors"
    assert r.stdout.strip() == str(target)
    assert "resized" in r.stderr  # the note about fitting the photo to the model
    with safe_open(target, "pt") as f:
        meta = f.metadata()
        lat = f.get_tensor("latents")
    assert lat.shape == (1, 3, 16, 16) and lat.dtype == torch.float32 and torch.isfinite(lat).all()
    assert meta["model"] == str(tiny_rgb) and meta["steps"] == "5" and meta["sampler"] == "ddim"
    assert meta["source"] == str(photo) and json.loads(meta["original_size"]) == [96, 64]
    assert meta["spacing"] == "logsnr" and meta["inversion"] == "exact"


def test_invert_reads_paths_from_stdin_and_directories(tiny_rgb, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("a.png", "b.png"):
        _photo(d, name)
    r = ok("invert", "-", "-m", tiny_rgb, "--steps", 3, "--out", tmp_path / "l1", "--inversion", "plain", input=f"{d / 'a.png'}\n\n{d / 'b.png'}\n")
    assert len(r.stdout.strip().splitlines()) == 2
    r = ok("invert", d, "-m", tiny_rgb, "--steps", 3, "--out", tmp_path / "l2", "--inversion", "plain", "-q")
    assert r.stdout.strip().splitlines() == [str(tmp_path / "l2" / "a.latent.safetensors"), str(tmp_path / "l2" / "b.latent.safetensors")]
    assert r.stderr == ""


def test_reconstruct_charges_each_image_the_evaluations_it_caused_whatever_its_batch(tmp_path):
    """Exact inversion evaluates only the images still solving: an image's model_calls are its own (the same in a
    batch of 3 as alone), the report's image_evaluations their sum, and its model_calls the forwards launched."""
    from ddimctl.data import load_builtin_dataset
    from ddimctl.images import save_png

    digits = load_builtin_dataset("mnist-test", 32)
    src = tmp_path / "digits"
    src.mkdir()
    for i in (0, 100, 200):
        save_png(digits[i], src / f"d{i:03d}.png")
    docs = {}
    for bs in (3, 1):
        r = ok("reconstruct", src, "--model", "mnist", "--steps", 5, "--batch-size", bs, "--out", tmp_path / f"b{bs}",
               "--json")
        docs[bs] = json.loads(r.stdout)
    calls = {bs: [rec["model_calls"] for rec in d["images"]] for bs, d in docs.items()}
    assert calls[3] == calls[1] and min(calls[3]) > 2 * 5
    for bs, d in docs.items():
        assert d["image_evaluations"] == sum(calls[bs])
    assert docs[1]["model_calls"] == docs[1]["image_evaluations"]  # alone, every forward is one image's
    assert max(calls[3]) <= docs[3]["model_calls"] < docs[3]["image_evaluations"]  # shared forwards


def test_reconstruct_reports_mse_and_exact_beats_plain(tiny_rgb, tmp_path):
    photo = _photo(tmp_path)
    docs = {}
    for inv in ("plain", "exact"):
        r = ok("reconstruct", photo, "-m", tiny_rgb, "--steps", 10, "--inversion", inv, "--out", tmp_path / inv, "--json")
        docs[inv] = json.loads(r.stdout)
    exact, plain = docs["exact"], docs["plain"]
    assert exact["outputs"] == [str(tmp_path / "exact" / "photo.png"), str(tmp_path / "exact" / "photo.compare.png")]
    rec = exact["images"][0]
    assert rec["mse"] >= 0 and rec["psnr"] > 0 and rec["model_calls"] > 2 * 10
    assert plain["images"][0]["model_calls"] == 2 * 10
    assert exact["metrics"]["mean_mse"] == pytest.approx(rec["mse"])
    assert exact["metrics"]["mean_mse"] < plain["metrics"]["mean_mse"]
    assert png(tmp_path / "exact" / "photo.compare.png").shape == (16 + 4, 16 * 2 + 3 * 2, 3)  # 2 px padding
    # the reported MSE is the MSE between the written reconstruction and the model-sized input (up to 8-bit rounding)


def test_interpolate_ends_are_the_seeds_samples(tiny, tmp_path):
    r = ok("interpolate", "seed:4", "seed:9", "-m", tiny, "--frames", 5, "--steps", 4, "--out", tmp_path / "i")
    outs = r.stdout.strip().splitlines()
    assert outs[:5] == [str(tmp_path / "i" / f"frame_{k:03d}.png") for k in range(5)]
    assert outs[5:] == [str(tmp_path / "i" / "strip.png"), str(tmp_path / "i" / "interpolation.gif")]
    # frames are decoded without x0 clipping (inversion needs that), so the ends are the unclipped samples
    ok("sample", "-m", tiny, "--n", 1, "--steps", 4, "--seed", 4, "--out", tmp_path / "s4", "--no-clip-sample")
    ok("sample", "-m", tiny, "--n", 1, "--steps", 4, "--seed", 9, "--out", tmp_path / "s9", "--no-clip-sample")
    assert (tmp_path / "i" / "frame_000.png").read_bytes() == (tmp_path / "s4" / "000000.png").read_bytes()
    assert (tmp_path / "i" / "frame_004.png").read_bytes() == (tmp_path / "s9" / "000000.png").read_bytes()
    assert png(tmp_path / "i" / "strip.png").shape[1] == 2 + 5 * (8 + 2)
    # --frames N: N frames in the GIF (Pillow stores identical consecutive frames once, shown twice as long);
    # --boomerang adds the way back, 2N - 2 frames
    frames = [png(tmp_path / "i" / f"frame_{k:03d}.png") for k in range(5)]
    distinct = lambda seq: 1 + sum(not np.array_equal(a, b) for a, b in zip(seq, seq[1:]))  # noqa: E731
    assert distinct(frames) >= 3  # the ends differ: the GIF really has several frames to hold
    assert Image.open(tmp_path / "i" / "interpolation.gif").n_frames == distinct(frames)
    ok("interpolate", "seed:4", "seed:9", "-m", tiny, "--frames", 5, "--steps", 4, "--out", tmp_path / "b", "--boomerang")
    assert Image.open(tmp_path / "b" / "interpolation.gif").n_frames == distinct(frames + frames[-2:0:-1])


def test_interpolate_from_latent_files_and_images(tiny_rgb, tmp_path):
    photo = _photo(tmp_path)
    ok("invert", photo, "-m", tiny_rgb, "--steps", 4, "--out", tmp_path / "lat", "--inversion", "plain")
    lat = tmp_path / "lat" / "photo.latent.safetensors"
    r = ok("interpolate", lat, "seed:1", "-m", tiny_rgb, "--frames", 3, "--steps", 4, "--out", tmp_path / "i")
    assert len(r.stdout.strip().splitlines()) == 5
    r = ok("interpolate", photo, lat, "-m", tiny_rgb, "--frames", 2, "--steps", 4, "--inversion", "plain", "--out", tmp_path / "j")
    # the image end is inverted with the same settings as the latent file: the same frame
    assert (tmp_path / "j" / "frame_000.png").read_bytes() == (tmp_path / "j" / "frame_001.png").read_bytes()


def test_info_describes_the_model(tiny):
    r = ok("info", tiny, "--json")
    doc = json.loads(r.stdout)
    assert doc["source"] == "dir"
    assert "prediction_type" in json.dumps(doc) and "sample_size" in json.dumps(doc)


def test_dpmpp_2m_defaults_to_logsnr_spacing(tiny, tmp_path):
    r = ok("sample", "-m", tiny, "--n", 1, "--steps", 5, "--sampler", "dpm++2m", "--json", "--out", tmp_path)
    assert json.loads(r.stdout)["settings"]["spacing"] == "logsnr"
    r = cli("sample", "-m", tiny, "--n", 1, "--steps", 5, "--sampler", "dpm++2m", "--eta", 0.5, "--out", tmp_path / "x")
    assert r.exit_code == 1 and "--eta" in r.stderr and "deterministic" in r.stderr


def test_clip_sample_option_changes_the_result(tiny, tmp_path):
    for flag in ("--clip-sample", "--no-clip-sample"):
        ok("sample", "-m", tiny, "--n", 2, "--steps", 4, "--format", "safetensors", "--out", tmp_path / flag, flag)
    clipped = load_file(tmp_path / "--clip-sample" / "samples.safetensors")["samples"]
    free = load_file(tmp_path / "--no-clip-sample" / "samples.safetensors")["samples"]
    default = tmp_path / "default"
    ok("sample", "-m", tiny, "--n", 2, "--steps", 4, "--format", "safetensors", "--out", default)
    assert torch.equal(load_file(default / "samples.safetensors")["samples"], clipped)  # DDIM default: clip on
    assert not torch.equal(clipped, free)


def _torchrun(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ddimctl", *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_torchrun_splits_work_by_index_and_the_union_equals_one_process(tiny, tiny_rgb, tmp_path):
    # byte-identical across process counts is what --deterministic promises (README, Reproducibility): each rank
    # computes fewer images per batch than the single process, and batch shape reaches the kernels' arithmetic
    r = _torchrun("sample", "-m", tiny, "-n", 5, "--steps", 3, "--eta", 0.5, "--deterministic",
                  "--out", tmp_path / "dist", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ok("sample", "-m", tiny, "--n", 5, "--steps", 3, "--eta", 0.5, "--deterministic", "--out", tmp_path / "single")
    dist, single = sorted((tmp_path / "dist").iterdir()), sorted((tmp_path / "single").iterdir())
    assert [p.name for p in dist] == [p.name for p in single] and len(single) == 5
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(dist, single))
    assert sorted(r.stdout.split()) == [str(p) for p in dist]  # each image reported once, by its rank

    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        _photo(photos, f"p{k}.png", size=(40 + 8 * k, 32))
    r = _torchrun("reconstruct", photos, "-m", tiny_rgb, "--steps", 3, "--inversion", "plain", "--deterministic",
                  "--out", tmp_path / "rd", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ok("reconstruct", photos, "-m", tiny_rgb, "--steps", 3, "--inversion", "plain", "--deterministic",
       "--out", tmp_path / "rs")
    rd, rs = sorted((tmp_path / "rd").iterdir()), sorted((tmp_path / "rs").iterdir())
    assert [p.name for p in rd] == [p.name for p in rs] and len(rs) == 6
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(rd, rs))


def test_compile_falls_back_cleanly(tiny, tmp_path, monkeypatch):
    ok("sample", "-m", tiny, "--n", 2, "--steps", 3, "--out", tmp_path / "eager")

    def broken_compile(model, *a, **k):
        def run(*args):
            raise RuntimeError("no compiler here\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    r = ok("sample", "-m", tiny, "--n", 2, "--steps", 3, "--out", tmp_path / "c1", "--compile")
    assert "--compile: compiling failed (RuntimeError: no compiler here); running eagerly" in r.stderr
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: (_ for _ in ()).throw(RuntimeError("unsupported")))
    r = ok("sample", "-m", tiny, "--n", 2, "--steps", 3, "--out", tmp_path / "c2", "--compile")
    assert "--compile: not available (RuntimeError: unsupported)" in r.stderr
    for d in ("c1", "c2"):
        for i in range(2):
            assert (tmp_path / d / f"{i:06d}.png").read_bytes() == (tmp_path / "eager" / f"{i:06d}.png").read_bytes()


def test_channels_last_and_bfloat16_agree_with_float32(tiny_rgb, tmp_path):
    ok("sample", "-m", tiny_rgb, "--n", 2, "--steps", 4, "--format", "safetensors", "--out", tmp_path / "ref")
    ok("sample", "-m", tiny_rgb, "--n", 2, "--steps", 4, "--format", "safetensors", "--out", tmp_path / "cl", "--channels-last")
    ok("sample", "-m", tiny_rgb, "--n", 2, "--steps", 4, "--format", "safetensors", "--out", tmp_path / "bf", "--dtype", "bfloat16")
    ref = load_file(tmp_path / "ref" / "samples.safetensors")["samples"]
    torch.testing.assert_close(load_file(tmp_path / "cl" / "samples.safetensors")["samples"], ref, atol=1e-4, rtol=0)
    bf = load_file(tmp_path / "bf" / "samples.safetensors")["samples"]
    assert bf.dtype == torch.float32 and not torch.equal(bf, ref)  # really ran in bfloat16 ...
    assert float((bf - ref).abs().mean()) < 0.05  # ... and stays close: the sampler state is float32


def test_json_documents_are_strict_json():
    from ddimctl.cli.output import json_safe

    doc = json_safe({"psnr": float("inf"), "mse": [0.5, float("nan")], "n": 3})
    assert json.loads(json.dumps(doc, allow_nan=False)) == {"psnr": None, "mse": [0.5, None], "n": 3}


def test_inversion_refuses_what_cannot_work(tiny, tmp_path):
    Image.new("L", (8, 8), 10).save(tmp_path / "a.png")
    r = cli("reconstruct", tmp_path / "a.png", "-m", tiny, "--sampler", "bdia", "--inversion", "plain", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "--inversion plain: the bdia sampler inverts exactly by construction" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_inverts_reconstructs_and_interpolates(tiny, tmp_path, sampler):
    Image.new("L", (8, 8), 10).save(tmp_path / "a.png")
    r = ok("reconstruct", tmp_path / "a.png", "-m", tiny, "--steps", 4, "--sampler", sampler, "--out", tmp_path / "r", "--json")
    doc = json.loads(r.stdout)
    assert doc["settings"]["sampler"] == sampler and doc["settings"]["spacing"] == "logsnr"  # the inversion default
    rec = doc["images"][0]
    if sampler != "bdia":  # iterations and residuals per inverse step (fireflow: per model call), from the clean end
        solves = 4 + (sampler == "fireflow")
        assert len(rec["iterations"]) == len(rec["residuals"]) == solves and all(i >= 1 for i in rec["iterations"])
    if sampler not in ("ddim", "bdia"):  # a multistep solve, checked against plain inversion by decoding both
        assert isinstance(rec["plain_inversion_kept"], bool) and rec["round_trip_rms"] >= 0
    ok("invert", tmp_path / "a.png", "-m", tiny, "--steps", 4, "--sampler", sampler, "--out", tmp_path / "l")
    lat = tmp_path / "l" / "a.latent.safetensors"
    with safe_open(str(lat), "pt") as f:
        assert ("latents_prev" in f.keys()) == (sampler == "bdia") and f.metadata()["spacing"] == "logsnr"
    # decoding the latent file retraces the inversion: the reconstruction, with the file's spacing
    ok("sample", "-m", tiny, "--latents", lat, "--steps", 4, "--sampler", sampler, "--no-clip-sample", "--out", tmp_path / "s")
    assert np.abs(png(tmp_path / "s" / "000000.png").astype(int) - png(tmp_path / "r" / "a.png").astype(int)).max() <= 1
    r = ok("interpolate", tmp_path / "a.png", lat, "-m", tiny, "--frames", 2, "--steps", 4, "--sampler", sampler, "--out", tmp_path / "i")
    # the image end is inverted and decoded with the same sampler: the same frame as the latent end
    assert np.abs(png(tmp_path / "i" / "frame_000.png").astype(int) - png(tmp_path / "i" / "frame_001.png").astype(int)).max() <= 1
    if sampler == "bdia":
        r = cli("sample", "-m", tiny, "--latents", lat, "--steps", 4, "--sampler", "ddim", "--out", tmp_path / "x")
        assert r.exit_code == 1 and "decode it with the bdia sampler" in r.stderr
        r = cli("sample", "-m", tiny, "--latents", lat, "--steps", 5, "--sampler", "bdia", "--out", tmp_path / "y")
        assert r.exit_code == 1 and "made with 4 steps and logsnr spacing" in r.stderr
