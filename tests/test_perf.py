"""The opt-in speed options (channels-last, bfloat16, --compile's fallback) keep results, and the sampling loops
never read tensors back to the host (which on a GPU would stall it at every step)."""

from __future__ import annotations

import pytest
import torch

from ddimctl.perf import CompiledWithFallback, prepare_model
from ddimctl.engine import Engine, SamplingOptions
from ddimctl.families.unet import in_memory
from ddimctl.sampler import make_generators, sample_ddim, sample_dpmpp_2m, sample_dpmpp_3m, sample_ipndm, sample_unipc
from ddimctl.settings import SamplerSettings
from ddimctl.nets.unet2d import UNet2DModel

from hostreads import cuda_sync_check, record_host_reads
from tinymodels import TINY_UNET, max_diff

TINY_RGB = {**TINY_UNET, "in_channels": 3, "out_channels": 3}


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel.from_config(TINY_RGB).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


T = torch.tensor([10.0, 900.0])


def test_channels_last_gives_the_same_output(unet, x):
    with torch.inference_mode():
        ref = unet(x, T)
        model, notes = prepare_model(unet, channels_last=True)
        assert notes == []
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert not model.conv_in.weight.is_contiguous()  # really converted (3 input channels, 3x3 kernel)
        out = model(x.contiguous(memory_format=torch.channels_last), T)
    assert max_diff(out, ref) <= 1e-5
    unet.to(memory_format=torch.contiguous_format)


def test_bfloat16_forward_runs_on_cpu_and_stays_close(unet, x):
    with torch.inference_mode():
        ref = unet(x, T)
        bf = UNet2DModel.from_config(TINY_RGB)
        bf.load_state_dict(unet.state_dict())
        bf = bf.to(torch.bfloat16).eval()
        out = bf(x.to(torch.bfloat16), T)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert max_diff(out, ref) <= 0.05 * float(ref.abs().max())
    assert max_diff(out, ref) > 0  # it really ran in bfloat16


def test_bfloat16_model_under_the_engine_keeps_a_float32_state(unet):
    settings = SamplerSettings.from_config({"clip_sample": True})
    bf = UNet2DModel.from_config(TINY_RGB)
    bf.load_state_dict(unet.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    ref = Engine(in_memory(unet, settings), SamplingOptions(steps=3)).generate([0, 1])[1]
    out = Engine(in_memory(bf, settings), SamplingOptions(steps=3), dtype=torch.bfloat16).generate([0, 1])[1]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert 0 < float((out - ref).abs().mean()) < 0.05


def test_compile_that_fails_at_the_first_call_falls_back_to_eager(unet, x, monkeypatch):
    calls = []

    def broken_compile(model, *args, **kwargs):
        def run(*a, **k):
            calls.append(1)
            raise RuntimeError("no C++ compiler found\ndetails")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    heard = []
    model, notes = prepare_model(unet, compile=True, note=heard.append)
    assert isinstance(model, CompiledWithFallback) and model.compiled and notes == []
    with torch.inference_mode():
        out = model(x, T)
        again = model(x, T)
        ref = unet(x, T)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert calls == [1] and not model.compiled  # tried once, then eager for good
    assert notes == heard == ["--compile: compiling failed (RuntimeError: no C++ compiler found); running eagerly"]
    # the same parameters, under the key prefix torch's own compiled wrapper uses
    assert model._orig_mod is unet
    assert set(model.state_dict()) == {f"_orig_mod.{k}" for k in unet.state_dict()}


def test_compile_that_is_not_available_falls_back_to_eager(unet, x, monkeypatch):
    def unavailable(model, *args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    model, notes = prepare_model(unet, channels_last=False, compile=True)
    assert notes == ["--compile: not available (RuntimeError: Dynamo is not supported on this Python); running eagerly"]
    with torch.inference_mode():
        assert torch.equal(model(x, T), unet(x, T))


def test_compile_does_not_hide_errors_in_the_inputs(unet, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: model)  # "compiled" = eager: fails the same way
    model, notes = prepare_model(unet, compile=True)
    with pytest.raises(ValueError, match="multiples of 2"), torch.inference_mode():
        model(torch.randn(1, 3, 7, 8), T[:1])
    assert notes == [] and model.compiled  # the input was at fault, not compiling


def _plan_and_denoiser(unet, clip=True):
    settings = SamplerSettings.from_config({"clip_sample": clip})
    return settings.plan(6), settings.denoiser(unet)


def test_sampling_loops_never_read_tensors_back_to_the_host(unet, x):
    plan, den = _plan_and_denoiser(unet)
    with torch.inference_mode(), record_host_reads() as reads:
        sample_ddim(den, x, plan)
        sample_ddim(den, x, plan, eta=1.0, generators=make_generators([0, 1]))
        sample_dpmpp_2m(den, x, plan)
        for sampler in (sample_dpmpp_3m, sample_unipc, sample_ipndm):
            sampler(den, x, plan)
            sampler(den, x, SamplerSettings.from_config({"timestep_spacing": "logsnr"}).plan(6))  # fractional times
    assert reads == []
    with record_host_reads() as reads:  # the recorder does see such reads
        float(x.sum()), x[0, 0, 0, 0].item(), x[:1, 0, 0, 0].tolist(), bool(x.sum() > 0)
    assert reads == ["__float__", "item", "tolist", "__bool__"]


def test_the_engine_samples_on_the_meta_device_where_no_value_can_be_read(unet):
    """Meta tensors have shapes but no values: any .item(), float(), branch on a value or copy to the host
    raises, so sampling there proves that nothing in the engine, the sampler or the UNet waits on the device."""
    meta = UNet2DModel.from_config(TINY_RGB).to("meta")
    settings = SamplerSettings.from_config({"clip_sample": True})
    for options in (SamplingOptions(steps=3), SamplingOptions(steps=3, sampler="dpm++2m"),
                    SamplingOptions(steps=3, eta=1.0, channels_last=True), SamplingOptions(steps=4, sampler="dpm++3m"),
                    SamplingOptions(steps=4, sampler="unipc"), SamplingOptions(steps=4, sampler="ipndm")):
        engine = Engine(in_memory(meta, settings), options, device=torch.device("meta"))
        x_T, x0 = engine.generate([0, 1])
        assert x0.device.type == "meta" and x0.shape == (2, 3, 8, 8) and x0.dtype == torch.float32
    with pytest.raises(RuntimeError, match="meta"):
        float(x0.sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda_makes_no_synchronising_call(unet):
    model = UNet2DModel.from_config(TINY_RGB)
    model.load_state_dict(unet.state_dict())
    model = model.cuda().eval()
    settings = SamplerSettings.from_config({"clip_sample": True})
    for options in (SamplingOptions(steps=4), SamplingOptions(steps=4, sampler="dpm++2m")):
        engine = Engine(in_memory(model, settings), options, device=torch.device("cuda"))
        x = engine.noise([0, 1])
        torch.cuda.synchronize()
        with cuda_sync_check("error") as active:
            plan, den = engine.plan, engine.denoisers(None, 2)[0]
            out = (sample_ddim if options.sampler == "ddim" else sample_dpmpp_2m)(den, x, plan)
        assert active and out.shape == x.shape
