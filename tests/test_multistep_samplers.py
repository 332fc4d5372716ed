"""The multistep samplers (DPM-Solver++(2M) and (3M), UniPC, iPNDM; BDIA) against closed forms, the reference
implementations and each other: the order of each update, convergence of whole runs, VP and rectified-flow paths
alike."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from ddimctl.prediction import Denoiser
from ddimctl.sampler import (
    SAMPLE_FUNCTIONS,
    ddim_step,
    dpmpp_2m_update,
    dpmpp_3m_update,
    ipndm_update,
    sample,
    unipc_bh2_update,
)
from ddimctl.schedule import flow_schedule, make_plan, plan_from_levels, vp_schedule
from oracles import D, GaussianOracle, MixtureOracle, ode_error, rms

NEW = ("dpm++3m", "unipc", "ipndm")


def vp_levels(lam: float) -> tuple[float, float]:
    """(a, b) of a VP process at log-SNR lam."""
    return math.sqrt(1 / (1 + math.exp(-2 * lam))), math.sqrt(1 / (1 + math.exp(2 * lam)))


def order_of(errors: list[float]) -> float:
    """The mean slope of log2(error) as the step halves."""
    return float(np.mean([math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]))


# ----------------------------------------------------------------------------------------------------------------
# Local order: one step from the exact solution, with exact history, on Gaussian data (closed-form ODE path)


class ExactPath:
    """The probability-flow ODE path of Gaussian data through x_T at lambda = -3 (VP), in closed form."""

    def __init__(self, mu, x_T):
        self.oracle = GaussianOracle(vp_schedule(), mu, 0.5)
        self.x_T, self.start = x_T, vp_levels(-3.0)

    def x(self, lam):
        return self.oracle.ode_solution(self.x_T, *self.start, *vp_levels(lam))

    def pred(self, lam, x=None):
        """(x0_hat, eps_hat) of the optimal denoiser at lambda, at the exact point (or at x)."""
        return self.oracle.predict(self.x(lam) if x is None else x, *vp_levels(lam))


def _local_error_lambda(path, step, h, lam0=0.5, ratio=0.8):
    """Error of one step lam0 -> lam0 + h whose history sits at lam0 - ratio h, lam0 - 2 ratio h (uneven steps)."""
    lams = [lam0 - i * ratio * h for i in range(3)]  # current, previous, the one before
    x = path.x(lam0)
    x0s = [path.pred(l)[0] for l in lams]
    a, b = vp_levels(lam0)
    a_to, b_to = vp_levels(lam0 + h)
    return rms(step(x, x0s, lams, a, b, a_to, b_to, path, lam0 + h) - path.x(lam0 + h))


def _ddim(x, x0s, lams, a, b, a_to, b_to, path, lam_to):
    eps = (x - a * x0s[0]) / b
    return ddim_step(x0s[0], eps, a_to, b_to)


def _2m(x, x0s, lams, a, b, a_to, b_to, path, lam_to):
    return dpmpp_2m_update(x, x0s[0], x0s[1], a, b, a_to, b_to, lams[0] - lams[1])[0]


def _3m(x, x0s, lams, a, b, a_to, b_to, path, lam_to):
    return dpmpp_3m_update(x, x0s[0], x0s[1], x0s[2], a, b, a_to, b_to, lams[0] - lams[1], lams[1] - lams[2])[0]


def _unip(p):
    def step(x, x0s, lams, a, b, a_to, b_to, path, lam_to):
        return unipc_bh2_update(x, x0s[0], a, b, a_to, b_to, list(zip(x0s[1:p], lams[1:p])))

    return step


def _unic(p):
    def step(x, x0s, lams, a, b, a_to, b_to, path, lam_to):
        hist = list(zip(x0s[1:p], lams[1:p]))
        predicted = unipc_bh2_update(x, x0s[0], a, b, a_to, b_to, hist)  # UniP-p
        x0_to = path.pred(lam_to, predicted)[0]  # the model call at the predicted point
        return unipc_bh2_update(x, x0s[0], a, b, a_to, b_to, hist, x0_to=x0_to)  # UniC-p

    return step


@pytest.mark.parametrize("name,step,order", [
    ("ddim", _ddim, 1),
    ("dpm++2m", _2m, 2),
    ("UniP-1", _unip(1), 1),
    ("UniP-2", _unip(2), 2),
    ("UniP-3", _unip(3), 3),
    ("UniC-1", _unic(1), 2),
    ("UniC-2", _unic(2), 3),
    ("UniC-3", _unic(3), 4),
])
def test_update_has_its_order_on_uneven_log_snr_steps(gaussian, name, step, order):
    path = ExactPath(*gaussian)
    errors = [_local_error_lambda(path, step, h) for h in (0.2, 0.1, 0.05, 0.025)]
    assert order_of(errors) == pytest.approx(order + 1, abs=0.3), (name, errors)


def test_dpmpp_3m_is_the_reference_formula_whose_local_error_is_third_order(gaussian):
    """DPM-Solver++(3M) as DPM-Solver's official code, diffusers and k-diffusion write it: its D2 = (D1_0 - D1_1) /
    (r0 + r1) is h^2 x0''/2, half what the phi_3 term needs (the official single-step solver's D2 has the factor
    2), so one step errs by O(h^3), not O(h^4). ddimctl keeps the reference formula (same samples as diffusers,
    and no less accurate at 5-10 calls, benchmarks/samplers.py); the factor-2 D2 is locally fourth order."""
    path = ExactPath(*gaussian)
    hs = (0.05, 0.025, 0.0125)
    errors = [_local_error_lambda(path, _3m, h) for h in hs]
    assert order_of(errors) == pytest.approx(3, abs=0.35), errors

    def corrected(x, x0s, lams, a, b, a_to, b_to, path, lam_to):
        r0, r1 = (lams[0] - lams[1]) / (lam_to - lams[0]), (lams[1] - lams[2]) / (lam_to - lams[0])
        d1_0, d1_1 = (x0s[0] - x0s[1]) / r0, (x0s[1] - x0s[2]) / r1
        # the same step with D2 doubled: add the missing half of the phi_3 term
        h = lam_to - lams[0]
        phi_3 = (math.expm1(-h) / h + 1) / h - 0.5
        return _3m(x, x0s, lams, a, b, a_to, b_to, path, lam_to) - a_to * phi_3 * (d1_0 - d1_1) / (r0 + r1)

    errors = [_local_error_lambda(path, corrected, h) for h in hs]
    assert order_of(errors) == pytest.approx(4, abs=0.3), errors


def test_unip_2_is_dpmpp_2m(gaussian):
    path = ExactPath(*gaussian)
    for h in (0.5, 0.05):
        assert _local_error_lambda(path, _unip(2), h) == pytest.approx(_local_error_lambda(path, _2m, h), rel=1e-9)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_update_has_its_order_on_even_sigma_steps(gaussian, order):
    path = ExactPath(*gaussian)

    def level(sigma):
        a = 1 / math.sqrt(1 + sigma * sigma)
        return a, sigma * a

    def lam_of(sigma):
        return -math.log(sigma)

    errors = []
    for d in (0.2, 0.1, 0.05, 0.025):
        sigmas = [1.0 + i * d for i in range(order)]  # current, then the earlier (noisier) points
        eps = [path.pred(lam_of(s))[1] for s in sigmas]
        x0 = path.pred(lam_of(sigmas[0]))[0]
        x_to = ipndm_update(x0, eps, *level(sigmas[0]), *level(1.0 - d))
        errors.append(rms(x_to - path.x(lam_of(1.0 - d))))
    assert order_of(errors) == pytest.approx(order + 1, abs=0.3), errors


def test_ipndm_update_is_the_papers_step_in_edm_coordinates():
    """diff-solvers' ipndm_sampler in x_edm = x / a, t = sigma: x' = x + (t' - t)(55 d - 59 d1 + 37 d2 - 9 d3) / 24."""
    g = torch.Generator().manual_seed(3)
    ds = [torch.randn(4, D, generator=g, dtype=torch.float64) for _ in range(4)]  # d = eps at 4 points
    x0 = torch.randn(4, D, generator=g, dtype=torch.float64)
    sigma, sigma_to = 2.0, 1.3
    a, b = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
    a_to, b_to = 1 / math.sqrt(1 + sigma_to**2), sigma_to / math.sqrt(1 + sigma_to**2)
    x_edm = x0 + sigma * ds[0]  # the point whose denoised value is x0: d = (x_edm - x0) / sigma
    paper = x_edm + (sigma_to - sigma) * (55 * ds[0] - 59 * ds[1] + 37 * ds[2] - 9 * ds[3]) / 24
    torch.testing.assert_close(ipndm_update(x0, ds, a, b, a_to, b_to), a_to * paper, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Whole runs


def _lambda_plan(n, lo=-5.0, hi=3.0):
    """n calls uniform in log-SNR from lo to hi, ending at hi (not at the clean end: no first-order final jump)."""
    s = vp_schedule()
    lams = np.linspace(lo, hi, n + 1)
    levels = [vp_levels(l) for l in lams]
    return plan_from_levels([s.time_of_lambda(l) for l in lams[:-1]], *zip(*levels))


@pytest.mark.parametrize("sampler,order", [("dpm++2m", 2), ("dpm++3m", 2), ("unipc", 3), ("ipndm", 2)])
def test_runs_converge_at_their_global_order(gaussian, sampler, order):
    """Multistep methods start with lower-order steps, whose local errors set the global order: 2 for dpm++3m and
    ipndm (a first-order first step), 3 for UniPC (whose corrector lifts every step, the first included)."""
    mu, x_T = gaussian
    oracle = GaussianOracle(vp_schedule(), mu, 0.5)
    errors = []
    for n in (40, 80, 160):
        plan = _lambda_plan(n)
        exact = oracle.ode_solution(x_T, plan.a[0], plan.b[0], plan.a[-1], plan.b[-1])
        errors.append(rms(sample(Denoiser(oracle), x_T, plan, sampler) - exact))
    assert order_of(errors) > order - 0.25, errors


def test_each_sampler_at_few_calls_beats_ddim_at_many_on_gaussian_data(gaussian):
    mu, x_T = gaussian
    s = vp_schedule()
    oracle = GaussianOracle(s, mu, 0.5)
    exact = oracle.ode_solution(x_T, *s.ab(999), 1.0, 0.0)
    ddim_50 = rms(sample(Denoiser(oracle), x_T, make_plan(s, 50, "logsnr")) - exact)
    for sampler in NEW:
        calls_before = oracle.calls
        err_20 = rms(sample(Denoiser(oracle), x_T, make_plan(s, 20, "logsnr"), sampler) - exact)
        assert oracle.calls - calls_before == 20  # one model call per step, the corrector's included
        assert err_20 < ddim_50 / 4, (sampler, err_20, ddim_50)


@pytest.mark.parametrize("sampler", ["dpm++2m", *NEW])
def test_one_step_is_the_ddim_step(gaussian, sampler):
    mu, x_T = gaussian
    s = vp_schedule()
    plan = make_plan(s, 1, "trailing")
    den = Denoiser(GaussianOracle(s, mu, 0.5))
    torch.testing.assert_close(sample(den, x_T, plan, sampler), sample(den, x_T, plan, "ddim"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", NEW)
@pytest.mark.parametrize("schedule,types,spacing", [
    (vp_schedule(), ["epsilon", "v_prediction", "sample", "flow"], "logsnr"),
    (flow_schedule(shift=2.0), ["flow", "v_prediction", "sample"], "trailing"),  # epsilon is singular at sigma = 1
])
def test_every_parameterization_gives_the_same_samples(gaussian, sampler, schedule, types, spacing):
    mu, x_T = gaussian
    plan = make_plan(schedule, 12, spacing)
    results = [sample(Denoiser(GaussianOracle(schedule, mu, 0.5, pt), pt), x_T, plan, sampler) for pt in types]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampler", NEW)
def test_rectified_flow_from_pure_noise_converges(gaussian, sampler):
    """Flow plans start at sigma = 1 (a = 0: x / a and lambda are infinite there); every sampler still converges.
    (On this uniform-sigma grid the log-SNR steps are very uneven, so the lambda-based methods converge
    irregularly at these step counts.)"""
    mu, x_T = gaussian
    s = flow_schedule()
    oracle = GaussianOracle(s, mu, 0.5, "flow")
    exact = oracle.ode_solution(x_T, 0.0, 1.0, 1.0, 0.0)
    errors = [rms(sample(Denoiser(oracle, "flow"), x_T, make_plan(s, n, "trailing"), sampler) - exact) for n in (10, 20, 40)]
    ddim_40 = rms(sample(Denoiser(oracle, "flow"), x_T, make_plan(s, 40, "trailing")) - exact)
    assert all(math.isfinite(e) for e in errors) and errors[-1] < ddim_40 / 10, (errors, ddim_40)
    assert errors[-1] < errors[0] / 2, errors


def test_mixture_oracle_reference_is_accurate():
    """The mixture oracle's RK4 reference: exact for one component (the Gaussian closed form), and stable under
    halving its steps for eight."""
    s = vp_schedule()
    g = torch.Generator().manual_seed(0)
    mu, x_T = torch.randn(1, D, generator=g, dtype=torch.float64), torch.randn(8, D, generator=g, dtype=torch.float64)
    one = MixtureOracle(s, mu, [0.5])
    exact = GaussianOracle(s, mu[0], 0.5).ode_solution(x_T, *s.ab(999), 1.0, 0.0)
    assert rms(one.ode_solution(x_T, *s.ab(999), 1.0, 0.0, steps=300) - exact) < 1e-8
    mix = MixtureOracle.random(s, components=8, dim=D)
    coarse, fine = (mix.ode_solution(x_T, 0.0, 1.0, 1.0, 0.0, steps=n) for n in (300, 600))  # from pure noise
    assert rms(coarse - fine) < 1e-6
    # the optimal predictions are consistent: x = a x0 + b eps at any level
    x = torch.randn(5, D, dtype=torch.float64)
    x0, eps = mix.predict(x, 0.6, 0.8)
    torch.testing.assert_close(0.6 * x0 + 0.8 * eps, x, rtol=0, atol=1e-12)


def test_higher_order_samplers_converge_on_a_mixture():
    s = vp_schedule()
    mix = MixtureOracle.random(s, components=4, dim=D, seed=1)
    x_T = torch.randn(32, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = mix.ode_solution(x_T, *s.ab(999), 1.0, 0.0, steps=400)
    ddim_50 = rms(sample(Denoiser(mix), x_T, make_plan(s, 50, "logsnr")) - exact)
    for sampler in NEW:
        e_50 = rms(sample(Denoiser(mix), x_T, make_plan(s, 50, "logsnr"), sampler) - exact)
        assert e_50 < ddim_50 / 10, (sampler, e_50, ddim_50)


def test_dpmpp_2m_is_second_order_and_beats_ddim_at_fewer_calls(gaussian):
    mu, x_T = gaussian
    s = vp_schedule()
    e_ddim_50, calls_ddim = ode_error(s, mu, 0.5, x_T, 50, "logsnr")
    e_2m_10, calls_2m = ode_error(s, mu, 0.5, x_T, 10, "logsnr", sampler="dpm++2m")
    assert calls_2m == 10 and calls_ddim <= 50
    assert e_2m_10 <= e_ddim_50, (e_2m_10, e_ddim_50)
    errs = [ode_error(s, mu, 0.5, x_T, n, "logsnr", sampler="dpm++2m")[0] for n in (20, 40)]
    assert errs[0] / errs[1] > 3.0, errs  # about 4 for a second-order method


def test_bdia_differs_from_ddim_by_less_than_ddims_own_error(gaussian):
    """BDIA (gamma = 1) integrates the same ODE: on Gaussian data its error against the exact solution is of DDIM's
    order or better."""
    mu, x_T = gaussian
    s = vp_schedule()
    oracle = GaussianOracle(s, mu, 0.5)
    plan = make_plan(s, 20, "logsnr")
    exact = oracle.ode_solution(x_T, plan.a[0], plan.b[0], plan.a[-1], plan.b[-1])
    e_ddim = rms(sample(Denoiser(oracle), x_T, plan) - exact)
    e_bdia = rms(sample(Denoiser(oracle), x_T, plan, "bdia") - exact)
    assert e_bdia < 2 * e_ddim, (e_bdia, e_ddim)


# ----------------------------------------------------------------------------------------------------------------
# Against the reference implementations (diffusers' schedulers on the same levels)


@pytest.mark.parametrize("steps", [6, 10, 20])
@pytest.mark.parametrize("ours,make", [
    ("unipc", lambda d: d.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", final_sigmas_type="zero")),
    ("dpm++3m", lambda d: d.DPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="zero")),
    ("dpm++2m", lambda d: d.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="zero")),
])
def test_multistep_samplers_match_diffusers(diffusers, gaussian, steps, ours, make):
    mu, x_T = gaussian
    oracle = GaussianOracle(vp_schedule(), mu, 0.5)
    scheduler = make(diffusers)
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, torch.tensor([float(t)])), t, x).prev_sample
    sig = scheduler.sigmas.double().numpy()  # sqrt((1 - abar) / abar), the last 0
    a = 1 / np.sqrt(1 + sig**2)
    plan = plan_from_levels(scheduler.timesteps.double().numpy(), a, sig * a)
    # diffusers computes its coefficients in float32
    torch.testing.assert_close(sample(Denoiser(oracle), x_T, plan, ours), x, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------------------------------------------
# Registry and arguments


def test_registry_and_eta():
    assert set(NEW) <= set(SAMPLE_FUNCTIONS)
    plan = make_plan(vp_schedule(), 3)
    den = Denoiser(lambda x, t: torch.zeros_like(x))
    for name in NEW:
        with pytest.raises(ValueError, match=re.escape(f"the {name} sampler is deterministic")):
            sample(den, torch.zeros(1, 2), plan, name, eta=0.5)
        seen = []
        sample(den, torch.zeros(1, 2), plan, name, callback=lambda i: seen.append(i["step"]))
        assert seen == [1, 2, 3]


def test_order_arguments():
    from ddimctl.sampler import sample_ipndm, sample_unipc

    plan, den, x = make_plan(vp_schedule(), 3), Denoiser(lambda x, t: torch.zeros_like(x)), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="UniPC order"):
        sample_unipc(den, x, plan, order=4)
    with pytest.raises(ValueError, match="iPNDM order"):
        sample_ipndm(den, x, plan, order=5)
