"""`ddimctl train`: exact resume, checkpoints every command (and diffusers) loads, DDP, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddimctl.cli import app
from tinymodels import TRAIN_TINY

TINY = [*TRAIN_TINY, "--attention-resolutions", "4", "--warmup-steps", "2", "--lr", "1e-3"]


def train(*args):
    r = CliRunner().invoke(app, ["train", *map(str, args)])
    return r


def weights(run: Path) -> dict:
    return load_file(run / "checkpoint" / "diffusion_pytorch_model.safetensors")


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    r = train("digits", "--out", tmp_path / "full", "--train-steps", 12, "--save-every", 4, *TINY)
    assert r.exit_code == 0, r.output
    r = train("digits", "--out", tmp_path / "part", "--train-steps", 5, "--save-every", 5, *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "part" / "state.json").read_text())["step"] == 5
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # a step logged by a run killed before it saved
        f.write(json.dumps({"step": 6, "loss": -1.0, "lr": 0.0, "elapsed": 0.0}) + "\n")
    r = train("digits", "--out", tmp_path / "part", "--train-steps", 12, "--save-every", 4, "--resume", *TINY)
    assert r.exit_code == 0, r.output
    full, part = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert full.keys() == part.keys()
    assert all(torch.equal(full[k], part[k]) for k in full)  # EMA weights, bit-identical
    sf, sp = load_file(tmp_path / "full" / "state.safetensors"), load_file(tmp_path / "part" / "state.safetensors")
    assert all(torch.equal(sf[k], sp[k]) for k in sf)  # model and optimizer state too
    losses = lambda run: [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    # a different seed really is a different run (the comparison above can fail)
    r = train("digits", "--out", tmp_path / "other", "--train-steps", 12, "--save-every", 12, "--seed", 1, *TINY)
    assert not torch.equal(weights(tmp_path / "other")["conv_in.weight"], full["conv_in.weight"])


def test_loss_falls_and_the_checkpoint_loads_everywhere(tmp_path):
    r = train("digits", "--out", tmp_path / "run", "--train-steps", 60, "--save-every", 60, "--sample-every", 30, *TINY)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "run" / "checkpoint")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 61)) and {"loss", "lr", "elapsed"} <= rows[0].keys()
    first, last = sum(r["loss"] for r in rows[:10]) / 10, sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.8 * first
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step_0000030.png", "step_0000060.png"]
    r = CliRunner().invoke(app, ["sample", "--model", tmp_path / "run" / "checkpoint", "--n", 2, "--steps", 3, "--out", tmp_path / "s"])
    assert r.exit_code == 0, r.output
    diffusers = pytest.importorskip("diffusers")  # optional: what runs above is checked without it
    m = diffusers.UNet2DModel.from_pretrained(tmp_path / "run" / "checkpoint")
    assert m.config.sample_size == 8 and m.config.in_channels == 1


def test_flow_objective_writes_a_flow_checkpoint(tmp_path):
    r = train("digits", "--out", tmp_path / "run", "--train-steps", 3, "--save-every", 3, "--objective", "flow", *TINY)
    assert r.exit_code == 0, r.output
    sched = json.loads((tmp_path / "run" / "checkpoint" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    from ddimctl.families import load

    assert load(str(tmp_path / "run" / "checkpoint")).settings.kind == "flow"


def test_image_folder_skips_unreadable_files(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs" / "nested"
    d.mkdir(parents=True)
    for k in range(10):
        Image.new("RGB", (12, 10), (20 * k, 10, 200)).save(d / f"{k}.png")
    (d / "broken.png").write_bytes(b"nope")
    r = CliRunner().invoke(app, ["train", str(tmp_path / "imgs"), "--out", str(tmp_path / "run"), "--train-steps", "2",
                                 "--channels", "3", *[a for a in TINY if a != "--quiet"]])
    assert r.exit_code == 0, r.output
    assert "training on 10 images" in r.stderr and "1 unreadable" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["nope-dataset"], "nope-dataset"),
    (["digits", "--objective", "score"], "--objective score"),
    (["digits", "--mixed-precision", "bf16"], "--mixed-precision bf16"),
    (["digits", "--channel-mult", "1,x"], "--channel-mult"),
])
def test_errors_are_one_line(tmp_path, args, needle):
    if "--mixed-precision" in args and torch.cuda.is_available():
        pytest.skip("has CUDA")
    r = train(args[0], "--out", tmp_path / "run", "--train-steps", 2, "--device", "cpu", *TINY, *args[1:])
    assert r.exit_code == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output


def test_existing_run_is_not_overwritten(tmp_path):
    assert train("digits", "--out", tmp_path / "run", "--train-steps", 2, *TINY).exit_code == 0
    r = train("digits", "--out", tmp_path / "run", "--train-steps", 2, *TINY)
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = train("digits", "--out", tmp_path / "run", "--train-steps", 4, "--resume", *TINY, "--lr", "0.1")
    assert r.exit_code == 1 and "options differ" in r.stderr and "lr" in r.stderr
    assert train("digits", "--out", tmp_path / "run", "--train-steps", 3, "--overwrite", *TINY).exit_code == 0
    rows = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]  # --overwrite starts the log again


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from ddimctl.train import TrainConfig, lr_at

    cfg = TrainConfig(data="digits", lr=1e-3, warmup_steps=10, train_steps=110, lr_schedule="cosine")
    lrs = [lr_at(k, cfg) for k in range(110)]
    assert lrs[:10] == pytest.approx([1e-3 * (k + 1) / 10 for k in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(0.5e-3)  # half way: half the peak
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-6
    assert lr_at(200, cfg) == 0.0
    constant = TrainConfig(data="digits", lr=1e-3, warmup_steps=10, train_steps=110)
    assert lr_at(109, constant) == 1e-3


def test_init_starts_from_a_checkpoint_and_checks_it_fits(tmp_path):
    assert train("digits", "--out", tmp_path / "a", "--train-steps", 6, *TINY).exit_code == 0
    # learning rate 0: the weights cannot move, so the new run's checkpoint is exactly the one it started from
    r = train("digits", "--out", tmp_path / "b", "--train-steps", 2, "--init", tmp_path / "a" / "checkpoint",
              *TINY, "--lr", "0")
    assert r.exit_code == 0, r.output
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "b" / "checkpoint" / "ddimctl.json").read_text())
    assert meta["init"] == str(tmp_path / "a" / "checkpoint")
    # with a learning rate it trains on from there
    r = train("digits", "--out", tmp_path / "c", "--train-steps", 2, "--init", tmp_path / "a" / "checkpoint", *TINY)
    assert r.exit_code == 0 and not torch.equal(weights(tmp_path / "c")["conv_in.weight"], a["conv_in.weight"])
    r = train("digits", "--out", tmp_path / "e", "--train-steps", 2, "--init", tmp_path / "a" / "checkpoint",
              *TINY, "--base-channels", "4")
    assert r.exit_code == 1 and "--init" in r.stderr and "block_out_channels" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
    r = train("digits", "--out", tmp_path / "f", "--train-steps", 2, "--init", tmp_path / "a" / "checkpoint",
              *TINY, "--objective", "flow")
    assert r.exit_code == 1 and "--objective flow: the checkpoint predicts epsilon" in r.stderr
    assert "--init" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ddp_with_two_cpu_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ddimctl",
           "train", "digits", "--out", str(tmp_path / "run"), "--train-steps", "6", "--save-every", "3", "--device", "cpu", *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(tmp_path / "run" / "checkpoint")]  # rank 0 alone reports and writes
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in rows] == list(range(1, 7))
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 6
    from ddimctl.families import load

    load(str(tmp_path / "run" / "checkpoint"))  # a complete, loadable checkpoint


def test_a_nan_loss_stops_the_run_before_anything_is_saved(tmp_path):
    """Losses are read back every --log-every steps, not every step; a NaN must still stop the run, name its step,
    and leave no checkpoint (the read-back happens before every save)."""
    from ddimctl.errors import NumericsError
    from ddimctl.train import TrainConfig, train as run

    data = torch.zeros(16, 1, 8, 8)
    data[:, :, 0, 0] = float("nan")
    cfg = TrainConfig(data="nan", image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                      norm_num_groups=4, batch_size=8, train_steps=6, save_every=3, log_every=5)
    with pytest.raises(NumericsError, match="step 1: the loss is nan"):
        run(cfg, tmp_path / "run", torch.device("cpu"), data=data)
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "state.json").exists()
    # with finite data the same run logs every step and saves
    state = run(cfg, tmp_path / "ok", torch.device("cpu"), data=torch.zeros(16, 1, 8, 8))
    rows = [json.loads(l)["step"] for l in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert state.step == 6 and rows == list(range(1, 7)) and (tmp_path / "ok" / "checkpoint").is_dir()
