"""Inversion: from data x0 back to the x_T whose deterministic (eta = 0) sample it is, for every sampler. Plain
functions, like the samplers they invert (:mod:`ddimctl.sampler`), whose step coefficients they reuse.

Plain DDIM inversion evaluates the model at the point it has (x_{t-1}) instead of the point it seeks (x_t): exact
only when x0_hat does not change along the way. Exact inversion solves each inverse step implicitly (find x_k
whose forward step lands on x_{k+1}); it needs the denoiser's Jacobian with its raw model output held
(``denoise.frozen_jacobian(a, b)``, part of :class:`ddimctl.prediction.Denoiser`'s interface).

Every explicit sampler is inverted by one function, :func:`invert_multistep`, given its step written as a *plan
update* ``update(plan, k, x, outs) -> x_{k+1}``: the sampler's step k from x = x_k, with ``outs[j] = (x0_hat,
eps_hat)`` the model's outputs at the states x_j, j = 0 .. k, of the same trajectory (outs[k] at x itself). The
update must be affine in x and in the outputs (every linear multistep sampler is), so the inversion can read its
coefficients by probing it with scalars. DDIM (:func:`ddim_plan_update`) uses outs[k] only; DPM-Solver++(2M) and
(3M), iPNDM and UniPC (:func:`dpmpp_2m_plan_update`, :func:`dpmpp_3m_plan_update`, :func:`ipndm_plan_update`,
:func:`unipc_plan_update`) use earlier outputs too, which the backward walk does not know yet: they are estimated
by extrapolation (see :func:`invert_multistep`).

BDIA-DDIM (:func:`invert_bdia`) is exactly invertible by construction: its latent is the pair (x_0, x_1) of the
plan's first two states, and the inverse runs its recursion backwards with one model call per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .sampler import (
    Callback, Denoise, _isfinite, bdia_step, ddim_step, dpmpp_2m_update, dpmpp_3m_second_order_before_end,
    dpmpp_3m_update, ipndm_update, lam, model_times, plan_requires_grad, sampling_function, unipc_bh2_update,
)
from .sampler import (  # FireFlow
    Midpoints, _blend, _clean_end_time, fireflow_midpoints, fireflow_step, flow_step, sample_fireflow,
)
from .schedule import SamplingPlan

#: ``update(plan, k, x_k, outs) -> x_{k+1}`` with ``outs[j] = (x0_hat, eps_hat)`` at state j, j = 0 .. k.
PlanUpdate = Callable[[SamplingPlan, int, Tensor, Sequence["tuple[Tensor, Tensor]"]], Tensor]

SOLVERS = ("improved", "anderson")
#: an image's solve of a step stops when its best residual has not fallen to STALL_PROGRESS x over its last
#: STALL_WINDOW // 2 model calls within NEAR x the tolerance, and under guidance also over its last FOLD_WINDOW
#: calls further off (a fold of the guided step map, no preimage nearby: what the solve leaves there is kept as an
#: offset, OFFSET_FACTOR). See _solve. Without guidance a step has no fold, and a slow solve of a huge step, as a
#: tuned 3-step plan's last, still gets there; nor on the step into the clean end, whose residual is the decoded
#: image's miss. FOLD_WINDOW 3 against 6: 77 against 84.5 calls per image (median) on 32 digits at w = 3, 10 steps,
#: the offset-corrected round trip as exact (docs/guided-inversion.md, section 6).
STALL_WINDOW = 6
FOLD_WINDOW = 3
STALL_PROGRESS = 0.5
#: the step into the clean end stops once a Newton-Krylov step removed less than this share of its residual (and it
#: is within NEAR x its tolerance): see _solve
FLOOR_GAIN = 0.6
#: the floor rule, and the stall rule's shorter window, act only within this factor of a step's tolerance (at 10x
#: they cut 5-step solves of sampled digits short: a reconstruction 4x the tolerance off)
NEAR = 2.0
#: a step whose solve stopped with its residual above this many times its bound keeps what it left as an offset
#: (:func:`stopped_short`): under guidance the step map folds and some steps have no preimage nearby
#: (docs/guided-inversion.md); decoding with these offsets retraces the inversion exactly
OFFSET_FACTOR = 10.0
_S2 = 0.25  # data variance of the Gaussian surrogate whose denoiser Jacobian preconditions the multistep solve


def _select(denoise, idx: Tensor):
    """``denoise`` for the images ``idx`` of the batch (a Denoiser slices its model's conditions; a plain callable
    is taken to be the same for every image)."""
    return denoise.select(idx) if hasattr(denoise, "select") else denoise


@dataclass
class InversionStats:
    """What an inversion cost and reached.

    ``model_calls``: batched model calls (forwards launched; a call that evaluates only the images of a batch still
    solving counts once). ``residuals[k]``: the largest per-image RMS of (forward step - known point) after the
    k-th inverse step (from the clean end; NaN for plain inversion, which does not solve); ``iterations[k]``: the
    most iterations an image spent on it. ``image_iterations[k][i]`` and ``image_residuals[k][i]``: the same for
    image i alone; ``image_calls[i]``: the model evaluations image i caused (every solver evaluates only the images
    still solving, so this is what it costs inverted on its own, and does not depend on its batch);
    :attr:`evaluations`: their sum, the batch's total. ``sweeps``: backward sweeps of a multistep inversion (1 for
    DDIM); ``krylov_steps``: Newton-Krylov steps taken where the frozen-model iteration stalled.

    ``keep_offsets``: set it before an exact inversion to have ``offsets[k]`` (plan order, each (B, ...)) hold
    what step k's solve left, ``x_{k+1} - update(x_k)``: :func:`run_plan_updates` with these offsets retraces the
    inversion exactly, wherever the solve stopped short (docs/guided-inversion.md).
    """

    model_calls: int = 0
    residuals: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    image_iterations: list[list[int]] = field(default_factory=list)
    image_residuals: list[list[float]] = field(default_factory=list)
    image_calls: list[int] = field(default_factory=list)
    sweeps: int = 0
    krylov_steps: int = 0
    latents_prev: Tensor | None = None  # set by Engine.invert: a pair sampler's second state x_{T-1}
    #: multistep samplers (:func:`invert_multistep_checked`): per image, whether plain inversion's latent was kept
    #: (its decode landed closer), and the RMS (model units) by which the kept latent's decode misses the input
    image_plain_kept: list[bool] | None = None
    image_round_trip: list[float] | None = None
    keep_offsets: bool = False
    offsets: list[Tensor] | None = None
    #: ``bounds[k]``: the RMS residual step k's solve aimed for (plan order; set by an exact inversion)
    bounds: list[float] | None = None

    @property
    def evaluations(self) -> int:
        """Model evaluations of single images in all (the sum of ``image_calls``): what the batch cost."""
        return sum(self.image_calls)

    @property
    def max_residual(self) -> float:
        return max((r for r in self.residuals if not math.isnan(r)), default=0.0)

    def _record(self, residual: Tensor | None, iterations: Tensor, calls: Tensor | None = None) -> None:
        """Append one inverse step: per-image residuals (B,) (None: unsolved) and iterations (B,)."""
        its = [int(i) for i in iterations.tolist()]
        res = [math.nan] * len(its) if residual is None else [float(r) for r in residual.tolist()]
        self.image_iterations.append(its)
        self.image_residuals.append(res)
        self.iterations.append(max(its, default=0))
        self.residuals.append(max(res, default=math.nan) if residual is not None else math.nan)
        if not self.image_calls:
            self.image_calls = [0] * len(its)
        add = its if calls is None else [int(c) for c in calls.tolist()]
        self.image_calls = [c + a for c, a in zip(self.image_calls, add)]


# ----------------------------------------------------------------------------------------------------------------
# Plan updates: each sampler's step k, reusing the sampler's own step function


def ddim_plan_update(plan: SamplingPlan, k: int, x: Tensor, outs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """The eta = 0 DDIM step k (:func:`ddimctl.sampler.ddim_step`): ``a_{k+1} x0_hat + b_{k+1} eps_hat`` at x_k."""
    x0, eps = outs[k]
    return ddim_step(x0, eps, plan.a[k + 1], plan.b[k + 1])


def dpmpp_2m_plan_update(plan: SamplingPlan, k: int, x: Tensor, outs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """DPM-Solver++(2M) step k exactly as :func:`ddimctl.sampler.sample_dpmpp_2m` takes it
    (:func:`ddimctl.sampler.dpmpp_2m_update`; first order on the first and the last step)."""
    S = len(plan)
    a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
    x0_prev, h_prev = None, math.inf
    if 0 < k < S - 1:
        x0_prev, h_prev = outs[k - 1][0], lam(a, b) - lam(plan.a[k - 1], plan.b[k - 1])
    return dpmpp_2m_update(x, outs[k][0], x0_prev, a, b, a_to, b_to, h_prev)[0]


def dpmpp_3m_plan_update(plan: SamplingPlan, k: int, x: Tensor, outs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """DPM-Solver++(3M) step k exactly as :func:`ddimctl.sampler.sample_dpmpp_3m` takes it
    (:func:`ddimctl.sampler.dpmpp_3m_update`; lower order on the first two steps and before the clean end)."""
    a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
    x0_prev = outs[k - 1][0] if k >= 1 else None
    x0_prev2 = outs[k - 2][0] if k >= 2 and not dpmpp_3m_second_order_before_end(plan, k) else None
    h_prev = lam(a, b) - lam(plan.a[k - 1], plan.b[k - 1]) if k >= 1 else math.inf
    h_prev2 = lam(plan.a[k - 1], plan.b[k - 1]) - lam(plan.a[k - 2], plan.b[k - 2]) if k >= 2 else math.inf
    return dpmpp_3m_update(x, outs[k][0], x0_prev, x0_prev2, a, b, a_to, b_to, h_prev, h_prev2)[0]


def ipndm_plan_update(plan: SamplingPlan, k: int, x: Tensor, outs: Sequence[tuple[Tensor, Tensor]],
                      order: int = 4) -> Tensor:
    """iPNDM step k exactly as :func:`ddimctl.sampler.sample_ipndm` takes it (:func:`ddimctl.sampler.ipndm_update`,
    Adams-Bashforth of order min(order, k + 1))."""
    eps = [outs[j][1] for j in range(k, k - min(order, k + 1), -1)]  # newest first
    return ipndm_update(outs[k][0], eps, plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1])


def _unipc_history(plan: SamplingPlan, k: int, outs: Sequence[tuple[Tensor, Tensor]], p: int) -> list:
    """The history :func:`ddimctl.sampler.sample_unipc` passes to step k's UniP-p: (x0_hat_j, lambda_j) of the
    p - 1 newest points before k whose lambda is finite, newest first."""
    hist: list = []
    for j in range(k - 1, -1, -1):
        if len(hist) == p - 1:
            break
        lam_j = lam(plan.a[j], plan.b[j])
        if _isfinite(lam_j):
            hist.append((outs[j][0], lam_j))
    return hist


def unipc_plan_update(plan: SamplingPlan, k: int, x: Tensor, outs: Sequence[tuple[Tensor, Tensor]],
                      order: int = 2) -> Tensor:
    """UniPC (bh2) step k of :func:`ddimctl.sampler.sample_unipc`, from the point x_k where the model was called.

    The sampler corrects x_k with the model's output there (UniC redoes step k - 1 from the point it started)
    and predicts x_{k+1} from the corrected point (UniP). Both redo the same step from the same point, with the
    same coefficient b_k / b_{k-1} on it, so the corrected point is x_k plus the difference of their output
    terms: a function of x_k and the outputs only, which is what a plan update must be. Equal to the sampler up
    to float rounding (float64: tests/test_sampler.py), not bit for bit.
    """
    S = len(plan)
    a, b, a_to, b_to = plan.a[k], plan.b[k], plan.a[k + 1], plan.b[k + 1]
    x0 = outs[k][0]
    if k > 0:  # UniC for the step k - 1 -> k, as a shift of x_k
        j = k - 1
        zero = torch.zeros_like(x)
        args = (zero, outs[j][0], plan.a[j], plan.b[j], a, b, _unipc_history(plan, j, outs, min(order, j + 1, S - j)))
        x = x + (unipc_bh2_update(*args, x0_to=x0) - unipc_bh2_update(*args))
    return unipc_bh2_update(x, x0, a, b, a_to, b_to, _unipc_history(plan, k, outs, min(order, k + 1, S - k)))


def run_plan_updates(update: PlanUpdate, denoise: Denoise, x: Tensor, plan: SamplingPlan,
                     callback: Callback | None = None, offsets: Sequence[Tensor | None] | None = None) -> Tensor:
    """Sample with a plan update (one model call per step): the forward direction of :func:`invert_multistep`.
    For a registered sampler it equals the sampler itself (tested). ``offsets[k]`` (None: none), added after step
    k, are what an exact inversion's solve left (``InversionStats.offsets``): with them the sample retraces it."""
    ts = model_times(plan, x)
    S = len(plan)
    outs: list[tuple[Tensor, Tensor]] = []
    for k in range(S):
        outs.append(denoise(x, ts[k : k + 1], plan.a[k], plan.b[k]))
        x = update(plan, k, x, outs)
        if offsets is not None and offsets[k] is not None:
            x = x + offsets[k].to(x.dtype)
        if callback is not None:
            callback({"step": k + 1, "total": S, "x": x, "x0": outs[k][0]})
    return x


def select_offsets(offsets: Sequence[Tensor | None] | None, idx) -> list[Tensor | None] | None:
    """Per-step offsets (plan order, each (B, ...) or None) for the images ``idx`` of their batch (an index, a
    slice or a list); None stays None."""
    return None if offsets is None else [None if o is None else o[idx] for o in offsets]


def stopped_short(stats: InversionStats, factor: float = OFFSET_FACTOR) -> list[Tensor | None] | None:
    """The offsets of an exact inversion (``stats.keep_offsets``) kept only for the images and steps whose solve
    stopped with a residual above ``factor`` x its bound (``factor`` 0: every nonzero offset), zero for the other
    images of such a step; None per step that needs none, and None when no step does. What
    :func:`run_plan_updates` needs to retrace the inversion within its tolerance, in a fraction of the storage
    (docs/guided-inversion.md)."""
    if stats.offsets is None or stats.bounds is None:
        raise ValueError("no offsets recorded: set stats.keep_offsets before an exact inversion")
    kept: list[Tensor | None] = []
    for o, bound in zip(stats.offsets, stats.bounds):
        far = _rms(o) > factor * bound
        kept.append(torch.where(_bcast(far, o), o, torch.zeros_like(o)) if bool(far.any()) else None)
    return kept if any(o is not None for o in kept) else None


def update_coefficients(update: PlanUpdate, plan: SamplingPlan, k: int) -> tuple[float, float, float]:
    """``(alpha, beta, gamma)``: the coefficients of x_k, x0_hat_k and eps_hat_k in step k, read by probing the
    (affine) update with scalars while the other states' outputs are zero."""
    zero = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)

    def probe(x, x0, eps):
        outs = [(zero, zero)] * k + [(x0, eps)]
        return float(update(plan, k, x, outs))

    base = probe(zero, zero, zero)
    return probe(one, zero, zero) - base, probe(zero, one, zero) - base, probe(zero, zero, one) - base


# ----------------------------------------------------------------------------------------------------------------
# Plain DDIM inversion, and the entry point that keeps the old interface


@sampling_function
def invert_ddim(
    denoise: Denoise,
    x0: Tensor,
    plan: SamplingPlan,
    callback: Callback | None = None,
    exact: bool = False,
    tol: float = 1e-3,
    max_iter: int = 50,
    stats: InversionStats | None = None,
    solver: str = "improved",
) -> Tensor:
    """DDIM inversion: walk ``plan`` backwards from data x0 (B, ...) to x_T with eta = 0; returns x_T.

    Plain (``exact=False``): each inverse step, from level k+1 to the noisier level k, evaluates the model at the
    point it has (x_{k+1}, with the target's time) and re-noises its (x0_hat, eps_hat) to level k with the same
    :func:`ddimctl.sampler.ddim_step`. One model call per step.

    Exact: :func:`invert_multistep` with the DDIM step, so that sampling x_T gives x0 back up to ``tol`` (see
    there). ``solver="anderson"`` is the earlier solve (plain first guess, ``tol`` on the RMS residual of each
    step), kept for comparison.
    """
    if exact:
        return invert_multistep(ddim_plan_update, denoise, x0, plan, callback, tol=tol, max_iter=max_iter,
                                stats=stats, solver=solver)
    stats = stats if stats is not None else InversionStats()
    ts = model_times(plan, x0)
    B, S = x0.shape[0], len(plan)
    x = x0
    for n, j in enumerate(range(S - 1, -1, -1)):
        pred_x0, pred_eps = denoise(x, ts[j : j + 1], plan.a[j + 1], plan.b[j + 1])
        stats.model_calls += 1
        x = ddim_step(pred_x0, pred_eps, plan.a[j], plan.b[j])
        stats._record(None, torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long))
        if callback is not None:
            callback({"step": n + 1, "total": S, "x": x, "x0": pred_x0})
    return x


def ddim_x_coefficient(denoise, a: float, b: float, a_to: float, b_to: float) -> float:
    """d x_to / d x of the eta = 0 step ``x_to = a_to x0_hat + b_to eps_hat`` with the raw model output held."""
    dx0, deps = denoise.frozen_jacobian(a, b)
    return a_to * dx0 + b_to * deps


# ----------------------------------------------------------------------------------------------------------------
# Exact inversion of any explicit sampler


def _rms(x: Tensor) -> Tensor:
    return x.flatten(1).double().pow(2).mean(1).sqrt()  # (B,) float64


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *[1] * (like.ndim - 1))


def _extrapolate(o: Tensor, o_prev: Tensor | None, lam_o: float, lam_prev: float, lam_to: float) -> Tensor:
    """Linear extrapolation in log-SNR of a model output known at two levels; zeroth order when it cannot."""
    if o_prev is None or not all(math.isfinite(v) for v in (lam_o, lam_prev, lam_to)) or lam_o == lam_prev:
        return o
    return o + ((lam_to - lam_o) / (lam_o - lam_prev)) * (o - o_prev)


def invert_multistep(
    update: PlanUpdate,
    denoise: Denoise,
    x0: Tensor,
    plan: SamplingPlan,
    callback: Callback | None = None,
    tol: float = 1e-3,
    max_iter: int = 50,
    stats: InversionStats | None = None,
    solver: str = "improved",
    max_sweeps: int = 0,
    krylov: bool = True,
) -> Tensor:
    """Exact inversion of the sampler whose step is ``update`` (a :data:`PlanUpdate`): x_T (B, ...) whose
    sample with that sampler is x0 (B, ...), each image on its own.

    Each inverse step k (from the clean end) solves ``update(plan, k, x, outs) = x_{k+1}`` for x = x_k by the
    fixed-point iteration ``x += (x_{k+1} - update(x)) / c``, c the step's slope in x with the model output held
    (a Newton step with a frozen model), accelerated by Anderson mixing over the last 4 iterates. Where that
    stalls (the residual not halved in 3 iterations), a Newton-Krylov step: GMRES on the true Jacobian, whose
    products with a vector are finite differences of the model (one call each).

    ``solver="improved"`` (the default):

    * first guess without a model call: the data prediction at x_k extrapolated linearly in log-SNR from the two
      solved states nearer the data, with the noise that makes the step land exactly on x_{k+1};
    * a stopping rule on the decoded image: ``tol`` is the RMS error (model units) that the solve may leave in
      the decoded sample, shared out as ``tol / sqrt(S)`` per step; a step stops when its residual, times the
      most a perturbation at level k+1 can grow on the way to the data (1 for VP data of std <= 1, sqrt(2) for
      flow; times |w| + |1 - w| under classifier-free guidance of scale w, except on the step into the clean end,
      whose residual is the decoded miss itself), is below that share, or when the last iteration changed the
      denoised estimate at x_k (a one-step decode) by less than a tenth of it while the residual is within 10x of
      its bound: the iteration then stalls only in directions the denoiser ignores, which decoding does not see;
      or when the residual has stopped falling (``STALL_WINDOW``: within NEAR x the bound, a floor of what the
      model can produce; further off, under guidance only, a fold of the step map with no preimage nearby,
      docs/guided-inversion.md);
    * under guidance, the step into the clean end by Newton-Krylov from its first iterate, stopped at the floor of
      what the model can produce (``FLOOR_GAIN``).

    ``stats.keep_offsets``: record what each step's solve left (``stats.offsets``), so that
    :func:`run_plan_updates` with them retraces the inversion exactly where the solve stopped short.

    ``solver="anderson"``: the earlier solve (plain-inversion first guess with its own model call, ``tol`` on the
    RMS residual of every step, no Krylov step).

    A multistep update needs the outputs at noisier states (outs[j], j < k) that the backward walk has not reached:
    the sweep extrapolates them in log-SNR from the states it has, so each step is solved exactly for that
    estimate, and the trajectory misses by the estimate's error times the step's memory coefficient (measured in
    benchmarks/inversion.py; this is where multistep inversion falls short of exact). ``max_sweeps`` > 0 adds
    that many rounds of frozen-model Newton on the whole trajectory (:func:`_global_newton`), keeping per image
    the most consistent trajectory: it converges on analytic oracles but did not improve the built-in model, so
    it is off by default.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r} (expected one of {', '.join(SOLVERS)})")
    with torch.set_grad_enabled(plan_requires_grad(plan)):
        return _invert_multistep(update, denoise, x0, plan, callback, tol, max_iter, stats, solver, max_sweeps, krylov)


def _invert_multistep(update, denoise, x0, plan, callback, tol, max_iter, stats, solver, max_sweeps, krylov):
    if not hasattr(denoise, "frozen_jacobian"):
        raise TypeError("exact inversion needs a denoiser with frozen_jacobian(a, b) (e.g. ddimctl.Denoiser)")
    stats = stats if stats is not None else InversionStats()
    improved = solver == "improved"
    ts = model_times(plan, x0)
    B, S = x0.shape[0], len(plan)
    lams = [float(lam(float(plan.a[k]), float(plan.b[k]))) for k in range(S + 1)]
    a_clean = float(plan.a[S])
    coeffs = [update_coefficients(update, plan, k) for k in range(S)]
    uses_memory = _uses_memory(update, plan)
    share = tol / math.sqrt(S) if improved else tol

    xs: list[Tensor | None] = [None] * (S + 1)  # states, xs[S] = the data
    outs: list[tuple[Tensor, Tensor] | None] = [None] * S  # model outputs at xs[k] (k < S)
    xs[S] = x0
    idx_all = torch.arange(B, device=x0.device)
    step_iters = [torch.zeros(B, dtype=torch.long, device=x0.device) for _ in range(S)]  # by inverse step n
    calls = torch.zeros(B, dtype=torch.long, device=x0.device)
    # classifier-free guidance mixes two model outputs with weights w and 1 - w: a perturbation's effect on the
    # decoded image can grow by |w| + |1 - w| (1 without guidance)
    # (the step into the clean end is the exception: its residual is the decoded image's miss itself, with no
    # model call after it to amplify it)
    guide = float(getattr(denoise, "guidance_gain", 1.0))
    gains = [(guide if k < S - 1 else 1.0) * a_clean / math.hypot(float(plan.a[k + 1]), float(plan.b[k + 1]))
             if improved else 1.0 for k in range(S)]
    need = torch.ones(B, dtype=torch.bool, device=x0.device)
    for sweep in range(1):
        stats.sweeps += 1
        first = sweep == 0
        prev_outs = list(outs)
        for n, k in enumerate(range(S - 1, -1, -1)):
            a, b = float(plan.a[k]), float(plan.b[k])
            alpha, beta, gamma = coeffs[k]
            dx0, deps = denoise.frozen_jacobian(a, b)
            c = alpha + beta * dx0 + gamma * deps
            target = xs[k + 1]

            def memory(out_k: tuple[Tensor, Tensor], idx: Tensor, k=k, first=first, prev_outs=prev_outs):
                """outs[0 .. k-1] for the images ``idx``: extrapolated (first sweep) or the previous sweep's."""
                if k == 0 or not uses_memory:
                    return [out_k] * k  # not read by the update
                if not first:
                    return [(o[0][idx], o[1][idx]) for o in prev_outs[:k]]
                nxt = outs[k + 1] if k + 1 < S else None
                return [tuple(_extrapolate(out_k[i], None if nxt is None else nxt[i][idx], lams[k], lams[k + 1],
                                           lams[j]) for i in (0, 1)) for j in range(k)]

            def evaluate(x: Tensor, idx: Tensor, k=k, a=a, b=b, memory=memory):
                out = _select(denoise, idx)(x, ts[k : k + 1], a, b)
                stats.model_calls += 1
                return update(plan, k, x, memory(out, idx) + [out]), out

            if not first:
                # the previous solution, moved by a frozen-model Newton step for the new target and memory
                stepped = update(plan, k, xs[k], memory(prev_outs[k], idx_all) + [prev_outs[k]])
                guess = xs[k] + (target - stepped) / c
            elif improved:
                guess = _first_guess(update, plan, k, xs, outs, lams, memory)
            else:  # the earlier solve's first guess: plain DDIM inversion, one model call
                p_x0, p_eps = denoise(target, ts[k : k + 1], plan.a[k + 1], plan.b[k + 1])
                stats.model_calls += 1
                calls += 1
                guess = ddim_step(p_x0, p_eps, a, b)
            # the step into the clean end (x_{k+1} = the data): Newton-Krylov from the start (see _solve)
            # (under guidance only: without it the frozen-model iteration gets there, and Krylov steps from the
            # start cost 5-step solves more calls and a worse result)
            clean_end = guide > 1.0 and improved and krylov and k == S - 1 and float(plan.b[S]) == 0.0
            res = _solve(evaluate, target, guess, c, need, tol_res=share / gains[k],
                         tol_change=_change_tolerance(share, a_clean, a, b) if improved else None, max_iter=max_iter,
                         krylov=krylov and improved, stats=stats, krylov_first=clean_end,
                         stall_window=STALL_WINDOW if improved else None, stall_far=guide > 1.0 and not clean_end)
            if first:
                xs[k], outs[k] = res.x, (res.x0, res.eps)
            else:  # images that needed no new sweep keep what they had
                m = _bcast(need, res.x)
                xs[k] = torch.where(m, res.x, xs[k])
                outs[k] = (torch.where(m, res.x0, outs[k][0]), torch.where(m, res.eps, outs[k][1]))
            step_iters[n] += res.iterations
            calls += res.calls
            if callback is not None and first:
                callback({"step": n + 1, "total": S, "x": xs[k], "x0": outs[k][0]})
    if uses_memory:
        _global_newton(update, denoise, plan, ts, xs, outs, gains, share, max_sweeps, stats, calls, step_iters)
    if stats.keep_offsets:
        stats.offsets = [None] * S
    stats.bounds = [share / g for g in gains]
    for n, k in enumerate(range(S - 1, -1, -1)):
        miss = xs[k + 1] - update(plan, k, xs[k], list(outs[: k + 1]))
        if stats.keep_offsets:
            stats.offsets[k] = miss
        stats._record(_rms(miss), step_iters[n], calls if n == 0 else torch.zeros_like(calls))
    return xs[0]


def _global_newton(update, denoise, plan, ts, xs, outs, gains, share, max_rounds, stats, calls, step_iters):
    """Make a multistep trajectory consistent: frozen-model Newton on all states at once, Anderson-accelerated.

    With the model outputs held, every step's residual ``R_k = x_{k+1} - update(plan, k, x_k, outs)`` is affine
    in the states with scalar slopes (the update's coefficients times ``frozen_jacobian``), the same for every
    pixel: one S x S matrix M, so a Newton correction is ``-M^-1 R`` applied along the steps. It couples a step to
    the earlier states its memory reads, which a step-by-step re-solve cannot (that converged at ~0.9 per sweep
    on the built-in model). Each round evaluates the model once at every state (S calls). Updates ``xs`` and
    ``outs`` in place; images stop on their own once no step misses by more than its share.
    """
    S = len(plan)
    B = xs[S].shape[0]
    dev = xs[S].device
    M = torch.zeros(S, S, dtype=torch.float64)
    for k in range(S):
        if k + 1 < S:
            M[k, k + 1] = 1.0
        for j, (alpha, beta, gamma) in enumerate(_all_coefficients(update, plan, k)):
            a_j, b_j = float(plan.a[j]), float(plan.b[j])
            # the Jacobian of the optimal denoiser for data N(0, s^2 I): x0 follows x near the data and
            # ignores it near pure noise (a frozen model output would have x0 follow x everywhere)
            dx0 = a_j * _S2 / (a_j * a_j * _S2 + b_j * b_j)
            deps = (1.0 - a_j * dx0) / b_j if b_j > 0 else 0.0
            M[k, j] -= (alpha if j == k else 0.0) + beta * dx0 + gamma * deps
    Minv = torch.linalg.inv(M).to(dev)
    shape = xs[S].shape
    active = torch.ones(B, dtype=torch.bool, device=dev)
    gs: list[Tensor] = []
    fs: list[Tensor] = []
    best = None
    for r in range(max_rounds + 1):
        R = torch.stack([xs[k + 1] - update(plan, k, xs[k], list(outs[: k + 1])) for k in range(S)], 1)  # (B, S, ...)
        worst = torch.stack([_rms(R[:, k]) * gains[k] for k in range(S)], 1).max(1).values / share
        # keep, per image, the most consistent trajectory seen (a round may make it worse where the surrogate
        # Jacobian is off)
        if best is None:
            best = (worst, [x.clone() for x in xs[:S]], [(o[0].clone(), o[1].clone()) for o in outs])
        else:
            better = worst < best[0]
            for k in range(S):
                m = _bcast(better, xs[k])
                best[1][k] = torch.where(m, xs[k], best[1][k])
                best[2][k] = (torch.where(m, outs[k][0], best[2][k][0]), torch.where(m, outs[k][1], best[2][k][1]))
            best = (torch.minimum(worst, best[0]), best[1], best[2])
        active &= worst > 1.0
        if not bool(active.any()) or r == max_rounds:
            break
        X = torch.stack(xs[:S], 1).flatten(2).double()  # (B, S, D)
        f = -(Minv.unsqueeze(0) @ R.flatten(2).double())  # (B, S, D): the frozen-model Newton correction
        g = (X + f).flatten(1)
        f = f.flatten(1)
        gs.append(g)
        fs.append(f)
        if len(fs) > 4:
            gs.pop(0)
            fs.pop(0)
        if len(fs) > 1:
            dF = torch.stack([fs[i + 1] - fs[i] for i in range(len(fs) - 1)], 2)
            dG = torch.stack([gs[i + 1] - gs[i] for i in range(len(gs) - 1)], 2)
            gram = dF.transpose(1, 2) @ dF
            ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(1).clamp(min=1e-300).view(-1, 1, 1)
            eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=dev)
            gam = torch.linalg.solve(gram + ridge * eye, dF.transpose(1, 2) @ f.unsqueeze(2))
            g = g - (dG @ gam).squeeze(2)
        X_new = g.view(B, S, -1)
        idx = active.nonzero().flatten()
        for k in range(S):
            xk = X_new[idx, k].to(xs[k].dtype).view(len(idx), *shape[1:])
            out = _select(denoise, idx)(xk, ts[k : k + 1], float(plan.a[k]), float(plan.b[k]))
            stats.model_calls += 1
            x_new, x0_new, eps_new = xs[k].clone(), outs[k][0].clone(), outs[k][1].clone()
            x_new[idx], x0_new[idx], eps_new[idx] = xk, out[0], out[1]
            xs[k], outs[k] = x_new, (x0_new, eps_new)
        calls[idx] += S
        for n in range(S):
            step_iters[n][idx] += 1
        stats.sweeps += 1
    for k in range(S):
        xs[k], outs[k] = best[1][k], best[2][k]


def _all_coefficients(update: PlanUpdate, plan: SamplingPlan, k: int) -> list[tuple[float, float, float]]:
    """For step k and each state j <= k: (coefficient of x_k if j == k else 0, of x0_hat_j, of eps_hat_j)."""
    zero = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    base = float(update(plan, k, zero, [(zero, zero)] * (k + 1)))
    alpha = float(update(plan, k, one, [(zero, zero)] * (k + 1))) - base
    out = []
    for j in range(k + 1):
        row = []
        for probe in ((one, zero), (zero, one)):
            outs = [(zero, zero)] * (k + 1)
            outs[j] = probe
            row.append(float(update(plan, k, zero, outs)) - base)
        out.append((alpha if j == k else 0.0, row[0], row[1]))
    return out


def _change_tolerance(share: float, a_clean: float, a: float, b: float) -> float:
    """The change of the denoised estimate at level (a, b) between two iterations below which a step stops.

    ``a_clean x0_hat`` is a one-step decode: for data of std s along a direction it sees a perturbation with gain
    ``a s^2 / (a^2 s^2 + b^2)`` where the sampler's path to the data has ``s / sqrt(a^2 s^2 + b^2)``, a factor
    ``sqrt(1 + sigma^2 / s^2)`` less (sigma = b / a); with s <= 1 that factor is at most ``sqrt(1 + sigma^2)``,
    so the proxy is trusted near the data and switched off towards pure noise. A tenth of the step's share.
    """
    if a <= 0:
        return 0.0
    return share / (10.0 * a_clean * math.sqrt(1.0 + (b / a) ** 2))


def _uses_memory(update: PlanUpdate, plan: SamplingPlan) -> bool:
    """Whether any step reads the outputs of earlier states (probed with scalars)."""
    zero = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    for k in range(1, len(plan)):
        for j in range(k):
            outs = [(zero, zero)] * (k + 1)
            base = float(update(plan, k, zero, outs))
            for i in (0, 1):
                probe = list(outs)
                probe[j] = (one, zero) if i == 0 else (zero, one)
                if float(update(plan, k, zero, probe)) != base:
                    return True
    return False


def _first_guess(update, plan, k, xs, outs, lams, memory):
    """x_k's first guess, without a model call: the data prediction at x_k extrapolated in log-SNR from the two
    solved states nearer the data, and the noise that makes step k land exactly on x_{k+1}."""
    S = len(plan)
    target = xs[k + 1]
    a, b = float(plan.a[k]), float(plan.b[k])
    idx = torch.arange(target.shape[0], device=target.device)
    if k + 1 < S:
        o1 = outs[k + 1]
        o2 = outs[k + 2] if k + 2 < S else None
        x0p = _extrapolate(o1[0], None if o2 is None else o2[0], lams[k + 1], lams[k + 2], lams[k])
        epsp = _extrapolate(o1[1], None if o2 is None else o2[1], lams[k + 1], lams[k + 2], lams[k])
    else:  # from the clean end: the data itself, no noise yet
        x0p = target / float(plan.a[S])
        epsp = torch.zeros_like(target)
    if b > 0:
        # update(x) with x0_hat = x0p and eps_hat = (x - a x0p) / b is affine in x: solve it for the target
        def f(x):
            out = (x0p, (x - a * x0p) / b)
            return update(plan, k, x, memory(out, idx) + [out])

        f0 = f(torch.zeros_like(target))
        slope = float((f(torch.ones_like(target)) - f0).flatten()[0])
        if abs(slope) > 1e-12:
            return (target - f0) / slope
    return a * x0p + b * epsp


@dataclass
class _Solution:
    x: Tensor
    x0: Tensor
    eps: Tensor
    residual: Tensor  # (B,) float64 RMS
    iterations: Tensor  # (B,) iterations each image took
    calls: Tensor  # (B,) model evaluations each image took


def _solve(evaluate, target, guess, coeff, active, *, tol_res, tol_change, max_iter, krylov, stats,
           memory: int = 4, krylov_dim: int = 4, fd_step: float = 1e-3, krylov_first: bool = False,
           stall_window: int | None = None, stall_far: bool = True) -> _Solution:
    """Solve ``evaluate(x)[0] == target`` for the ``active`` images; the others come back as ``guess`` with no work.

    ``evaluate(x, idx) -> (x_to, (x0_hat, eps_hat))``: one model call at x for the images ``idx``: only the images
    still solving are evaluated, and ``calls`` counts each image's own. Each image keeps its own Anderson history,
    residual and stopping point, so its result does not depend on the others in its batch; the best iterate
    (lowest residual) is returned with the model's outputs there.

    ``krylov_first``: every iteration is a Newton-Krylov step (where the budget allows one) until one makes the
    residual worse (then that image goes on as without it), and an image stops once a Krylov step removed less
    than :data:`FLOOR_GAIN` of its residual while it is within :data:`NEAR` x ``tol_res``.
    For the step into the clean end, where the frozen-model slope (x0_hat following x) is wrong in every direction
    the denoiser smooths: frozen-model iterations do not reduce the residual there, they only move x along those
    directions, and the backward walk then multiplies that drift by sigma_k / sigma_k+1 at every further step
    (docs/guided-inversion.md). What is left is the part of the image the model cannot produce (for a real digit
    about 2e-3 RMS on the built-in models), and the residual there is the decoded image's miss itself.
    ``stall_window``: an image also stops when its best residual has not fallen to :data:`STALL_PROGRESS` times
    what it was that many of its own model calls ago (half as many within :data:`NEAR` x ``tol_res``, where what is
    left is a floor of what the model can produce); further off only with ``stall_far``, over :data:`FOLD_WINDOW`
    calls: a residual that has stopped falling there, as under guidance at a fold of the step map with no preimage
    nearby, is not worth further iterations (the caller keeps what is left as an offset), while without guidance a
    slow solve of a huge step still gets there.
    """
    B = target.shape[0]
    dev = target.device
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    calls = torch.zeros(B, dtype=torch.long, device=dev)
    act = active.clone()
    x = guess
    best_x = x.clone()
    best_x0 = torch.zeros_like(target)
    best_eps = torch.zeros_like(target)
    best_to = torch.zeros_like(target)
    best_res = torch.full((B,), math.inf, dtype=torch.float64, device=dev)
    prev_x0 = None
    res_hist: list[Tensor] = []
    gs: list[Tensor] = []
    fs: list[Tensor] = []
    hist_from = torch.zeros(B, dtype=torch.long, device=dev)  # per image: history entries before this are void
    kry_count = torch.zeros(B, dtype=torch.long, device=dev)
    damp = torch.ones(B, dtype=torch.float64, device=dev)  # the safeguard's step length (see below)
    kry_from = torch.full((B,), math.inf, dtype=torch.float64, device=dev)  # best residual when the last Krylov step began
    kf = torch.full((B,), bool(krylov_first), dtype=torch.bool, device=dev)  # per image: Newton-Krylov first still
    last_kry = torch.zeros(B, dtype=torch.bool, device=dev)  # per image: the iterate just evaluated is a Krylov step's
    snaps: list[tuple[Tensor, Tensor]] = []  # stall window: (each image's calls, its best residual) per evaluation
    while bool(act.any()):
        idx = act.nonzero().flatten()
        x_to_i, (x0_i, eps_i) = evaluate(x[idx], idx)
        iters[idx] += 1
        calls[idx] += 1
        x_to = best_to.clone()
        x_to[idx] = x_to_i
        x0 = best_x0.clone()
        x0[idx] = x0_i
        eps = best_eps.clone()
        eps[idx] = eps_i
        r = target - x_to
        res = torch.where(act, _rms(r), best_res)
        better = act & (res < best_res)
        mb = _bcast(better, x)
        best_x, best_x0, best_eps, best_to = (torch.where(mb, x, best_x), torch.where(mb, x0, best_x0),
                                              torch.where(mb, eps, best_eps), torch.where(mb, x_to, best_to))
        best_res = torch.where(better, res, best_res)
        done = (res <= tol_res) | ~torch.isfinite(res) | (res > 1e3 * best_res.clamp(min=tol_res))
        if tol_change and prev_x0 is not None:  # stalled only where decoding does not look (see the docstring)
            done |= (_rms(x0 - prev_x0) <= tol_change) & (res <= 10 * tol_res)
        if krylov_first:
            # a Krylov step that made things worse (far from the solution, where the linear model is poor): that
            # image goes on with the frozen-model iteration; one that gained less than FLOOR_GAIN: the floor
            kf &= ~(last_kry & ~better)
            done |= act & kf & torch.isfinite(kry_from) & (best_res > kry_from * (1.0 - FLOOR_GAIN)) & (best_res <= NEAR * tol_res)
        if stall_window is not None:
            # the best residual of `window` of the image's own calls ago (inf until it has made that many): the
            # solve has stalled when the best has not fallen to STALL_PROGRESS x that since
            # (half the window within NEAR x the tolerance: a floor of what the model can produce, not a solve far off)
            near = best_res <= NEAR * tol_res
            window = torch.where(near, stall_window // 2, FOLD_WINDOW if stall_far else stall_window)
            ago = torch.full_like(best_res, math.inf)
            for c, b in snaps:
                ago = torch.where(c <= calls - window, b, ago)
            snaps.append((calls.clone(), best_res.clone()))
            done |= act & (best_res > STALL_PROGRESS * ago) & (near | stall_far)
        act = act & ~done & (iters < max_iter)  # each image's own budget (Krylov calls count in it)
        prev_x0 = x0
        res_hist.append(res)
        if not bool(act.any()):
            break
        # Anderson-accelerated frozen-model Newton step
        f = (r / coeff).flatten(1).double()  # (B, D)
        g = x.flatten(1).double() + f
        gs.append(g)
        fs.append(f)
        if len(fs) > memory + 1:
            gs.pop(0)
            fs.pop(0)
            hist_from = (hist_from - 1).clamp(min=0)
        if len(fs) > 1:
            m = len(fs) - 1
            valid = (torch.arange(m, device=dev).view(1, m) >= hist_from.view(-1, 1)).double()  # (B, m)
            dF = torch.stack([fs[i + 1] - fs[i] for i in range(m)], dim=2) * valid.unsqueeze(1)  # (B, D, m)
            dG = torch.stack([gs[i + 1] - gs[i] for i in range(m)], dim=2) * valid.unsqueeze(1)
            gram = dF.transpose(1, 2) @ dF  # (B, m, m)
            ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).sum(1).clamp(min=1e-300).view(-1, 1, 1)
            eye = torch.eye(m, dtype=gram.dtype, device=dev)
            gam = torch.linalg.solve(gram + ridge * eye + (1 - valid).unsqueeze(2) * eye,
                                     dF.transpose(1, 2) @ f.unsqueeze(2))  # (B, m, 1)
            g = g - (dG @ gam).squeeze(2)
        x_new = g.to(x.dtype).view_as(x)
        # safeguard: where the last iterate is no better than the best, restart from the best with a frozen-model
        # step, halved at each further failure (backtracking: repeating the same step from the same point would
        # cycle), and a fresh Anderson history; a success restores the full step
        worse = act & ~better & torch.isfinite(best_res)
        damp = torch.where(better, torch.ones_like(damp), damp)
        if bool(worse.any()):
            plain = best_x + _bcast(damp, best_x).to(best_x.dtype) * (target - best_to) / coeff
            x_new = torch.where(_bcast(worse, x_new), plain.to(x.dtype), x_new)
            hist_from = torch.where(worse, torch.full_like(hist_from, len(fs)), hist_from)
        damp = torch.where(worse, damp * 0.5, damp)
        # Newton-Krylov where the frozen-model iteration stalls
        stalled = torch.zeros_like(act)
        if krylov and len(res_hist) >= 4:
            # at most two within 10x of the tolerance (where the frozen-model iteration usually finishes the job); as many
            # as the budget allows while the residual is still far off (a huge step, as a tuned 3-step plan's
            # last, where the frozen-model slope is off by orders of magnitude)
            far = res > 10 * tol_res
            stalled = act & (res > 0.5 * res_hist[-4]) & ((kry_count < 2) | far) & (iters + krylov_dim < max_iter)
        if krylov:
            stalled = torch.where(kf, act & (iters + krylov_dim < max_iter), stalled)
        last_kry = stalled
        if bool(stalled.any()):
            sidx = stalled.nonzero().flatten()
            delta, used = _gmres_step(evaluate, best_x[sidx], best_to[sidx], target[sidx], sidx, krylov_dim,
                                      fd_step)
            calls[sidx] += used
            iters[sidx] += used
            stats.krylov_steps += 1
            kry_count[sidx] += 1
            kry_from[sidx] = best_res[sidx]
            x_new[sidx] = best_x[sidx] + delta
            hist_from[sidx] = len(fs)  # the Anderson history restarts at the Newton point
        x = torch.where(_bcast(act, x), x_new, x)
    # images never evaluated (inactive from the start) keep their guess
    untouched = ~torch.isfinite(best_res) & ~active
    if bool(untouched.any()):
        best_x = torch.where(_bcast(untouched, best_x), x, best_x)
    return _Solution(best_x, best_x0, best_eps, best_res, iters, calls)


def _gmres_step(evaluate, x, x_to, target, idx, m: int, fd_step: float):
    """A Newton step for ``update(x) = target`` by m GMRES iterations on the Jacobian, whose products with a
    vector are forward differences of the model (one call each); returns (delta, calls)."""
    r = (target - x_to).flatten(1).double()  # (n, D)
    n, D = r.shape
    beta = r.norm(dim=1).clamp(min=1e-300)
    V = [r / beta.unsqueeze(1)]
    H = torch.zeros(n, m + 1, m, dtype=torch.float64, device=r.device)
    eps_abs = fd_step * math.sqrt(D)  # a perturbation of RMS fd_step
    used = 0
    for i in range(m):
        q = (x.flatten(1).double() + eps_abs * V[i]).to(x.dtype).view_as(x)
        q_to, _ = evaluate(q, idx)
        used += 1
        w = ((q_to - x_to).flatten(1).double()) / eps_abs
        for j in range(i + 1):
            H[:, j, i] = (w * V[j]).sum(1)
            w = w - H[:, j, i].unsqueeze(1) * V[j]
        H[:, i + 1, i] = w.norm(dim=1)
        V.append(w / H[:, i + 1, i].clamp(min=1e-300).unsqueeze(1))
    rhs = torch.zeros(n, m + 1, 1, dtype=torch.float64, device=r.device)
    rhs[:, 0, 0] = beta
    y = torch.linalg.lstsq(H, rhs).solution  # (n, m, 1)
    delta = (torch.stack(V[:m], dim=2) @ y).squeeze(2)
    return delta.to(x.dtype).view_as(x), used


# ----------------------------------------------------------------------------------------------------------------
# BDIA: exactly invertible by construction


@sampling_function
def invert_bdia(
    denoise: Denoise,
    x0: Tensor,
    plan: SamplingPlan,
    gamma: float = 1.0,
    callback: Callback | None = None,
    stats: InversionStats | None = None,
) -> tuple[Tensor, Tensor]:
    """Invert the BDIA-DDIM sampler (:func:`ddimctl.sampler.sample_bdia`): returns its latent, the pair
    (x_0, x_1) of the plan's first two states, each (B, ...); one model call per step, no iteration.

    The state next to the data, x_{S-1}, is the plain DDIM inversion of x0 (any choice is exact: decoding walks
    the same recursion back); then each BDIA step is undone in closed form, ``x_{k-1} = (x_{k+1} -
    F_{k->k+1}(x_k)) / gamma + F_{k->k-1}(x_k)`` with F the DDIM step from x_k (:func:`ddimctl.sampler.bdia_step`
    solved for x_{k-1}).
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0 to invert BDIA, got {gamma}")
    stats = stats if stats is not None else InversionStats()
    ts = model_times(plan, x0)
    B, S = x0.shape[0], len(plan)
    ones = torch.ones(B, dtype=torch.long)
    # the state next to the data: plain DDIM inversion (the model at x0 with level S-1's time)
    pred_x0, pred_eps = denoise(x0, ts[S - 1 : S], plan.a[S], plan.b[S])
    stats.model_calls += 1
    stats._record(None, torch.zeros(B, dtype=torch.long), ones)
    x_next, x = x0, ddim_step(pred_x0, pred_eps, plan.a[S - 1], plan.b[S - 1])
    if callback is not None:
        callback({"step": 1, "total": S, "x": x, "x0": pred_x0})
    for n, k in enumerate(range(S - 1, 0, -1)):
        out = denoise(x, ts[k : k + 1], plan.a[k], plan.b[k])
        stats.model_calls += 1
        stats._record(None, torch.zeros(B, dtype=torch.long), ones)
        x_prev = bdia_step(x_next, out, plan, k, gamma, inverse=True)
        x_next, x = x, x_prev
        if callback is not None:
            callback({"step": n + 2, "total": S, "x": x, "x0": out[0]})
    return x, x_next


#: name -> f(denoise, x0, plan, exact, tol, max_iter, callback, stats) -> (x_T, x_1 or None); every sampler of
#: :data:`ddimctl.sampler.SAMPLE_FUNCTIONS` inverts.
def _inv_ddim(denoise, x0, plan, exact, tol, max_iter, callback, stats):
    return invert_ddim(denoise, x0, plan, callback, exact, tol, max_iter, stats), None


def _inv_bdia(denoise, x0, plan, exact, tol, max_iter, callback, stats):
    return invert_bdia(denoise, x0, plan, 1.0, callback, stats)


def invert_multistep_checked(update: PlanUpdate, denoise: Denoise, x0: Tensor, plan: SamplingPlan,
                             callback: Callback | None = None, tol: float = 1e-3, max_iter: int = 50,
                             stats: InversionStats | None = None) -> Tensor:
    """:func:`invert_multistep`, checked by decoding: per image, the latent whose sample with this sampler lands
    closer to x0, the multistep solve's or plain DDIM inversion's.

    The multistep solve is exact only where its extrapolated memory is right; on a trained model it misses by
    about 5e-3 MSE at 10 steps, and on some images (and for iPNDM's fourth-order memory, on most) by more than plain
    inversion does (benchmarks/inversion.py). Decoding both candidates costs 3 S calls more (the plain inversion
    and two decodes) and guarantees the result is never further than plain inversion's. ``stats`` records per
    image which was kept and the RMS (model units) by which its decode misses x0.
    """
    stats = stats if stats is not None else InversionStats()
    S = len(plan)
    x_T = invert_multistep(update, denoise, x0, plan, callback, tol, max_iter, stats)
    plain = invert_ddim(denoise, x0, plan, None, False, tol, max_iter, InversionStats())
    miss = _rms(run_plan_updates(update, denoise, x_T, plan) - x0)
    miss_plain = _rms(run_plan_updates(update, denoise, plain, plan) - x0)
    keep_plain = miss_plain < miss
    stats.model_calls += 3 * S
    stats.image_calls = [c + 3 * S for c in stats.image_calls]
    stats.image_plain_kept = [bool(v) for v in keep_plain.tolist()]
    stats.image_round_trip = [float(v) for v in torch.minimum(miss, miss_plain).tolist()]
    return torch.where(_bcast(keep_plain, x_T), plain, x_T)


def _inv_multistep(update: PlanUpdate) -> Callable[..., "tuple[Tensor, None]"]:
    """The registry's inversion for a multistep sampler given by its plan update; plain inversion is DDIM's."""

    def run(denoise, x0, plan, exact, tol, max_iter, callback, stats):
        if not exact:
            return invert_ddim(denoise, x0, plan, callback, False, tol, max_iter, stats), None
        return invert_multistep_checked(update, denoise, x0, plan, callback, tol, max_iter, stats), None

    return run


# ----------------------------------------------------------------------------------------------------------------
# FireFlow: its own reversed scheme (plain), and exact inversion over the states where it calls the model
#
# FireFlow (:func:`ddimctl.sampler.sample_fireflow`) calls the model at x_T and then once per step at the step's
# midpoint y_k, whose velocity is reused to start step k + 1. Written over the states where it calls the model --
# x_T, y_0, ..., y_{S-1}, and the data -- it is a two-step linear multistep method: y_{k+1} follows from y_k, the
# output at y_k and the output at y_{k-1} (walk back from y_k to x_k along the reused velocity, take the step, walk
# on to the next midpoint). That is a plan update (:data:`PlanUpdate`) on the "call plan" of those S + 2 levels, so
# the exact inversion is :func:`invert_multistep` on it, the same solver as every multistep sampler's.


def fireflow_call_plan(plan: SamplingPlan, mid: Midpoints | None = None) -> SamplingPlan:
    """The S + 1 model calls of FireFlow on ``plan`` as a plan of S + 2 levels: level 0 of ``plan`` (x_T), the S
    midpoints (:func:`ddimctl.sampler.fireflow_midpoints`), and the clean end."""
    mid = mid if mid is not None else fireflow_midpoints(plan)
    S = len(plan)
    cat = (lambda vs: torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in vs])) if plan_requires_grad(
        plan) else (lambda vs: np.asarray([float(v) for v in vs], np.float64))
    return SamplingPlan(cat([plan.timesteps[0], *mid.timesteps]), cat([plan.a[0], *mid.a, plan.a[S]]),
                        cat([plan.b[0], *mid.b, plan.b[S]]), plan.schedule)


def fireflow_plan_update(plan: SamplingPlan, mid: Midpoints | None = None) -> PlanUpdate:
    """FireFlow on ``plan`` as a plan update over its call plan (:func:`fireflow_call_plan`): step j goes from the
    j-th call's point to the next one's. With ``outs[j]`` the outputs at call j (j = 0 at x_T, j = k + 1 at step k's
    midpoint), step 0 is the first half step from x_T, and step j >= 1 undoes step k = j - 1's half step (back from
    y_k to x_k along its starting velocity, outs[j - 1]), takes step k with the midpoint velocity (outs[j]) and the
    next half step with it. Each piece is the sampler's own :func:`ddimctl.sampler.flow_step`; run by
    :func:`run_plan_updates` it equals :func:`ddimctl.sampler.sample_fireflow` up to rounding (float64: tested)."""
    mid = mid if mid is not None else fireflow_midpoints(plan)
    S = len(plan)

    def half_step(x: Tensor, k: int, out: tuple[Tensor, Tensor], back: bool = False) -> Tensor:
        """x_k -> y_k along ``out`` (y_k -> x_k when ``back``); no move for a node at the step's start."""
        if mid.fraction[k] == 0:
            return x
        ends = ((mid.a[k], mid.b[k]), (plan.a[k], plan.b[k]))
        (a, b), (a_to, b_to) = ends if back else ends[::-1]
        return flow_step(x, a, b, out[0], out[1], a_to, b_to)

    def update(call_plan: SamplingPlan, j: int, x: Tensor, outs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        if j == 0:
            return half_step(x, 0, outs[0])
        k = j - 1
        x_k = half_step(x, k, outs[k], back=True)
        x_next = flow_step(x_k, plan.a[k], plan.b[k], *_blend(outs[k], outs[j], mid.weight(k)), plan.a[k + 1],
                           plan.b[k + 1])
        return x_next if j == S else half_step(x_next, j, outs[j])

    return update


@sampling_function
def invert_fireflow_plain(denoise: Denoise, x0: Tensor, plan: SamplingPlan, callback: Callback | None = None,
                          stats: InversionStats | None = None) -> Tensor:
    """FireFlow's own inversion: the same scheme walked from the data to x_T (:func:`ddimctl.sampler.fireflow_step`
    with ``inverse=True``), S + 1 model calls: one at the data (the clean end's model time), then one per step at
    the same midpoints as sampling. Second order, not exact: sampling its x_T misses x0 by O(h^2)."""
    stats = stats if stats is not None else InversionStats()
    mid = fireflow_midpoints(plan)
    ts_mid = model_times(mid, x0)
    B, S = x0.shape[0], len(plan)
    t_end = torch.as_tensor(_clean_end_time(plan), dtype=ts_mid.dtype).reshape(1).to(x0.device)
    out = denoise(x0, t_end, plan.a[S], plan.b[S])  # the velocity at the data: the first step's starting velocity
    stats.model_calls += 1
    x = x0
    for n, k in enumerate(range(S - 1, -1, -1)):
        x, out = fireflow_step(x, out, denoise, ts_mid[k : k + 1], plan, mid, k, inverse=True)
        stats.model_calls += 1
        stats._record(None, torch.zeros(B, dtype=torch.long), torch.full((B,), 2 if n == 0 else 1, dtype=torch.long))
        if callback is not None:
            callback({"step": n + 1, "total": S, "x": x, "x0": out[0]})
    return x


#: Rounds of Newton on the whole trajectory after the step-by-step solve (:func:`_global_newton`): FireFlow's
#: reused velocity ties every step to the one before, so the step-by-step solve alone is not exact.
FIREFLOW_SWEEPS = 20


def invert_fireflow(denoise: Denoise, x0: Tensor, plan: SamplingPlan, callback: Callback | None = None,
                    exact: bool = True, tol: float = 1e-3, max_iter: int = 50, stats: InversionStats | None = None,
                    max_sweeps: int = FIREFLOW_SWEEPS, checked: bool = True) -> Tensor:
    """Invert FireFlow (:func:`ddimctl.sampler.sample_fireflow`): x_T (B, ...) whose FireFlow sample is x0.

    Plain (``exact=False``): :func:`invert_fireflow_plain`, FireFlow's reversed scheme.

    Exact: :func:`invert_multistep` on FireFlow's call plan (:func:`fireflow_call_plan`,
    :func:`fireflow_plan_update`): each of the S + 1 inverse steps (one per model call, from the clean end) solved
    implicitly by the shared solver, the reused velocity of the step before estimated by extrapolation, then up to
    ``max_sweeps`` rounds of Newton on the whole trajectory (:func:`_global_newton`) until every step is consistent
    with the velocities it reuses, to ``tol`` (the RMS error, model units, it may leave in the decoded sample). On
    the analytic oracles that is exact to the tolerance (tests/test_fireflow.py). ``checked``: decode the result and
    FireFlow's plain inversion and keep, per image, the one that lands closer (as :func:`invert_multistep_checked`;
    3 (S + 1) calls more): ``stats`` records which was kept and the RMS by which its decode misses x0.
    """
    stats = stats if stats is not None else InversionStats()
    if not exact:
        return invert_fireflow_plain(denoise, x0, plan, callback, stats)
    mid = fireflow_midpoints(plan)
    x_T = invert_multistep(fireflow_plan_update(plan, mid), denoise, x0, fireflow_call_plan(plan, mid), callback,
                           tol=tol, max_iter=max_iter, stats=stats, max_sweeps=max_sweeps)
    if not checked:
        return x_T
    with torch.set_grad_enabled(plan_requires_grad(plan)):
        plain = invert_fireflow_plain(denoise, x0, plan, None, InversionStats())
        miss = _rms(sample_fireflow(denoise, x_T, plan) - x0)
        miss_plain = _rms(sample_fireflow(denoise, plain, plan) - x0)
    keep_plain = miss_plain < miss
    extra = 3 * (len(plan) + 1)
    stats.model_calls += extra
    stats.image_calls = [c + extra for c in stats.image_calls]
    stats.image_plain_kept = [bool(v) for v in keep_plain.tolist()]
    stats.image_round_trip = [float(v) for v in torch.minimum(miss, miss_plain).tolist()]
    return torch.where(_bcast(keep_plain, x_T), plain, x_T)


def _inv_fireflow(denoise, x0, plan, exact, tol, max_iter, callback, stats):
    return invert_fireflow(denoise, x0, plan, callback, exact, tol, max_iter, stats), None


INVERT_FUNCTIONS: dict[str, Callable[..., "tuple[Tensor, Tensor | None]"]] = {
    "ddim": _inv_ddim,
    "dpm++2m": _inv_multistep(dpmpp_2m_plan_update),
    "bdia": _inv_bdia,
    "dpm++3m": _inv_multistep(dpmpp_3m_plan_update),
    "unipc": _inv_multistep(unipc_plan_update),
    "ipndm": _inv_multistep(ipndm_plan_update),
    "fireflow": _inv_fireflow,
}
