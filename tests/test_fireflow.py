"""FireFlow (``--sampler fireflow``): the midpoint step that reuses its midpoint velocity, against closed forms and
FireFlow's own sampling loop, VP and flow alike; its plain (reversed) and exact inversions; the commands on the
built-in mnist-flow model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddimctl.inversion import (
    INVERT_FUNCTIONS, InversionStats, fireflow_call_plan, fireflow_plan_update, invert_fireflow,
    invert_fireflow_plain, run_plan_updates,
)
from ddimctl.prediction import Denoiser
from ddimctl.sampler import SAMPLE_FUNCTIONS, fireflow_midpoints, flow_time, sample
from ddimctl.schedule import SamplingPlan, flow_schedule, make_plan, plan_from_levels, vp_schedule
from oracles import GaussianOracle, MixtureOracle, rms

D = 16


@pytest.fixture(scope="module")
def gaussian():
    g = torch.Generator().manual_seed(0)
    return torch.randn(D, generator=g, dtype=torch.float64), torch.randn(32, D, generator=g, dtype=torch.float64)


def order_of(errors: list[float]) -> float:
    """The mean slope of log2(error) as the number of steps doubles."""
    return float(np.mean([math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]))


def vp_lambda_plan(n: int, lo: float = -5.0, hi: float = 3.0) -> SamplingPlan:
    """n VP steps uniform in log-SNR from lo to hi, ending at hi (no step into the clean end), with the schedule."""
    s = vp_schedule()
    lams = np.linspace(lo, hi, n + 1)
    a = np.sqrt(1 / (1 + np.exp(-2 * lams)))
    b = np.sqrt(1 / (1 + np.exp(2 * lams)))
    return SamplingPlan(np.array([s.time_of_lambda(float(l)) for l in lams[:-1]]), a, b, s)


def fireflow_reference(model, x: torch.Tensor, sigmas, T: int = 1000) -> torch.Tensor:
    """FireFlow's loop as its authors write it (``denoise_fireflow`` in their ``flux/sampling.py``), on a velocity
    model called with t = sigma T; ``sigmas`` reversed is their inversion."""
    next_v = None
    for s, s_prev in zip(sigmas[:-1], sigmas[1:]):
        v = model(x, torch.tensor([s * T], dtype=x.dtype)) if next_v is None else next_v
        x_mid = x + (s_prev - s) / 2 * v
        v_mid = model(x_mid, torch.tensor([(s + (s_prev - s) / 2) * T], dtype=x.dtype))
        next_v = v_mid
        x = x + (s_prev - s) * v_mid
    return x


# ----------------------------------------------------------------------------------------------------------------
# The sampler


@pytest.mark.parametrize("shift,spacing", [(1.0, "trailing"), (3.0, "trailing"), (1.0, "logsnr")])
def test_on_a_flow_model_it_is_fireflows_own_update(gaussian, shift, spacing):
    s = flow_schedule(shift=shift)
    mix = MixtureOracle.random(s, components=4, dim=D, seed=2, prediction_type="flow")
    plan = make_plan(s, 7, spacing)
    x_T = gaussian[1]
    got = sample(Denoiser(mix, "flow"), x_T, plan, "fireflow")
    want = fireflow_reference(mix, x_T, [float(v) for v in plan.b])
    assert rms(got - want) <= 1e-13 * rms(want), rms(got - want)
    # the plain inversion is the same loop on the reversed grid
    got = invert_fireflow_plain(Denoiser(mix, "flow"), want, plan)
    ref = fireflow_reference(mix, want, [float(v) for v in plan.b][::-1])
    assert rms(got - ref) <= 1e-13 * rms(ref), rms(got - ref)
    assert rms(got - x_T) > 1e-4  # and it is not exact


def test_on_a_vp_model_it_is_fireflow_in_flow_coordinates(gaussian):
    """VP through the same construction: FireFlow's loop run on z = x / (a + b) over s = b / (a + b), with the
    velocity eps - x0 of the VP denoiser at the level of each s, is what the sampler gives."""
    v = vp_schedule()
    mix = MixtureOracle.random(v, components=4, dim=D, seed=3)
    plan = vp_lambda_plan(8)
    x_T = gaussian[1]

    def level(s):
        n = 1 / math.sqrt((1 - s) ** 2 + s * s)  # a^2 + b^2 = 1
        return (1 - s) * n, s * n

    def velocity(z, t):
        s = float(t[0]) / 1000
        a, b = level(s)
        x0, eps = mix.predict(z * (a + b), a, b)
        return eps - x0

    s_k = [float(flow_time(a, b)) for a, b in zip(plan.a, plan.b)]
    want = fireflow_reference(velocity, x_T / (plan.a[0] + plan.b[0]), s_k) * (plan.a[-1] + plan.b[-1])
    got = sample(Denoiser(mix), x_T, plan, "fireflow")
    assert rms(got - want) <= 1e-9 * rms(want), rms(got - want)
    assert rms(sample(Denoiser(mix), x_T, plan) - want) > 1e-4  # (DDIM is not)


@pytest.mark.parametrize("case", ["flow gaussian", "flow mixture", "vp gaussian", "vp v-prediction"])
def test_converges_at_second_order(gaussian, case):
    """Error against the exact probability-flow ODE solution as the steps double: slope 2 (DDIM, on the same
    plans, has slope 1 on Gaussian data -- checked too, so the measure can tell them apart)."""
    mu, x_T = gaussian
    kind, data = case.split()
    if kind == "flow":
        s = flow_schedule()
        oracle = (GaussianOracle(s, mu, 0.5, "flow") if data == "gaussian"
                  else MixtureOracle.random(s, components=4, dim=D, seed=1, prediction_type="flow"))
        den, plans = Denoiser(oracle, "flow"), [make_plan(s, n, "trailing") for n in (40, 80, 160)]
        exact = (oracle.ode_solution(x_T, 0.0, 1.0, 1.0, 0.0) if data == "gaussian"
                 else oracle.ode_solution(x_T, 0.0, 1.0, 1.0, 0.0, steps=400))
    else:
        pt = "epsilon" if data == "gaussian" else "v_prediction"
        oracle = GaussianOracle(vp_schedule(), mu, 0.5, pt)
        den, plans = Denoiser(oracle, pt), [vp_lambda_plan(n) for n in (40, 80, 160)]
        exact = oracle.ode_solution(x_T, plans[0].a[0], plans[0].b[0], plans[0].a[-1], plans[0].b[-1])
    errors = [rms(sample(den, x_T, p, "fireflow") - exact) for p in plans]
    assert order_of(errors) == pytest.approx(2.0, abs=0.25), errors
    ddim = [rms(sample(den, x_T, p) - exact) for p in plans]
    if data != "mixture":  # (on the mixture DDIM's error is irregular: a few samples change component)
        assert order_of(ddim) == pytest.approx(1.0, abs=0.25), ddim
    assert errors[0] < ddim[0] / 10, (errors, ddim)


@pytest.mark.parametrize("schedule,pt,spacing", [(flow_schedule(), "flow", "trailing"),
                                                 (vp_schedule(), "epsilon", "logsnr"),
                                                 (vp_schedule(), "epsilon", "leading")])
@pytest.mark.parametrize("steps", [1, 5, 12])
def test_one_model_call_per_step_after_the_first(gaussian, schedule, pt, spacing, steps):
    mu, x_T = gaussian
    plan = make_plan(schedule, steps, spacing)
    mid = fireflow_midpoints(plan)
    oracle = GaussianOracle(schedule, mu, 0.5, pt)
    seen, steps_seen = [], []

    def model(x, t):
        seen.append(float(t[0]))
        return oracle(x, t)

    sample(Denoiser(model, pt), x_T, plan, "fireflow", callback=lambda i: steps_seen.append(i["step"]))
    assert len(seen) == steps + 1 and steps_seen == list(range(1, steps + 1))
    # the extra call at x_T, then one at each step's midpoint
    assert seen == pytest.approx([float(plan.timesteps[0])] + [float(t) for t in mid.timesteps], abs=1e-9)


def test_midpoints_are_halfway_in_flow_time_at_the_schedules_own_levels():
    # flow: sigma's midpoint, model time sigma T -- with the schedule or without it (a plan of bare levels)
    s = flow_schedule(shift=3.0)
    plan = make_plan(s, 6, "trailing")
    mid = fireflow_midpoints(plan)
    bare = fireflow_midpoints(plan_from_levels(plan.timesteps, plan.a, plan.b))
    for k in range(6):
        s_mid = 0.5 * (plan.b[k] + plan.b[k + 1])
        assert mid.b[k] == pytest.approx(s_mid, abs=1e-12) and mid.a[k] == pytest.approx(1 - s_mid, abs=1e-12)
        assert mid.timesteps[k] == pytest.approx(1000 * s_mid, abs=1e-9) and mid.fraction[k] == 0.5
        assert (bare.timesteps[k], bare.a[k], bare.b[k]) == pytest.approx((mid.timesteps[k], mid.a[k], mid.b[k]), abs=1e-9)
    # VP: halfway in s = b / (a + b), at the level the schedule gives the model time
    v = vp_schedule()
    plan = make_plan(v, 10, "logsnr")
    mid = fireflow_midpoints(plan)
    for k in range(10):
        s0, s1 = flow_time(plan.a[k], plan.b[k]), flow_time(plan.a[k + 1], plan.b[k + 1])
        assert flow_time(mid.a[k], mid.b[k]) == pytest.approx(0.5 * (s0 + s1), abs=1e-12)
        assert v.ab(float(mid.timesteps[k])) == pytest.approx((mid.a[k], mid.b[k]), abs=1e-12)
    # a VP plan that calls the model at t = 0: the last midpoint would be less noisy than any training time, so the
    # last step calls the model at its start (the DDIM step) -- still one call
    plan = make_plan(v, 10, "leading")
    mid = fireflow_midpoints(plan)
    assert plan.timesteps[-1] == 0 and mid.fraction[-1] == 0 and mid.timesteps[-1] == 0
    assert all(f == 0.5 for f in mid.fraction[:-1])


def test_registered_everywhere_and_deterministic():
    assert "fireflow" in SAMPLE_FUNCTIONS and "fireflow" in INVERT_FUNCTIONS
    with pytest.raises(ValueError, match="the fireflow sampler is deterministic"):
        sample(Denoiser(lambda x, t: torch.zeros_like(x)), torch.zeros(1, 2), make_plan(vp_schedule(), 3), "fireflow",
               eta=0.5)


# ----------------------------------------------------------------------------------------------------------------
# Inversion


CASES = [(flow_schedule(), "flow", "trailing"), (vp_schedule(), "epsilon", "logsnr"),
         (vp_schedule(), "v_prediction", "leading")]


@pytest.mark.parametrize("schedule,pt,spacing", CASES)
@pytest.mark.parametrize("steps", [3, 10])
def test_the_plan_update_is_the_sampler(gaussian, schedule, pt, spacing, steps):
    """Exact inversion solves FireFlow written over its model calls (fireflow_plan_update): the same map."""
    mix = MixtureOracle.random(schedule, components=4, dim=D, seed=1, prediction_type=pt)
    den, x_T = Denoiser(mix, pt), gaussian[1]
    plan = make_plan(schedule, steps, spacing)
    want = sample(den, x_T, plan, "fireflow")
    got = run_plan_updates(fireflow_plan_update(plan), den, x_T, fireflow_call_plan(plan))
    assert rms(got - want) <= 1e-14 * rms(want), rms(got - want)


@pytest.mark.parametrize("schedule,pt,spacing", CASES)
@pytest.mark.parametrize("steps", [10, 30])
def test_exact_inversion_round_trips_in_float64_and_plain_does_not(gaussian, schedule, pt, spacing, steps):
    mu, x_T = gaussian
    oracle = GaussianOracle(schedule, mu, 0.5, pt)
    den = Denoiser(oracle, pt)
    plan = make_plan(schedule, steps, spacing)
    x0 = sample(den, x_T, plan, "fireflow")
    stats, before = InversionStats(), oracle.calls
    back = invert_fireflow(den, x0, plan, tol=1e-12, stats=stats)
    assert stats.model_calls == oracle.calls - before
    assert rms(sample(den, back, plan, "fireflow") - x0) <= 1e-12
    assert rms(back - x_T) <= 1e-10
    assert stats.image_plain_kept == [False] * len(x_T) and max(stats.image_round_trip) <= 1e-12
    assert len(stats.residuals) == steps + 1  # one implicit solve per model call
    plain_stats = InversionStats()
    plain = invert_fireflow(den, x0, plan, exact=False, stats=plain_stats)
    assert plain_stats.model_calls == steps + 1 and len(plain_stats.residuals) == steps
    assert rms(sample(den, plain, plan, "fireflow") - x0) > 1e-5


def test_exact_inversion_round_trips_on_a_mixture():
    """Three well-separated components (bimodal posteriors along the way): the step-by-step solve with extrapolated
    reused velocities is off, the rounds of Newton on the whole trajectory make it exact."""
    s = flow_schedule()
    g = torch.Generator().manual_seed(0)
    mus, x_T = torch.randn(3, D, generator=g, dtype=torch.float64), torch.randn(16, D, generator=g, dtype=torch.float64)
    den = Denoiser(MixtureOracle(s, mus, 0.3, prediction_type="flow"), "flow")
    plan = make_plan(s, 20, "trailing")
    x0 = sample(den, x_T, plan, "fireflow")
    back = invert_fireflow(den, x0, plan, tol=1e-10)
    assert rms(sample(den, back, plan, "fireflow") - x0) <= 1e-8
    one_pass = invert_fireflow(den, x0, plan, tol=1e-10, max_sweeps=0, checked=False)
    assert rms(sample(den, one_pass, plan, "fireflow") - x0) > 1e-4
    plain = invert_fireflow(den, x0, plan, exact=False)
    assert rms(sample(den, plain, plan, "fireflow") - x0) > 1e-4


def test_plain_inversion_round_trip_shrinks_with_the_steps_but_stays_inexact(gaussian):
    """FireFlow's reversed scheme: its round trip error falls at least at second order (third on Gaussian data,
    where the forward and reversed local errors cancel at leading order), and is never zero."""
    mu, x_T = gaussian
    s = flow_schedule()
    den = Denoiser(GaussianOracle(s, mu, 0.5, "flow"), "flow")
    errors = []
    for n in (20, 40, 80):
        plan = make_plan(s, n, "trailing")
        x0 = sample(den, x_T, plan, "fireflow")
        errors.append(rms(sample(den, invert_fireflow(den, x0, plan, exact=False), plan, "fireflow") - x0))
    assert order_of(errors) > 1.75 and errors[-1] > 1e-7, errors


# ----------------------------------------------------------------------------------------------------------------
# The commands, on the built-in rectified-flow model


def test_sample_and_reconstruct_on_mnist_flow(tmp_path):
    from typer.testing import CliRunner

    from ddimctl.cli import app
    from ddimctl.data import load_builtin_dataset

    # sample, as a user runs it
    r = subprocess.run([sys.executable, "-m", "ddimctl", "sample", "-m", "mnist-flow", "--sampler", "fireflow",
                        "--steps", "4", "--n", "2", "--out", str(tmp_path / "s"), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["settings"]["sampler"] == "fireflow" and len(doc["outputs"]) == 2
    img = np.asarray(Image.open(doc["outputs"][0]))
    assert img.shape == (32, 32) and img.std() > 10  # a picture, not a flat field

    digit = load_builtin_dataset("mnist-test")[0, 0]  # a held-out digit in [-1, 1]
    Image.fromarray(((digit.numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)).save(tmp_path / "d.png")
    records = {}
    for inversion in ("plain", "exact"):
        r = CliRunner().invoke(app, ["reconstruct", str(tmp_path / "d.png"), "-m", "mnist-flow", "--sampler",
                                     "fireflow", "--steps", "4", "--inversion", inversion, "--out",
                                     str(tmp_path / inversion), "--json"])
        assert r.exit_code == 0, (r.output, r.exception)
        doc = json.loads(r.stdout)
        assert doc["settings"]["sampler"] == "fireflow"
        records[inversion] = doc["images"][0]
    assert records["plain"]["model_calls"] == 5 + 5  # S + 1 to invert, S + 1 to decode
    exact = records["exact"]
    assert exact["model_calls"] > 10 and isinstance(exact["plain_inversion_kept"], bool)
    assert len(exact["iterations"]) == 5  # one solve per model call
    assert exact["mse"] <= records["plain"]["mse"] * (1 + 1e-6) + 1e-12  # checked: never further than plain
