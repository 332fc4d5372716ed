"""ddimctl.images: reading real image files into [-1, 1] tensors, writing PNG/GIF, grids, metrics, input specs.

Real photographs come from scikit-learn's sample images (china.jpg, 427x640) or scikit-image's data module;
the tests that need one are skipped when neither is installed.
"""

from __future__ import annotations

import errno
import functools
import io
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddimctl import fsutil
from ddimctl.errors import InputError, OutputError
from ddimctl.images import (
    LoadedImage,
    iter_image_paths,
    load_image,
    make_grid,
    mse,
    psnr,
    save_gif,
    save_png,
    side_by_side,
    tensor_to_pil,
    to_uint8,
    to_unit,
)



@functools.lru_cache(maxsize=None)
def _photo() -> np.ndarray | None:
    try:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[0]  # china.jpg, (427, 640, 3) uint8
    except ImportError:
        pass
    try:
        import skimage.data

        return skimage.data.coffee()  # (400, 600, 3) uint8
    except ImportError:
        return None


@pytest.fixture
def photo() -> np.ndarray:
    """A real RGB photograph, (H, W, 3) uint8 with W > H."""
    arr = _photo()
    if arr is None:
        pytest.skip("needs scikit-learn or scikit-image for a real photograph")
    return arr


@pytest.fixture
def gray_photo() -> np.ndarray:
    """A real grayscale photograph, (512, 512) uint8 (scikit-image's camera)."""
    data = pytest.importorskip("skimage.data")
    return data.camera()


def u8_to_x(arr: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) uint8 -> (C, H, W) float32 in [-1, 1], computed as load_image does (float64, then float32)."""
    a = arr.astype(np.float64) / 255.0 * 2.0 - 1.0
    if a.ndim == 2:
        a = a[..., None]
    return torch.from_numpy(np.ascontiguousarray(a.astype(np.float32).transpose(2, 0, 1)))


def error_of(path, *args) -> str:
    with pytest.raises(InputError) as e:
        load_image(path, *args)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg


# ------------------------------------------------------------------------------------------------------------
# Error paths


def test_not_an_image(tmp_path):
    p = tmp_path / "photo.png"
    p.write_text("this is not a PNG\n")
    assert error_of(p, 3, 32) == f"{p}: not an image (cannot identify image file)"


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert error_of(p, 3, 32) == f"{p}: empty file"


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_real_file(tmp_path, photo, fmt, suffix):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format=fmt)
    data = buf.getvalue()
    p = tmp_path / f"cut{suffix}"
    p.write_bytes(data[: len(data) // 2])
    msg = error_of(p, 3, 32)
    assert msg.startswith(f"{p}: truncated or corrupt image (") and "truncated" in msg[len(str(p)) :]


def test_decompression_bomb_error_and_warning_are_both_refused(tmp_path, monkeypatch):
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.new("RGB", (40, 40), (10, 20, 30)).save(small)  # 1,600 px: between 1x and 2x the limit -> Pillow warns
    Image.new("RGB", (100, 100), (10, 20, 30)).save(big)  # 10,000 px: over 2x -> Pillow raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert error_of(small, 3, 32) == (
        f"{small}: image too large (1,600 pixels, more than the limit of 1,000; PIL.Image.MAX_IMAGE_PIXELS sets the limit)"
    )
    assert error_of(big, 3, 32).startswith(f"{big}: image too large (10,000 pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert load_image(big, 3, 32).tensor.shape == (1, 3, 32, 32)


def test_missing_path_and_directory(tmp_path):
    assert error_of(tmp_path / "nope.png", 3, 32) == f"{tmp_path / 'nope.png'}: no such file"
    assert error_of(tmp_path, 3, 32) == f"{tmp_path}: is a directory, not an image"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_permission_denied(tmp_path):
    p = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(p)
    p.chmod(0)
    if os.access(p, os.R_OK):
        p.chmod(0o644)
        pytest.skip("file permissions are not enforced for this user (root with CAP_DAC_OVERRIDE)")
    try:
        assert error_of(p, 1, None) == f"{p}: not readable (permission denied)"
    finally:
        p.chmod(0o644)


def test_bad_arguments(tmp_path):
    p = tmp_path / "a.png"
    Image.new("L", (4, 4)).save(p)
    with pytest.raises(ValueError):
        load_image(p, 4, None)
    with pytest.raises(ValueError):
        load_image(p, 1, 0)


# ------------------------------------------------------------------------------------------------------------
# Mode handling, with real values


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    v = int(65535 * 0.75)  # 49151
    arr = np.full((6, 5), v, dtype=np.uint16)
    arr[0, 0] = v + 1  # one step of 16-bit precision must survive
    arr[0, 1] = 0
    arr[0, 2] = 65535
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode in ("I;16", "I")
    img = load_image(p, 1, None)
    t = img.tensor[0, 0].double()
    assert img.tensor.dtype == torch.float32 and img.tensor.shape == (1, 1, 6, 5)
    assert abs(t[3, 3].item() - (2 * v / 65535 - 1)) < 1e-6  # ~0.49998, not clipped to 1
    assert abs(t[3, 3].item() - 0.5) < 1e-4
    assert t[0, 0] > t[3, 3]  # not quantized to 8 bits
    assert abs(t[0, 0].item() - t[3, 3].item() - 2 / 65535) < 1e-6
    assert t[0, 1].item() == -1.0 and t[0, 2].item() == 1.0
    assert any("16-bit" in n for n in img.notes)
    rgb = load_image(p, 3, None).tensor[0]
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2]) and torch.equal(rgb[0], img.tensor[0, 0])


def test_16bit_resize_keeps_precision(tmp_path):
    arr = np.full((8, 8), 30000, dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    t = load_image(p, 1, 4).tensor
    assert torch.allclose(t.double(), torch.full((1, 1, 4, 4), 2 * 30000 / 65535 - 1, dtype=torch.float64), atol=1e-6)


def test_rgba_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    arr[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    arr[0, 2] = (0, 0, 255, 0)  # transparent blue -> white
    arr[1, 0] = (0, 0, 0, 51)  # 20 % black over white -> 0.8
    p = tmp_path / "alpha.png"
    Image.fromarray(arr, "RGBA").save(p)
    img = load_image(p, 3, None)
    t = img.tensor[0]
    assert torch.equal(t[:, 0, 0], torch.ones(3))
    assert torch.equal(t[:, 0, 1], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(t[:, 0, 2], torch.ones(3))
    assert torch.allclose(t[:, 1, 0], torch.full((3,), 2 * 0.8 - 1), atol=1e-6)
    assert "composited alpha on white" in img.notes
    assert load_image(p, 1, None).tensor[0, 0, 0, 0].item() == 1.0  # into a gray model as well


def test_gray_alpha_and_palette_transparency(tmp_path):
    la = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)  # (1, 2, 2): transparent black, opaque black
    p = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p)
    assert load_image(p, 1, None).tensor.flatten().tolist() == [1.0, -1.0]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.putpixel((1, 0), 0)
    q = tmp_path / "pal.png"
    pal.save(q, transparency=0)  # palette index 0 (black) is transparent
    t = load_image(q, 3, None).tensor[0]
    assert torch.equal(t[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red
    assert torch.equal(t[:, 0, 1], torch.ones(3))  # transparent -> white


def test_palette_image(tmp_path, photo):
    p = tmp_path / "pal.gif"
    pim = Image.fromarray(photo).quantize(64)
    pim.save(p)
    expected = np.asarray(Image.open(p).convert("RGB"))
    img = load_image(p, 3, None)
    assert torch.equal(img.tensor[0], u8_to_x(expected))


def test_gray_photo_into_three_channels(tmp_path, gray_photo):
    p = tmp_path / "camera.png"
    Image.fromarray(gray_photo).save(p)
    img = load_image(p, 3, None)
    t = img.tensor[0]
    assert t.shape == (3, 512, 512)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    assert torch.equal(t[:1], u8_to_x(gray_photo))
    assert "grayscale replicated to 3 channels" in img.notes


def test_rgb_into_one_channel_uses_601_luma(tmp_path, photo):
    arr = np.zeros((1, 2, 3), dtype=np.uint8)
    arr[0, 0] = (200, 100, 50)
    arr[0, 1] = (10, 250, 30)
    p = tmp_path / "rgb.png"
    Image.fromarray(arr).save(p)
    img = load_image(p, 1, None)
    t = img.tensor[0, 0, 0]
    luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50  # 124.2: kept in float, not rounded to 124
    assert abs(t[0].item() - (2 * luma / 255 - 1)) < 1e-6
    assert abs(t[1].item() - (2 * (0.299 * 10 + 0.587 * 250 + 0.114 * 30) / 255 - 1)) < 1e-6
    assert "RGB converted to grayscale (ITU-R 601 luma)" in img.notes
    # agrees with Pillow's convert("L") up to its integer rounding, on a whole real photo
    q = tmp_path / "photo.png"
    Image.fromarray(photo).save(q)
    ours = to_uint8(load_image(q, 1, None).tensor[0, 0]).astype(int)
    pil = np.asarray(Image.fromarray(photo).convert("L")).astype(int)
    assert np.abs(ours - pil).max() <= 1


def test_exif_orientation_6_rotates(tmp_path, photo):
    stored = photo[:60, :90].copy()  # stored 90 wide x 60 high
    stored[:20, :30] = (255, 0, 0)  # a red block at the stored top-left
    p = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(p, quality=95, exif=exif.tobytes())
    decoded = np.asarray(Image.open(p).convert("RGB"))  # the stored pixels, as decoded, no rotation
    img = load_image(p, 3, None)
    assert img.original_size == (60, 90)  # (width, height) as displayed
    assert img.tensor.shape == (1, 3, 90, 60)
    assert torch.equal(img.tensor[0], u8_to_x(np.rot90(decoded, k=-1)))  # clockwise
    red = to_uint8(img.tensor[0]).astype(int)  # (3, 90, 60): the 30x20 red block is now 20x30 at the top-right
    assert red[0, 2:28, -18:-2].mean() > 200 and red[1, 2:28, -18:-2].mean() < 40
    assert red[0, 2:28, 2:18].mean() < red[1, 2:28, 2:18].mean() + 60  # the top-left is the photo, not red
    assert any("EXIF orientation 6" in n for n in img.notes)


def test_cmyk_and_float_images(tmp_path, photo):
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(photo[:32, :48]).convert("CMYK").save(p)
    expected = np.asarray(Image.open(p).convert("RGB"))
    img = load_image(p, 3, None)
    assert torch.equal(img.tensor[0], u8_to_x(expected)) and any("CMYK" in n for n in img.notes)

    f = np.full((4, 4), 0.25, dtype=np.float32)
    f[0, 0] = 1.5  # out of range: clipped
    q = tmp_path / "float.tif"
    Image.fromarray(f, "F").save(q)
    t = load_image(q, 1, None).tensor[0, 0]
    assert t[1, 1].item() == -0.5 and t[0, 0].item() == 1.0


# ------------------------------------------------------------------------------------------------------------
# Resizing


def test_resize_center_crop_keeps_the_center(tmp_path, photo):
    h, w = photo.shape[:2]
    p = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(p, quality=95)
    decoded = Image.open(p).convert("RGB")
    img = load_image(p, 3, 32)
    assert img.tensor.shape == (1, 3, 32, 32)
    assert img.original_size == (w, h)
    assert img.notes == [f"resized {w}x{h} -> 32x32 (center crop)"]
    assert -1 <= img.tensor.min() and img.tensor.max() <= 1

    def crop_ref(left: float) -> torch.Tensor:
        ref = decoded.resize((32, 32), Image.Resampling.BICUBIC, box=(left, 0, left + h, h))
        return u8_to_x(np.asarray(ref))

    center = (img.tensor[0] - crop_ref((w - h) / 2)).abs().mean().item()
    left = (img.tensor[0] - crop_ref(0)).abs().mean().item()
    right = (img.tensor[0] - crop_ref(w - h)).abs().mean().item()
    assert center < 0.01  # 8-bit rounding of the reference only
    assert left > 10 * center and right > 10 * center


def test_resize_rectangular_target_and_no_resize(tmp_path, photo):
    h, w = photo.shape[:2]
    p = tmp_path / "photo.png"
    Image.fromarray(photo).save(p)
    assert load_image(p, 3, (16, 48)).tensor.shape == (1, 3, 16, 48)  # (height, width)
    same = load_image(p, 3, None)
    assert same.tensor.shape == (1, 3, h, w) and same.notes == []
    assert torch.equal(same.tensor[0], u8_to_x(photo))
    exact = load_image(p, 3, (h, w))
    assert torch.equal(exact.tensor, same.tensor) and exact.notes == []
    sq = tmp_path / "sq.png"
    Image.fromarray(photo[:64, :64]).save(sq)
    assert load_image(sq, 3, 32).notes == ["resized 64x64 -> 32x32"]


# ------------------------------------------------------------------------------------------------------------
# Writing


def test_to_uint8_mapping():
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0, float("inf"), float("-inf"), 2 * 10.5 / 255 - 1])
    # 0 -> 127.5 rounds half to even (128); 10.5 (as float32) is not exactly a half, so just check it is 10 or 11
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (8,)
    assert out[:7].tolist() == [0, 255, 128, 0, 255, 255, 0]
    assert out[7] in (10, 11)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))
    assert torch.equal(to_unit(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_tensor_to_pil_modes():
    assert tensor_to_pil(torch.zeros(1, 4, 5)).mode == "L"
    im = tensor_to_pil(torch.zeros(3, 4, 5))
    assert im.mode == "RGB" and im.size == (5, 4)
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(2, 4, 5))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_is_exact(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(channels, 17, 23, generator=g) * 2.2 - 1.1  # a little out of range too
    p = save_png(x, tmp_path / "x.png")
    assert p == tmp_path / "x.png"
    back = load_image(p, channels, None)
    assert back.notes == []
    quantized = u8_to_x(to_uint8(x).transpose(1, 2, 0).squeeze(-1) if channels == 1 else to_uint8(x).transpose(1, 2, 0))
    assert torch.equal(back.tensor[0], quantized)
    assert np.array_equal(to_uint8(back.tensor[0]), to_uint8(x))


def test_png_is_byte_identical_and_carries_text(tmp_path, photo):
    x = u8_to_x(photo[:32, :32])
    a, b = save_png(x, tmp_path / "a.png"), save_png(x.clone(), tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    info = {"steps": "50", "model": "google/ddpm-cifar10-32", "note": "ünïcode ✓"}
    c, d = save_png(x, tmp_path / "c.png", info), save_png(x, tmp_path / "d.png", dict(info))
    assert c.read_bytes() == d.read_bytes() != a.read_bytes()
    assert Image.open(c).text == info
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "c.png", "d.png"]


def test_save_png_errors_are_output_errors(tmp_path, monkeypatch):
    with pytest.raises(OutputError, match="parent directory does not exist"):
        save_png(torch.zeros(3, 4, 4), tmp_path / "missing" / "a.png")
    monkeypatch.setattr(fsutil.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OutputError) as e:
        save_png(torch.zeros(3, 4, 4), tmp_path / "a.png")
    assert str(e.value) == f"{tmp_path / 'a.png'}: no space left on device"
    assert os.listdir(tmp_path) == []


def test_make_grid_layout():
    x = torch.stack([torch.full((3, 4, 5), float(k) / 10) for k in range(5)])
    g = make_grid(x, padding=2)  # nrow = ceil(sqrt(5)) = 3 -> 2 rows
    assert g.shape == (3, 2 * (4 + 2) + 2, 3 * (5 + 2) + 2)
    for k in range(5):
        r, c = divmod(k, 3)
        tile = g[:, 2 + r * 6 : 2 + r * 6 + 4, 2 + c * 7 : 2 + c * 7 + 5]
        assert torch.equal(tile, x[k])
    assert (g[:, :2] == 1.0).all() and (g[:, :, :2] == 1.0).all()  # white border
    assert (g[:, 8:, 16:] == 1.0).all()  # the empty sixth slot
    assert make_grid(x, nrow=5, padding=0).shape == (3, 4, 25)
    assert make_grid(x, nrow=10).shape == (3, 8, 37)  # nrow capped at N
    assert make_grid(list(x), nrow=1, pad_value=-1.0).shape == (3, 5 * 6 + 2, 7 + 2)
    assert torch.equal(make_grid(x[:1]), x[0])  # one image: returned as is, like torchvision
    assert make_grid(torch.zeros(4, 1, 3, 3)).shape == (1, 12, 12)


def test_side_by_side():
    a, b = torch.zeros(3, 8, 6), -torch.ones(3, 8, 6)
    s = side_by_side(a, b)
    assert s.shape == (3, 8 + 4, 2 * 6 + 6)
    assert torch.equal(s[:, 2:10, 2:8], a) and torch.equal(s[:, 2:10, 10:16], b)
    with pytest.raises(ValueError):
        side_by_side(a, torch.zeros(3, 8, 7))


def test_gif_frames_duration_and_boomerang(tmp_path, photo):
    base = u8_to_x(photo[:40, :40])
    frames = [base * (1 - k / 5) for k in range(5)]  # 5 distinct frames
    p = save_gif(frames, tmp_path / "a.gif", duration_ms=120)
    with Image.open(p) as im:
        assert im.n_frames == 5 and im.size == (40, 40)
        assert im.info.get("duration") == 120 and im.info.get("loop") == 0
    q = save_gif(frames, tmp_path / "b.gif", boomerang=True)
    with Image.open(q) as im:
        assert im.n_frames == 8  # 0 1 2 3 4 3 2 1
    r = save_gif([f[:1] for f in frames], tmp_path / "gray.gif", loop=None)
    with Image.open(r) as im:
        assert im.n_frames == 5 and "loop" not in im.info
    assert sorted(os.listdir(tmp_path)) == ["a.gif", "b.gif", "gray.gif"]
    with pytest.raises(ValueError):
        save_gif([], tmp_path / "none.gif")


# ------------------------------------------------------------------------------------------------------------
# Metrics


def test_mse_psnr_closed_form():
    a = torch.zeros(3, 4, 4)  # 0.5 in [0, 1]
    b = a + 0.2  # 0.6 in [0, 1]: per-dimension squared error 0.01
    assert mse(a, b) == pytest.approx(0.01, rel=1e-6)  # 0.2 is not exact in float32
    assert psnr(a, b) == pytest.approx(20.0, rel=1e-6)
    assert mse(a, a) == 0.0 and psnr(a, a) == math.inf
    # half the pixels off by 1.0 in [0, 1] (from -1 to 1): mse 0.5, psnr 10 log10(2)
    c = -torch.ones(1, 2, 2)
    d = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])
    assert mse(c, d) == pytest.approx(0.5) and psnr(c, d) == pytest.approx(10 * math.log10(2))
    # values outside [-1, 1] are clamped first
    assert mse(torch.full((1, 1, 1), -5.0), torch.full((1, 1, 1), 5.0)) == 1.0


def test_mse_psnr_batches():
    a = torch.zeros(3, 1, 2, 2)
    b = torch.stack([a[0], a[0] + 0.2, a[0] + 0.02])
    m, p = mse(a, b), psnr(a, b)
    assert m.shape == (3,) and p.shape == (3,) and m.dtype == torch.float64
    assert m.tolist() == pytest.approx([0.0, 0.01, 0.0001])
    assert p[0].item() == math.inf and p[1:].tolist() == pytest.approx([20.0, 40.0])
    with pytest.raises(ValueError):
        mse(a, b[:2])


# ------------------------------------------------------------------------------------------------------------
# Input specs


def _touch_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (2, 2)).save(path, format="PNG")
    return path


def test_directory_is_recursive_sorted_case_insensitive(tmp_path):
    d = tmp_path / "in"
    names = ["b.PNG", "a.jpg", "sub/c.JpEg", "sub/deeper/d.webp", "e.tiff", "f.TIF", "g.bmp", "h.gif"]
    for n in names:
        _touch_png(d / n)
    (d / "notes.txt").write_text("x")
    (d / "model.safetensors").write_bytes(b"")
    _touch_png(d / ".hidden.png")
    _touch_png(d / ".cache" / "x.png")
    got = iter_image_paths([str(d)])
    assert got == sorted(d / n for n in names)


def test_files_globs_stdin_and_dedup(tmp_path):
    a, b, c = (_touch_png(tmp_path / n) for n in ("a.png", "b.png", "c.jpg"))
    odd = tmp_path / "odd.dat"
    odd.write_bytes(b"")  # an explicit file is kept whatever its extension (load_image judges it)
    assert iter_image_paths([str(odd)]) == [odd]
    assert iter_image_paths([str(tmp_path / "*.png")]) == [a, b]
    stdin = io.StringIO(f"{c}\n\n   \n{a}\r\n")
    got = iter_image_paths([str(b), "-", str(tmp_path / "*.png"), str(tmp_path)], stdin=stdin)
    assert got == [b, c, a]  # order of first appearance, each once
    assert iter_image_paths([str(tmp_path / "." / "a.png"), str(a)]) == [a]


def test_spec_errors(tmp_path):
    with pytest.raises(InputError) as e:
        iter_image_paths([str(tmp_path / "missing.png")])
    assert str(e.value) == f"{tmp_path / 'missing.png'}: no such file or directory"
    with pytest.raises(InputError) as e:
        iter_image_paths([str(tmp_path / "*.png")])
    assert str(e.value) == f"{tmp_path / '*.png'}: no files match this pattern"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    with pytest.raises(InputError) as e:
        iter_image_paths([str(empty)])
    assert str(e.value) == f"{empty}: no images found (looked for .png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .tiff)"
    with pytest.raises(InputError) as e:
        iter_image_paths([str(tmp_path / "e*")])
    assert str(e.value).startswith(f"{tmp_path / 'e*'}: matches no images")
    with pytest.raises(InputError) as e:
        iter_image_paths(["-"], stdin=io.StringIO("gone.png\n"))
    assert str(e.value) == "gone.png: no such file or directory (read from stdin)"


def test_loaded_image_is_a_dataclass(tmp_path):
    p = _touch_png(tmp_path / "a.png")
    img = load_image(p, 1, None)
    assert isinstance(img, LoadedImage) and img.original_size == (2, 2) and img.tensor.dtype == torch.float32
