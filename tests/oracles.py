"""Oracle models with closed-form optimal predictions, for testing the sampler core.

Data N(mu, diag(s^2)) (s -> 0 is data that is one point): at ``x_t = a x0 + b eps`` the optimal predictions are
``eps*(x_t) = b (x_t - a mu) / (a^2 s^2 + b^2)`` and ``x0*(x_t) = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2)``.
The probability-flow ODE keeps each coordinate's standardized value, so its exact solution from level
(a_T, b_T) to (a, b) is ``a mu + sqrt(a^2 s^2 + b^2) (x_T - a_T mu) / sqrt(a_T^2 s^2 + b_T^2)``.
"""

from __future__ import annotations

import math

import torch

from ddimctl.prediction import from_x0_eps
from ddimctl.schedule import Schedule


class GaussianOracle:
    """``model(x_t, t)`` giving the optimal output of ``prediction_type`` for Gaussian data; counts calls."""

    def __init__(self, schedule: Schedule, mu: torch.Tensor, s: torch.Tensor | float, prediction_type="epsilon"):
        self.schedule, self.mu, self.s, self.prediction_type = schedule, mu, torch.as_tensor(s, dtype=mu.dtype), prediction_type
        self.calls = 0

    def predict(self, x, a, b):
        var = a * a * self.s**2 + b * b
        eps = b * (x - a * self.mu) / var
        x0 = self.mu + a * self.s**2 * (x - a * self.mu) / var
        return x0, eps

    def __call__(self, x, t):
        self.calls += 1
        a, b = self.schedule.ab(float(t[0]))
        x0, eps = self.predict(x, a, b)
        return from_x0_eps(x0, eps, a, b, self.prediction_type)

    def ode_solution(self, x_start, a_from, b_from, a_to, b_to):
        z = (x_start - a_from * self.mu) / torch.sqrt(a_from**2 * self.s**2 + b_from**2)
        return a_to * self.mu + torch.sqrt(a_to**2 * self.s**2 + b_to**2) * z


def rms(x):
    return float(x.pow(2).mean().sqrt())


class MixtureOracle:
    """``model(x_t, t)``: the optimal output for data drawn from a mixture of Gaussians N(mu_i, s^2 I) with weights
    w_i -- a nonlinear denoiser (its x0_hat moves between the modes) with a closed form. At ``x_t = a x0 + b eps``
    the component posterior is ``pi_i ~ w_i N(x_t; a mu_i, (a^2 s^2 + b^2) I)`` and
    ``x0*(x_t) = sum_i pi_i (mu_i + a s^2 (x_t - a mu_i) / (a^2 s^2 + b^2))``. Counts calls."""

    def __init__(self, schedule: Schedule, mus: torch.Tensor, s: float, weights=None, prediction_type="epsilon"):
        self.schedule, self.mus, self.s, self.prediction_type = schedule, mus, float(s), prediction_type
        k = mus.shape[0]
        self.logw = torch.log(torch.as_tensor(weights if weights is not None else [1.0 / k] * k, dtype=mus.dtype))
        self.calls = 0

    def predict(self, x, a, b):
        var = a * a * self.s**2 + b * b
        d = x.unsqueeze(1) - a * self.mus.to(x.dtype)  # (B, K, D)
        logp = self.logw.to(x.dtype) - 0.5 * d.pow(2).sum(-1) / var  # (B, K)
        pi = torch.softmax(logp, dim=1).unsqueeze(-1)
        x0 = (pi * (self.mus.to(x.dtype) + a * self.s**2 * d / var)).sum(1)
        eps = (x - a * x0) / b if b > 0 else torch.zeros_like(x)
        return x0, eps

    def __call__(self, x, t):
        self.calls += 1
        a, b = self.schedule.ab(float(t[0]))
        x0, eps = self.predict(x, a, b)
        return from_x0_eps(x0, eps, a, b, self.prediction_type)
