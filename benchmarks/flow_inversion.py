"""Inverting rectified-flow models (issue 29): round-trip error (invert, then sample the latent with the same
sampler) against the model calls it took, for the inversions people use on flow models and ddimctl's.

Methods (the latent of each is decoded with its own sampler):

* ``euler plain``: the flow Euler step (DDIM at eta 0) and its plain inversion (the model at the point it has);
* ``fireflow plain``: FireFlow (arXiv 2412.07517; ``--sampler fireflow``) and its own reversed scheme;
* ``rf-solver plain``: RF-Solver's second-order step (arXiv 2411.04746, two calls a step: a Taylor step with the
  velocity's finite-difference time derivative) and its reversed scheme -- a baseline, written here;
* ``dpm++2m exact``, ``unipc exact``: ddimctl's multistep samplers with their exact inversion (the step-by-step
  solve with extrapolated memory, checked by decoding against plain inversion);
* ``ddim exact``, ``fireflow exact``: ddimctl's exact inversion of the DDIM (Euler) step and of FireFlow.

Part ``oracle``: the analytic flow oracles of tests/oracles.py (Gaussian N(mu, 0.5^2 I) in 16 dims; a mixture of 8
Gaussians in 32 dims), float64, on data drawn from the data distribution itself. Errors in model units (x0).

Part ``model``: any model reference (``--models``, default the built-in mnist-flow) through the Engine API
(``Engine.load(ref, SamplingOptions(...))``, ``engine.reconstruct(x0, conditions=...)``), on held-out MNIST digits
(a 1x32x32 model) or grayscale/RGB crops of scikit-image's photographs (any other size); ``--prompt`` gives text
models their condition. Per-dimension MSE of images in [0, 1] (the DDIM paper's Table 2 convention); for a latent
model, against the autoencoder's own round trip of the image (``Reconstruction.inversion_mse``).

Calls: model evaluations per image, invert + decode (for the solves, what the image took on its own; median over
images). "exact" in the summary: worst image's MSE <= 1e-10.

    python benchmarks/flow_inversion.py                                  # both parts, writes the tables to stdout
    python benchmarks/flow_inversion.py --part oracle --steps 5,10
    python benchmarks/flow_inversion.py --part model --models mnist-flow,PATH/TO/sd3 --prompt "a photo" --images 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ddimctl.conditioning import ConditionOptions  # noqa: E402
from ddimctl.engine import Engine, SamplingOptions  # noqa: E402
from ddimctl.images import mse as image_mse  # noqa: E402
from ddimctl.inversion import INVERT_FUNCTIONS, InversionStats  # noqa: E402
from ddimctl.prediction import Denoiser  # noqa: E402
from ddimctl.sampler import _clean_end_time, fireflow_midpoints, fireflow_step, model_times, sample  # noqa: E402
from ddimctl.schedule import SamplingPlan, flow_schedule, make_plan  # noqa: E402

#: method -> (sampler, inversion); None: a baseline written here
METHODS = {
    "euler plain": ("ddim", "plain"),
    "fireflow plain": ("fireflow", "plain"),
    "rf-solver plain": (None, "plain"),
    "dpm++2m exact": ("dpm++2m", "exact"),
    "unipc exact": ("unipc", "exact"),
    "ddim exact": ("ddim", "exact"),
    "fireflow exact": ("fireflow", "exact"),
}
EXACT_MSE = 1e-10


# ----------------------------------------------------------------------------------------------------------------
# RF-Solver, the baseline


def rf_solver_sample(denoise, x: torch.Tensor, plan: SamplingPlan, inverse: bool = False) -> torch.Tensor:
    """RF-Solver (Wang et al. 2024, arXiv 2411.04746): per step, a call at the start and one at the midpoint,

        v = model(x, t);  x_mid = x + (h/2) v;  v_mid = model(x_mid, t + h/2)
        x_to = x + h v + (h^2 / 2) (v_mid - v) / (h/2)            (their second-order Taylor step)

    which is ``x + h v_mid``: FireFlow's step (:func:`ddimctl.sampler.fireflow_step`, the same midpoints, flow
    coordinates for any (a, b)) with a fresh starting velocity instead of the reused one -- 2 S calls.
    ``inverse``: the same scheme walked from the data (their inversion)."""
    mid = fireflow_midpoints(plan)
    ts, ts_mid = model_times(plan, x), model_times(mid, x)
    S = len(plan)
    t_end = torch.as_tensor(_clean_end_time(plan), dtype=ts.dtype).reshape(1).to(x.device)
    for k in (range(S - 1, -1, -1) if inverse else range(S)):
        i = k + 1 if inverse else k  # the level the step starts from
        start = denoise(x, t_end if i == S else ts[i : i + 1], plan.a[i], plan.b[i])
        x, _ = fireflow_step(x, start, denoise, ts_mid[k : k + 1], plan, mid, k, inverse)
    return x


# ----------------------------------------------------------------------------------------------------------------
# One method on one batch: (reconstruction, calls per image)


def run_core(method: str, denoise, x0: torch.Tensor, plan: SamplingPlan, tol: float, counter) -> tuple[torch.Tensor, list[int]]:
    """A method on a denoiser and plan directly (the oracles): the reconstruction and the calls per image."""
    sampler, inversion = METHODS[method]
    S = len(plan)
    if sampler is None:
        lat = rf_solver_sample(denoise, x0, plan, inverse=True)
        return rf_solver_sample(denoise, lat, plan), [4 * S] * len(x0)
    stats = InversionStats()
    lat, _ = INVERT_FUNCTIONS[sampler](denoise, x0, plan, inversion == "exact", tol, 50, None, stats)
    before = counter()
    rec = sample(denoise, lat, plan, sampler)
    return rec, [c + counter() - before for c in stats.image_calls]


def run_engine(method: str, ref: str, x0: torch.Tensor, steps: int, spacing: str, tol: float,
               cond: ConditionOptions) -> tuple[torch.Tensor, list[int]]:
    """A method through the Engine API (any model reference): per-image MSE ([0, 1]) and calls per image."""
    sampler, inversion = METHODS[method]
    engine = Engine.load(ref, SamplingOptions(steps=steps, sampler=sampler or "ddim", spacing=spacing,
                                              inversion=inversion, tol=tol, inverting=True))
    conditions = engine.conditions(cond, len(x0)) or engine.default_conditions(len(x0))
    engine.check_conditions(conditions)
    if sampler is None:  # the baseline: the engine's ODE denoiser (no clipping), plan and autoencoder
        with torch.inference_mode():
            _, ode = engine.denoisers(conditions, len(x0))
            lat = rf_solver_sample(ode, engine.to_latents(x0), engine.plan, inverse=True)
            rec = engine.to_images(rf_solver_sample(ode, lat, engine.plan))
            # a latent model: against the autoencoder's own round trip, as for the other methods
            target = x0 if engine.autoencoder is None else engine.to_images(engine.to_latents(x0))
        return image_mse(rec, target.to(rec.device)), [4 * len(engine.plan)] * len(x0)
    r = engine.reconstruct(x0, conditions=conditions)
    # a latent model: against the autoencoder's own round trip (what the inversion alone misses)
    err = r.mse if r.inversion_mse is None else r.inversion_mse
    return err, r.image_calls


# ----------------------------------------------------------------------------------------------------------------
# The tables


def header(title: str) -> None:
    print(f"\n#### {title}\n")
    print("| steps | method | calls / image | MSE mean | MSE worst image |")
    print("|---|---|---|---|---|")


def row(steps: int, method: str, per_image_mse: torch.Tensor, calls: list[int], summary: list) -> None:
    worst, mean = float(per_image_mse.max()), float(per_image_mse.mean())
    med = statistics.median(calls)
    exact = worst <= EXACT_MSE
    print(f"| {steps} | {'**' + method + '**' if exact else method} | {med:.0f} | {mean:.2e} | {worst:.2e} |", flush=True)
    summary.append((steps, method, med, worst))


def print_summary(summary: list, what: str) -> None:
    """Per step count: the methods whose worst image round-trips to <= 1e-10 MSE, and the cheapest of them."""
    print(f"\n{what}: exact (worst image MSE <= {EXACT_MSE:.0e}) -- ", end="")
    parts = []
    for steps in sorted({s for s, *_ in summary}):
        rows = [r for r in summary if r[0] == steps]
        exact = sorted((calls, m) for s, m, calls, worst in rows if worst <= EXACT_MSE)
        best_inexact = min((worst, m, calls) for s, m, calls, worst in rows if worst > EXACT_MSE)
        parts.append(f"{steps} steps: " + (", ".join(f"{m} ({c:.0f} calls)" for c, m in exact) or "none")
                     + f"; best inexact {best_inexact[1]} {best_inexact[0]:.1e} ({best_inexact[2]:.0f} calls)")
    print("; ".join(parts) + "\n")


def oracle_part(steps_list: list[int], spacings: list[str], n: int, tol: float, methods: list[str]) -> None:
    from oracles import GaussianOracle, MixtureOracle

    s = flow_schedule()
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(16, generator=g, dtype=torch.float64)
    gauss = GaussianOracle(s, mu, 0.5, "flow")
    mix = MixtureOracle.random(s, components=8, dim=32, seed=0, prediction_type="flow")
    # data drawn from each data distribution
    x_gauss = mu + 0.5 * torch.randn(n, 16, generator=g, dtype=torch.float64)
    comp = torch.multinomial(mix.log_w.exp(), n, replacement=True, generator=g)
    x_mix = mix.means[comp] + mix.stds[comp, None] * torch.randn(n, 32, generator=g, dtype=torch.float64)
    for name, oracle, x0 in (("Gaussian N(mu, 0.5^2 I), 16 dims", gauss, x_gauss),
                             ("mixture of 8 Gaussians, 32 dims", mix, x_mix)):
        for spacing in spacings:
            header(f"Oracle: {name}, rectified flow, {spacing} spacing, {n} data points (float64; MSE of x0)")
            summary = []
            for steps in steps_list:
                plan = make_plan(s, steps, spacing)
                den = Denoiser(oracle, "flow")
                for method in methods:
                    rec, calls = run_core(method, den, x0, plan, tol, lambda: oracle.calls)
                    row(steps, method, (rec - x0).pow(2).mean(1), calls, summary)
            print_summary(summary, f"{name}, {spacing}")


def model_images(engine: Engine, n: int) -> tuple[torch.Tensor, str]:
    """n images for a model: held-out MNIST digits (1x32x32), else scikit-image photographs cropped to its size."""
    C, H, W = engine.image_shape
    if (C, H, W) == (1, 32, 32):
        from ddimctl.data import load_builtin_dataset

        x = load_builtin_dataset("mnist-test")
        return x[torch.linspace(0, len(x) - 1, n).long()], "held-out MNIST digits (every class)"
    import numpy as np
    import skimage.data
    from PIL import Image

    crops = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB" if C == 3 else "L")
        img = img.resize((W * img.width // min(img.size), H * img.height // min(img.size)), Image.LANCZOS)
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        crops.append(a[:H, :W] if a.ndim == 2 else a[:H, :W].transpose(2, 0, 1))
    x = torch.from_numpy(np.stack([crops[i % len(crops)] for i in range(n)]))
    return (x[:, None] if x.ndim == 3 else x), "crops of scikit-image photographs"


def model_part(models: list[str], steps_list: list[int], spacings: list[str], n: int, tol: float, methods: list[str],
               cond: ConditionOptions) -> None:
    for ref in models:
        probe = Engine.load(ref, SamplingOptions(steps=1))
        x0, what = model_images(probe, n)
        for spacing in spacings:
            header(f"Model {ref!r}, {spacing} spacing, {n} {what} (MSE of images in [0, 1]"
                   f"{'' if probe.autoencoder is None else ', against the autoencoder round trip'})")
            summary = []
            for steps in steps_list:
                for method in methods:
                    t0 = time.perf_counter()
                    m, calls = run_engine(method, ref, x0, steps, spacing, tol, cond)
                    row(steps, method, m, calls, summary)
                    print(f"  ({ref}, {spacing}, {steps} steps, {method}: {time.perf_counter() - t0:.0f} s)",
                          file=sys.stderr)
            print_summary(summary, f"{ref}, {spacing}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("oracle", "model", "both"), default="both")
    ap.add_argument("--models", default="mnist-flow", help="model references, comma-separated (Engine.load)")
    ap.add_argument("--steps", default="5,10,20,30")
    ap.add_argument("--spacings", default="trailing,logsnr",
                    help="trailing: the flow models' own uniform-sigma grid; logsnr: ddimctl's inversion default")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--points", type=int, default=128, help="oracle data points")
    ap.add_argument("--images", type=int, default=20, help="model images")
    ap.add_argument("--tol", type=float, default=1e-5, help="the exact solves' tolerance (RMS, model units)")
    ap.add_argument("--prompt", default=None, help="text models: the prompt of every image")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = [int(v) for v in args.steps.split(",")]
    spacings = args.spacings.split(",")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown} (expected {', '.join(METHODS)})")
    t0 = time.perf_counter()
    if args.part in ("oracle", "both"):
        oracle_part(steps, spacings, args.points, args.tol, methods)
    if args.part in ("model", "both"):
        model_part(args.models.split(","), steps, spacings, args.images, args.tol, methods,
                   ConditionOptions(prompt=args.prompt))
    print(f"({time.perf_counter() - t0:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
