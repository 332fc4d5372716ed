"""The built-in models' figures, made with the library (no CLI): sample grids at 10 and 50 DDIM steps and the
training loss curves.

    python examples/make_figures.py                   # sample grids of both built-in models
    python examples/make_figures.py --runs /work/runs # also the loss curves, from RUNS/<model>/metrics.jsonl

Grids: seeds 0..63, eta 0, one generator per seed — the same pixels as
``ddimctl sample --model MODEL --steps S --n 64 --grid ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from ddimctl.families import load
from ddimctl.images import make_grid, save_png
from ddimctl.sampler import make_generators, randn, sample

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from plot_loss import main as plot_loss  # noqa: E402

TITLES = {"mnist": "mnist (epsilon)", "mnist-flow": "mnist-flow (rectified flow)"}


@torch.no_grad()
def sample_grid(model: str, steps: int, n: int = 64, batch: int = 16) -> torch.Tensor:
    """A grid (C, H', W') in [-1, 1] of n samples of a checkpoint, seeds 0..n-1, DDIM eta 0, in batches of
    ``batch`` (the CLI's default: float results differ by ~1e-5 between batch sizes, now and then one PNG level)."""
    ckpt = load(model, device="cpu")
    shape = ckpt.image_shape
    denoise, plan = ckpt.settings.denoiser(ckpt.model), ckpt.settings.plan(steps)
    x0 = []
    for start in range(0, n, batch):
        x_T = randn(make_generators(range(start, min(n, start + batch))), shape)  # (b, C, H, W)
        x0.append(sample(denoise, x_T, plan))  # (b, C, H, W)
    return make_grid(torch.cat(x0).clamp(-1, 1), nrow=8)


def loss_curve(metrics: Path, dst: Path, title: str) -> None:
    """Plot metrics.jsonl up to the step the run last saved (rows after it were never kept)."""
    state = metrics.parent / "state.json"
    last = json.loads(state.read_text())["step"] if state.exists() else None
    rows = [line for line in metrics.read_text().splitlines(keepends=True)
            if line.strip() and (last is None or json.loads(line)["step"] <= last)]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.writelines(rows)
    plot_loss(f.name, str(dst), title)
    Path(f.name).unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist,mnist-flow")
    ap.add_argument("--steps", default="10,50")
    ap.add_argument("--runs", type=Path, help="training runs folder (RUNS/<model>/metrics.jsonl) for the loss curves")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    for model in args.models.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            print(save_png(sample_grid(model, steps), args.out / f"samples_{model}_{steps}steps.png"))
        if args.runs is not None:
            dst = args.out / f"loss_{model}.png"
            loss_curve(args.runs / model / "metrics.jsonl", dst, TITLES.get(model, model))
            print(dst)


if __name__ == "__main__":
    main()
