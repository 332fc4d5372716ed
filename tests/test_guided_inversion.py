"""Exact inversion under classifier-free guidance and per-image accounting (issue 30; docs/guided-inversion.md).

A class-conditional analytic model (each class a Gaussian mixture of its own, the null class their union) stands in
for a trained one where closed forms are needed; the built-in ``mnist-cond`` checks the step into the clean end.
"""

from __future__ import annotations

import pytest
import torch

import ddimctl.inversion as inv
from ddimctl.inversion import (
    InversionStats, _rms, _solve, ddim_plan_update, invert_ddim, run_plan_updates,
)
from ddimctl.conditioning import ClassifierFreeGuidance, Cond
from ddimctl.prediction import Denoiser
from ddimctl.sampler import ddim_step, model_times, sample
from ddimctl.schedule import make_plan, vp_schedule
from oracles import GaussianOracle, MixtureOracle, levels_at

D = 16
K = 3  # classes; label K is the null class


class ClassMixture:
    """``model(x, t, labels)`` (epsilon): class c is the mixture of its own two Gaussian components, the null label
    ``K`` the mixture of all of them; ``rows`` counts the samples it was evaluated on."""

    def __init__(self, schedule, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        means = 0.6 * torch.randn(2 * K, D, generator=g, dtype=torch.float64)
        self.schedule = schedule
        self.classes = [MixtureOracle(schedule, means[2 * c : 2 * c + 2], 0.2) for c in range(K)]
        self.null = MixtureOracle(schedule, means, 0.2)
        self.rows = 0

    def __call__(self, x, t, class_labels):
        labels = class_labels
        self.rows += len(x)
        a, b = levels_at(self.schedule, t)
        out = torch.empty_like(x)
        for c in labels.unique().tolist():
            m = labels == c
            out[m] = (self.null if c == K else self.classes[c]).predict(x[m], a, b)[1]
        return out


@pytest.fixture(scope="module")
def guided():
    """(denoiser at w = 3, its model, 10-step logsnr plan, 5 images: four guided samples and one off the data)."""
    s = vp_schedule()
    model = ClassMixture(s)
    labels = torch.tensor([0, 1, 2, 0, 1])
    den = Denoiser(ClassifierFreeGuidance(model, Cond({"class_labels": labels}),
                                          Cond({"class_labels": torch.full_like(labels, K)}), 3.0))
    plan = make_plan(s, 10, "logsnr")
    x_T = torch.randn(5, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = sample(den, x_T, plan)
    x0[4] = 1.5 * x0[4]  # an image no sample is: it needs other iterations than the rest
    return den, model, plan, x0


def test_a_batch_evaluates_only_the_images_still_solving_and_each_image_costs_what_it_costs_alone(guided):
    den, model, plan, x0 = guided
    st = InversionStats()
    rows = model.rows
    together = invert_ddim(den, x0, plan, exact=True, tol=1e-6, stats=st)
    # one guided evaluation is a conditional and an unconditional row: the model saw exactly the evaluations the
    # images caused, none for an image that had stopped
    assert model.rows - rows == 2 * st.evaluations == 2 * sum(st.image_calls)
    assert len(set(st.image_calls)) > 1  # the images needed different work ...
    assert st.model_calls < st.evaluations  # ... and the batch's calls are shared, not one per image
    for i in range(len(x0)):
        alone = InversionStats()
        x = invert_ddim(den.select(torch.tensor([i])).with_guidance_scale(3.0), x0[i : i + 1], plan, exact=True, tol=1e-6,
                        stats=alone)
        assert alone.image_calls == [st.image_calls[i]]
        torch.testing.assert_close(x[0], together[i], rtol=0, atol=1e-9)


def test_offsets_retrace_an_inversion_that_stopped_short(guided):
    den, _, plan, x0 = guided
    st = InversionStats(keep_offsets=True)
    x_T = invert_ddim(den, x0, plan, exact=True, tol=1e-6, max_iter=2, stats=st)  # far too few iterations
    assert len(st.offsets) == len(plan) and all(o.shape == x0.shape for o in st.offsets)
    assert float(_rms(sample(den, x_T, plan) - x0).max()) > 1e-4  # the latent alone misses
    back = run_plan_updates(ddim_plan_update, den, x_T, plan, offsets=st.offsets)
    assert float(_rms(back - x0).max()) < 1e-12  # with what each step left, the decode retraces the inversion
    # a solved inversion leaves offsets of the size of its residuals
    solved = InversionStats(keep_offsets=True)
    invert_ddim(den, x0, plan, exact=True, tol=1e-6, stats=solved)
    assert max(float(_rms(o).max()) for o in solved.offsets) == pytest.approx(solved.max_residual, rel=1e-9)


def test_with_guidance_scale_changes_only_the_scale(guided):
    den = guided[0]
    w5 = den.with_guidance_scale(5.0)
    assert w5.guidance_scale == 5.0 and den.guidance_scale == 3.0 and w5.model.cond is den.model.cond


def _tanh_step(x, idx):
    y = 0.5 * torch.tanh(x)
    return y, (y, y)


@pytest.mark.parametrize("target,reachable", [(1.0, False), (0.3, True)])
def test_a_solve_stops_when_its_residual_stops_falling_but_not_while_it_converges(target, reachable):
    """0.5 tanh(x) = 1 has no solution (the residual creeps towards 0.5 as x grows): with the stall window the
    solve gives up after a few calls instead of spending its whole budget; = 0.3 is solved either way."""
    x = torch.zeros(2, 8, dtype=torch.float64)
    t = torch.full_like(x, target)
    kw = dict(tol_res=1e-10, tol_change=None, max_iter=50, krylov=True, stats=InversionStats())
    on = _solve(_tanh_step, t, x, 0.5, torch.ones(2, dtype=torch.bool), stall_window=inv.STALL_WINDOW, **kw)
    off = _solve(_tanh_step, t, x, 0.5, torch.ones(2, dtype=torch.bool), **kw)
    if reachable:
        assert float(on.residual.max()) <= 1e-10 and on.calls.tolist() == off.calls.tolist()
    else:
        assert off.calls.tolist() == [50, 50] and int(on.calls.max()) <= 3 * inv.STALL_WINDOW
        assert float(on.residual.min()) > 0.49  # no preimage: what is left is left either way
        assert float(off.residual.min()) > 0.49


def test_the_step_into_the_clean_end_is_solved_by_newton_krylov_where_frozen_iterations_only_drift():
    """Data with 8 directions of std 1 and 8 of std 0.003: at sigma 0.026 the denoiser keeps the first and
    almost ignores the others, so the frozen-model iteration barely reduces the residual there while it moves x
    (docs/guided-inversion.md); Newton-Krylov finds the preimage (it exists: the target is the step's image)."""
    s = vp_schedule()
    stds = torch.tensor([1.0] * 8 + [0.003] * 8, dtype=torch.float64)
    den = Denoiser(GaussianOracle(s, torch.zeros(D, dtype=torch.float64), stds))
    plan = make_plan(s, 10, "logsnr")
    k = len(plan) - 1
    ts = model_times(plan, stds)
    a, b, a_to, b_to = (float(v) for v in (plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]))
    assert b_to == 0.0 and b / a < 0.05

    def evaluate(x, idx):
        out = den(x, ts[k : k + 1], a, b)
        return ddim_step(*out, a_to, b_to), out

    g = torch.Generator().manual_seed(0)
    x_true = a * stds * torch.randn(3, D, generator=g, dtype=torch.float64) + b * torch.randn(3, D, generator=g,
                                                                                              dtype=torch.float64)
    target = evaluate(x_true, None)[0]
    guess = a * target  # the solver's first guess at the clean end: the data, no noise
    kw = dict(tol_res=1e-9, tol_change=None, max_iter=11, krylov=True, stats=InversionStats())
    frozen = _solve(evaluate, target, guess, a_to / a, torch.ones(3, dtype=torch.bool), **kw)
    newton = _solve(evaluate, target, guess, a_to / a, torch.ones(3, dtype=torch.bool), krylov_first=True, **kw)
    assert int(newton.calls.max()) <= 11
    assert float(newton.residual.max()) < 1e-3 * float(frozen.residual.min())
    assert float(_rms(newton.x - x_true).max()) < 0.1 * float(_rms(frozen.x - x_true).min())


@pytest.mark.usefixtures("one_thread")
def test_under_guidance_the_clean_end_step_of_real_digits_gets_in_6_calls_what_frozen_iterations_do_not():
    """The built-in mnist-cond at w = 3, held-out digits with their labels: the step into the clean end (sigma
    0.026 -> 0), from the solver's first guess. In 6 model calls Newton-Krylov from the start takes the residual
    well below where 6 frozen-model iterations (the old solve's start there) leave it (measured 0.63x and 0.58x)."""
    from ddimctl.data import load_builtin_dataset
    from ddimctl.engine import Engine, SamplingOptions

    e = Engine.load("mnist-cond", SamplingOptions(steps=10, guidance_scale=3.0, inverting=True))
    xt, yt = load_builtin_dataset("mnist-test", 32, with_labels=True)
    x, y = xt[[0, 200]], yt[[0, 200]]
    den = e.denoisers(y.tolist(), len(y))[1]
    plan = e.plan
    k = len(plan) - 1
    ts = model_times(plan, x)
    a, b, a_to = float(plan.a[k]), float(plan.b[k]), float(plan.a[k + 1])

    def evaluate(z, idx):
        out = den.select(idx)(z, ts[k : k + 1], a, b)
        return ddim_step(*out, a_to, 0.0), out

    kw = dict(tol_res=1e-9, tol_change=None, max_iter=6, krylov=True, stats=InversionStats())
    active = torch.ones(2, dtype=torch.bool)
    with torch.inference_mode():
        start = _rms(evaluate(a * x, torch.arange(2))[0] - x)
        frozen = _solve(evaluate, x, a * x, a_to / a, active, **kw)
        newton = _solve(evaluate, x, a * x, a_to / a, active, krylov_first=True, **kw)
    assert newton.calls.tolist() == frozen.calls.tolist() == [6, 6]
    assert bool((newton.residual < 0.8 * frozen.residual).all()), (newton.residual, frozen.residual)
    assert bool((frozen.residual < start).all())  # the frozen iterations do gain a little: a real comparison
