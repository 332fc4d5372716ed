"""Accuracy of the samplers and of inversion, measured against exact answers.

Part 1 (oracle): data N(mu, s^2 I) in 16 dimensions with the optimal predictor, where the probability-flow ODE
solution is known in closed form. For ddim and dpm++2m at several step counts: RMS error of x0 against the exact
solution, and the model calls each sampler needs to reach a fixed error.

Part 2 (model): per-dimension reconstruction MSE (images in [0, 1], as in the DDIM paper's Table 2) of
invert-then-sample on held-out MNIST digits with a built-in model, for plain and exact inversion, with the
model calls used.

    python benchmarks/accuracy.py                 # both parts
    python benchmarks/accuracy.py --part oracle   # seconds
    python benchmarks/accuracy.py --part model --model mnist --images 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ddimctl.prediction import Denoiser  # noqa: E402
from ddimctl.inversion import InversionStats, invert_ddim  # noqa: E402
from ddimctl.sampler import sample  # noqa: E402
from ddimctl.schedule import flow_schedule, make_plan, vp_schedule  # noqa: E402

PAPER_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009}


def oracle_part() -> None:
    from oracles import GaussianOracle, rms

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(16, generator=g, dtype=torch.float64)
    x_T = torch.randn(256, 16, generator=g, dtype=torch.float64)
    for name, schedule, pt in [("VP linear betas, epsilon", vp_schedule(), "epsilon"),
                               ("rectified flow, velocity", flow_schedule(), "flow")]:
        print(f"\n### Gaussian oracle: {name} (RMS error of x0 against the exact ODE solution)\n")
        print("| sampler | spacing | " + " | ".join(f"{n} calls" for n in (5, 10, 20, 50, 100)) + " |")
        print("|---|---|" + "---|" * 5)
        spacings = ["leading", "trailing", "logsnr"] if schedule.kind == "vp" else ["trailing", "logsnr"]
        results = {}
        for sampler in ("ddim", "dpm++2m"):
            for spacing in spacings:
                errs = []
                for n in (5, 10, 20, 50, 100):
                    oracle = GaussianOracle(schedule, mu, 0.5, pt)
                    plan = make_plan(schedule, n, spacing, 1 if spacing == "leading" else 0)
                    x0 = sample(Denoiser(oracle, pt), x_T, plan, sampler=sampler)
                    exact = oracle.ode_solution(x_T, plan.a[0], plan.b[0], plan.a[-1], plan.b[-1])
                    errs.append((oracle.calls, rms(x0 - exact)))
                results[(sampler, spacing)] = errs
                print(f"| {sampler} | {spacing} | " + " | ".join(f"{e:.2e} ({c})" for c, e in errs) + " |")
        target = results[("ddim", spacings[0])][3][1]
        print(f"\nCalls to reach ddim's 50-step error ({target:.2e}, {spacings[0]} spacing):")
        for (sampler, spacing), errs in results.items():
            reach = next((c for c, e in errs if e <= target), None)
            print(f"- {sampler} / {spacing}: {reach if reach is not None else '> 100'}")


def model_part(model_ref: str, n_images: int, steps_list: list[int]) -> None:
    from ddimctl.families import load
    from ddimctl.data import load_builtin_dataset
    from ddimctl.images import mse
    from ddimctl.engine import Engine, SamplingOptions

    ckpt = load(model_ref)
    x0 = load_builtin_dataset("mnist-test", image_size=ckpt.image_shape[1])[:n_images]  # (N, 1, 32, 32) in [-1, 1]
    print(f"\n### Reconstruction on {len(x0)} held-out MNIST digits, model {model_ref!r} (per-dimension MSE, [0, 1])\n")
    print("| steps | plain MSE | plain calls/img | exact MSE | exact calls/img | exact max residual | DDIM paper T2 (CIFAR-10) |")
    print("|---|---|---|---|---|---|---|")
    for steps in steps_list:
        row = [str(steps)]
        for inversion in ("plain", "exact"):
            engine = Engine(ckpt, SamplingOptions(steps=steps, inversion=inversion, tol=1e-5, max_iter=50))
            t0 = time.perf_counter()
            inv = engine.invert(x0)
            x_T, stats = inv.x_T, inv.stats
            rec = engine.decode(x_T)
            err = float(mse(rec, x0).mean())
            calls = (stats.model_calls + len(engine.plan)) / 1  # per batch = per image (batched)
            row += [f"{err:.2e}", f"{calls:.0f}"]
            if inversion == "exact":
                row.append(f"{stats.max_residual:.1e}")
            print(f"  ({inversion}, {steps} steps: {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        row.append(str(PAPER_TABLE2.get(steps, "")))
        print("| " + " | ".join(row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["oracle", "model", "all"], default="all")
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--steps", default="10,20,50,100")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.part in ("oracle", "all"):
        oracle_part()
    if args.part in ("model", "all"):
        model_part(args.model, args.images, [int(s) for s in args.steps.split(",")])


if __name__ == "__main__":
    main()
