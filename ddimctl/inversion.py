"""Inversion: from data x0 back to the x_T whose deterministic (eta = 0) sample it is. Plain functions, like the
samplers they invert (:mod:`ddimctl.sampler`), whose step coefficients they reuse.

Plain DDIM inversion evaluates the model at the point it has (x_{t-1}) instead of the point it seeks (x_t): exact
only when x0_hat does not change along the way. Exact inversion solves each inverse step implicitly (find x_t
whose forward step lands on x_{t-1}); it needs the denoiser's Jacobian with its raw model output held
(``denoise.frozen_jacobian(a, b)``, part of :class:`ddimctl.prediction.Denoiser`'s interface).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .sampler import Callback, Denoise, ddim_step, model_times, sampling_function
from .schedule import SamplingPlan


@dataclass
class InversionStats:
    """What an inversion cost and reached. ``residuals[k]``: RMS of (forward step - known point) after solving
    the k-th inverse step (from the clean end); for plain DDIM inversion it is the unsolved first guess."""

    model_calls: int = 0
    residuals: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)

    @property
    def max_residual(self) -> float:
        return max(self.residuals, default=0.0)


@sampling_function
def invert_ddim(
    denoise: Denoise,
    x0: Tensor,
    plan: SamplingPlan,
    callback: Callback | None = None,
    exact: bool = False,
    tol: float = 1e-6,
    max_iter: int = 50,
    stats: InversionStats | None = None,
) -> Tensor:
    """DDIM inversion: walk ``plan`` backwards from data x0 (B, ...) to x_T with eta = 0; returns x_T.

    Each inverse step, from level j+1 to the noisier level j, first takes the plain DDIM inverse: the model is
    evaluated at the point it has (x_{j+1}, with the target's time) and the same :func:`ddim_step` re-noises its
    (x0_hat, eps_hat) to level j.

    With ``exact=True`` each inverse step is then solved implicitly: find x_j such that the forward DDIM step from
    x_j lands on x_{j+1}, by the fixed-point iteration ``x_j += (x_{j+1} - step(x_j)) / c`` where c is the step's
    coefficient on x_j with the model output held (a Newton step with a frozen model). It stops when the RMS
    residual is below ``tol`` or stops shrinking, or after ``max_iter`` iterations; ``stats`` records residuals and
    model calls.
    """
    if exact and not hasattr(denoise, "frozen_jacobian"):
        raise TypeError("exact inversion needs a denoiser with frozen_jacobian(a, b) (e.g. ddimctl.Denoiser)")
    stats = stats if stats is not None else InversionStats()
    ts = model_times(plan, x0)
    S = len(plan)
    x = x0
    for n, j in enumerate(range(S - 1, -1, -1)):
        a_from, b_from, a, b = plan.a[j + 1], plan.b[j + 1], plan.a[j], plan.b[j]
        t = ts[j : j + 1]
        pred_x0, pred_eps = denoise(x, t, a_from, b_from)
        stats.model_calls += 1
        x_new = ddim_step(pred_x0, pred_eps, a, b)
        if exact:
            x_new, res, iters = _solve_inverse_step(denoise, x, x_new, t, (a, b), (a_from, b_from), tol, max_iter)
            stats.model_calls += iters
        else:
            res, iters = math.nan, 0
        stats.residuals.append(res)
        stats.iterations.append(iters)
        x = x_new
        if callback is not None:
            callback({"step": n + 1, "total": S, "x": x, "x0": pred_x0})
    return x


def ddim_x_coefficient(denoise, a: float, b: float, a_to: float, b_to: float) -> float:
    """d x_to / d x of the eta = 0 step ``x_to = a_to x0_hat + b_to eps_hat`` with the raw model output held."""
    dx0, deps = denoise.frozen_jacobian(a, b)
    return a_to * dx0 + b_to * deps


def _solve_inverse_step(denoise, target, guess, t, ab, ab_to, tol, max_iter, memory: int = 4):
    """Solve step(x) = target for x at level ``ab``, each sample on its own; returns (x, max RMS residual, calls).

    The plain update ``g(x) = x + (target - step(x)) / c`` (a Newton step with the model output frozen) is
    accelerated with Anderson mixing over the last ``memory`` iterates (Walker & Ni 2011), which converges where
    the plain iteration stalls at large steps. Every sample keeps its own history, residual and stopping point,
    so the result for one image does not depend on the others in its batch.
    """
    (a, b), (a_to, b_to) = ab, ab_to
    coeff = ddim_x_coefficient(denoise, a, b, a_to, b_to)
    B = target.shape[0]
    x = guess
    best_x, best_res = guess, torch.full((B,), math.inf, dtype=torch.float64, device=guess.device)
    active = torch.ones(B, dtype=torch.bool, device=guess.device)
    gs, fs = [], []  # histories of g(x_k) and f_k = g(x_k) - x_k, flattened (B, D) float64
    calls = 0
    for _ in range(max_iter):
        pred_x0, pred_eps = denoise(x, t, a, b)
        calls += 1
        r = target - ddim_step(pred_x0, pred_eps, a_to, b_to)
        res = r.flatten(1).double().pow(2).mean(1).sqrt()  # (B,) RMS residual per sample
        better = res < best_res
        best_x = torch.where(better.view(-1, *[1] * (x.ndim - 1)), x, best_x)
        best_res = torch.where(better, res, best_res)
        active &= (res > tol) & torch.isfinite(res) & (res < 1e3 * best_res.clamp(min=tol))
        if not bool(active.any()):  # one sync per iteration: the solve needs to know when to stop
            break
        f = (r / coeff).flatten(1).double()  # (B, D)
        g = x.flatten(1).double() + f
        gs.append(g)
        fs.append(f)
        if len(fs) > memory + 1:
            gs.pop(0)
            fs.pop(0)
        if len(fs) > 1:
            dF = torch.stack([fs[i + 1] - fs[i] for i in range(len(fs) - 1)], dim=2)  # (B, D, m)
            dG = torch.stack([gs[i + 1] - gs[i] for i in range(len(gs) - 1)], dim=2)
            gram = dF.transpose(1, 2) @ dF  # (B, m, m)
            ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(1).clamp(min=1e-300).view(-1, 1, 1)
            eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
            gamma = torch.linalg.solve(gram + ridge * eye, dF.transpose(1, 2) @ f.unsqueeze(2))  # (B, m, 1)
            g = g - (dG @ gamma).squeeze(2)
        x_new = g.to(x.dtype).view_as(x)
        x = torch.where(active.view(-1, *[1] * (x.ndim - 1)), x_new, x)
    return best_x, float(best_res.max()), calls
