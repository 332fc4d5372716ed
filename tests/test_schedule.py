"""Schedules, timestep spacing and plans (levels and model times), checked against closed forms and against
diffusers' DDIMScheduler."""

import math

import numpy as np
import pytest

from ddimctl.schedule import (
    flow_schedule,
    make_betas,
    make_plan,
    plan_from_lambdas,
    rescale_zero_terminal_snr,
    select_timesteps,
    shift_sigma,
    vp_schedule,
)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(diffusers, beta_schedule, zero_snr):
    ref = diffusers.DDIMScheduler(
        beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=zero_snr
    )
    ours = vp_schedule(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    # diffusers builds its betas in float32; ours are float64, so agreement is to float32 precision.
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-5, atol=1e-7)
    assert ours.alphas_cumprod.dtype == np.float64


def test_linear_betas_closed_form():
    betas = make_betas(1000, 1e-4, 0.02, "linear")
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)


def test_zero_terminal_snr_properties():
    betas = make_betas(1000, 0.00085, 0.012, "scaled_linear")
    rescaled = rescale_zero_terminal_snr(betas)
    abar = np.cumprod(1 - rescaled)
    assert abar[-1] == pytest.approx(0.0, abs=1e-15)  # zero SNR at the last step
    assert abar[0] == pytest.approx(np.cumprod(1 - betas)[0])  # first step unchanged


def test_explicit_betas_and_bad_values():
    s = vp_schedule(trained_betas=[0.1, 0.2, 0.3])
    np.testing.assert_allclose(s.alphas_cumprod, [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7])
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas(10, beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="betas"):
        make_betas(trained_betas=[0.1, -0.2])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 10, 25, 50, 333, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers(diffusers, spacing, steps, offset):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and offset and steps == 1000:
        with pytest.raises(ValueError, match="range"):
            select_timesteps(1000, steps, spacing, offset)
        return
    ref.set_timesteps(steps)
    ours = select_timesteps(1000, steps, spacing, offset)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_quad_spacing_is_the_papers():
    ts = select_timesteps(1000, 10, "quad")
    expected = [int(v) for v in np.linspace(0, math.sqrt(800), 10) ** 2][::-1]
    assert ts.tolist() == expected


def test_logsnr_spacing_is_uniform_in_logsnr():
    """The S calls sit on the first S of S + 1 nodes uniform in log-SNR (the last node is replaced by the clean
    end); select_timesteps gives the nearest training timesteps, make_plan the exact fractional ones."""
    s = vp_schedule()
    ts = select_timesteps(1000, 20, "logsnr", lambdas=s.lambdas())
    lam_all = s.lambdas()
    targets = np.linspace(lam_all[-1], lam_all[0], 21)[:-1]
    assert ts[0] == 999 and ts[-1] > 0 and len(ts) == 20
    # each chosen timestep is the integer one nearest its uniform log-SNR target
    for t, target in zip(ts, targets):
        gap = max(abs(lam_all[t] - lam_all[max(t - 1, 0)]), abs(lam_all[t] - lam_all[min(t + 1, 999)]))
        assert abs(lam_all[t] - target) <= gap / 2 + 1e-12
    plan = make_plan(s, 20, "logsnr")
    np.testing.assert_allclose(np.log(plan.a[:-1] / plan.b[:-1]), targets, atol=1e-9)
    np.testing.assert_allclose(plan.timesteps, ts, atol=0.5)


def test_logsnr_plan_spends_no_call_at_the_data_end():
    """logsnr: S + 1 nodes uniform in log-SNR, the first S called, the last step into the clean end."""
    s = vp_schedule()
    for n in (5, 10, 50):
        plan = make_plan(s, n, "logsnr")
        lam = np.log(plan.a[:-1]) - np.log(plan.b[:-1])
        lo, hi = s.lambdas()[-1], s.lambdas()[0]
        np.testing.assert_allclose(lam, lo + (hi - lo) * np.arange(n) / n, atol=1e-9)
        assert plan.timesteps[0] == 999 and plan.timesteps[-1] > 0.0 and lam[-1] < hi and plan.b[-1] == 0.0
        # the model time of each level is where the schedule has that level
        for t, a, b in zip(plan.timesteps, plan.a, plan.b):
            assert s.ab(float(t)) == pytest.approx((a, b), abs=1e-12)
    flow = make_plan(flow_schedule(), 4, "logsnr")
    assert flow.b[0] == 1.0 and flow.b[-1] == 0.0 and np.all(np.diff(flow.b) < 0)


def test_fractional_times_interpolate_log_a():
    s = vp_schedule()
    assert s.ab(500.0) == (math.sqrt(s.alphas_cumprod[500]), math.sqrt(1 - s.alphas_cumprod[500]))
    a, b = s.ab(500.25)
    la = 0.75 * 0.5 * math.log(s.alphas_cumprod[500]) + 0.25 * 0.5 * math.log(s.alphas_cumprod[501])
    assert a == pytest.approx(math.exp(la), rel=1e-14) and a * a + b * b == pytest.approx(1.0, abs=1e-14)
    assert s.time_of_lambda(math.log(a / b)) == pytest.approx(500.25, abs=1e-9)
    with pytest.raises(ValueError, match="outside the training range"):
        s.ab(999.5)
    plan = plan_from_lambdas(s, [-5.0, 0.0, 2.0])
    assert plan.timesteps[0] == pytest.approx(s.time_of_lambda(-5.0))


@pytest.mark.parametrize("steps", [0, 1001])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match="steps must be between 1 and the 1000 training timesteps"):
        select_timesteps(1000, steps)


def test_vp_plan_levels_and_final_alpha():
    s = vp_schedule(set_alpha_to_one=True)
    plan = make_plan(s, 10, "leading", 1)
    assert len(plan) == 10 and len(plan.a) == 11
    assert plan.timesteps[0] == 901 and plan.timesteps[-1] == 1
    np.testing.assert_allclose(plan.a**2 + plan.b**2, 1.0)
    assert plan.a[-1] == 1.0 and plan.b[-1] == 0.0
    s2 = vp_schedule(set_alpha_to_one=False)
    plan2 = make_plan(s2, 10, "leading", 1)
    assert plan2.a[-1] ** 2 == pytest.approx(s2.alphas_cumprod[0])


def test_flow_plan_trailing_is_uniform_and_shift():
    s = flow_schedule()
    plan = make_plan(s, 4, "trailing")
    np.testing.assert_allclose(plan.b, [1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(plan.a, 1 - plan.b)
    np.testing.assert_allclose(plan.timesteps, [1000, 750, 500, 250])
    shifted = make_plan(flow_schedule(shift=3.0), 4, "trailing")
    np.testing.assert_allclose(shifted.b[:-1], [shift_sigma(v, 3.0) for v in (1.0, 0.75, 0.5, 0.25)])
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert s.ab(250.0) == (0.75, 0.25)
