"""The library surface the commands stand on: latent files, the engine's reconstruct and interpolation ends, the
sampler functions' autograd policy, and byte-identical safetensors output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ddimctl.errors import InputError
from ddimctl.images import mse, save_png
from ddimctl.inversion import invert_ddim
from ddimctl.latents import load_latents, save_latents
from ddimctl.engine import Engine, SamplingOptions, parse_end
from ddimctl.families.unet import in_memory
from ddimctl.prediction import Denoiser
from ddimctl.sampler import sample
from ddimctl.schedule import make_plan, vp_schedule
from ddimctl.settings import SamplerSettings
from ddimctl.nets.unet2d import UNet2DModel
from tinymodels import TINY_UNET

@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(TINY_UNET).eval()
    return Engine(in_memory(unet, SamplerSettings.from_config({"clip_sample": True})), SamplingOptions(steps=4))


def test_latent_files_round_trip_with_their_metadata(tmp_path):
    x = torch.randn(1, 3, 4, 4)
    p = save_latents(tmp_path / "a.latent.safetensors", x[0], {"model": "m", "steps": 10, "size": [4, 4]})
    back, meta = load_latents(p)
    assert torch.equal(back, x) and back.dtype == torch.float32
    assert meta["model"] == "m" and meta["steps"] == "10" and meta["size"] == "[4, 4]" and "ddimctl_version" in meta


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"not safetensors"), "not a readable .safetensors file"),
    (lambda p: save_latents(p, torch.full((1, 1, 2, 2), float("nan"))), "NaN or inf"),
])
def test_bad_latent_files_are_one_line_errors(tmp_path, make, needle):
    p = tmp_path / "x.safetensors"
    make(p)
    with pytest.raises(InputError) as e:
        load_latents(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_reconstruct_returns_the_latents_the_reconstruction_and_its_error(engine):
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    rec = engine.reconstruct(x0)
    assert rec.x_T.shape == rec.x0.shape == x0.shape
    torch.testing.assert_close(rec.mse, mse(rec.x0, x0), rtol=0, atol=0)
    # the reconstruction is the decode of the latent with the offsets of the steps the solve stopped short on (this
    # random network on noise images: at its 50-iteration cap on 3 of the 4 steps)
    assert rec.offsets is not None
    torch.testing.assert_close(rec.x0, engine.decode(rec.x_T, offsets=rec.offsets), rtol=0, atol=0)
    assert not torch.equal(rec.x0, engine.decode(rec.x_T))
    assert rec.model_calls == rec.stats.model_calls + len(engine.plan) > 2 * len(engine.plan)  # exact: iterations


def test_interpolation_ends_are_parsed_without_running_the_model(engine, tmp_path):
    save_png(torch.zeros(1, 8, 8), tmp_path / "img.png")
    save_latents(tmp_path / "l.safetensors", torch.ones(1, 1, 8, 8))
    assert parse_end("seed:3", engine.image_shape).seed == 3
    assert parse_end(str(tmp_path / "img.png"), engine.image_shape).kind == "image"
    x_T, x_prev = engine.end_latent(parse_end(str(tmp_path / "l.safetensors"), engine.image_shape))
    assert torch.equal(x_T, torch.ones(1, 1, 8, 8)) and x_prev is None
    torch.testing.assert_close(engine.end_latent(parse_end("seed:3", engine.image_shape))[0], engine.noise([3]))
    save_latents(tmp_path / "wrong.safetensors", torch.ones(1, 2, 8, 8))
    with pytest.raises(InputError, match="the model needs"):
        parse_end(str(tmp_path / "wrong.safetensors"), engine.image_shape)
    with pytest.raises(InputError, match="seed:N"):
        parse_end("seed:x", engine.image_shape)


def _oracle_denoiser():
    schedule = vp_schedule()
    mu = torch.linspace(-1, 1, 6, dtype=torch.float64)

    def model(x, t):
        a, b = schedule.ab(float(t[0]))
        return b * (x - a * mu) / (a * a * 0.25 + b * b)

    return schedule, Denoiser(model)


def test_exact_inversion_needs_the_declared_jacobian():
    schedule, den = _oracle_denoiser()
    plan = make_plan(schedule, 5)
    x0 = torch.zeros(1, 6, dtype=torch.float64)
    invert_ddim(den, x0, plan, exact=True)  # a Denoiser declares frozen_jacobian
    with pytest.raises(TypeError, match="frozen_jacobian"):
        invert_ddim(lambda x, t, a, b: den(x, t, a, b), x0, plan, exact=True)


def test_samplers_record_no_graph_unless_the_plan_is_being_optimised():
    w = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)  # a model with a parameter that wants gradients
    schedule = vp_schedule()

    def model(x, t):
        return w * x

    plan = make_plan(schedule, 4)
    x = torch.randn(2, 3, dtype=torch.float64)
    for sampler in ("ddim", "dpm++2m"):
        assert not sample(Denoiser(model), x, plan, sampler).requires_grad
    assert not invert_ddim(Denoiser(model), x, plan).requires_grad
    # a plan whose levels are tensors requiring grad is being tuned: gradients flow to them
    a = torch.tensor(plan.a, requires_grad=True)
    tuned = type(plan)(plan.timesteps, a, torch.tensor(plan.b))
    out = sample(Denoiser(model), x, tuned, "dpm++2m")
    out.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_safetensors_files_are_byte_identical_across_processes(tmp_path):
    """safetensors writes metadata in a per-process hash order; ddimctl's writer sorts it."""
    code = (
        "import sys, torch; from ddimctl.fsutil import save_safetensors_atomic\n"
        "save_safetensors_atomic(sys.argv[1], {'b': torch.arange(4.0), 'a': torch.ones(2)},"
        " {f'key{i}': str(i) for i in range(12)})\n"
    )
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {f"key{i}": str(i) for i in range(12)} and torch.equal(f.get_tensor("b"), torch.arange(4.0))
