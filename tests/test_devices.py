"""ddimctl.devices: --device / --dtype resolution and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from ddimctl import devices
from ddimctl.devices import resolve_device, resolve_dtype, schedule_dtype
from ddimctl.errors import DdimctlError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def one_line(fn, *args) -> str:
    with pytest.raises(DdimctlError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@no_cuda
def test_auto_is_the_cpu_here():
    if devices._mps_available():
        pytest.skip("MPS machine")
    assert resolve_device("auto") == torch.device("cpu")


def test_cpu_and_spelling():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_unavailable_is_one_line(name):
    msg = one_line(resolve_device, name)
    assert msg.startswith(f"--device {name}: CUDA is not available on this machine")


def test_mps_unavailable(monkeypatch):
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert "MPS is not available" in one_line(resolve_device, "mps")


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert "2 CUDA device(s)" in one_line(resolve_device, "cuda:2")


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "gpu", ""])
def test_unknown_device(name):
    assert "unknown device" in one_line(resolve_device, name)


@pytest.mark.parametrize(
    "name, dtype",
    [("auto", torch.float32), ("float32", torch.float32), ("fp32", torch.float32),
     ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16)],
)
def test_dtypes_on_cpu(name, dtype):
    assert resolve_dtype(name, torch.device("cpu")) == dtype


@pytest.mark.parametrize("name", ["float16", "fp16", "half"])
def test_float16_on_cpu_is_refused_with_a_hint(name):
    msg = one_line(resolve_dtype, name, torch.device("cpu"))
    assert msg.startswith(f"--dtype {name}:") and "bfloat16" in msg and "float32" in msg


@pytest.mark.parametrize("device", ["cuda", "mps"])
@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("float16", torch.float16), ("bf16", torch.bfloat16),
                                         ("auto", torch.float32)])
def test_half_precision_on_accelerators(device, name, dtype):
    assert resolve_dtype(name, torch.device(device)) == dtype


def test_unknown_dtype():
    assert "unknown dtype" in one_line(resolve_dtype, "int8", "cpu")


def test_schedule_dtype():
    assert schedule_dtype(torch.device("cpu")) == torch.float64
    assert schedule_dtype("cuda") == torch.float64
    assert schedule_dtype(torch.device("mps")) == torch.float32


@cuda
def test_cuda_device_and_half_precision_forward():
    dev = resolve_device("cuda")
    assert dev.type == "cuda" and resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    dtype = resolve_dtype("fp16", dev)
    x = torch.ones(4, device=dev, dtype=dtype)
    assert (x * 2).dtype == torch.float16
