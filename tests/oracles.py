"""Oracle models with closed-form optimal predictions, for testing the sampler core.

Data N(mu, diag(s^2)) (s -> 0 is data that is one point): at ``x_t = a x0 + b eps`` the optimal predictions are
``eps*(x_t) = b (x_t - a mu) / (a^2 s^2 + b^2)`` and ``x0*(x_t) = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2)``.
The probability-flow ODE keeps each coordinate's standardized value, so its exact solution from level
(a_T, b_T) to (a, b) is ``a mu + sqrt(a^2 s^2 + b^2) (x_T - a_T mu) / sqrt(a_T^2 s^2 + b_T^2)``.
"""

from __future__ import annotations

import math

import torch

from ddimctl.prediction import Denoiser, from_x0_eps
from ddimctl.sampler import sample
from ddimctl.schedule import Schedule, make_plan


D = 16  # the data dimension of the sampler tests


def gaussian_data(dim: int = D, batch: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A mean mu (dim,) and starting noises x_T (batch, dim), float64, both N(0, 1) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    x_T = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return mu, x_T


class _Oracle:
    """``model(x_t, t)``: the optimal output of ``prediction_type`` from :meth:`predict`'s (x0*, eps*) at the
    schedule's level of t; counts calls."""

    schedule: Schedule
    prediction_type: str
    calls: int

    def predict(self, x, a, b):
        raise NotImplementedError

    def __call__(self, x, t):
        self.calls += 1
        a, b = levels_at(self.schedule, t)
        x0, eps = self.predict(x, a, b)
        return from_x0_eps(x0, eps, a, b, self.prediction_type)


class GaussianOracle(_Oracle):
    """``model(x_t, t)`` giving the optimal output of ``prediction_type`` for Gaussian data; counts calls."""

    def __init__(self, schedule: Schedule, mu: torch.Tensor, s: torch.Tensor | float, prediction_type="epsilon"):
        self.schedule, self.mu, self.s, self.prediction_type = schedule, mu, torch.as_tensor(s, dtype=mu.dtype), prediction_type
        self.calls = 0

    def predict(self, x, a, b):
        var = a * a * self.s**2 + b * b
        eps = b * (x - a * self.mu) / var
        x0 = self.mu + a * self.s**2 * (x - a * self.mu) / var
        return x0, eps

    def ode_solution(self, x_start, a_from, b_from, a_to, b_to):
        z = (x_start - a_from * self.mu) / torch.sqrt(a_from**2 * self.s**2 + b_from**2)
        return a_to * self.mu + torch.sqrt(a_to**2 * self.s**2 + b_to**2) * z


def levels_at(schedule: Schedule, t: torch.Tensor):
    """(a, b) at model time t[0]: floats from the schedule, or differentiable 0-d tensors when t requires grad
    (a plan being tuned moves the model's time with its levels)."""
    if t.requires_grad:
        from ddimctl.tuning import LevelMap

        a, b = LevelMap(schedule).ab_of_time(t[0].double())
        return a.to(t.dtype), b.to(t.dtype)
    return schedule.ab(float(t[0]))


def rms(x):
    return float(x.pow(2).mean().sqrt())


def ode_error(schedule, mu, s, x_T, steps, spacing="leading", sampler="ddim", prediction_type="epsilon"):
    """(RMS error of a run from x_T against the exact ODE solution, the oracle's model calls) on Gaussian data
    N(mu, s^2); "leading" spacing with steps_offset 1, other spacings with 0."""
    oracle = GaussianOracle(schedule, mu, s, prediction_type)
    plan = make_plan(schedule, steps, spacing, 1 if spacing == "leading" else 0)
    x0 = sample(Denoiser(oracle, prediction_type), x_T, plan, sampler=sampler)
    exact = oracle.ode_solution(x_T, plan.a[0], plan.b[0], plan.a[-1], plan.b[-1])
    return rms(x0 - exact), oracle.calls


class MixtureOracle(_Oracle):
    """``model(x_t, t)`` giving the optimal output of ``prediction_type`` for data drawn from the Gaussian mixture
    ``sum_k w_k N(mu_k, s_k^2 I)`` (means (K, D), stds (K,), weights (K,)); counts calls.

    At ``x = a x0 + b eps`` component k has marginal ``N(a mu_k, v_k I)`` with ``v_k = a^2 s_k^2 + b^2``; with
    responsibilities ``r_k(x)`` (its posterior probability) the optimal predictions are
    ``x0* = sum_k r_k (mu_k + a s_k^2 (x - a mu_k) / v_k)`` and ``eps* = sum_k r_k b (x - a mu_k) / v_k``: defined
    at pure noise (a = 0) and at the clean end (b = 0) alike. One component is the Gaussian oracle.
    The probability-flow ODE has no closed form here: :meth:`ode_solution` integrates it to high accuracy.
    """

    def __init__(self, schedule: Schedule, means, stds, weights=None, prediction_type="epsilon"):
        self.schedule, self.prediction_type = schedule, prediction_type
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        K = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()  # (K,)
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = torch.log(w / w.sum())
        self.calls = 0

    @classmethod
    def random(cls, schedule: Schedule, components: int = 8, dim: int = 32, seed: int = 0, prediction_type="epsilon"):
        """A fixed random mixture: means N(0, 0.5^2), stds in [0.1, 0.3], unequal weights; data roughly in [-1.5, 1.5]."""
        g = torch.Generator().manual_seed(seed)
        means = 0.5 * torch.randn(components, dim, generator=g, dtype=torch.float64)
        stds = 0.1 + 0.2 * torch.rand(components, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(schedule, means, stds, weights, prediction_type)

    def predict(self, x, a, b):
        """(x0*, eps*) at level (a, b) for x (B, D); a, b floats or 0-d tensors."""
        mu = self.means.to(x.dtype)  # (K, D)
        v = a * a * self.stds.to(x.dtype) ** 2 + b * b  # (K,)
        diff = x[:, None, :] - a * mu[None]  # (B, K, D)
        D = x.shape[1]
        log_r = self.log_w.to(x.dtype) - 0.5 * D * torch.log(v) - 0.5 * diff.pow(2).sum(-1) / v  # (B, K)
        r = torch.softmax(log_r, dim=1)[:, :, None]  # (B, K, 1)
        x0 = (r * (mu[None] + (a * self.stds.to(x.dtype) ** 2 / v)[None, :, None] * diff)).sum(1)
        eps = (r * (b / v)[None, :, None] * diff).sum(1)
        return x0, eps

    def ode_solution(self, x_start, a_from, b_from, a_to, b_to, steps: int = 2000):
        """The probability-flow ODE's solution from level (a_from, b_from) to (a_to, b_to), by classical RK4.

        It integrates in rectified-flow coordinates, where every end is finite: ``z = x / (a + b)``,
        ``s = b / (a + b)`` gives ``z = (1 - s) x0 + s eps`` and ``dz/ds = eps* - x0*``; ``steps`` RK4 steps
        uniform in log-SNR (clipped to |lambda| <= 14, then one step to an infinite end). Its own error is checked
        against the closed form (one component) and by halving the steps (tests/test_multistep_samplers.py).
        """
        def lam_of(a, b):
            return math.log(a) - math.log(b) if a > 0 and b > 0 else (math.inf if b == 0 else -math.inf)

        l0, l1 = lam_of(float(a_from), float(b_from)), lam_of(float(a_to), float(b_to))
        inner = torch.linspace(max(l0, -14.0), min(l1, 14.0), steps + 1, dtype=torch.float64)
        s_nodes = torch.sigmoid(-inner).tolist()
        if l0 < -14.0:
            s_nodes = [float(b_from) / (float(a_from) + float(b_from))] + s_nodes
        if l1 > 14.0:
            s_nodes = s_nodes + [float(b_to) / (float(a_to) + float(b_to))]

        def velocity(z, s):
            x0, eps = self.predict(z, 1.0 - s, s)
            return eps - x0

        z = x_start.double() / (float(a_from) + float(b_from))
        for s, s_next in zip(s_nodes[:-1], s_nodes[1:]):
            h = s_next - s
            k1 = velocity(z, s)
            k2 = velocity(z + 0.5 * h * k1, s + 0.5 * h)
            k3 = velocity(z + 0.5 * h * k2, s + 0.5 * h)
            k4 = velocity(z + h * k3, s_next)
            z = z + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
        return (z * (float(a_to) + float(b_to))).to(x_start.dtype)
