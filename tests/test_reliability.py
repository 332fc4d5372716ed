"""The reliability battery: every bad input through the real CLI in a subprocess.

Each case asserts the exit code, a one-line message naming the input and the problem, no traceback, and no
partial output.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tinymodels import make_tiny_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("DDIMCTL_DEBUG", None)


def ddimctl(*args, env=None, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=timeout)


def assert_one_line_error(r, code: int, *needles: str):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) >= 1
    last = lines[-1]
    for n in needles:
        assert n in last, (n, r.stderr)


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*")) if d.exists() else []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", channels=3, size=8)


@pytest.fixture(scope="module")
def tiny_gray(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-gray", channels=1, size=8)


# ---------------------------------------------------------------------------------------------------------
# Images


def _png_bytes(w, h) -> bytes:
    """A PNG whose header claims w x h pixels (data irrelevant): Pillow checks the size when opening."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _bad_images(d: Path) -> dict[str, tuple[Path, str]]:
    d.mkdir(exist_ok=True)
    cases = {}
    (d / "text.png").write_text("not an image at all\n")
    cases["not an image"] = (d / "text.png", "not an image")
    (d / "empty.jpg").write_bytes(b"")
    cases["empty"] = (d / "empty.jpg", "empty")
    photo = np.asarray(Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)))
    Image.fromarray(photo).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    cases["truncated png"] = (d / "cut.png", "truncated")
    Image.fromarray(photo).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(data[: len(data) // 2])
    cases["truncated jpeg"] = (d / "cut.jpg", "truncated")
    (d / "bomb.png").write_bytes(_png_bytes(20000, 20000))  # 400 M pixels > 2 x Pillow's limit
    cases["decompression bomb"] = (d / "bomb.png", "pixels")
    cases["missing"] = (d / "nope.png", "no such file")
    return cases


@pytest.mark.parametrize("case", ["not an image", "empty", "truncated png", "truncated jpeg", "decompression bomb", "missing"])
def test_bad_images_are_named_and_nothing_is_written(tiny, tmp_path, case):
    path, needle = _bad_images(tmp_path / "in")[case]
    out = tmp_path / "out"
    r = ddimctl("invert", path, "--model", tiny, "--steps", 2, "--out", out)
    assert_one_line_error(r, 1, str(path))
    assert needle in r.stderr.lower(), r.stderr
    assert [f for f in files_in(out) if not f.startswith(".")] == [] and not any(f.endswith(".tmp") for f in files_in(out))


def test_directory_without_images(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    r = ddimctl("reconstruct", tmp_path / "empty", "--model", tiny, "--out", tmp_path / "out")
    assert_one_line_error(r, 1, str(tmp_path / "empty"), "no images")


def test_a_bad_image_in_a_batch_stops_before_anything_is_written(tiny, tmp_path):
    d = tmp_path / "in"
    _bad_images(d)
    r = ddimctl("invert", d / "full.png", d / "cut.png", "--model", tiny, "--steps", 2, "--out", tmp_path / "out")
    assert_one_line_error(r, 1, "cut.png")


def test_unusual_images_are_handled(tiny, tiny_gray, tmp_path):
    """16-bit, RGBA, palette, grayscale into RGB, RGB into grayscale, EXIF-rotated JPEG: all invert fine."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)).save(d / "deep16.png")
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(d / "alpha.png")
    Image.new("RGB", (30, 30), (0, 128, 255)).convert("P", palette=Image.ADAPTIVE).save(d / "palette.png")
    Image.new("L", (30, 30), 77).save(d / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 40), (10, 200, 30)).save(d / "rotated.jpg", exif=exif)
    for model in (tiny, tiny_gray):
        out = tmp_path / f"out-{Path(model).name}"
        r = ddimctl("invert", d, "--model", model, "--steps", 2, "--inversion", "plain", "--out", out, "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert len(doc["outputs"]) == 5
        sizes = {Path(i["source"]).name: i["original_size"] for i in doc["images"]}
        assert sizes["rotated.jpg"] == [40, 60]  # EXIF orientation applied before anything else
        assert sizes["deep16.png"] == [64, 48]


# ---------------------------------------------------------------------------------------------------------
# Models


def test_model_reference_that_does_not_exist(tmp_path):
    r = ddimctl("sample", "--model", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert_one_line_error(r, 1, str(tmp_path / "nowhere"))
    r = ddimctl("sample", "--model", "someone/not-cached", "--out", tmp_path / "o",
                env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(r, 1, "someone/not-cached")
    assert "offline" in r.stderr.lower() or "HF_HUB_OFFLINE" in r.stderr
    assert not (tmp_path / "o").exists()


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "diffusion_pytorch_model.safetensors"),
    ("foreign", "diffusion_pytorch_model.safetensors"),
    ("no-config", "config.json"),
    ("bad-json", "config.json"),
    ("unsupported", "time_embedding_type"),
    ("mismatch", "diffusion_pytorch_model.safetensors"),
])
def test_broken_checkpoints(tiny, tmp_path, damage, needle):
    m = _copy_model(Path(tiny), tmp_path / "m")
    w = m / "diffusion_pytorch_model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:1000])
    elif damage == "foreign":
        Image.new("RGB", (4, 4)).save(w, format="PNG")
    elif damage == "no-config":
        (m / "config.json").unlink()
    elif damage == "bad-json":
        (m / "config.json").write_text("{not json")
    elif damage == "unsupported":
        cfg = json.loads((m / "config.json").read_text())
        cfg["time_embedding_type"] = "sinusoidal"
        (m / "config.json").write_text(json.dumps(cfg))
    elif damage == "mismatch":
        cfg = json.loads((m / "config.json").read_text())
        cfg["block_out_channels"] = [8, 32]
        (m / "config.json").write_text(json.dumps(cfg))
    r = ddimctl("sample", "--model", m, "--out", tmp_path / "o", "--n", 1, "--steps", 2)
    assert_one_line_error(r, 1, needle)
    assert not (tmp_path / "o").exists() or files_in(tmp_path / "o") == []


def test_pickle_checkpoints_are_refused(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04not really a pickle")
    r = ddimctl("sample", "--model", p, "--out", tmp_path / "o")
    assert_one_line_error(r, 1, "model.ckpt", "pickle")


# ---------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("args,code,needle", [
    (["--steps", "0"], 2, "--steps"),
    (["--steps", "5000"], 1, "--steps 5000"),
    (["--eta", "-0.5"], 2, "--eta"),
    (["--eta", "1.5"], 2, "--eta"),
    (["--n", "0"], 2, "--n"),
    (["--spacing", "sideways"], 1, "sideways"),
    (["--sampler", "euler"], 1, "euler"),
    (["--device", "cuda:7"], 1, "--device cuda:7"),
])
def test_bad_options(tiny, tmp_path, args, code, needle):
    if args[:2] == ["--device", "cuda:7"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = ddimctl("sample", "--model", tiny, "--out", tmp_path / "o", *args)
    assert_one_line_error(r, code, needle)
    assert files_in(tmp_path / "o") == []


def test_unwritable_out(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    r = ddimctl("sample", "--model", tiny, "--n", 1, "--steps", 2, "--out", tmp_path / "file" / "sub")
    assert_one_line_error(r, 1, str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


def test_full_disk_while_writing(tiny, tmp_path):
    """fsync fails with ENOSPC (injected through sitecustomize in the real subprocess): no partial files."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os\n"
        "_real = os.fsync\n"
        "def fsync(fd):\n"
        "    if os.fstat(fd).st_size > 0:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _real(fd)\n"
        "os.fsync = fsync\n"
    )
    out = tmp_path / "o"
    r = ddimctl("sample", "--model", tiny, "--n", 3, "--steps", 2, "--out", out,
                env={"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert_one_line_error(r, 1, "000000.png", "no space left on device")
    assert files_in(out) == []


# ---------------------------------------------------------------------------------------------------------
# Numbers


def test_nan_model_is_detected_and_nothing_written(tiny, tmp_path):
    m = _copy_model(Path(tiny), tmp_path / "nan")
    w = load_file(m / "diffusion_pytorch_model.safetensors")
    w["conv_out.bias"] = torch.full_like(w["conv_out.bias"], float("nan"))
    save_file(w, m / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    r = ddimctl("sample", "--model", m, "--n", 2, "--steps", 2, "--out", tmp_path / "o")
    assert_one_line_error(r, 1, "NaN")
    assert "000000" in r.stderr
    assert files_in(tmp_path / "o") == []


# ---------------------------------------------------------------------------------------------------------
# Interruptions and reproducibility


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_batch_leaves_only_complete_files_and_resumes_identically(tiny, tmp_path, sig, code):
    out = tmp_path / "o"
    args = ["sample", "--model", tiny, "--n", 24, "--batch-size", 2, "--steps", 60, "--seed", 5, "--quiet"]
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps it ignored: give
    # the child the default disposition, as an interactive run has, so the suite also works when run with `&`.
    proc = subprocess.Popen([sys.executable, "-m", "ddimctl", *map(str, args), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240  # generous: the machine may be busy
    while time.time() < deadline and len(list(out.glob("*.png"))) < 4 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    written = sorted(out.glob("*.png"))
    assert 4 <= len(written) < 24, "interrupt the run in the middle"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    for p in written:
        Image.open(p).load()  # every file that exists is complete
    assert stdout.split() == [str(p) for p in written]  # reported exactly what it finished
    r = ddimctl(*args, "--out", out, "--skip-existing")
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    assert ddimctl(*args, "--out", ref).returncode == 0
    assert [p.name for p in sorted(out.glob("*.png"))] == [p.name for p in sorted(ref.glob("*.png"))]
    for p in sorted(ref.glob("*.png")):
        assert (out / p.name).read_bytes() == p.read_bytes()


def test_same_seed_gives_byte_identical_pngs_across_runs_and_batch_sizes(tiny, tmp_path):
    for name, bs in [("a", 1), ("b", 1), ("c", 3)]:
        r = ddimctl("sample", "--model", tiny, "--n", 5, "--steps", 5, "--eta", 1, "--seed", 42, "--batch-size", bs,
                    "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    for i in range(5):
        ref = (tmp_path / "a" / f"{i:06d}.png").read_bytes()
        assert (tmp_path / "b" / f"{i:06d}.png").read_bytes() == ref
        assert (tmp_path / "c" / f"{i:06d}.png").read_bytes() == ref


def test_debug_variable_shows_the_traceback(tmp_path):
    r = ddimctl("sample", "--model", tmp_path / "nowhere", env={"DDIMCTL_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr
