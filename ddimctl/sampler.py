"""The sampler core: DDIM and the higher-order samplers as plain functions.

Every function takes a ``denoise(x_t, t, a, b) -> (x0_hat, eps_hat)`` callable (see
:class:`ddimctl.prediction.Denoiser`), a tensor ``x`` of shape (B, ...) and a
:class:`ddimctl.schedule.SamplingPlan`; none touches files, devices or the terminal. ``t`` is the model time
shared by the whole batch, shape (1,): a model computes its time embedding once, so no sample's result depends on
the batch through it. Progress goes to an optional ``callback(info: dict)``, called after every step with
``step``, ``total``, ``x`` and ``x0``.

The DDIM step (Song, Meng & Ermon 2021, eq. 12, with sigma from eq. 16) is written once, for any process
``x_t = a_t x0 + b_t eps``, so it serves VP (DDPM) and rectified-flow models alike. The paper's alpha_t is
DDPM's alpha-bar; for a VP process ``a_t = sqrt(alpha_t)`` and ``b_t = sqrt(1 - alpha_t)``::

    x_prev = a_prev * x0_hat + sqrt(b_prev^2 - sigma_t^2) * eps_hat + sigma_t * z                  (eq. 12)
    sigma_t = eta * b_prev * sqrt(1 - (a_t b_prev / (b_t a_prev))^2)                               (eq. 16)

which for VP is the paper's ``eta * sqrt((1 - alpha_prev) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_prev)``;
for rectified flow (``a = 1 - s``, ``b = s``) with eta = 0 the step is exactly an Euler step
``x_prev = x_t + (s_prev - s_t) v``.

No autograd graph is recorded while sampling (as k-diffusion's samplers run under ``no_grad``), unless the
plan's own levels are tensors that require grad: then the caller is optimising the plan (:mod:`ddimctl.tuning`)
and gradients flow through every step. The levels are read as Python floats in every other case.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .schedule import SamplingPlan, Schedule

Denoise = Callable[[Tensor, Tensor, float, float], "tuple[Tensor, Tensor]"]
Callback = Callable[[dict[str, Any]], None]


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
# Scalars: a level is a Python float, or a 0-d tensor when a plan is being optimised; these take either.


def _sqrt(v):
    return torch.sqrt(v) if torch.is_tensor(v) else math.sqrt(v)


def _log(v):
    return torch.log(v) if torch.is_tensor(v) else (-math.inf if v == 0 else math.log(v))


def _expm1(v):
    return torch.expm1(v) if torch.is_tensor(v) else math.expm1(v)


def _exp(v):
    return torch.exp(v) if torch.is_tensor(v) else math.exp(v)


def _isfinite(v) -> bool:
    return bool(torch.isfinite(v)) if torch.is_tensor(v) else math.isfinite(v)


def lam(a, b):
    """The half log-SNR ``lambda = log(a / b)``: -inf at pure noise (a = 0), +inf at the clean end (b = 0)."""
    return _log(a) - _log(b)


def plan_requires_grad(plan: SamplingPlan) -> bool:
    """Whether a plan's levels or times are tensors being optimised (then the samplers record a graph)."""
    return any(torch.is_tensor(v) and v.requires_grad for v in (plan.a, plan.b, plan.timesteps))


def sampling_function(fn: Callable) -> Callable:
    """Run a sampler (or inversion) with autograd off, unless its plan requires grad (see the module notes)."""

    @functools.wraps(fn)
    def wrapper(denoise, x, plan, *args, **kwargs):
        with torch.set_grad_enabled(plan_requires_grad(plan)):
            return fn(denoise, x, plan, *args, **kwargs)

    return wrapper


def model_times(plan: SamplingPlan, x: Tensor) -> Tensor:
    """The plan's model times on x's device, once, before the loop (no host-device transfer inside it)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.as_tensor(plan.timesteps, dtype=dtype).to(x.device)


# ----------------------------------------------------------------------------------------------------------------
# The DDIM step


def ddim_sigma(a_t: float, b_t: float, a_prev: float, b_prev: float, eta: float) -> float:
    """sigma_t(eta) of eq. 16 through (a, b): ``eta * b_prev * sqrt(1 - (a_t b_prev / (b_t a_prev))^2)``."""
    if eta == 0 or b_prev == 0:
        return 0.0
    ratio = (a_t * b_prev) / (b_t * a_prev)  # = exp(lambda_t - lambda_prev) <= 1 when moving towards data
    return eta * b_prev * math.sqrt(max(0.0, 1.0 - ratio * ratio))


def ddim_step(pred_x0: Tensor, pred_eps: Tensor, a_prev, b_prev, sigma_t: float = 0.0, z: Tensor | None = None) -> Tensor:
    """Eq. 12: the sample at level (a_prev, b_prev) given (x0_hat, eps_hat) at the current level.

    ``z`` is the fresh noise, used when ``sigma_t > 0``. Inversion re-noises with the same function.
    """
    # 1. "predicted x_0" term: sqrt(alpha_{t-1}) * x0_hat
    prev_sample = a_prev * pred_x0
    # 2. "direction pointing to x_t": sqrt(1 - alpha_{t-1} - sigma_t^2) * eps_hat
    if sigma_t == 0:
        prev_sample = prev_sample + b_prev * pred_eps  # b_prev >= 0: the same as the square root below
    else:
        prev_sample = prev_sample + math.sqrt(max(b_prev * b_prev - sigma_t * sigma_t, 0.0)) * pred_eps
        # 3. random noise: sigma_t * z
        prev_sample = prev_sample + sigma_t * z
    return prev_sample


# ----------------------------------------------------------------------------------------------------------------
# Samplers


@sampling_function
def sample_ddim(
    denoise: Denoise,
    x: Tensor,
    plan: SamplingPlan,
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run the DDIM sampler from x (B, ...) at level 0 of ``plan`` to the clean end; returns x0 (B, ...).

    ``eta = 0`` is deterministic (the probability-flow ODE, first order); ``eta = 1`` is DDPM ancestral sampling.
    With ``eta > 0`` the step noise for sample i is drawn from ``generators[i]``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and (generators is None or len(generators) != x.shape[0]):
        raise ValueError("eta > 0 needs one generator per sample")
    ts = model_times(plan, x)
    S = len(plan)
    for k in range(S):
        a_t, b_t, a_prev, b_prev = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
        pred_x0, pred_eps = denoise(x, ts[k : k + 1], a_t, b_t)
        sigma_t = ddim_sigma(a_t, b_t, a_prev, b_prev, eta)
        z = randn(generators, x.shape[1:], x.dtype, x.device) if sigma_t > 0 else None
        x = ddim_step(pred_x0, pred_eps, a_prev, b_prev, sigma_t, z)
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": pred_x0})
    return x


def dpmpp_2m_update(x: Tensor, x0: Tensor, x0_prev: Tensor | None, a, b, a_to, b_to, h_prev) -> tuple[Tensor, Any]:
    """One DPM-Solver++(2M) step from level (a, b) to (a_to, b_to); returns (x_to, h).

    ``x0_prev`` and ``h_prev``: the previous step's data prediction and log-SNR step (None / inf for a first-order
    step). With lambda = log(a / b) and h = lambda_to - lambda (Lu et al. 2022, arXiv 2211.01095, Alg. 2)::

        x_to = (b_to / b) x - a_to (exp(-h) - 1) D,   D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev,  r = h_prev / h

    D = x0 (first order) is exactly the DDIM step. Into the clean end (b_to = 0, h = inf) it lands on a_to x0.
    """
    if b_to == 0:
        return a_to * x0, math.inf
    h = lam(a_to, b_to) - lam(a, b)
    D = x0
    if x0_prev is not None and _isfinite(h_prev):
        r = h_prev / h
        D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (b_to / b) * x - a_to * _expm1(-h) * D, h


@sampling_function
def sample_dpmpp_2m(denoise: Denoise, x: Tensor, plan: SamplingPlan, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M): second-order multistep in the data prediction (:func:`dpmpp_2m_update`).

    First order on the first step and on the last step into the clean end (``lower_order_final``), where the
    extrapolation is worst.
    """
    ts = model_times(plan, x)
    S = len(plan)
    x0_prev, h_prev = None, math.inf
    for k in range(S):
        a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
        x0, _ = denoise(x, ts[k : k + 1], a, b)
        last = k == S - 1
        x, h = dpmpp_2m_update(x, x0, None if last else x0_prev, a, b, a_to, b_to, h_prev)
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": x0})
    return x


def _sample_dpmpp_2m(denoise, x, plan, eta, generators, callback):
    if eta != 0:
        raise ValueError("the dpm++2m sampler is deterministic: use eta 0 (or the ddim sampler for eta > 0)")
    return sample_dpmpp_2m(denoise, x, plan, callback)


def bdia_step(x_other: Tensor, out: tuple[Tensor, Tensor], plan: SamplingPlan, k: int, gamma: float = 1.0,
              inverse: bool = False) -> Tensor:
    """One BDIA-DDIM step around state k (Zhang, Lewis & Kleijn 2023, arXiv 2307.10829, eq. 23 with eta = 0).

    With ``F_{k->j} = ddim_step(x0_hat_k, eps_hat_k, a_j, b_j)`` the DDIM step from x_k to level j, using the
    model's outputs ``out`` at x_k only::

        x_{k+1} = gamma x_{k-1} - gamma F_{k->k-1} + F_{k->k+1}          (towards the data; x_other = x_{k-1})
        x_{k-1} = (x_{k+1} - F_{k->k+1}) / gamma + F_{k->k-1}             (inverse=True; x_other = x_{k+1})

    gamma = 0 is DDIM; gamma = 1 integrates symmetrically over [t_{k-1}, t_{k+1}] and keeps the inverse recursion's
    parasitic root (-1/gamma) on the unit circle.
    """
    x0, eps = out
    toward_data = ddim_step(x0, eps, plan.a[k + 1], plan.b[k + 1])
    toward_noise = ddim_step(x0, eps, plan.a[k - 1], plan.b[k - 1])
    if inverse:
        return (x_other - toward_data) / gamma + toward_noise
    return gamma * x_other - gamma * toward_noise + toward_data


@sampling_function
def sample_bdia(
    denoise: Denoise,
    x: Tensor,
    plan: SamplingPlan,
    x_next: Tensor | None = None,
    gamma: float = 1.0,
    callback: Callback | None = None,
) -> Tensor:
    """BDIA-DDIM: exactly invertible with one model call per step (:func:`bdia_step`); returns x0 (B, ...).

    Its state is a pair: from noise x (level 0) the first step is a DDIM step to x_1; from a latent pair (x,
    ``x_next`` = x_1, what :func:`ddimctl.inversion.invert_bdia` returns) it starts at step 1, one call fewer.
    """
    ts = model_times(plan, x)
    S = len(plan)
    if x_next is None:
        pred_x0, pred_eps = denoise(x, ts[0:1], plan.a[0], plan.b[0])
        x_prev, x = x, ddim_step(pred_x0, pred_eps, plan.a[1], plan.b[1])
    else:
        x_prev, x, pred_x0 = x, x_next, x_next
    if callback is not None:
        callback({"step": 1, "total": S, "x": x, "x0": pred_x0})
    for k in range(1, S):
        out = denoise(x, ts[k : k + 1], plan.a[k], plan.b[k])
        x_prev, x = x, bdia_step(x_prev, out, plan, k, gamma)
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": out[0]})
    return x


def _sample_bdia(denoise, x, plan, eta, generators, callback):
    if eta != 0:
        raise ValueError("the bdia sampler is deterministic: use eta 0 (or the ddim sampler for eta > 0)")
    return sample_bdia(denoise, x, plan, callback=callback)


# ----------------------------------------------------------------------------------------------------------------
# DPM-Solver++(3M): third-order multistep in the data prediction


def dpmpp_3m_update(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None, x0_prev2: Tensor | None, a, b, a_to, b_to, h_prev, h_prev2
) -> tuple[Tensor, Any]:
    """One DPM-Solver++(3M) step from level (a, b) to (a_to, b_to); returns (x_to, h).

    ``x0_prev``, ``x0_prev2``: the data predictions of the two previous points and ``h_prev``, ``h_prev2`` the
    log-SNR steps that led from each to the next (None / inf: fewer points, lower order). With h = lambda_to -
    lambda, r0 = h_prev / h, r1 = h_prev2 / h (DPM-Solver's official ``multistep_dpm_solver_third_update``,
    algorithm "dpmsolver++"; Lu et al. 2022, arXiv 2211.01095)::

        D1_0 = (x0 - x0_prev) / r0,   D1_1 = (x0_prev - x0_prev2) / r1                 (divided differences)
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),   D2 = (D1_0 - D1_1) / (r0 + r1)
        x_to = (b_to / b) x - a_to (e^-h - 1) x0 + a_to ((e^-h - 1) / h + 1) D1 - a_to ((e^-h - 1 + h) / h^2 - 1/2) D2

    Without ``x0_prev2`` it is the 2M step (:func:`dpmpp_2m_update`), without ``x0_prev`` the DDIM step.

    Note (measured, tests/test_samplers.py): with D1_0 - D1_1 ~ (r0 + r1) h^2 x0''/2 this D2 is h^2 x0''/2, half what
    the phi_3 term needs for a third-order quadrature (the official *single-step* solver writes D2 with the
    factor 2), so one step errs by O(h^3) and the method converges at second order. The reference formula is
    kept: it gives the same samples as diffusers and k-diffusion, and at 5-10 calls it is no less accurate than
    the corrected one (benchmarks/samplers.py); it is better only from about 15 calls on.
    """
    if x0_prev2 is None or not _isfinite(h_prev2) or b_to == 0:
        return dpmpp_2m_update(x, x0, x0_prev, a, b, a_to, b_to, h_prev)
    h = lam(a_to, b_to) - lam(a, b)
    r0, r1 = h_prev / h, h_prev2 / h
    # 1. divided differences of the data prediction in lambda, scaled by h
    d1_0, d1_1 = (x0 - x0_prev) / r0, (x0_prev - x0_prev2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    # 2. the exponential integrator's phi functions of -h: phi_1 = e^-h - 1, phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2
    phi_1 = _expm1(-h)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    # 3. x_to = (b_to / b) x - a_to phi_1 x0 + a_to phi_2 D1 - a_to phi_3 D2
    return (b_to / b) * x - (a_to * phi_1) * x0 + (a_to * phi_2) * d1 - (a_to * phi_3) * d2, h


def dpmpp_3m_second_order_before_end(plan: SamplingPlan, k: int) -> bool:
    """Whether DPM-Solver++(3M) takes step k at second order because the next step goes to the clean end (as
    diffusers' ``lower_order_final``, for fewer than 15 steps)."""
    S = len(plan)
    return plan.b[S] == 0 and k == S - 2 and S < 15


@sampling_function
def sample_dpmpp_3m(denoise: Denoise, x: Tensor, plan: SamplingPlan, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(3M) (:func:`dpmpp_3m_update`): first order on the first step, second on the second; the
    step into the clean end is first order (lambda = inf there: no extrapolation in lambda reaches it) and the one
    before it second order (as diffusers' ``lower_order_final``)."""
    ts = model_times(plan, x)
    S = len(plan)
    x0s: list[Tensor] = []  # data predictions at the previous points, newest first
    hs: list[Any] = []  # the log-SNR steps that led to them, newest first
    for k in range(S):
        a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
        x0, _ = denoise(x, ts[k : k + 1], a, b)
        before_end = dpmpp_3m_second_order_before_end(plan, k)
        prev = x0s[0] if x0s else None
        prev2 = x0s[1] if len(x0s) > 1 and not before_end else None
        x, h = dpmpp_3m_update(x, x0, prev, prev2, a, b, a_to, b_to, hs[0] if hs else math.inf,
                               hs[1] if len(hs) > 1 else math.inf)
        x0s, hs = [x0] + x0s[:1], [h] + hs[:1]
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": x0})
    return x


# ----------------------------------------------------------------------------------------------------------------
# UniPC: a multistep predictor (UniP) and a corrector (UniC) that reuses the next model call


def _solve_small(R: list[list[Any]], rhs: list[Any]) -> list[Any]:
    """Solve the small dense system R rho = rhs by Gaussian elimination (no pivoting: R is Vandermonde in distinct
    nodes); entries may be Python floats or 0-d tensors, so the float path stays float and the tensor path
    differentiable."""
    n = len(rhs)
    M = [list(row) + [v] for row, v in zip(R, rhs)]
    for i in range(n):
        for j in range(i + 1, n):
            f = M[j][i] / M[i][i]
            M[j] = [mj - f * mi for mj, mi in zip(M[j], M[i])]
    rho = [0.0] * n
    for i in reversed(range(n)):
        rho[i] = (M[i][n] - sum(M[i][j] * rho[j] for j in range(i + 1, n))) / M[i][i]
    return rho


def unipc_bh2_update(
    x: Tensor, x0: Tensor, a, b, a_to, b_to, history: Sequence[tuple[Tensor, Any]] = (), x0_to: Tensor | None = None
) -> Tensor:
    """One UniPC step in the data prediction with B(h) = e^h - 1 ("bh2"), from level (a, b) to (a_to, b_to).

    ``history``: (x0_i, lambda_i) of earlier points, newest first. Without ``x0_to`` this is the predictor UniP-p
    with p = len(history) + 1; with ``x0_to`` (the model's data prediction at the point UniP-p predicted) it is the
    corrector UniC-p, which recomputes the same step with that extra point and is of order p + 1 (Zhao et al.
    2023, arXiv 2302.04867; the official ``multistep_uni_pc_bh_update`` and diffusers' ``multistep_uni_c_bh_update``)::

        h = lambda_to - lambda,   r_i = (lambda_i - lambda) / h,   D_i = (x0_i - x0) / r_i
        x_to = (b_to / b) x - a_to (e^-h - 1) x0 - a_to B(h) (sum_i rho_i D_i  [+ rho_c (x0_to - x0)])
        sum_j rho_j r_j^(m-1) = g_m m! / B(h),  m = 1..K,   g_1 = (e^-h - 1) / (-h) - 1,  g_(m+1) = g_m / (-h) - 1/(m+1)!

    (r = 1 for the corrector's new point). UniP-2 uses rho = 1/2, which is exactly DPM-Solver++(2M); UniC-1 uses
    rho_c = 1/2. Into the clean end (b_to = 0, h = inf) only the first-order step is defined: x_to = a_to x0.
    """
    if b_to == 0:
        return a_to * x0
    lam_s = lam(a, b)
    h = lam(a_to, b_to) - lam_s
    hh = -h  # the data prediction integrates e^-h
    h_phi_1 = _expm1(hh)  # 1. h phi_1(h) = e^-h - 1
    B_h = h_phi_1  # 2. B(h) of the "bh2" variant
    x_to = (b_to / b) * x - (a_to * h_phi_1) * x0  # 3. the first-order (DDIM) part
    rks = [(lam_i - lam_s) / h for _, lam_i in history]
    diffs = [(x0_i - x0) / r for (x0_i, _), r in zip(history, rks)]
    if x0_to is not None:
        rks, diffs = rks + [1.0], diffs + [x0_to - x0]
    if not diffs:
        return x_to
    # 4. the order conditions: g_m, m = 1..K, of the phi functions of -h
    K = len(diffs)
    rhs, g, fact = [], h_phi_1 / hh - 1, 1.0
    for m in range(1, K + 1):
        rhs.append(g * fact / B_h)
        fact *= m + 1
        g = g / hh - 1 / fact
    if x0_to is None and K == 1:
        rho = [0.5]  # UniP-2: the official code's simplification, which is DPM-Solver++(2M)
    elif x0_to is not None and K == 1:
        rho = [0.5]  # UniC-1
    else:
        rho = _solve_small([[r ** (m - 1) for r in rks] for m in range(1, K + 1)], rhs)
    # 5. x_to -= a_to B(h) sum_i rho_i D_i
    correction = rho[0] * diffs[0]
    for r_i, d_i in zip(rho[1:], diffs[1:]):
        correction = correction + r_i * d_i
    return x_to - (a_to * B_h) * correction


@sampling_function
def sample_unipc(
    denoise: Denoise, x: Tensor, plan: SamplingPlan, order: int = 2, callback: Callback | None = None
) -> Tensor:
    """UniPC (bh2) of predictor order ``order`` (1..3; the default 2 is the DPM-Solver++(2M) predictor): after
    each model call at the predicted point x_k, the corrector UniC recomputes x_k from x_{k-1} with that call
    (:func:`unipc_bh2_update` with ``x0_to``), and the next predictor starts from the corrected x_k with the same
    call, so it costs no extra call. The last prediction (into the clean end) is never corrected: no call is made
    there. Predictor orders: min(order, k + 1) at step k, lower near the end as diffusers' ``lower_order_final``
    (order 1 into the clean end).

    State carried between steps: the point the last predictor started from (``x_from``), its level and the
    history it used, so the corrector can redo that step.
    """
    if not 1 <= order <= 3:
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    ts = model_times(plan, x)
    S = len(plan)
    history: list[tuple[Tensor, Any]] = []  # (x0, lambda) at earlier points, newest first
    pending = None  # (x_from, x0_from, k_from, history_from) of the last predictor step
    for k in range(S):
        a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
        x0, _ = denoise(x, ts[k : k + 1], a, b)
        if pending is not None:
            # UniC: redo the step x_{k-1} -> x_k with the model's data prediction at the predicted x_k
            x_from, x0_from, j, hist_from = pending
            x = unipc_bh2_update(x_from, x0_from, plan.a[j], plan.b[j], a, b, hist_from, x0_to=x0)
        p = min(order, k + 1, S - k)  # lower order on the first and the last steps
        hist = history[: p - 1]
        x_next = unipc_bh2_update(x, x0, a, b, a_to, b_to, hist)  # UniP-p
        pending = (x, x0, k, hist)
        lam_k = lam(a, b)
        # a point at pure noise (lambda = -inf, as a flow plan's first) is infinitely far: no use to extrapolate
        history = ([(x0, lam_k)] if _isfinite(lam_k) else []) + history[: order - 1]
        x = x_next
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": x0})
    return x


# ----------------------------------------------------------------------------------------------------------------
# iPNDM: fixed-coefficient Adams-Bashforth in (x / a, sigma = b / a)

#: Adams-Bashforth coefficients for orders 1..4, newest derivative first (iPNDM, Zhang & Chen 2022, arXiv 2204.13902).
IPNDM_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm_update(x0: Tensor, eps: Sequence[Tensor], a, b, a_to, b_to) -> Tensor:
    """One iPNDM step from level (a, b) to (a_to, b_to); ``eps``: the noise predictions at this point and the
    earlier ones, newest first (their count is the order, 1..4).

    In y = x / a and sigma = b / a the probability-flow ODE is dy/dsigma = eps_hat, and iPNDM takes the
    Adams-Bashforth step with fixed coefficients c_j whatever the step sizes (Zhang & Chen 2022, the "improved
    PNDM" of DEIS; diff-solvers' ``ipndm_sampler``)::

        y_to = y + (sigma_to - sigma) sum_j c_j eps_(k-j)                     (c = 55/24, -59/24, 37/24, -9/24 at order 4)

    written as the DDIM step plus the Adams-Bashforth correction, so that the first (first-order) step may start
    from pure noise (a = 0, sigma = inf)::

        x_to = a_to x0 + b_to eps_k + a_to (sigma_to - sigma) (sum_j c_j eps_(k-j) - eps_k)

    The step into the clean end (sigma_to = 0) is of full order: nothing in it is singular there.
    """
    x_to = a_to * x0 + b_to * eps[0]  # 1. the Euler step in (y, sigma): DDIM
    if len(eps) == 1:
        return x_to
    coeffs = IPNDM_COEFFICIENTS[len(eps)]
    # 2. sum_j c_j eps_(k-j) - eps_k
    combo = (coeffs[0] - 1.0) * eps[0]
    for c, e in zip(coeffs[1:], eps[1:]):
        combo = combo + c * e
    # 3. a_to (sigma_to - sigma) = b_to - a_to b / a
    return x_to + (b_to - a_to * b / a) * combo


@sampling_function
def sample_ipndm(
    denoise: Denoise, x: Tensor, plan: SamplingPlan, order: int = 4, callback: Callback | None = None
) -> Tensor:
    """iPNDM (:func:`ipndm_update`): Adams-Bashforth of order min(``order``, k + 1) at step k (1..4)."""
    if not 1 <= order <= 4:
        raise ValueError(f"iPNDM order must be between 1 and 4, got {order}")
    ts = model_times(plan, x)
    S = len(plan)
    eps_hist: list[Tensor] = []  # noise predictions at the earlier points, newest first
    for k in range(S):
        a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
        x0, eps = denoise(x, ts[k : k + 1], a, b)
        eps_hist = [eps] + eps_hist[: order - 1]
        x = ipndm_update(x0, eps_hist[: min(order, k + 1)], a, b, a_to, b_to)
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": x0})
    return x


# ----------------------------------------------------------------------------------------------------------------
# FireFlow: the midpoint rule, with each step's midpoint velocity reused as the next step's starting velocity
#
# Any process x = a x0 + b eps is rectified flow in the coordinates z = x / (a + b), s = b / (a + b)
# (z = (1 - s) x0 + s eps), where the probability-flow ODE reads dz/ds = eps_hat - x0_hat (the velocity) and the DDIM
# step is exactly the Euler step. FireFlow is written in those coordinates, so the one function serves VP and flow
# models alike, and for a flow model (a + b = 1, s = sigma) it is FireFlow's own update.


def flow_time(a, b):
    """The rectified-flow time ``s = b / (a + b)`` of level (a, b): 1 at pure noise, 0 at the clean end."""
    return b / (a + b)


def flow_step(x: Tensor, a, b, pred_x0: Tensor, pred_eps: Tensor, a_to, b_to) -> Tensor:
    """The Euler step in flow coordinates from x at level (a, b) to level (a_to, b_to) along the velocity
    ``pred_eps - pred_x0`` of model outputs that may belong to another point than x (FireFlow reuses them)::

        x_to = ddim_step(x0_hat, eps_hat -> a_to, b_to) + (a_to + b_to) / (a + b) * (x - ddim_step(x0_hat, eps_hat -> a, b))

    that is ``z_to = z + (s_to - s)(eps_hat - x0_hat)`` in z = x / (a + b). Outputs computed at x itself make the
    second term vanish: then it is the DDIM step (eta = 0). For rectified flow (a + b = 1) it is ``x + (s_to - s) v``,
    v the model's velocity.
    """
    mismatch = x - ddim_step(pred_x0, pred_eps, a, b)  # zero where the outputs were computed at x
    return ddim_step(pred_x0, pred_eps, a_to, b_to) + ((a_to + b_to) / (a + b)) * mismatch


@dataclass(frozen=True)
class Midpoints:
    """Where FireFlow's step k calls the model: model time ``timesteps[k]`` at level ``(a[k], b[k])``, at the
    fraction ``fraction[k]`` of the step's length in s from its noisy end: 1/2 (the midpoint), or 0 (the step's
    start, where the midpoint lies outside the model's training range; see :func:`fireflow_midpoints`)."""

    timesteps: Any  # (S,) float64 array, or a tensor when the plan's levels are tensors
    a: Sequence[Any]
    b: Sequence[Any]
    fraction: Sequence[float]

    def weight(self, k: int, inverse: bool = False) -> float:
        """The weight of the node's velocity in step k, the rest going to the starting velocity: the two-stage
        Runge-Kutta rule ``z_to = z + h ((1 - w) v_start + w v_node)`` with w = 1 / (2c) for a node at fraction c of
        the step (second order for any c > 0). Forward: 1 at the midpoint, and 1 for a node at the start (the DDIM
        step with a fresh call there). ``inverse``: the step walked from the clean side, where the node lies at
        1 - c (1/2 for a node at the forward step's start: Heun's rule)."""
        c = (1.0 - self.fraction[k]) if inverse else self.fraction[k]
        return 1.0 if c == 0 else 1.0 / (2.0 * c)


def _level_of_flow_time(schedule: Schedule, s: float) -> tuple[float, float, float, bool]:
    """(model time, a, b, inside): the schedule's level whose flow time is s, and whether the model was trained
    there (a VP model is not called less noisy than its first training timestep, nor noisier than its last)."""
    lam_s = math.log1p(-s) - math.log(s) if 0.0 < s < 1.0 else (math.inf if s <= 0.0 else -math.inf)
    lo, hi = schedule.lambda_range()
    inside = schedule.kind != "vp" or lo <= lam_s <= hi
    lam_s = lam_s if inside else min(max(lam_s, lo), hi)
    t = schedule.time_of_lambda(lam_s) if math.isfinite(lam_s) else (
        float(schedule.num_train_timesteps) if lam_s < 0 else 0.0)
    a, b = schedule.ab(t)
    return t, a, b, inside


def _scale_rule(plan: SamplingPlan) -> Callable[[Any, int], Any]:
    """``(s, k) -> a + b`` at flow time s inside step k, for a plan without its schedule: the VP (a^2 + b^2 = 1) or
    flow (a + b = 1) level when every level of the plan is one, else a + b interpolated linearly in s."""
    a = [float(v.detach()) if torch.is_tensor(v) else float(v) for v in plan.a]
    b = [float(v.detach()) if torch.is_tensor(v) else float(v) for v in plan.b]
    if all(abs(x * x + y * y - 1.0) < 1e-9 for x, y in zip(a, b)):
        return lambda s, k: 1.0 / _sqrt((1.0 - s) ** 2 + s * s)
    if all(abs(x + y - 1.0) < 1e-9 for x, y in zip(a, b)):
        return lambda s, k: 1.0
    def interpolated(s, k):
        s0, s1 = flow_time(plan.a[k], plan.b[k]), flow_time(plan.a[k + 1], plan.b[k + 1])
        n0, n1 = plan.a[k] + plan.b[k], plan.a[k + 1] + plan.b[k + 1]
        return n0 + (n1 - n0) * (s - s0) / (s1 - s0)
    return interpolated


def _clean_end_time(plan: SamplingPlan):
    """The model time of the plan's clean end (level S), which a plan does not list: from its schedule (clamped to
    the training range); without one, ``t_{S-1} s_S / s_{S-1}`` (model time proportional to s, as rectified flow's)."""
    S = len(plan)
    if plan.schedule is not None and not plan_requires_grad(plan):
        return _level_of_flow_time(plan.schedule, float(flow_time(plan.a[S], plan.b[S])))[0]
    return plan.timesteps[S - 1] * flow_time(plan.a[S], plan.b[S]) / flow_time(plan.a[S - 1], plan.b[S - 1])


def fireflow_midpoints(plan: SamplingPlan) -> Midpoints:
    """The S levels where FireFlow (:func:`sample_fireflow`) calls the model: step k's midpoint in the flow time
    s = b / (a + b), ``s_mid = (s_k + s_{k+1}) / 2`` (for a flow model, sigma's midpoint, as FireFlow's code).

    The model time and level come from the plan's schedule (:attr:`SamplingPlan.schedule`), exactly. A VP model is
    never called less noisy than its first training timestep: where a midpoint lies beyond it (the last step into
    the clean end, at many steps or when the plan calls the model at t = 0), that step calls the model at its start
    instead and is the DDIM step (fraction 0: first order on the last step, as the multistep samplers' last step;
    still one call). A plan without its schedule (a tuned schedule file, a plan being optimised) interpolates the
    model time linearly in s between the step's ends (exact for rectified flow, whose model time is sigma T; an
    O(h^2) approximation for VP) and takes the level of the plan's own kind (:func:`_scale_rule`).
    """
    S = len(plan)
    exact = plan.schedule is not None and not plan_requires_grad(plan)
    scale = None if exact else _scale_rule(plan)
    ts, a_m, b_m, frac = [], [], [], []
    for k in range(S):
        s0, s1 = flow_time(plan.a[k], plan.b[k]), flow_time(plan.a[k + 1], plan.b[k + 1])
        s_mid = 0.5 * (s0 + s1)
        if exact:
            t, a, b, inside = _level_of_flow_time(plan.schedule, float(s_mid))
            c = 0.5
            if not inside:  # the step's start instead
                t, a, b, c = plan.timesteps[k], plan.a[k], plan.b[k], 0.0
        else:
            t_to = plan.timesteps[k + 1] if k + 1 < S else _clean_end_time(plan)
            t = 0.5 * (plan.timesteps[k] + t_to)
            n = scale(s_mid, k)
            a, b, c = (1.0 - s_mid) * n, s_mid * n, 0.5
        ts.append(t)
        a_m.append(a)
        b_m.append(b)
        frac.append(c)
    times = torch.stack([torch.as_tensor(t, dtype=torch.float64) for t in ts]) if any(
        torch.is_tensor(t) for t in ts) else np.asarray(ts, np.float64)
    return Midpoints(times, a_m, b_m, frac)


def _blend(start: tuple[Tensor, Tensor], node: tuple[Tensor, Tensor], w) -> tuple[Tensor, Tensor]:
    """``(1 - w) start + w node`` for two (x0_hat, eps_hat) pairs (the node's own pair where w = 1)."""
    if not torch.is_tensor(w) and w == 1.0:
        return node
    return (1 - w) * start[0] + w * node[0], (1 - w) * start[1] + w * node[1]


def fireflow_step(x: Tensor, start: tuple[Tensor, Tensor], denoise: Denoise, t_mid: Tensor, plan: SamplingPlan,
                  mid: Midpoints, k: int, inverse: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One FireFlow step between levels k and k + 1 of ``plan`` (from k to k + 1; from k + 1 to k when ``inverse``,
    FireFlow's inversion), given the starting velocity's outputs ``start``; one model call, at the midpoint.
    Returns (x at the other end, the model's outputs at the midpoint: the next step's starting velocity)::

        x_mid = x + (s_mid - s) v_start            (flow_step with the reused outputs)
        v_mid = model(x_mid, t_mid)
        x_to  = x + (s_to - s) v_mid               (the midpoint rule; ((1 - w) v_start + w v_mid) off the midpoint)
    """
    i, j = (k + 1, k) if inverse else (k, k + 1)
    a, b, a_to, b_to = plan.a[i], plan.b[i], plan.a[j], plan.b[j]
    # 1. half a step (in s) along the starting velocity, to the midpoint level (no move for a node at the start)
    at_start = mid.fraction[k] == 0 and not inverse
    x_mid = x if at_start else flow_step(x, a, b, start[0], start[1], mid.a[k], mid.b[k])
    # 2. the step's model call, at the midpoint
    out_mid = denoise(x_mid, t_mid, mid.a[k], mid.b[k])
    # 3. the whole step along the midpoint velocity
    x_to = flow_step(x, a, b, *_blend(start, out_mid, mid.weight(k, inverse)), a_to, b_to)
    return x_to, out_mid


@sampling_function
def sample_fireflow(denoise: Denoise, x: Tensor, plan: SamplingPlan, callback: Callback | None = None) -> Tensor:
    """FireFlow (Deng et al. 2024, arXiv 2412.07517): the midpoint rule in flow coordinates, second order, at one
    model call a step after the first (S + 1 calls in all); returns x0 (B, ...).

    Where the model is called: once at x_T (level 0, the first step's starting velocity: the one extra call), then
    once per step at its midpoint (:func:`fireflow_midpoints`: halfway in s = b / (a + b), the model time of that
    level from the plan's schedule). What is reused: the outputs (x0_hat, eps_hat) at step k's midpoint, which give
    the velocity of the whole step k, are step k + 1's starting velocity instead of a fresh call at x_{k+1} (they
    were computed at x_mid, half a step earlier: an O(h) error in a quantity that moves the midpoint by O(h), so
    the step stays second order). See :func:`fireflow_step`; for a flow model (a = 1 - sigma, b = sigma) each step
    is exactly FireFlow's ``x_mid = x + (sigma_mid - sigma) v; v = model(x_mid, sigma_mid); x += (sigma_to - sigma) v``.
    """
    ts = model_times(plan, x)
    mid = fireflow_midpoints(plan)
    ts_mid = model_times(mid, x)
    S = len(plan)
    out = denoise(x, ts[0:1], plan.a[0], plan.b[0])  # the starting velocity of the first step
    for k in range(S):
        x, out = fireflow_step(x, out, denoise, ts_mid[k : k + 1], plan, mid, k)
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": out[0]})
    return x


def _deterministic(name: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The registry's ``f(denoise, x, plan, eta, generators, callback)`` for an ODE-only sampler."""

    def run(denoise, x, plan, eta, generators, callback):
        if eta != 0:
            raise ValueError(f"the {name} sampler is deterministic: use eta 0 (or the ddim sampler for eta > 0)")
        return fn(denoise, x, plan, callback=callback)

    run.__name__ = f"_sample_{name}"
    return run


#: name -> f(denoise, x, plan, eta, generators, callback); every sampler reachable by name (``--sampler``).
SAMPLE_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "dpm++2m": _sample_dpmpp_2m,
    "bdia": _sample_bdia,
    "dpm++3m": _deterministic("dpm++3m", sample_dpmpp_3m),
    "unipc": _deterministic("unipc", sample_unipc),
    "ipndm": _deterministic("ipndm", sample_ipndm),
    "fireflow": _deterministic("fireflow", sample_fireflow),
}
SAMPLERS = tuple(SAMPLE_FUNCTIONS)


def sample(
    denoise: Denoise,
    x: Tensor,
    plan: SamplingPlan,
    sampler: str = "ddim",
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run the sampler named ``sampler`` (see :data:`SAMPLE_FUNCTIONS`); only ``ddim`` takes eta > 0."""
    if sampler not in SAMPLE_FUNCTIONS:
        raise ValueError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")
    return SAMPLE_FUNCTIONS[sampler](denoise, x, plan, eta, generators, callback)


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
