"""Few-step samplers and tuned schedules: error against exact answers, and sample quality of the built-in models.

Part 1 (oracle): RMS error of x0 against the exact probability-flow ODE solution on 2048 noises, for every sampler
and spacing (and a schedule tuned on 512 other noises, ``tune_plan`` with its defaults) at 5, 10, 20 and 50 calls,
on four oracles with analytic optimal predictors:

* Gaussian N(mu, 0.5^2 I) in 16 dimensions (closed-form ODE solution);
* a Gaussian mixture, 8 components in 32 dimensions (``tests/oracles.py: MixtureOracle.random``; reference by
  RK4 with 1000 log-SNR steps, itself accurate to ~1e-8);

each as a VP (linear betas) epsilon-model and as a rectified-flow velocity model. ``logsnr (before)`` is the
placement ``logsnr`` had before this release (S calls from t = T-1 to t = 0, nearest training timesteps). On the
mixture the RMS error of few-call samplers is dominated by the few samples that end in another component than
the exact solution; the tables also give the median per-sample error and that count.

Part 2 (model): on a built-in model, without clipping x0 (with the checkpoint's ``clip_sample`` every sampler
converges to a different limit: on mnist, clipped DDIM with 200 calls ends 0.24 RMS from clipped UniPC with 1000),
RMS error against a 1000-call reference (unipc, logsnr) on 32 held-out seeds, at 5 and 10 calls, each sampler
with its default spacing and with a schedule tuned on 64 other seeds;
and the share of 200 samples (seeds 200000..) that the digit classifier of ``benchmarks/quality.py`` labels with
confidence > 0.9, against DDIM at 50 calls (the model's own spacing). Every sampler also runs with the untuned
spacings ``logsnr`` and ``trailing``, so that tuned schedules are compared with the best untuned one.

    python benchmarks/samplers.py --part oracle            # about 20 minutes on 2 cores
    python benchmarks/samplers.py --part oracle --oracles mixture --train-noises 64   # tuned on fewer noises
    python benchmarks/samplers.py --part model --models mnist --cache .bench-cache
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddimctl.prediction import Denoiser  # noqa: E402
from ddimctl.sampler import sample  # noqa: E402
from ddimctl.schedule import SamplingPlan, flow_schedule, make_plan, vp_schedule  # noqa: E402
from ddimctl.tuning import (  # noqa: E402
    Reference, TuneReport, plan_error, reference_samples, reference_trajectory, tune_plan,
)

SAMPLERS = ("ddim", "dpm++2m", "dpm++3m", "unipc", "ipndm")
CALLS = (5, 10, 20, 50)


def logsnr_before(schedule, steps: int) -> SamplingPlan:
    """The ``logsnr`` placement before this release: S calls at the training timesteps nearest to S log-SNR-uniform
    targets from t = T-1 to t = 0 (the last call at t = 0), duplicates removed."""
    lam = schedule.lambdas()
    targets = np.linspace(lam[-1], lam[0], steps)
    ts = np.unique(np.abs(lam[None, :] - targets[:, None]).argmin(axis=1))[::-1]
    abar = np.append(schedule.alphas_cumprod[ts], schedule.final_alpha_cumprod)
    return SamplingPlan(ts.astype(np.float64), np.sqrt(abar), np.sqrt(1.0 - abar))


def _plans(schedule, kind: str):
    spacings = {"leading": lambda n: make_plan(schedule, n, "leading", 1),
                "trailing": lambda n: make_plan(schedule, n, "trailing"),
                "logsnr": lambda n: make_plan(schedule, n, "logsnr"),
                "logsnr (before)": lambda n: logsnr_before(schedule, n)}
    if kind == "flow":  # leading and the old placement start below sigma = 1 on a flow model
        spacings = {k: v for k, v in spacings.items() if k in ("trailing", "logsnr")}
    return spacings


def _components(oracle, x: torch.Tensor) -> torch.Tensor:
    """The mixture component each sample (B, D) lies in (largest posterior at the clean end)."""
    d = (x[:, None, :] - oracle.means[None]).pow(2).sum(-1) / oracle.stds[None] ** 2
    return (oracle.log_w[None] - x.shape[1] * torch.log(oracle.stds)[None] - 0.5 * d).argmax(1)


def oracle_part(n_eval: int = 2048, n_train: int = 512, iterations: int = 20,
                which: tuple[str, ...] = ("gaussian", "mixture")) -> dict:
    from oracles import GaussianOracle, MixtureOracle

    results = {}
    for kind in ("vp", "flow"):
        schedule, pt = (vp_schedule(), "epsilon") if kind == "vp" else (flow_schedule(), "flow")
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(16, generator=g, dtype=torch.float64)
        oracles = [("gaussian", "Gaussian, 16 dims", lambda: GaussianOracle(schedule, mu, 0.5, pt), 16),
                   ("mixture", "mixture of 8 Gaussians, 32 dims",
                    lambda: MixtureOracle.random(schedule, 8, 32, seed=0, prediction_type=pt), 32)]
        for key, name, make_oracle, dim in oracles:
            if key not in which:
                continue
            oracle = make_oracle()
            t0 = time.perf_counter()
            # training and held-out noises from two generators: the held-out set is the same whatever n_train
            noises = torch.cat([torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                                for n, seed in ((n_train, 1), (n_eval, 2))])
            start = make_plan(schedule, 2, "logsnr")
            exact = oracle.ode_solution(noises, start.a[0], start.b[0], 1.0, 0.0, **({"steps": 1000} if dim == 32 else {}))
            train, held = slice(0, n_train), slice(n_train, None)
            den = Denoiser(oracle, pt)
            ref = reference_trajectory(den, schedule, noises[train])  # the trajectory GITS needs
            ref = Reference(exact[train], ref.plan, ref.points, ref.x0s)  # ... and the exact samples as targets
            mixture = isinstance(oracle, MixtureOracle)
            comp = _components(oracle, exact[held]) if mixture else None
            title = f"{name}, {'VP linear betas, epsilon' if kind == 'vp' else 'rectified flow, velocity'}"
            print(f"\n### {title}: RMS error of x0 against the exact ODE solution ({n_eval} noises; tuned on "
                  f"{n_train} others)\n")
            head = " | ".join(f"{n} calls" for n in CALLS)
            print(f"| sampler | spacing | {head} |\n|---|---|" + "---|" * len(CALLS))
            table = {}
            for sampler in SAMPLERS:
                rows = {sp: [] for sp in _plans(schedule, kind)}
                rows["tuned"] = []
                for n in CALLS:
                    for sp, make in _plans(schedule, kind).items():
                        rows[sp].append(_stats(den, make(n), sampler, noises[held], exact[held], oracle, comp))
                    plan = tune_plan(den, schedule, n, sampler, noises[train], ref, iterations=iterations)
                    rows["tuned"].append(_stats(den, plan, sampler, noises[held], exact[held], oracle, comp))
                for sp, cells in rows.items():
                    shown = " | ".join(_cell(c, mixture) for c in cells)
                    print(f"| {sampler} | {sp} | {shown} |", flush=True)
                table[sampler] = rows
            _summary(table, kind)
            results[title] = table
            print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return results


def _stats(den, plan, sampler, noises, exact, oracle, comp):
    x0 = sample(den, noises, plan, sampler)
    per = (x0 - exact).pow(2).mean(1).sqrt()
    out = {"rms": float(per.pow(2).mean().sqrt()), "median": float(per.median()), "calls": len(plan)}
    if comp is not None:
        out["switched"] = int((_components(oracle, x0) != comp).sum())
    return out


def _cell(c: dict, mixture: bool) -> str:
    text = f"{c['rms']:.2e}"
    if mixture:
        text += f" (med {c['median']:.1e}, {c['switched']} sw)"
    return text


def _summary(table: dict, kind: str) -> None:
    def best(sampler_rows, i, tuned: bool):
        cells = [(rows[sp][i]["rms"], s, sp) for s, rows in sampler_rows.items() for sp in rows if (sp == "tuned") == tuned]
        return min(cells)

    ddim = {n: min(table["ddim"][sp][CALLS.index(n)]["rms"] for sp in table["ddim"] if sp != "tuned") for n in (20, 50)}
    print()
    for n, against in ((10, 50), (5, 20)):
        i = CALLS.index(n)
        e_u, s_u, sp_u = best(table, i, tuned=False)
        e_t, s_t, _ = best(table, i, tuned=True)
        print(f"- {n} calls: best untuned {s_u}/{sp_u} {e_u:.2e}, best tuned {s_t} {e_t:.2e}; DDIM at {against} "
              f"(best spacing) {ddim[against]:.2e}: ratio untuned {e_u / ddim[against]:.2f}, tuned {e_t / ddim[against]:.2f}")
    for n in (5, 10):
        i = CALLS.index(n)
        gains = []
        for s, rows in table.items():
            untuned = min(rows[sp][i]["rms"] for sp in rows if sp != "tuned")
            gains.append(f"{s} {untuned / rows['tuned'][i]['rms']:.2f}x")
        print(f"- tuned vs the same sampler's best untuned spacing at {n} calls: " + ", ".join(gains))


# ----------------------------------------------------------------------------------------------------------------
# Part 2: the built-in models


def model_part(refs: list[str], cache: Path, n_quality: int, iterations: int, tuned_samplers: list[str]) -> dict:
    from quality import train_classifier

    from ddimctl.engine import Engine, SamplingOptions

    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    net, acc, real_conf = train_classifier()
    print(f"\nclassifier: held-out accuracy {acc:.3f}, {100 * real_conf:.1f} % of real digits confident "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    results = {}
    for ref_name in refs:
        base = Engine.load(ref_name, SamplingOptions(steps=10, clip_sample=False))
        base.model.model.requires_grad_(False)
        schedule, den = base.settings.schedule(), base.denoisers(None, 1)[0]
        eval_seeds = list(range(100000, 100032))
        ref1000 = _cached(cache / f"{ref_name}_ref1000_{eval_seeds[0]}-{eval_seeds[-1]}_noclip.pt", lambda: reference_samples(
            den, schedule, base.noise(eval_seeds), "unipc", 1000, batch_size=32))
        train_seeds = list(range(64))
        traj = _cached(cache / f"{ref_name}_traj200_0-63_noclip.pt", lambda: _traj_dict(reference_trajectory(
            den, schedule, base.noise(train_seeds), "unipc", 200, batch_size=64)))
        traj = Reference(traj["x0"], traj["plan"], traj["points"], traj["x0s"])
        noises = base.noise(eval_seeds)
        print(f"\n### {ref_name}: RMS error against a 1000-call reference (32 held-out seeds), and confident share "
              f"of {n_quality} samples (classifier confidence > 0.9)\n")
        print("| sampler | schedule | 5 calls: error | 5 calls: confident | 10 calls: error | 10 calls: confident |")
        print("|---|---|---|---|---|---|")
        rows = {}
        ddim50 = _engine(base, steps=50)
        q50 = _confident(net, ddim50.denoisers(None, 1)[0], ddim50.plan, "ddim", ddim50, n_quality)
        e50 = plan_error(den, ddim50.plan, "ddim", noises, ref1000)
        print(f"| ddim | {ddim50.spacing}, 50 calls | {e50:.3e} | {100 * q50:.1f} % | | |", flush=True)
        for sampler in SAMPLERS:
            default = _engine(base, steps=5, sampler=sampler).spacing
            for which in ("default", *(sp for sp in ("logsnr", "trailing") if sp != default), "tuned"):
                if which == "tuned" and sampler not in tuned_samplers:
                    continue
                cells = []
                for n in (5, 10):
                    spacing = None if which in ("default", "tuned") else which
                    eng = _engine(base, steps=n, sampler=sampler, spacing=spacing)
                    plan, label = eng.plan, eng.spacing + (" (default)" if which == "default" else "")
                    if which == "tuned":
                        plan = _cached(cache / f"{ref_name}_{sampler}_{n}_tuned{iterations}_noclip.pt", lambda: tune_plan(
                            den, schedule, n, sampler, base.noise(train_seeds), traj, iterations=iterations, batch_size=64))
                        label = f"tuned ({iterations} it.)"
                    err = plan_error(den, plan, sampler, noises, ref1000)
                    conf = _confident(net, den, plan, sampler, eng, n_quality)
                    cells += [f"{err:.3e}", f"{100 * conf:.1f} %"]
                    rows[(sampler, which, n)] = (err, conf)
                print(f"| {sampler} | {label} | " + " | ".join(cells) + " |", flush=True)
        print()
        for n in (5, 10):
            gains = []
            for sampler in tuned_samplers:
                untuned = min(e for (s, w, k), (e, _) in rows.items() if s == sampler and k == n and w != "tuned")
                tuned_err, tuned_conf = rows[(sampler, "tuned", n)]
                gains.append(f"{sampler} {untuned / tuned_err:.2f}x (confident {100 * tuned_conf:.1f} %)")
            best_u = min((e, s, w) for (s, w, k), (e, _) in rows.items() if k == n and w != "tuned")
            print(f"- {n} calls: tuned vs the same sampler's best untuned spacing: {', '.join(gains)}; best untuned "
                  f"{best_u[1]}/{best_u[2]} {best_u[0]:.3e}; DDIM at 50: {e50:.3e}, confident {100 * q50:.1f} %")
        results[ref_name] = {"ddim50": (e50, q50), "rows": rows}
    print(f"\n({time.perf_counter() - t0:.0f} s in all)", file=sys.stderr)
    return results


def _engine(base, **options):
    """An engine on ``base``'s model with these sampling options, without clipping."""
    from ddimctl.engine import Engine, SamplingOptions

    return Engine(base.model, SamplingOptions(clip_sample=False, **options))


def _traj_dict(ref: Reference) -> dict:
    return {"x0": ref.x0, "plan": ref.plan, "points": ref.points, "x0s": ref.x0s}


def _cached(path: Path, make):
    if path.exists():
        return torch.load(path, weights_only=False)
    value = make()
    torch.save(value, path)
    return value


SEED0 = 200000  # the quality samples' seeds: apart from the tuning (0..63) and error (100000..) seeds


@torch.no_grad()
def _confident(net, den, plan, sampler, engine, n: int, batch: int = 50) -> float:
    probs = []
    for start in range(0, n, batch):
        x_T = engine.noise(list(range(SEED0 + start, SEED0 + min(n, start + batch))))
        x0 = sample(den, x_T, plan, sampler)
        probs.append(torch.softmax(net(x0.clamp(-1, 1).float()), 1))
    return float((torch.cat(probs).max(1).values > 0.9).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["oracle", "model", "all"], default="all")
    ap.add_argument("--models", default="mnist,mnist-flow")
    ap.add_argument("--cache", type=Path, default=Path(".bench-cache"), help="references and tuned plans are kept here")
    ap.add_argument("--quality-samples", type=int, default=200)
    ap.add_argument("--iterations", type=int, default=20, help="LD3 iterations of the tuned schedules")
    ap.add_argument("--tuned-samplers", default="unipc,ipndm")
    ap.add_argument("--oracles", default="gaussian,mixture", help="which oracles (part oracle)")
    ap.add_argument("--train-noises", type=int, default=512, help="noises the oracles' schedules are tuned on")
    ap.add_argument("--eval-noises", type=int, default=2048, help="held-out noises the oracles' errors are measured on")
    args = ap.parse_args()
    if args.part in ("oracle", "all"):
        oracle_part(args.eval_noises, args.train_noises, args.iterations, tuple(args.oracles.split(",")))
    if args.part in ("model", "all"):
        model_part(args.models.split(","), args.cache, args.quality_samples, args.iterations, args.tuned_samplers.split(","))


if __name__ == "__main__":
    main()
