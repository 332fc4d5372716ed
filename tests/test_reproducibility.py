"""What the README promises about reproducibility, checked through the command line in real processes.

The built-in ``mnist`` model is used because its arithmetic does depend on the batch on this CPU (a batch of one
takes other convolution kernels; rounding depends on how many threads split an operation): one image alone and in
a batch differ by ~1e-5. That rarely moves an 8-bit pixel of a digit, so the checks that must be able to see it
compare exact floats: ``--format safetensors`` samples and latent files written by ``invert``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddimctl.cli.common import plan_batches

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV.pop("DDIMCTL_DEBUG", None)
ARGS = ["sample", "--steps", "4", "-n", "8", "--seed", "3", "--quiet"]


def ddimctl(*args, env=None, cwd=None):
    r = subprocess.run([sys.executable, "-m", "ddimctl", *map(str, args)], capture_output=True, text=True,
                       env={**ENV, **(env or {})}, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_deterministic_results_are_byte_identical_for_any_batch_size(tmp_path):
    for bs in (1, 3, 8):
        ddimctl(*ARGS, "--deterministic", "--batch-size", bs, "--format", "safetensors", "--out", tmp_path / f"st{bs}")
        ddimctl(*ARGS, "--deterministic", "--batch-size", bs, "--out", tmp_path / f"png{bs}")
    for kind in ("st", "png"):
        assert files(tmp_path / f"{kind}1") == files(tmp_path / f"{kind}3") == files(tmp_path / f"{kind}8")
    # one thread or two: the same bytes (torchrun gives each process one thread)
    ddimctl(*ARGS, "--deterministic", "--batch-size", 8, "--format", "safetensors", "--out", tmp_path / "t1",
            env={"OMP_NUM_THREADS": "1"})
    assert files(tmp_path / "t1") == files(tmp_path / "st8")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """Six real held-out digits as PNG files."""
    from ddimctl.data import load_builtin_dataset
    from ddimctl.images import save_png

    d = tmp_path_factory.mktemp("digits")
    x = load_builtin_dataset("mnist-test")
    for k, i in enumerate((0, 60, 120, 180, 240, 300)):
        save_png(x[i], d / f"d{k}.png")
    return d


INVERT = ["invert", "--steps", "4", "--inversion", "plain", "--quiet"]


def test_deterministic_latents_are_byte_identical_across_torchrun_process_counts(digits, tmp_path):
    pytest.importorskip("torch.distributed.run")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ddimctl",
                        *INVERT, str(digits), "--deterministic", "--batch-size", "2", "--out", str(tmp_path / "dist")],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ddimctl(*INVERT, digits, "--deterministic", "--batch-size", 6, "--out", tmp_path / "one")
    assert files(tmp_path / "dist") == files(tmp_path / "one")


def test_skip_existing_completes_a_run_byte_identically_without_the_option(digits, tmp_path):
    """A file lost from the middle of a batch is recomputed in its original batch (of 3), not alone: a batch of
    one takes other convolution kernels on this CPU, so alone it would come out different."""
    out, ref = tmp_path / "o", tmp_path / "ref"
    ddimctl(*INVERT, digits, "--batch-size", 3, "--out", ref)
    ddimctl(*INVERT, digits, "--batch-size", 3, "--out", out)
    assert files(out) == files(ref)  # the same command twice: byte-identical
    (out / "d1.latent.safetensors").unlink()
    r = ddimctl(*INVERT, digits, "--batch-size", 3, "--out", out, "--skip-existing")
    assert r.stdout.split() == [str(out / "d1.latent.safetensors")]
    assert files(out) == files(ref)


def test_batches_are_cut_before_existing_outputs_are_skipped(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(10)]
    for i in (0, 1, 2, 5):
        paths[i].write_bytes(b"x")
    batches, todo = plan_batches(paths, overwrite=False, skip_existing=True, batch_size=4)
    assert todo == [3, 4, 6, 7, 8, 9]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the first run's batches; none of them all done
    (paths[8]).write_bytes(b"x")
    (paths[9]).write_bytes(b"x")
    assert plan_batches(paths, False, True, 4)[0] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a finished batch is not rerun
