"""The sampler core: DDIM (and DPM-Solver++ 2M) sampling and inversion as plain functions.

Every function takes a ``denoise(x_t, t, a, b) -> (x0_hat, eps_hat)`` callable (see
:class:`ddimctl.prediction.Denoiser`), a tensor ``x`` of shape (B, C, H, W) and a
:class:`ddimctl.schedule.SamplingPlan`; none touches files, devices or the terminal. Progress goes to an
optional ``callback(info: dict)``, called after every step with ``step``, ``total``, ``x`` and ``x0``.

The DDIM step (Song, Meng & Ermon 2021, eq. 12, with sigma from eq. 16) is written once, for any process
``x_t = a_t x0 + b_t eps``, so it serves VP (DDPM) and rectified-flow models alike::

    x_prev = a_prev * x0_hat + sqrt(b_prev^2 - sigma^2) * eps_hat + sigma * z
    sigma  = eta * b_prev * sqrt(1 - (a_t b_prev / (b_t a_prev))^2)

For VP (``a^2 = alphabar``, ``b^2 = 1 - alphabar``) sigma equals the paper's
``eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)``; for rectified flow with eta = 0
the step is exactly an Euler step ``x_prev = x_t + (s_prev - s_t) v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .schedule import SamplingPlan

Denoise = Callable[[Tensor, Tensor, float, float], "tuple[Tensor, Tensor]"]
Callback = Callable[[dict[str, Any]], None]
SAMPLERS = ("ddim", "dpm++2m")


# ----------------------------------------------------------------------------------------------------------------
# Noise: one generator per sample, so sample i is bit-identical whatever the batch it is drawn in.


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded ``seeds[i]``."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def randn(generators: Sequence[torch.Generator], shape: Sequence[int], dtype=torch.float32, device="cpu") -> Tensor:
    """Draw one (``*shape``) normal tensor from each generator: result (B, *shape).

    Draws are made in float32 on the CPU (the same bits on every device), then cast and moved.
    """
    z = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])
    return z.to(device=device, dtype=dtype, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------------
# The step


def ddim_sigma(a: float, b: float, a_to: float, b_to: float, eta: float) -> float:
    """sigma_t(eta) of eq. 16, written through (a, b): eta * b_to * sqrt(1 - (a b_to / (b a_to))^2)."""
    if eta == 0 or b_to == 0:
        return 0.0
    ratio = (a * b_to) / (b * a_to)  # = exp(lambda_t - lambda_prev) <= 1 when moving towards data
    return eta * b_to * math.sqrt(max(0.0, 1.0 - ratio * ratio))


def ddim_step(x0: Tensor, eps: Tensor, a_to: float, b_to: float, sigma: float = 0.0, z: Tensor | None = None) -> Tensor:
    """Eq. 12: move to level (a_to, b_to) given (x0_hat, eps_hat); ``z`` is the fresh noise when sigma > 0."""
    # 1. "predicted x0" part, 2. "direction pointing to x_t", 3. random noise
    x = a_to * x0 + math.sqrt(max(b_to * b_to - sigma * sigma, 0.0)) * eps
    if sigma > 0:
        x = x + sigma * z
    return x


def _model_times(plan: SamplingPlan, x: Tensor) -> Tensor:
    """The plan's model times on x's device, once, before the loop (no host-device transfer inside it)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.as_tensor(plan.timesteps, dtype=dtype).to(x.device)


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample_ddim(
    denoise: Denoise,
    x: Tensor,
    plan: SamplingPlan,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run the DDIM sampler from x (B, C, H, W) at level 0 of ``plan`` to the clean end; returns x0 (B, C, H, W).

    ``eta = 0`` is deterministic (the probability-flow ODE, first order); ``eta = 1`` is DDPM ancestral sampling.
    With ``eta > 0`` the step noise for sample i is drawn from ``generators[i]``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and (generators is None or len(generators) != x.shape[0]):
        raise ValueError("eta > 0 needs one generator per sample")
    ts = _model_times(plan, x)
    B = x.shape[0]
    for k in range(len(plan)):
        a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
        x0, eps = denoise(x, ts[k].expand(B), a, b)
        sigma = ddim_sigma(a, b, a_to, b_to, eta)
        z = randn(generators, x.shape[1:], x.dtype, x.device) if sigma > 0 else None
        x = ddim_step(x0, eps, a_to, b_to, sigma, z)
        if callback is not None:
            callback({"step": k + 1, "total": len(plan), "x": x, "x0": x0})
    return x


def sample_dpmpp_2m(
    denoise: Denoise, x: Tensor, plan: SamplingPlan, callback: Callback | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2): second-order multistep in the data
    prediction, with lambda = log(a / b) and h = lambda_to - lambda::

        x_to = (b_to / b) x - a_to (exp(-h) - 1) D,   D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k-1},  r = h_{k-1} / h

    First order (D = x0_k, which is exactly the DDIM step) on the first step and on the last step into the
    clean end (``lower_order_final``), where the extrapolation is worst.
    """
    ts = _model_times(plan, x)
    B, S = x.shape[0], len(plan)
    x0_prev, h_prev = None, math.inf
    for k in range(S):
        a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
        x0, _ = denoise(x, ts[k].expand(B), a, b)
        if b_to == 0:
            x = a_to * x0  # lambda_to = inf: the step lands on the prediction itself
            h = math.inf
        else:
            h = _lam(a_to, b_to) - _lam(a, b)
            D = x0
            if x0_prev is not None and k < S - 1 and math.isfinite(h_prev):
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (b_to / b) * x - a_to * math.expm1(-h) * D
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": x0})
    return x


def _lam(a: float, b: float) -> float:
    """log(a / b), -inf at pure noise (a = 0)."""
    return -math.inf if a == 0 else math.log(a) - math.log(b)


def sample(
    denoise: Denoise,
    x: Tensor,
    plan: SamplingPlan,
    sampler: str = "ddim",
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Dispatch to :func:`sample_ddim` or :func:`sample_dpmpp_2m` (which is deterministic: eta must be 0)."""
    if sampler == "ddim":
        return sample_ddim(denoise, x, plan, eta, generators, callback)
    if sampler == "dpm++2m":
        if eta != 0:
            raise ValueError("the dpm++2m sampler is deterministic: use eta 0 (or the ddim sampler for eta > 0)")
        return sample_dpmpp_2m(denoise, x, plan, callback)
    raise ValueError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")


# ----------------------------------------------------------------------------------------------------------------
# Inversion


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
    """DDIM inversion: walk ``plan`` backwards from data x0 (B, C, H, W) to x_T with eta = 0; returns x_T.

    Each inverse step, from level j+1 to the noisier level j, first takes the plain DDIM inverse: the model is
    evaluated at the point it has (x_{j+1}, with the target's time) and the same :func:`ddim_step` re-noises its
    (x0_hat, eps_hat) to level j. That is exact only when x0_hat does not change along the way.

    With ``exact=True`` each inverse step is then solved implicitly: find x_j such that the forward DDIM step from
    x_j lands on x_{j+1}, by the fixed-point iteration ``x_j += (x_{j+1} - step(x_j)) / c`` where c is the step's
    coefficient on x_j with the model output held (a Newton step with a frozen model). It stops when the RMS
    residual is below ``tol`` or stops shrinking, or after ``max_iter`` iterations; ``stats`` records residuals and
    model calls.
    """
    stats = stats if stats is not None else InversionStats()
    ts = _model_times(plan, x0)
    B, S = x0.shape[0], len(plan)
    x = x0
    for n, j in enumerate(range(S - 1, -1, -1)):
        a_from, b_from, a, b = plan.a[j + 1], plan.b[j + 1], plan.a[j], plan.b[j]
        t = ts[j].expand(B)
        x0_hat, eps_hat = denoise(x, t, a_from, b_from)
        stats.model_calls += 1
        x_new = ddim_step(x0_hat, eps_hat, a, b)
        if exact:
            x_new, res, iters = _solve_inverse_step(denoise, x, x_new, t, (a, b), (a_from, b_from), tol, max_iter)
            stats.model_calls += iters
        else:
            res, iters = math.nan, 0
        stats.residuals.append(res)
        stats.iterations.append(iters)
        x = x_new
        if callback is not None:
            callback({"step": n + 1, "total": S, "x": x, "x0": x0_hat})
    return x


def _solve_inverse_step(denoise, target, guess, t, ab, ab_to, tol, max_iter, memory: int = 4):
    """Solve step(x) = target for x at level ``ab``, each sample on its own; returns (x, max RMS residual, calls).

    The plain update ``g(x) = x + (target - step(x)) / c`` (a Newton step with the model output frozen) is
    accelerated with Anderson mixing over the last ``memory`` iterates (Walker & Ni 2011), which converges where
    the plain iteration stalls at large steps. Every sample keeps its own history, residual and stopping point,
    so the result for one image does not depend on the others in its batch.
    """
    (a, b), (a_to, b_to) = ab, ab_to
    coeff = denoise.x_coefficient(a, b, a_to, b_to) if hasattr(denoise, "x_coefficient") else a_to / a
    B = target.shape[0]
    x = guess
    best_x, best_res = guess, torch.full((B,), math.inf, dtype=torch.float64, device=guess.device)
    active = torch.ones(B, dtype=torch.bool, device=guess.device)
    gs, fs = [], []  # histories of g(x_k) and f_k = g(x_k) - x_k, flattened (B, D) float64
    calls = 0
    for _ in range(max_iter):
        x0_hat, eps_hat = denoise(x, t, a, b)
        calls += 1
        r = target - ddim_step(x0_hat, eps_hat, a_to, b_to)
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


# ----------------------------------------------------------------------------------------------------------------
# Latent interpolation


def slerp(x0: Tensor, x1: Tensor, alpha: float | Tensor, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation between latents x0, x1 (B, ...) at alpha in [0, 1], per sample; falls back to
    linear interpolation where the two are nearly parallel (|cos| > dot_threshold)."""
    a = x0.flatten(1).double()  # (B, D)
    c = x1.flatten(1).double()
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x0.device).reshape(-1, 1)
    dot = (a * c).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * c.norm(dim=1, keepdim=True))
    dot = dot.clamp(-1.0, 1.0)
    theta = torch.acos(dot)
    sin = torch.sin(theta)
    near = dot.abs() > dot_threshold
    safe_sin = torch.where(near, torch.ones_like(sin), sin)
    w0 = torch.where(near, 1 - alpha, torch.sin((1 - alpha) * theta) / safe_sin)
    w1 = torch.where(near, alpha, torch.sin(alpha * theta) / safe_sin)
    return (w0 * a + w1 * c).reshape(x0.shape).to(x0.dtype)
