"""Inversion (ddimctl.inversion) on oracle models (tests/oracles.py): plain DDIM inversion's error, exact
inversion's round trip in float64, its batch independence and iteration cap; the inversion of every sampler
(issue 16): BDIA by construction, the multistep samplers' plan updates, the solver, the checked multistep solve."""

import pytest
import torch

from ddimctl.inversion import (
    INVERT_FUNCTIONS,
    InversionStats,
    _solve,
    ddim_plan_update,
    dpmpp_2m_plan_update,
    dpmpp_3m_plan_update,
    invert_bdia,
    invert_ddim,
    invert_multistep,
    invert_multistep_checked,
    ipndm_plan_update,
    run_plan_updates,
    unipc_plan_update,
    update_coefficients,
)
from ddimctl.prediction import Denoiser
from ddimctl.sampler import SAMPLERS, ddim_step, sample, sample_bdia
from ddimctl.schedule import flow_schedule, make_plan, plan_from_levels, vp_schedule
from oracles import D, GaussianOracle, MixtureOracle, rms


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
