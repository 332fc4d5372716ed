"""The sampler core, proved against closed forms (oracle models with analytic optimal predictions)."""

import math

import numpy as np
import pytest
import torch

from ddimctl.prediction import Denoiser, Thresholding, from_x0_eps, threshold, to_x0_eps
from ddimctl.inversion import InversionStats, invert_ddim
from ddimctl.sampler import (
    ddim_sigma,
    ddim_step,
    make_generators,
    randn,
    sample,
    sample_ddim,
    slerp,
)
from ddimctl.schedule import flow_schedule, make_plan, plan_from_levels, vp_schedule
from oracles import GaussianOracle, rms

D = 16


@pytest.fixture
def gaussian():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    x_T = torch.randn(32, D, generator=g, dtype=torch.float64)
    return mu, x_T


def ode_error(schedule, mu, s, x_T, steps, spacing="leading", sampler="ddim", prediction_type="epsilon"):
    oracle = GaussianOracle(schedule, mu, s, prediction_type)
    plan = make_plan(schedule, steps, spacing, 1 if spacing == "leading" else 0)
    x0 = sample(Denoiser(oracle, prediction_type), x_T, plan, sampler=sampler)
    exact = oracle.ode_solution(x_T, plan.a[0], plan.b[0], plan.a[-1], plan.b[-1])
    return rms(x0 - exact), oracle.calls


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


def test_dpmpp_2m_is_second_order_and_beats_ddim_at_fewer_calls(gaussian):
    mu, x_T = gaussian
    s = vp_schedule()
    e_ddim_50, calls_ddim = ode_error(s, mu, 0.5, x_T, 50, "logsnr")
    e_2m_10, calls_2m = ode_error(s, mu, 0.5, x_T, 10, "logsnr", sampler="dpm++2m")
    assert calls_2m == 10 and calls_ddim <= 50
    assert e_2m_10 <= e_ddim_50, (e_2m_10, e_ddim_50)
    errs = [ode_error(s, mu, 0.5, x_T, n, "logsnr", sampler="dpm++2m")[0] for n in (20, 40)]
    assert errs[0] / errs[1] > 3.0, errs  # about 4 for a second-order method


def test_dpmpp_2m_first_step_equals_ddim(gaussian):
    mu, x_T = gaussian
    s = vp_schedule()
    plan = make_plan(s, 1, "trailing")
    den = Denoiser(GaussianOracle(s, mu, 0.5))
    torch.testing.assert_close(sample(den, x_T, plan, "dpm++2m"), sample(den, x_T, plan, "ddim"), rtol=0, atol=1e-12)


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


def test_parameterization_round_trip():
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    for a, b in [(0.8, 0.6), (0.3, 0.7)]:
        x = a * x0 + b * eps
        for pt in ["epsilon", "v_prediction", "sample", "flow"]:
            got = to_x0_eps(from_x0_eps(x0, eps, a, b, pt), x, a, b, pt)
            if pt == "v_prediction" and a * a + b * b != 1:
                continue  # v = a eps - b x0 is defined for VP; the general inverse still holds below
            torch.testing.assert_close(got[0], x0, atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1], eps, atol=1e-5, rtol=0)


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


def test_plain_inversion_error_shrinks_as_one_over_steps(gaussian):
    mu, x_T = gaussian
    s = vp_schedule()
    errs = []
    for n in (50, 100, 200):
        oracle = GaussianOracle(s, mu, 0.5)
        plan = make_plan(s, n)
        den = Denoiser(oracle)
        x0 = sample(den, x_T, plan)
        errs.append(rms(sample(den, invert_ddim(den, x0, plan), plan) - x0))
    assert all(1.7 < errs[i] / errs[i + 1] < 2.3 for i in range(2)), errs


@pytest.mark.parametrize("schedule,pt,spacing", [
    (vp_schedule(), "epsilon", "leading"),
    (vp_schedule(), "v_prediction", "trailing"),
    (flow_schedule(), "flow", "trailing"),
])
@pytest.mark.parametrize("steps", [10, 100])
def test_exact_inversion_round_trips_in_float64(gaussian, schedule, pt, spacing, steps):
    mu, x_T = gaussian
    oracle = GaussianOracle(schedule, mu, 0.5, pt)
    den = Denoiser(oracle, pt)
    plan = make_plan(schedule, steps, spacing)
    x0 = sample(den, x_T, plan)
    stats, calls_before = InversionStats(), oracle.calls
    x_back = invert_ddim(den, x0, plan, exact=True, tol=1e-12, stats=stats)
    assert stats.model_calls == oracle.calls - calls_before
    assert rms(x_back - x_T) <= 1e-5
    assert rms(sample(den, x_back, plan) - x0) <= 1e-5
    assert stats.max_residual <= 1e-10 and len(stats.residuals) == steps
    # plain inversion of the same point is far off: the exact solve is doing the work
    assert rms(invert_ddim(den, x0, plan) - x_T) > 1e-3


def test_inversion_reuses_the_step():
    """One inverse step re-noises (x0_hat, eps_hat) with the very coefficients of ddim_step."""
    s = vp_schedule()
    plan = plan_from_levels([500.0], [s.ab(500)[0], 1.0], [s.ab(500)[1], 0.0])
    seen = []

    def model(x, t):
        seen.append(float(t[0]))
        return torch.full_like(x, 0.3)

    x0 = torch.randn(2, D, dtype=torch.float64)
    x_T = invert_ddim(Denoiser(model), x0, plan)
    a, b = s.ab(500)
    torch.testing.assert_close(x_T, ddim_step(x0, torch.full_like(x0, 0.3), a, b), rtol=0, atol=0)
    assert seen == [500.0]  # the target's model time


def test_clipping_and_thresholding():
    x = torch.tensor([[3.0, -0.5, 0.2, -2.0]], dtype=torch.float64)
    den = Denoiser(lambda x, t: torch.zeros_like(x), "epsilon", clip_sample=1.0)
    x0, eps = den(x, torch.zeros(1), 1.0, 0.0)
    assert x0.tolist() == [[1.0, -0.5, 0.2, -1.0]] and torch.equal(eps, torch.zeros_like(x))
    th = threshold(x, Thresholding(ratio=1.0, max_value=2.5))  # s = min(max|x|, 2.5) = 2.5
    torch.testing.assert_close(th, x.clamp(-2.5, 2.5) / 2.5)
    th1 = threshold(x, Thresholding(ratio=0.5, max_value=10.0))  # s = median of |x| = (0.5 + 2) / 2
    torch.testing.assert_close(th1, x.clamp(-1.25, 1.25) / 1.25)
    th2 = threshold(x * 0.1, Thresholding(ratio=0.5, max_value=10.0))  # s clamped to min 1: plain clipping
    torch.testing.assert_close(th2, (x * 0.1).clamp(-1, 1))


def test_thresholding_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.7)
    x = 2 * torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(threshold(x, Thresholding(0.9, 1.7)), sch._threshold_sample(x))


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


def test_exact_inversion_of_a_sample_does_not_depend_on_its_batch(gaussian):
    mu, x_T = gaussian
    s = vp_schedule()
    plan = make_plan(s, 10)
    den = Denoiser(GaussianOracle(s, mu, 0.5))
    x0 = sample(den, x_T[:4], plan)
    x0[1] = x0[1] * 3  # an off-distribution image that needs more iterations than the others
    together = invert_ddim(den, x0, plan, exact=True, tol=1e-9)
    for i in range(4):
        alone = invert_ddim(den, x0[i : i + 1], plan, exact=True, tol=1e-9)
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-12)


def test_exact_inversion_stops_at_the_iteration_cap():
    s = vp_schedule()
    plan = make_plan(s, 5)
    # a wildly nonlinear "model": the fixed point is hard to reach in 3 iterations
    den = Denoiser(lambda x, t: torch.sin(40 * x))
    stats = InversionStats()
    x = invert_ddim(den, torch.full((1, 4), 0.3, dtype=torch.float64), plan, exact=True, tol=1e-14, max_iter=3, stats=stats)
    assert all(i <= 3 for i in stats.iterations) and stats.model_calls <= 5 * 4
    assert torch.isfinite(x).all() and stats.max_residual > 1e-14



# ----------------------------------------------------------------------------------------------------------------
# Inversion of every sampler (issue 16)

from ddimctl.inversion import (  # noqa: E402
    INVERT_FUNCTIONS, _solve, ddim_plan_update, dpmpp_2m_plan_update, dpmpp_3m_plan_update, invert_bdia,
    invert_multistep, invert_multistep_checked, ipndm_plan_update, run_plan_updates, unipc_plan_update,
    update_coefficients,
)
from ddimctl.sampler import SAMPLERS  # noqa: E402
from ddimctl.sampler import sample_bdia  # noqa: E402
from oracles import MixtureOracle  # noqa: E402

ORACLE_CASES = [(vp_schedule(), "epsilon", "logsnr"), (vp_schedule(), "epsilon", "leading"),
                (flow_schedule(), "flow", "trailing")]


def _mixture(schedule, pt, seed=0):
    g = torch.Generator().manual_seed(seed)
    mus = torch.randn(3, D, generator=g, dtype=torch.float64)
    x_T = torch.randn(16, D, generator=g, dtype=torch.float64)
    return Denoiser(MixtureOracle(schedule, mus, 0.3, prediction_type=pt), pt), x_T


@pytest.mark.parametrize("schedule,pt,spacing", ORACLE_CASES)
def test_bdia_round_trips_in_float64_on_a_mixture_oracle(schedule, pt, spacing):
    den, x_T = _mixture(schedule, pt)
    plan = make_plan(schedule, 10, spacing)
    x0 = sample(den, x_T, plan, "bdia")
    calls = den.model.calls
    lat, lat_next = invert_bdia(den, x0, plan)
    assert den.model.calls - calls == 10  # one call per step, no iteration
    back = sample_bdia(den, lat, plan, lat_next)
    assert rms(back - x0) <= 1e-10
    assert float(lat.std()) < 1.5  # gamma = 1: a usable latent (the parasitic root stays on the unit circle)
    # gamma = 0 is DDIM; gamma = 0.5 round-trips too, with a latent blown up by the parasitic root (-1/gamma)
    torch.testing.assert_close(sample_bdia(den, x_T, plan, gamma=0.0), sample(den, x_T, plan), rtol=0, atol=1e-12)


def test_bdia_differs_from_ddim_by_less_than_ddims_own_error():
    """BDIA (gamma = 1) integrates the same ODE: on Gaussian data its error against the exact solution is of DDIM's
    order or better."""
    g = torch.Generator().manual_seed(0)
    mu, x_T = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(32, D, generator=g, dtype=torch.float64)
    s = vp_schedule()
    oracle = GaussianOracle(s, mu, 0.5)
    plan = make_plan(s, 20, "logsnr")
    exact = oracle.ode_solution(x_T, plan.a[0], plan.b[0], plan.a[-1], plan.b[-1])
    e_ddim = rms(sample(Denoiser(oracle), x_T, plan) - exact)
    e_bdia = rms(sample(Denoiser(oracle), x_T, plan, "bdia") - exact)
    assert e_bdia < 2 * e_ddim, (e_bdia, e_ddim)


MULTISTEP = [("dpm++2m", dpmpp_2m_plan_update), ("dpm++3m", dpmpp_3m_plan_update), ("unipc", unipc_plan_update),
             ("ipndm", ipndm_plan_update)]


def test_every_sampler_has_an_inversion():
    assert set(INVERT_FUNCTIONS) == set(SAMPLERS)


@pytest.mark.parametrize("sampler,update", [("ddim", ddim_plan_update)] + MULTISTEP)
@pytest.mark.parametrize("schedule,pt,spacing", ORACLE_CASES)
@pytest.mark.parametrize("steps", [3, 7, 10])
def test_plan_updates_are_the_samplers_steps(sampler, update, schedule, pt, spacing, steps):
    """Bit for bit, except UniPC's, which writes the corrected point as a shift of the predicted one (the same
    arithmetic regrouped): float64 shows it is the same map."""
    den, x_T = _mixture(schedule, pt)
    plan = make_plan(schedule, steps, spacing)
    got, want = run_plan_updates(update, den, x_T, plan), sample(den, x_T, plan, sampler)
    if sampler == "unipc":
        assert rms(got - want) <= 1e-14 * rms(want), rms(got - want)
    else:
        assert torch.equal(got, want)


def test_inversion_reads_the_steps_own_coefficients():
    plan = make_plan(vp_schedule(), 5, "logsnr")
    for k in range(5):  # DDIM: x_{k+1} = a_{k+1} x0_hat + b_{k+1} eps_hat, nothing on x itself
        assert update_coefficients(ddim_plan_update, plan, k) == pytest.approx((0.0, plan.a[k + 1], plan.b[k + 1]))
    alpha, beta, gamma = update_coefficients(dpmpp_2m_plan_update, plan, 2)
    assert alpha == pytest.approx(plan.b[3] / plan.b[2]) and gamma == 0.0 and beta != 0.0


@pytest.mark.parametrize("schedule,pt,spacing", ORACLE_CASES)
def test_improved_solve_never_returns_a_larger_residual_than_the_plain_fixed_point(schedule, pt, spacing):
    """One inverse step, same target, same first guess, same budget: Anderson + Newton-Krylov (improved) against
    the plain frozen-model fixed point x += (target - step(x)) / c."""
    den, x_T = _mixture(schedule, pt, seed=3)
    plan = make_plan(schedule, 10, spacing)
    traj = [x_T]
    for k in range(10):
        traj.append(run_plan_updates(ddim_plan_update, den, traj[-1], plan_from_levels(
            [plan.timesteps[k]], [plan.a[k], plan.a[k + 1]], [plan.b[k], plan.b[k + 1]])))
    stats = InversionStats()
    for k in range(10):
        a, b = float(plan.a[k]), float(plan.b[k])
        t = torch.as_tensor(plan.timesteps, dtype=torch.float64)[k]
        c = update_coefficients(ddim_plan_update, plan, k)
        dx0, deps = den.frozen_jacobian(a, b)
        coeff = c[0] + c[1] * dx0 + c[2] * deps

        def evaluate(x, idx, k=k, t=t, a=a, b=b):
            out = den(x, t.expand(len(idx)), a, b)
            return ddim_plan_update(plan, k, x, [out] * (k + 1)), out

        target = traj[k + 1]
        guess = ddim_step(*den(target, t.expand(len(target)), plan.a[k + 1], plan.b[k + 1]), a, b)
        active = torch.ones(len(target), dtype=torch.bool)
        kw = dict(tol_res=0.0, tol_change=None, max_iter=8, stats=stats)
        improved = _solve(evaluate, target, guess, coeff, active, krylov=True, **kw)
        plain = _solve(evaluate, target, guess, coeff, active, krylov=False, memory=0, **kw)
        assert bool((improved.residual <= plain.residual * (1 + 1e-9) + 1e-15).all()), (k, improved.residual, plain.residual)


@pytest.mark.parametrize("sampler,update", MULTISTEP)
@pytest.mark.parametrize("schedule,pt,spacing", [(vp_schedule(), "epsilon", "logsnr"), (flow_schedule(), "flow", "trailing")])
def test_checked_multistep_inversion_is_never_further_than_plain_and_exact_where_the_memory_is(
        sampler, update, schedule, pt, spacing):
    """Per image, the checked solve's decode is no further from x0 than plain inversion's (it keeps the closer);
    with a denoiser whose x0_hat is constant (a point mass) every step's memory is right and the multistep solve
    itself is exact."""
    den, x_T = _mixture(schedule, pt)
    plan = make_plan(schedule, 10, spacing)
    x0 = sample(den, x_T, plan, sampler)
    stats = InversionStats()
    back = invert_multistep_checked(update, den, x0, plan, tol=1e-10, stats=stats)
    err = (sample(den, back, plan, sampler) - x0).flatten(1).pow(2).mean(1).sqrt()
    plain = (sample(den, invert_ddim(den, x0, plan), plan, sampler) - x0).flatten(1).pow(2).mean(1).sqrt()
    assert bool((err <= plain).all()), (err, plain)
    assert stats.image_round_trip == pytest.approx(err.tolist(), rel=1e-9, abs=1e-15)
    assert len(stats.image_plain_kept) == x0.shape[0]
    c = torch.linspace(-1, 1, D, dtype=torch.float64)
    one = Denoiser(GaussianOracle(schedule, c, 0.0, pt), pt)
    x0 = sample(one, x_T, plan, sampler)
    back = invert_multistep(update, one, x0, plan, tol=1e-12)
    assert rms(sample(one, back, plan, sampler) - x0) <= 1e-10


@pytest.mark.parametrize("schedule,pt,spacing", [(vp_schedule(), "epsilon", "logsnr"), (flow_schedule(), "flow", "trailing")])
def test_multistep_exact_inversion_round_trips_better_than_plain(schedule, pt, spacing):
    """dpm++2m: each step solved exactly for extrapolated memory. Not exact (the memory estimate's error stays in
    the trajectory; see invert_multistep), but far closer than plain inversion, and exact where the memory is
    right: with a denoiser whose x0_hat is constant the 2M step equals DDIM's."""
    den, x_T = _mixture(schedule, pt)
    plan = make_plan(schedule, 10, spacing)
    x0 = sample(den, x_T, plan, "dpm++2m")
    back = invert_multistep(dpmpp_2m_plan_update, den, x0, plan, tol=1e-10)
    err = rms(sample(den, back, plan, "dpm++2m") - x0)
    plain = rms(sample(den, invert_ddim(den, x0, plan), plan, "dpm++2m") - x0)
    assert err < plain / 3, (err, plain)
    c = torch.linspace(-1, 1, D, dtype=torch.float64)
    one = Denoiser(GaussianOracle(schedule, c, 0.0, pt), pt)
    x0 = sample(one, x_T, plan, "dpm++2m")
    back = invert_multistep(dpmpp_2m_plan_update, one, x0, plan, tol=1e-12)
    assert rms(sample(one, back, plan, "dpm++2m") - x0) <= 1e-10
