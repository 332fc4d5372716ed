"""Why exact inversion stalls under classifier-free guidance (issue 30, item 1): a probe, not a benchmark.

Everything runs in float64 on the built-in ``mnist-cond`` at 10 steps (logsnr spacing, as ``ddimctl reconstruct``
uses) and guidance w = 3 (--guidance), on held-out MNIST digits with their own labels, picked as
benchmarks/conditional.py picks them (every len/N-th test digit, so every class alike). Findings and numbers:
docs/guided-inversion.md.

    python benchmarks/guided_inversion_probe.py                      # all parts (about 1 h on 2 busy cores)
    python benchmarks/guided_inversion_probe.py --parts solve,newton --step 4
    python benchmarks/guided_inversion_probe.py --parts control --samples 8

Parts (each prints its own table; ``solve`` runs first whenever a later part needs its states):

* ``solve``: the exact inversion as it was (``invert_ddim(exact=True)``, tol 3e-3): per inverse step (n = 0 is the
  step from the clean image) the largest residual, iterations, and which images stall (residual > 10x the step's
  tolerance).
* ``newton``: at inverse step --step, for the --images worst images there, three starts -- plain inversion (the
  model at the target, re-noised), the unguided exact solution (w = 1, solved to 1e-8) and the stalled solve's
  best iterate -- each driven by Newton-Krylov (GMRES with --krylov finite-difference JVPs, backtracking line
  search) and, from the stalled point, by a trust-region Newton-Krylov (Levenberg-Marquardt step inside the
  Krylov subspace, radius adapted by the ratio of actual to predicted decrease).
* ``jacobian``: the full 1024 x 1024 Jacobian of the step map (forward differences, 1024 extra model calls per
  point) where the trust-region solve ended: its smallest singular values, its eigenvalue of least real part, the
  denoiser-Jacobian eigenvalue that implies, the spectral radius of the frozen-model iteration, the residual along
  the two flattest directions and along the full Newton step; at the unguided solution the conditional and
  unconditional Jacobians apart, which give the guided one for every w: where det changes sign as w grows.
* ``continuation``: continuation in w at that step from the unguided solution (w = 1, 1.25, ..., 3, each solve
  started from the last one).
* ``control``: digits *sampled* under guidance (so every step has a preimage: the sampled trajectory), inverted with
  the same solver: per step the residual and the distance of each solved state from the sampled one; then the step
  into the clean end alone by Newton-Krylov from plain inversion: does it find the sampled x_{S-1}?
* ``gain`` (not in the default parts): how much a step's residual grows on the way to the decoded image.

``solve``, ``control`` and ``gain`` use the exact inversion of the checkout they run in; the numbers of
docs/guided-inversion.md's first sections came from commit 0b93190, whose solver was main's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddimctl.data import load_builtin_dataset  # noqa: E402
from ddimctl.inversion import (  # noqa: E402
    InversionStats, _rms, _solve, ddim_plan_update, invert_ddim, run_plan_updates,
)
from ddimctl.engine import Engine, SamplingOptions  # noqa: E402
from ddimctl.sampler import ddim_step, model_times, sample  # noqa: E402


class Probe:
    """The step maps of one plan under guidance, with a model-call counter (one call = one guided evaluation of a
    batch, whatever its size)."""

    def __init__(self, model: str, steps: int, w: float):
        self.engine = Engine.load(model, SamplingOptions(steps=steps, guidance_scale=w, inverting=True),
                                  dtype=torch.float64)
        self.plan, self.w = self.engine.plan, w
        self.S = len(self.plan)
        self.ts = model_times(self.plan, torch.zeros(1, dtype=torch.float64))
        self.calls = 0

    def den(self, labels: torch.Tensor, w: float | None = None):
        d = self.engine.denoisers(torch.as_tensor(labels).tolist(), len(labels))[1]
        return d.with_guidance_scale(self.w if w is None else w)

    def level(self, k: int) -> tuple[float, float]:
        return float(self.plan.a[k]), float(self.plan.b[k])

    def step(self, den, k: int, x: torch.Tensor) -> torch.Tensor:
        """The sampler's step k: x_k -> x_{k+1}."""
        self.calls += 1
        x0, eps = den(x, self.ts[k : k + 1], *self.level(k))
        return ddim_step(x0, eps, *self.level(k + 1))

    def plain(self, den, k: int, target: torch.Tensor) -> torch.Tensor:
        """Plain inversion of step k: the model at the target (level k + 1), re-noised to level k."""
        self.calls += 1
        x0, eps = den(target, self.ts[k : k + 1], *self.level(k + 1))
        return ddim_step(x0, eps, *self.level(k))

    def slope(self, k: int) -> float:
        return self.level(k + 1)[0] / self.level(k)[0]  # eps-prediction: the frozen-model slope a_{k+1} / a_k

    def rho(self, k: int) -> float:
        (a, b), (a2, b2) = self.level(k), self.level(k + 1)
        return (b2 / a2) / (b / a)

    def solve(self, den, k: int, target, guess, tol_res: float, max_iter: int):
        """The library's per-step solver (frozen-model Newton + Anderson + Newton-Krylov where it stalls)."""
        def evaluate(x, idx):
            self.calls += 1
            x0, eps = den.select(idx)(x, self.ts[k : k + 1], *self.level(k))
            return ddim_step(x0, eps, *self.level(k + 1)), (x0, eps)

        return _solve(evaluate, target, guess, self.slope(k), torch.ones(len(target), dtype=torch.bool),
                      tol_res=tol_res, tol_change=None, max_iter=max_iter, krylov=True, stats=InversionStats())

    # -- Newton-Krylov -------------------------------------------------------------------------------------------

    def arnoldi(self, fmap, x, fx, r, m: int, h: float = 1e-6):
        """m Arnoldi steps on the Jacobian of ``fmap`` at x from r (B, D); JVPs by forward differences of RMS h."""
        nb, D = r.shape
        beta = r.norm(dim=1).clamp(min=1e-300)
        V = [r / beta[:, None]]
        H = torch.zeros(nb, m + 1, m, dtype=torch.float64)
        e = h * math.sqrt(D)
        for i in range(m):
            w = (fmap(x + e * V[i].view_as(x)) - fx).flatten(1) / e
            for j in range(i + 1):
                H[:, j, i] = (w * V[j]).sum(1)
                w = w - H[:, j, i, None] * V[j]
            H[:, i + 1, i] = w.norm(dim=1)
            V.append(w / H[:, i + 1, i].clamp(min=1e-300)[:, None])
        return torch.stack(V[:m], 2), H, beta

    def newton_krylov(self, fmap, x, target, m: int, iters: int, trust: bool):
        """Newton-Krylov from x (B, ...): GMRES steps with a backtracking line search, or (``trust``) a
        Levenberg-Marquardt step inside the Krylov subspace within an adaptive radius. Returns (x, residual (B,),
        residual history)."""
        fx = fmap(x)
        res = _rms(fx - target)
        radius = torch.full((len(x),), 0.05 * math.sqrt(x[0].numel()), dtype=torch.float64)  # RMS 0.05
        hist = [res]
        for _ in range(iters):
            r = (target - fx).flatten(1)
            V, H, beta = self.arnoldi(fmap, x, fx, r, m)
            rhs = torch.zeros(len(x), m + 1, dtype=torch.float64)
            rhs[:, 0] = beta
            if not trust:
                y = torch.linalg.lstsq(H, rhs[:, :, None]).solution.squeeze(2)
                delta = (V @ y[:, :, None]).squeeze(2).view_as(x)
                lam = torch.ones(len(x), dtype=torch.float64)
                acc = torch.zeros(len(x), dtype=torch.bool)
                xn, fn, rn = x.clone(), fx.clone(), res.clone()
                for _ in range(5):
                    xt = x + lam.view(-1, 1, 1, 1) * delta
                    ft = fmap(xt)
                    rt = _rms(ft - target)
                    ok = ~acc & (rt < (1 - 1e-4 * lam) * res)
                    xn[ok], fn[ok], rn[ok] = xt[ok], ft[ok], rt[ok]
                    acc |= ok
                    lam = torch.where(acc, lam, lam / 4)
                    if bool(acc.all()):
                        break
                x, fx, res = xn, fn, rn
            else:
                y, pred = _lm_in_subspace(H, rhs, radius)
                delta = (V @ y[:, :, None]).squeeze(2).view_as(x)
                ft = fmap(x + delta)
                rt = _rms(ft - target)
                ratio = (res - rt) / (res - pred / math.sqrt(x[0].numel())).clamp(min=1e-300)
                ok = rt < res
                x = torch.where(ok.view(-1, 1, 1, 1), x + delta, x)
                fx = torch.where(ok.view(-1, 1, 1, 1), ft, fx)
                res = torch.where(ok, rt, res)
                step = delta.flatten(1).norm(dim=1)
                radius = torch.where(ratio < 0.25, step / 4,
                                     torch.where((ratio > 0.75) & (step > 0.99 * radius), 2 * radius, radius))
            hist.append(res)
        return x, res, hist

    def jacobian(self, den1, k: int, x: torch.Tensor, h: float = 1e-6, chunk: int = 128) -> torch.Tensor:
        """The full Jacobian (D, D) of step k at x (1, ...) by forward differences; ``den1`` for one image."""
        D = x[0].numel()
        dd = den1.select(torch.zeros(chunk, dtype=torch.long))  # the one image's denoiser, chunk times over
        fx = self.step(den1, k, x)
        cols = []
        for c0 in range(0, D, chunk):
            n = min(chunk, D - c0)
            P = x.expand(n, *x.shape[1:]).clone().flatten(1)
            P[torch.arange(n), torch.arange(c0, c0 + n)] += h
            d = dd if n == chunk else den1.select(torch.zeros(n, dtype=torch.long))
            cols.append((self.step(d, k, P.view(n, *x.shape[1:])) - fx).flatten(1) / h)
        return torch.cat(cols).T  # (out, in)


def _lm_in_subspace(H, rhs, radius):
    """Per image: y minimising |rhs - H y| subject to |y| <= radius (bisection on the Levenberg-Marquardt
    parameter). Returns (y (B, m), predicted residual norm (B,))."""
    m = H.shape[2]
    eye = torch.eye(m, dtype=torch.float64)
    ys = []
    for b in range(H.shape[0]):
        A, g = H[b].T @ H[b], H[b].T @ rhs[b]
        y = torch.linalg.lstsq(H[b], rhs[b][:, None]).solution.squeeze(1)
        if y.norm() > radius[b]:
            lo, hi = 0.0, float(A.diagonal().max()) * 1e6 + 1.0
            for _ in range(100):
                mu = math.sqrt(max(lo, 1e-12 * hi) * hi)
                if torch.linalg.solve(A + mu * eye, g).norm() > radius[b]:
                    lo = mu
                else:
                    hi = mu
                if lo > 0 and hi / lo < 1.01:
                    break
            y = torch.linalg.solve(A + hi * eye, g)
        ys.append(y)
    Y = torch.stack(ys)
    return Y, (rhs - (H @ Y[:, :, None]).squeeze(2)).norm(dim=1)


def fmt(v) -> str:
    return " ".join(f"{float(u):.1e}" for u in v)


def part_solve(p: Probe, x, y, tol: float, report: dict) -> dict:
    states: list[torch.Tensor] = []
    st = InversionStats()
    with torch.inference_mode():
        invert_ddim(p.den(y), x, p.plan, exact=True, tol=tol, max_iter=50, stats=st,
                    callback=lambda info: states.append(info["x"].clone()))
    S = p.S
    tol_step = tol / math.sqrt(S) / (abs(p.w) + abs(1 - p.w))  # the solve's per-step residual bound (VP)
    stalled = [[i for i, r in enumerate(st.image_residuals[n]) if r > 10 * tol_step] for n in range(S)]
    print(f"\n## solve: exact inversion as it was, w = {p.w:g}, {len(x)} digits, tol {tol:g} "
          f"(per-step residual bound {tol_step:.1e}); {st.model_calls} batched calls\n")
    print("| inverse step n | level k | sigma_k -> sigma_k+1 | max residual | max iterations | images stalled |")
    print("|---|---|---|---|---|---|")
    for n in range(S):
        k = S - 1 - n
        (a, b), (a2, b2) = p.level(k), p.level(k + 1)
        print(f"| {n} | {k} | {b / a:.3g} -> {b2 / a2:.3g} | {st.residuals[n]:.1e} | {st.iterations[n]} | "
              f"{len(stalled[n])} |")
    report["solve"] = {"residuals": st.residuals, "iterations": st.iterations, "stalled": stalled,
                       "image_calls": st.image_calls}
    return {"states": states, "stats": st}


def part_newton(p: Probe, x, y, solved: dict, n: int, images: list[int], m: int, report: dict) -> dict:
    k = p.S - 1 - n
    target = (solved["states"][n - 1] if n > 0 else x)[images]
    yy = y[images]
    dg, du = p.den(yy), p.den(yy, 1.0)
    with torch.inference_mode():
        starts = {"plain": p.plain(dg, k, target)}
        starts["unguided exact"] = p.solve(du, k, target, starts["plain"], 1e-8, 60).x
        starts["stalled solve"] = solved["states"][n][images]
        names = list(starts)
        X = torch.cat([starts[s] for s in names])
        T = target.repeat(len(names), 1, 1, 1)
        dd = p.den(yy.repeat(len(names)))
        fmap = lambda z: p.step(dd, k, z)  # noqa: E731
        c0 = p.calls
        Xn, res_nk, _ = p.newton_krylov(fmap, X, T, m, 8, trust=False)
        nk_calls = p.calls - c0
        B = len(images)
        c0 = p.calls
        dl = p.den(yy)
        Xt, res_tr, _ = p.newton_krylov(lambda z: p.step(dl, k, z), Xn[2 * B:], target, m, 15, trust=True)
        tr_calls = p.calls - c0
    start_res = {s: _rms(p.step(p.den(yy), k, starts[s]) - target) for s in names}
    print(f"\n## newton: inverse step n = {n} (k = {k}), images {images}; residual RMS at the start -> after "
          f"Newton-Krylov (GMRES({m}), line search, 8 steps) per start; trust-region from the stalled point\n")
    print("| start | " + " | ".join(f"image {i}" for i in images) + " |")
    print("|---|" + "---|" * len(images))
    for j, s in enumerate(names):
        a, b = start_res[s], res_nk[j * B:(j + 1) * B]
        print(f"| {s} | " + " | ".join(f"{float(u):.1e} -> {float(v):.1e}" for u, v in zip(a, b)) + " |")
    print("| trust region from the Newton-Krylov point | " + " | ".join(f"{float(v):.1e}" for v in res_tr) + " |")
    moved = [_rms(Xn[j * B:(j + 1) * B] - starts[s]) for j, s in enumerate(names)]
    print(f"\n(Newton-Krylov: {nk_calls} batched calls for the {len(names) * B} systems; trust region {tr_calls}; "
          f"RMS moved from each start: " + "; ".join(f"{s} {fmt(mv)}" for s, mv in zip(names, moved)) + ")")
    report["newton"] = {"step": n, "images": images, "start": {s: start_res[s].tolist() for s in names},
                        "newton_krylov": res_nk.tolist(), "trust_region": res_tr.tolist()}
    return {"k": k, "target": target, "starts": starts, "x_tr": Xt, "images": images, "y": yy}


def part_jacobian(p: Probe, nk: dict, n_images: int, report: dict) -> None:
    k, rho, c = nk["k"], p.rho(nk["k"]), p.slope(nk["k"])
    thresh = -rho / (1 - rho)
    print(f"\n## jacobian at inverse step k = {k}: rho = sigma_k+1 / sigma_k = {rho:.3f}; the step map's Jacobian is "
          f"c (rho I + (1 - rho) J_D), c = {c:.3f} the frozen slope, J_D the guided denoiser's Jacobian (in x / a): "
          f"it is singular where J_D has an eigenvalue {thresh:.2f}\n")
    rows = []
    with torch.inference_mode():
        for j, i in enumerate(nk["images"][:n_images]):
            x = nk["x_tr"][j : j + 1]
            T = nk["target"][j : j + 1]
            d1 = p.den(nk["y"][j : j + 1])
            fx = p.step(d1, k, x)
            J = p.jacobian(d1, k, x) / c
            r = (T - fx).flatten()
            U, sv, Vh = torch.linalg.svd(J)
            ev = torch.linalg.eigvals(J)
            radius = torch.linalg.eigvals(torch.eye(J.shape[0], dtype=J.dtype) - J).abs().max()
            newton = Vh.T @ ((U.T @ r) / sv) / c
            D = x[0].numel()
            lines = [x + s * Vh[-1].view_as(x) * math.sqrt(D) for s in (-0.1, -0.05, 0.05, 0.1)]
            lines += [x + s * Vh[-2].view_as(x) * math.sqrt(D) for s in (-0.1, -0.05, 0.05, 0.1)]
            lines += [x + t * newton.view_as(x) for t in (0.1, 0.5, 1.0)]
            L = torch.cat(lines)
            lr = _rms(p.step(p.den(nk["y"][j : j + 1].expand(len(L))), k, L) - T)
            row = {"image": i, "residual": float(_rms(fx - T)), "smallest_sv": sv[-4:].flip(0).tolist(),
                   "largest_sv": float(sv[0]), "min_real_eig": float(ev.real.min()),
                   "n_negative_eig": int((ev.real < 0).sum()),
                   "implied_denoiser_eig": float((ev.real.min() - rho) / (1 - rho)),
                   "frozen_radius": float(radius), "newton_rms": float(newton.norm() / math.sqrt(D)),
                   "residual_share_flattest": float((U[:, -1] @ r) ** 2 / (r @ r)),
                   "along_vmin": lr[:4].tolist(), "along_vmin2": lr[4:8].tolist(), "along_newton": lr[8:].tolist()}
            rows.append(row)
            print(f"image {i}: residual {row['residual']:.1e}; smallest singular values of J/c {fmt(row['smallest_sv'])} "
                  f"(largest {row['largest_sv']:.2f}); eigenvalues with negative real part {row['n_negative_eig']}, least "
                  f"{row['min_real_eig']:+.3f} (denoiser eigenvalue {row['implied_denoiser_eig']:+.2f}); frozen-model "
                  f"iteration spectral radius {row['frozen_radius']:.2f}; full Newton step RMS {row['newton_rms']:.2f}, "
                  f"{100 * row['residual_share_flattest']:.0f} % of |r|^2 on the flattest direction")
            print(f"   residual moving RMS -0.1, -0.05, +0.05, +0.1 along the flattest direction {fmt(row['along_vmin'])}, "
                  f"the next {fmt(row['along_vmin2'])}; along the Newton step at t = 0.1, 0.5, 1: {fmt(row['along_newton'])}")
        # the guided Jacobian for every w at the unguided solution: (1 - w) J_uncond + w J_cond
        ws = [1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0]
        print(f"\nat the unguided exact solution, the guided Jacobian for w = {', '.join(f'{w:g}' for w in ws)}:")
        wrows = []
        for j, i in enumerate(nk["images"][:n_images]):
            x = nk["starts"]["unguided exact"][j : j + 1]
            lab = nk["y"][j : j + 1]
            base = p.engine.denoisers(torch.as_tensor(lab).tolist(), len(lab))[1]
            Jc = p.jacobian(base.with_guidance_scale(1.0), k, x) / c  # the conditional output alone
            Ju = p.jacobian(base.with_guidance_scale(0.0), k, x) / c  # the unconditional output alone
            svs, eigs = [], []
            for w in ws:
                Jw = (1 - w) * Ju + w * Jc
                svs.append(float(torch.linalg.svdvals(Jw)[-1]))
                eigs.append(float(torch.linalg.eigvals(Jw).real.min()))
            wrows.append({"image": i, "w": ws, "min_sv": svs, "min_real_eig": eigs})
            print(f"image {i}: smallest singular value {' '.join(f'{v:.3f}' for v in svs)}")
            print(f"          least real eigenvalue   {' '.join(f'{v:+.3f}' for v in eigs)}")
    report["jacobian"] = {"k": k, "rho": rho, "threshold": thresh, "at_stall": rows, "w_scan": wrows}


def part_continuation(p: Probe, nk: dict, report: dict) -> None:
    k = nk["k"]
    ws = [1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0]
    print(f"\n## continuation in w at step k = {k} from the unguided exact solution (each solve: up to 40 "
          "iterations, tol 1e-8, started from the last w's solution)\n")
    print("| w | " + " | ".join(f"image {i}" for i in nk["images"]) + " |")
    print("|---|" + "---|" * len(nk["images"]))
    x = nk["starts"]["unguided exact"]
    rows = []
    with torch.inference_mode():
        for w in ws:
            sol = p.solve(p.den(nk["y"], w), k, nk["target"], x, 1e-8, 40)
            x = sol.x
            rows.append(sol.residual.tolist())
            print(f"| {w:g} | " + " | ".join(f"{float(v):.1e}" for v in sol.residual) + " |", flush=True)
    report["continuation"] = {"w": ws, "residuals": rows}


def part_control(p: Probe, n: int, tol: float, report: dict, max_iter: int = 50) -> None:
    y = torch.arange(n) % 10
    xT = torch.randn(n, 1, *p.engine.latent_shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dg = p.den(y)
    traj = [xT]
    states: list[torch.Tensor] = []
    st = InversionStats()
    with torch.inference_mode():
        x0 = sample(dg, xT, p.plan, "ddim", 0.0, None, lambda info: traj.append(info["x"].clone()))
        invert_ddim(dg, x0, p.plan, exact=True, tol=tol, max_iter=max_iter, stats=st,
                    callback=lambda info: states.append(info["x"].clone()))
    print(f"\n## control: {n} digits sampled under w = {p.w:g} (labels 0, 1, ...; seed 0), inverted with tol {tol:g}, "
          f"max-iter {max_iter}\n")
    print("| inverse step n | max residual | max iterations | distance of the solved state from the sampled one, "
          "per image (RMS) |")
    print("|---|---|---|---|")
    dist = []
    for m in range(p.S):
        dm = _rms(states[m] - traj[p.S - 1 - m])
        dist.append(dm.tolist())
        print(f"| {m} | {st.residuals[m]:.1e} | {st.iterations[m]} | {fmt(dm)} |")
    report["control"] = {"residuals": st.residuals, "iterations": st.iterations, "distance": dist}
    # the step into the clean end alone, where the sampled x_{S-1} is an exact preimage: Newton-Krylov from plain
    k = p.S - 1
    with torch.inference_mode():
        start = p.plain(dg, k, x0)
        x, res, hist = p.newton_krylov(lambda z: p.step(dg, k, z), start, x0, 20, 5, trust=False)
    d_start, d_end = _rms(start - traj[k]), _rms(x - traj[k])
    print(f"\nthe step into the clean end alone, Newton-Krylov (GMRES(20), line search, 5 steps) from plain inversion: "
          f"residual per image {fmt(hist[0])} -> {fmt(res)}; distance from the sampled x_{k} {fmt(d_start)} -> "
          f"{fmt(d_end)}")
    report["control"]["clean_end"] = {"residual": [h.tolist() for h in hist], "distance_start": d_start.tolist(),
                                      "distance_end": d_end.tolist()}


def part_gain(p: Probe, x, y, tol: float, report: dict) -> None:
    """How much a step's residual grows on the way to the decoded image under guidance: the solve's own residual
    vector at level k + 1 (and a random one), scaled to RMS 1e-3, added to x_{k+1} and decoded from there."""
    den = p.den(y)
    st = InversionStats()
    st.keep_offsets = True
    states: list[torch.Tensor] = []
    with torch.inference_mode():
        invert_ddim(den, x, p.plan, exact=True, tol=tol, max_iter=50, stats=st,
                    callback=lambda info: states.append(info["x"].clone()))
        g = torch.Generator().manual_seed(0)
        print(f"\n## gain: decoded change / perturbation (RMS 1e-3 at level k+1), w = {p.w:g}, median / max over "
              f"{len(x)} digits (the solve's tolerance assumes at most |w| + |1 - w| = {abs(p.w) + abs(1 - p.w):g})\n")
        print("| level k+1 | sigma | the solve's residual direction | a random direction |\n|---|---|---|---|")
        rows = []
        for k in range(p.S - 1):
            tail = p.plan.tail(p.S - k - 1)
            xk1 = states[p.S - 2 - k]
            base = run_plan_updates(ddim_plan_update, den, xk1, tail, offsets=st.offsets[k + 1:])
            out = []
            for kind in ("residual", "random"):
                d = st.offsets[k] if kind == "residual" else torch.randn(xk1.shape, generator=g, dtype=xk1.dtype)
                d = d / _rms(d).view(-1, *[1] * (d.ndim - 1)).to(d.dtype) * 1e-3
                dec = run_plan_updates(ddim_plan_update, den, xk1 + d, tail, offsets=st.offsets[k + 1:])
                out.append(_rms(dec - base) / 1e-3)
            a, b = p.level(k + 1)
            rows.append({"level": k + 1, "residual": out[0].tolist(), "random": out[1].tolist()})
            print(f"| {k + 1} | {b / a:.3g} | {float(out[0].median()):.2f} / {float(out[0].max()):.2f} | "
                  f"{float(out[1].median()):.2f} / {float(out[1].max()):.2f} |", flush=True)
    report["gain"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-cond")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--digits", type=int, default=20)
    ap.add_argument("--tol", type=float, default=3e-3)
    ap.add_argument("--parts", default="solve,newton,jacobian,continuation,control")
    ap.add_argument("--step", type=int, default=4, help="inverse step n (0: the one from the clean image) to probe")
    ap.add_argument("--images", type=int, default=4, help="how many of the worst images at --step to probe")
    ap.add_argument("--jacobian-images", type=int, default=2)
    ap.add_argument("--krylov", type=int, default=20)
    ap.add_argument("--samples", type=int, default=8, help="guided samples in the control part")
    ap.add_argument("--control-tol", type=float, help="the control part's tol (default: --tol)")
    ap.add_argument("--control-max-iter", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    p = Probe(args.model, args.steps, args.guidance)
    xt, yt = load_builtin_dataset("mnist-test", p.engine.image_shape[-1], with_labels=True)
    pick = torch.arange(0, len(xt), max(1, len(xt) // args.digits))[: args.digits]
    x, y = xt[pick].double(), yt[pick]
    parts = args.parts.split(",")
    report: dict = {"args": vars(args) | {"json": str(args.json)}}
    solved = nk = None
    if any(q in parts for q in ("solve", "newton", "jacobian", "continuation")):
        solved = part_solve(p, x, y, args.tol, report)
    if any(q in parts for q in ("newton", "jacobian", "continuation")):
        res = torch.tensor(solved["stats"].image_residuals[args.step])
        images = res.argsort(descending=True)[: args.images].tolist()
        nk = part_newton(p, x, y, solved, args.step, images, args.krylov, report)
    if "jacobian" in parts:
        part_jacobian(p, nk, args.jacobian_images, report)
    if "continuation" in parts:
        part_continuation(p, nk, report)
    if "control" in parts:
        part_control(p, args.samples, args.control_tol or args.tol, report, args.control_max_iter)
    if "gain" in parts:
        part_gain(p, x, y, args.tol, report)
    print(f"\n({p.calls} model calls, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
