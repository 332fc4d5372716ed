"""The DDIM sampler (ddimctl.sampler), proved against closed forms (oracle models with analytic optimal
predictions, tests/oracles.py): its order, exactness on one-point data, every parameterization, eta and
per-sample generators, slerp, argument checks."""

import math

import pytest
import torch

from ddimctl.inversion import invert_ddim
from ddimctl.prediction import Denoiser, to_x0_eps
from ddimctl.sampler import ddim_sigma, ddim_step, make_generators, randn, sample, slerp
from ddimctl.schedule import flow_schedule, make_plan, vp_schedule
from oracles import D, GaussianOracle, ode_error, rms


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_converges_at_first_order_on_gaussian_data(gaussian, spacing):
    mu, x_T = gaussian
    errors = [ode_error(vp_schedule(), mu, 0.5, x_T, n, spacing)[0] for n in (25, 50, 100, 200)]
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    # first order: doubling the steps halves the error
    assert all(1.8 < r < 2.2 for r in ratios), (errors, ratios)
    assert errors[-1] < 1e-2


def test_ddim_converges_on_rectified_flow(gaussian):
    mu, x_T = gaussian
    errors = [ode_error(flow_schedule(), mu, 0.5, x_T, n, "trailing", prediction_type="flow")[0] for n in (25, 50, 100)]
    assert all(1.8 < errors[i] / errors[i + 1] < 2.2 for i in range(2)), errors


def test_ddim_is_exact_for_one_point_data():
    c = torch.linspace(-1, 1, D, dtype=torch.float64)
    x_T = torch.randn(8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for schedule, pt, spacing in [(vp_schedule(), "epsilon", "leading"), (flow_schedule(), "flow", "trailing")]:
        den = Denoiser(GaussianOracle(schedule, c, 0.0, pt), pt)
        plan = make_plan(schedule, 5, spacing)
        x0 = sample(den, x_T, plan)
        assert rms(x0 - c) < 1e-12
        # invert -> sample round trip is exact too: x0_hat stays c along the path
        x_back = invert_ddim(den, x0, plan)
        assert rms(sample(den, x_back, plan) - x0) < 1e-12


@pytest.mark.parametrize("schedule,types,spacing", [
    (vp_schedule(), ["epsilon", "v_prediction", "sample", "flow"], "leading"),
    (flow_schedule(shift=2.0), ["flow", "v_prediction", "sample"], "trailing"),  # epsilon is singular at sigma = 1
])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_oracle_in_every_parameterization_gives_the_same_samples(gaussian, schedule, types, spacing, eta):
    mu, x_T = gaussian
    plan = make_plan(schedule, 20, spacing, 1 if spacing == "leading" else 0)
    results = []
    for pt in types:
        den = Denoiser(GaussianOracle(schedule, mu, 0.5, pt), pt)
        gens = make_generators(range(len(x_T))) if eta else None
        results.append(sample(den, x_T, plan, eta=eta, generators=gens))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=0, atol=1e-10)


def test_rectified_flow_step_is_an_euler_step():
    s = flow_schedule()
    plan = make_plan(s, 7, "trailing")
    x = torch.randn(3, D, dtype=torch.float64)
    v = torch.randn(3, D, dtype=torch.float64)
    for k in range(len(plan)):
        sig, sig_to = plan.b[k], plan.b[k + 1]
        x0, eps = to_x0_eps(v, x, plan.a[k], sig, "flow")
        stepped = ddim_step(x0, eps, plan.a[k + 1], sig_to)
        torch.testing.assert_close(stepped, x + (sig_to - sig) * v, rtol=0, atol=1e-12)


def test_sigma_matches_the_papers_formula():
    s = vp_schedule()
    for t, t_prev in [(999, 979), (500, 480), (20, 0)]:
        abar, abar_prev = s.alphas_cumprod[t], s.alphas_cumprod[t_prev]
        paper = 0.7 * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
        got = ddim_sigma(math.sqrt(abar), math.sqrt(1 - abar), math.sqrt(abar_prev), math.sqrt(1 - abar_prev), 0.7)
        assert got == pytest.approx(paper, rel=1e-12)


def test_eta_one_all_steps_reproduces_the_data_distribution():
    """DDPM (eta = 1, all 1000 steps) with the optimal predictor samples N(mu, s^2)."""
    torch.manual_seed(0)
    n, d, s_data = 400, 64, 0.5
    mu = torch.linspace(-1, 1, d, dtype=torch.float64)
    schedule = vp_schedule()
    plan = make_plan(schedule, 1000, "leading")
    gens = make_generators(range(n))
    x_T = randn(gens, (d,), torch.float64)
    x0 = sample(Denoiser(GaussianOracle(schedule, mu, s_data)), x_T, plan, eta=1.0, generators=gens)
    z = (x0 - mu) / s_data  # standardized: should be N(0, 1), n*d = 25,600 values
    assert abs(float(z.mean())) < 4 / math.sqrt(n * d)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / (n * d))
    # and eta = 0 from the same x_T is deterministic, with a different (ODE) sample
    x0_ode = sample(Denoiser(GaussianOracle(schedule, mu, s_data)), x_T, make_plan(schedule, 50), eta=0.0)
    assert rms(x0_ode - x0) > 0.1


def test_per_sample_generators_make_samples_independent_of_batch():
    schedule = vp_schedule()
    plan = make_plan(schedule, 10)
    mu = torch.zeros(D)
    den = Denoiser(GaussianOracle(schedule, mu, 0.5))
    seeds = [100, 101, 102, 103, 104]
    gens = make_generators(seeds)
    full = sample(den, randn(gens, (D,)), plan, eta=1.0, generators=gens)
    for i, seed in enumerate(seeds):  # alone, and in a batch in another position
        g = make_generators([seed])
        alone = sample(den, randn(g, (D,)), plan, eta=1.0, generators=g)
        assert torch.equal(alone[0], full[i])
    g = make_generators([seeds[3], seeds[0]])
    pair = sample(den, randn(g, (D,)), plan, eta=1.0, generators=g)
    assert torch.equal(pair[0], full[3]) and torch.equal(pair[1], full[0])


def test_slerp():
    a = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    b = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # for unit-norm ends the midpoint keeps unit norm (a linear midpoint would shrink)
    an, bn = a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1), b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    mid = slerp(an, bn, 0.5)
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), torch.ones(2))
    assert float((an + bn).flatten(1).norm(dim=1)[0]) / 2 < 0.9  # what lerp would give
    # equal angles to both ends, and a quarter of the way at 0.25
    cos = lambda u, v: float((u.flatten() @ v.flatten()) / (u.norm() * v.norm()))
    assert cos(mid[0], an[0]) == pytest.approx(cos(mid[0], bn[0]), abs=1e-5)
    theta = math.acos(cos(an[0], bn[0]))
    assert math.acos(cos(slerp(an, bn, 0.25)[0], an[0])) == pytest.approx(theta / 4, abs=1e-4)
    # nearly parallel: falls back to lerp, finite
    near = slerp(a, a * 1.0000001, 0.5)
    assert torch.isfinite(near).all()
    torch.testing.assert_close(near, a, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    plan = make_plan(vp_schedule(), 5)
    den = Denoiser(lambda x, t: x)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample(den, x, plan, eta=-0.1)
    with pytest.raises(ValueError, match="one generator per sample"):
        sample(den, x, plan, eta=0.5)
    with pytest.raises(ValueError, match="deterministic"):
        sample(den, x, plan, sampler="dpm++2m", eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(den, x, plan, sampler="euler")
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(lambda x, t: x, "score")


def test_callback_reports_every_step():
    plan = make_plan(vp_schedule(), 7)
    seen = []
    sample(Denoiser(lambda x, t: torch.zeros_like(x)), torch.zeros(1, 2), plan, callback=lambda i: seen.append(i["step"]))
    assert seen == list(range(1, 8))


def test_float32_runs_and_agrees_with_float64(gaussian):
    mu, x_T = gaussian
    s = vp_schedule()
    plan = make_plan(s, 20)
    x64 = sample(Denoiser(GaussianOracle(s, mu, 0.5)), x_T, plan)
    x32 = sample(Denoiser(GaussianOracle(s, mu.float(), 0.5)), x_T.float(), plan)
    assert x32.dtype == torch.float32
    assert rms(x32.double() - x64) < 1e-5
