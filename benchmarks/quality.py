"""Sample quality of the built-in models, measured with a digit classifier.

1. A small CNN is trained (seeded, CPU, about a minute) on the 4,500 MNIST training digits and tested on the
   500 held-out ones (``mnist-test``), which the built-in models never saw.
2. For each built-in model and 10, 20, 50 and 100 DDIM steps (eta 0): the share of samples classified with
   confidence > 0.9, and the class histogram (mode coverage: every class should hold >= 5 %).
3. The per-dimension reconstruction MSE (images in [0, 1]) of invert-then-sample on held-out digits, plain DDIM
   inversion, beside the DDIM paper's Table 2 (CIFAR-10, so only the trend compares).

    python benchmarks/quality.py                      # both built-in models, 200 samples per setting
    python benchmarks/quality.py --models mnist --samples 500 --json quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ddimctl.families import load
from ddimctl.data import load_builtin_dataset
from ddimctl.images import mse
from ddimctl.engine import Engine, SamplingOptions

PAPER_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009}


def classifier() -> nn.Module:
    """A small BatchNorm CNN for (B, 1, 32, 32) digits in [-1, 1] -> (B, 10) logits."""
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # 16x16
        *block(32, 64), nn.MaxPool2d(2),  # 8x8
        *block(64, 64), nn.MaxPool2d(2),  # 4x4
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 16, 10),
    )


def train_classifier(epochs: int = 8, seed: int = 0) -> tuple[nn.Module, float, float]:
    """Train on the 4,500 training digits (with +-2 px shifts, one-cycle learning rate); returns (model, held-out
    accuracy, share of held-out digits classified with confidence > 0.9 — the ceiling for the samples' figure).
    The classifier was chosen on held-out accuracy alone, never on the samples' scores."""
    torch.manual_seed(seed)
    x, y = load_builtin_dataset("mnist", 32, with_labels=True)
    xt, yt = load_builtin_dataset("mnist-test", 32, with_labels=True)
    net = classifier()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(x) // 64))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(x[idx], shifts=(dx, dy), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net(xt), 1)
    acc = float((p.argmax(1) == yt).float().mean())
    return net, acc, float((p.max(1).values > 0.9).float().mean())


def sample_quality(net, ckpt, steps: int, n: int, batch: int = 50) -> dict:
    engine = Engine(ckpt, SamplingOptions(steps=steps))
    probs = []
    for start in range(0, n, batch):
        seeds = list(range(start, min(n, start + batch)))
        _, x0 = engine.generate(seeds)
        with torch.no_grad():
            probs.append(torch.softmax(net(x0.clamp(-1, 1)), 1))
    p = torch.cat(probs)
    conf, cls = p.max(1)
    hist = torch.bincount(cls, minlength=10).double() / n
    return {"confident": float((conf > 0.9).double().mean()), "histogram": hist.tolist(), "min_class": float(hist.min())}


def reconstruction_mse(ckpt, steps: int, n: int) -> float:
    engine = Engine(ckpt, SamplingOptions(steps=steps, inversion="plain"))
    x0 = load_builtin_dataset("mnist-test", ckpt.image_shape[1])[:n]
    x_T = engine.invert(x0).x_T
    return float(mse(engine.decode(x_T), x0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist,mnist-flow")
    ap.add_argument("--steps", default="10,20,50,100")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--recon", type=int, default=50, help="held-out digits to reconstruct (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    steps_list = [int(s) for s in args.steps.split(",")]
    t0 = time.perf_counter()
    net, acc, real_conf = train_classifier()
    print(f"classifier: held-out accuracy {acc:.3f} on 500 real digits, {100 * real_conf:.1f} % of them classified "
          f"with confidence > 0.9 ({time.perf_counter() - t0:.0f} s)\n")
    results = {"classifier_accuracy": acc, "real_digits_confident": real_conf, "models": {}}
    for ref in args.models.split(","):
        ckpt = load(ref)
        rows = {}
        print(f"### {ref}: {args.samples} samples per row (seeds 0..{args.samples - 1}), DDIM eta 0\n")
        print("| steps | confident (> 0.9) | smallest class | class histogram 0..9 (%) | recon MSE (plain) | DDIM paper T2 |")
        print("|---|---|---|---|---|---|")
        for steps in steps_list:
            q = sample_quality(net, ckpt, steps, args.samples)
            q["recon_mse"] = reconstruction_mse(ckpt, steps, args.recon) if args.recon else None  # null in the JSON
            rows[steps] = q
            hist = " ".join(f"{100 * h:.0f}" for h in q["histogram"])
            print(f"| {steps} | {100 * q['confident']:.1f} % | {100 * q['min_class']:.1f} % | {hist} | "
                  f"{'—' if q['recon_mse'] is None else format(q['recon_mse'], '.2e')} | {PAPER_TABLE2.get(steps, '')} |",
                  flush=True)
        results["models"][ref] = rows
        print()
    print(f"({time.perf_counter() - t0:.0f} s in all)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
