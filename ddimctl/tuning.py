"""Per-model tuned sampling schedules: learn the S noise levels at which a sampler calls the model.

LD3's recipe (Tong et al. 2024, arXiv 2405.15506): draw K seeded noises, sample each with many model calls (the
reference, e.g. UniPC with 200 calls), then learn the S levels that make the S-call sampler land closest to the
reference, by gradient descent *through the sampler* on the log-SNR of the levels. The levels are parameterized
so that they stay ordered and inside the model's training range: with ``w = softmax(theta)`` (S weights),

    lambda_k = lambda_lo + (lambda_hi - lambda_lo) * (w_0 + ... + w_(k-1)),   k = 1 .. S-1

between the least noisy training level lambda_hi and lambda_lo (the start, or the first finite level when the
start is pure noise); the first call stays at the start and the last step goes to the clean end, as every other
plan. ``theta = 0`` is exactly the ``logsnr`` spacing. Model times follow the levels through the schedule
(:class:`LevelMap`, differentiable), so the model is called where its input's noise level is.

A tuned schedule is saved as a small JSON file (:mod:`ddimctl.schedule_files`) that names the model and revision,
the sampler, S, the levels and the errors measured on the training noises and on held-out ones; a command refuses
a file tuned for another model, sampler or noise schedule. :meth:`ddimctl.engine.Engine.tune` tunes a loaded model.

    ref = reference_samples(denoise, schedule, noises)                       # (K, ...) x0 with 200 calls
    plan = tune_plan(denoise, schedule, 10, "unipc", noises, reference=ref)  # a SamplingPlan with 10 calls
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .sampler import SAMPLE_FUNCTIONS, SAMPLERS, Denoise, sample
from .schedule import SamplingPlan, Schedule, make_plan, plan_from_lambdas, shift_sigma

#: The sampler and number of calls of the reference that tuning matches by default (a third-order sampler on
#: log-SNR steps; 200 calls is far more accurate than anything tuned at <= 20 calls, benchmarks/samplers.py).
REFERENCE_SAMPLER, REFERENCE_STEPS = "unipc", 200


# ----------------------------------------------------------------------------------------------------------------
# Levels <-> model times, differentiable


class LevelMap:
    """Differentiable maps between log-SNR lambda, model time t and the levels (a, b) of a schedule, matching
    :meth:`Schedule.ab` and :meth:`Schedule.time_of_lambda` (float64 tensors in, float64 tensors out).

    VP: ``a^2 = sigmoid(2 lambda)``, ``b^2 = sigmoid(-2 lambda)``, and ``log a`` is piecewise linear in t between
    the training timesteps. Flow: ``sigma = sigmoid(-lambda)``, ``(a, b) = (1 - sigma, sigma)``, ``t = sigma T``.
    """

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.T = schedule.num_train_timesteps
        if schedule.kind == "vp":
            with np.errstate(divide="ignore"):
                self.log_a = torch.as_tensor(0.5 * np.log(schedule.alphas_cumprod), dtype=torch.float64)  # (T,) decreasing

    def ab_of_lambda(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        if self.schedule.kind == "vp":
            return torch.sqrt(torch.sigmoid(2 * lam)), torch.sqrt(torch.sigmoid(-2 * lam))
        sigma = torch.sigmoid(-lam)
        return 1 - sigma, sigma

    def time_of_lambda(self, lam: Tensor) -> Tensor:
        if self.schedule.kind == "flow":
            return torch.sigmoid(-lam) * self.T
        log_a = -0.5 * torch.nn.functional.softplus(-2 * lam)
        table = self.log_a.to(lam.device)
        # segment i with table[i] >= log_a >= table[i + 1] (the table decreases in t)
        i = torch.searchsorted(-table, -log_a.detach()).clamp(1, self.T - 1) - 1
        lo, hi = table[i], table[i + 1]
        return i.to(lam.dtype) + (log_a - lo) / (hi - lo)

    def ab_of_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) at model times t (VP: log a interpolated linearly between training timesteps)."""
        if self.schedule.kind == "flow":
            s = t / self.T
            return 1 - s, s
        table = self.log_a.to(t.device)
        i = t.detach().floor().long().clamp(0, self.T - 2)
        w = t - i.to(t.dtype)
        log_a = (1 - w) * table[i] + w * table[i + 1]
        return torch.exp(log_a), torch.sqrt(-torch.expm1(2 * log_a))


def lambda_bounds(schedule: Schedule) -> tuple[float, float, float]:
    """(start, lo, hi): the log-SNR of the first call (-inf at pure noise), the lowest a tuned call may take
    (the start, or the first finite training level after pure noise) and the least noisy training level."""
    T = schedule.num_train_timesteps
    if schedule.kind == "vp":
        lam = schedule.lambdas()
        finite = lam[np.isfinite(lam)]
        return float(lam[-1]), float(finite.min()), float(finite.max())
    _, hi = schedule.lambda_range()
    s_lo = shift_sigma((T - 1) / T, schedule.shift)
    return -math.inf, math.log1p(-s_lo) - math.log(s_lo), hi


def plan_lambdas(plan: SamplingPlan) -> np.ndarray:
    """log(a / b) of a plan's S call levels (float64, (S,); -inf at pure noise)."""
    a, b = np.asarray(plan.a[:-1], np.float64), np.asarray(plan.b[:-1], np.float64)
    with np.errstate(divide="ignore"):
        return np.log(a) - np.log(b)


class PlanParameters:
    """The S noise levels of a plan as ``theta`` (S unconstrained values; see the module notes) and the
    differentiable map ``theta -> SamplingPlan`` whose levels and times are tensors that carry gradients."""

    def __init__(self, schedule: Schedule, steps: int):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.schedule, self.steps = schedule, steps
        self.start, self.lo, self.hi = lambda_bounds(schedule)
        self.map = LevelMap(schedule)
        if schedule.kind == "vp":
            self.end = (math.sqrt(schedule.final_alpha_cumprod), math.sqrt(1.0 - schedule.final_alpha_cumprod))
        else:
            self.end = (1.0, 0.0)

    def theta_from_lambdas(self, lambdas: Sequence[float]) -> Tensor:
        """theta that reproduces the call levels ``lambdas`` ((S,), increasing; the first is the start)."""
        lam = np.asarray(lambdas, np.float64)
        if len(lam) != self.steps:
            raise ValueError(f"expected {self.steps} levels, got {len(lam)}")
        span = self.hi - self.lo
        inner = np.clip(lam[1:], self.lo, self.hi)
        gaps = np.diff(np.concatenate([[self.lo], inner, [self.hi]]))  # (S,)
        return torch.as_tensor(np.log(np.maximum(gaps, 1e-4 * span)), dtype=torch.float64)

    def lambdas(self, theta: Tensor) -> Tensor:
        """The S call levels' log-SNR (the first fixed at the start)."""
        w = torch.softmax(theta, dim=0)
        inner = self.lo + (self.hi - self.lo) * torch.cumsum(w, dim=0)[:-1]  # (S-1,)
        start = torch.full((1,), self.start, dtype=torch.float64, device=theta.device)
        return torch.cat([start, inner])

    def plan(self, theta: Tensor) -> SamplingPlan:
        """The plan of ``theta``: a, b (S+1,) and timesteps (S,) as float64 tensors carrying theta's gradient."""
        lam = self.lambdas(theta)
        t_inner = self.map.time_of_lambda(lam[1:])
        t_inner = t_inner.clamp(0.0, float(self.schedule.num_train_timesteps - (1 if self.schedule.kind == "vp" else 0)))
        a_inner, b_inner = self.map.ab_of_time(t_inner)
        t0 = float(self.schedule.num_train_timesteps - 1 if self.schedule.kind == "vp" else self.schedule.num_train_timesteps)
        a0, b0 = self.schedule.ab(t0)
        one = lambda v: torch.tensor([v], dtype=torch.float64, device=theta.device)  # noqa: E731
        ts = torch.cat([one(t0), t_inner])
        a = torch.cat([one(a0), a_inner, one(self.end[0])])
        b = torch.cat([one(b0), b_inner, one(self.end[1])])
        return SamplingPlan(ts, a, b)


def detach_plan(plan: SamplingPlan) -> SamplingPlan:
    """A plan of float64 numpy arrays (what sampling uses outside tuning)."""
    conv = lambda v: v.detach().cpu().numpy().astype(np.float64) if torch.is_tensor(v) else np.asarray(v, np.float64)  # noqa: E731
    return SamplingPlan(conv(plan.timesteps), conv(plan.a), conv(plan.b))


# ----------------------------------------------------------------------------------------------------------------
# Reference samples and errors


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _sample_batches(denoise: Denoise, noises: Tensor, plan: SamplingPlan, sampler: str, batch_size: int,
                    callback_for: Callable[[slice], Any] | None = None):
    """(slice, x0) for each batch of ``noises`` sampled with ``plan``: ``denoise`` for each batch's noises only
    (a conditioned denoiser slices its conditions; a plain callable is the same for every noise), and
    ``callback_for(slice)`` the batch's callback."""
    for sl in _batches(len(noises), batch_size):
        part = denoise.select(sl) if hasattr(denoise, "select") else denoise
        yield sl, sample(part, noises[sl], plan, sampler, callback=None if callback_for is None else callback_for(sl))


def reference_samples(denoise: Denoise, schedule: Schedule, noises: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The x0 of each noise (K, ...) sampled with ``steps`` calls of ``sampler`` on ``logsnr`` steps: the samples of
    :func:`reference_trajectory` (same arguments), without keeping the trajectory."""
    return reference_trajectory(denoise, schedule, noises, *args, **kwargs, keep=False).x0


@torch.no_grad()
def plan_error(denoise: Denoise, plan: SamplingPlan, sampler: str, noises: Tensor, reference: Tensor,
               batch_size: int = 64) -> float:
    """RMS difference between the samples of ``plan`` from ``noises`` and ``reference`` (all values)."""
    total = sum(float((x0.double() - reference[sl].to(x0.device).double()).pow(2).sum())
                for sl, x0 in _sample_batches(denoise, noises, plan, sampler, batch_size))
    return math.sqrt(total / noises.numel())


# ----------------------------------------------------------------------------------------------------------------
# GITS: the best S of the reference's steps by dynamic programming (no gradient, no extra model call)


@dataclass
class Reference:
    """Reference samples and the trajectory that produced them: ``x0`` (K, ...); ``plan``: the fine plan (N
    calls); ``points[i]``, ``x0s[i]``: where call i was made and its data prediction (K, ...) each."""

    x0: Tensor
    plan: SamplingPlan
    points: list[Tensor] = field(default_factory=list)
    x0s: list[Tensor] = field(default_factory=list)


@torch.no_grad()
def reference_trajectory(
    denoise: Denoise,
    schedule: Schedule,
    noises: Tensor,
    sampler: str = REFERENCE_SAMPLER,
    steps: int = REFERENCE_STEPS,
    batch_size: int = 64,
    callback: Callable[[dict[str, Any]], None] | None = None,
    keep: bool = True,
) -> Reference:
    """The reference samples of ``noises`` (as :func:`reference_samples`) and, with ``keep``, every call's point
    and data prediction (for :func:`gits_lambdas`)."""
    plan = make_plan(schedule, steps, "logsnr")
    points, x0s = [[] for _ in range(steps)], [[] for _ in range(steps)]

    def callback_for(sl: slice):
        seen: list[Tensor] = [noises[sl]]

        def record(info: dict[str, Any]) -> None:
            if keep:
                k = info["step"] - 1
                points[k].append(seen[-1])  # the point the model was called at (the previous step's result)
                x0s[k].append(info["x0"])
                seen.append(info["x"])
            if callback is not None:
                callback(info)

        return record

    outs = [x0 for _, x0 in _sample_batches(denoise, noises, plan, sampler, batch_size, callback_for)]
    if not keep:
        return Reference(torch.cat(outs), plan)
    return Reference(torch.cat(outs), plan, [torch.cat(p) for p in points], [torch.cat(p) for p in x0s])


def gits_lambdas(ref: Reference, steps: int, discount: float = 1.0) -> np.ndarray:
    """GITS (Chen et al. 2024, arXiv 2405.11326): choose S of the reference's N call levels by dynamic programming
    over the costs of :func:`gits_costs`: the path of S jumps from call 0 to the clean end with the least summed
    cost, the k-th jump's cost (from 0) weighted by ``discount ** k`` (GITS' ``coeff``).
    Returns the S levels' log-SNR (the first is the start)."""
    N = len(ref.plan)
    if not 1 <= steps <= N:
        raise ValueError(f"steps must be between 1 and the reference's {N} calls, got {steps}")
    return plan_lambdas(ref.plan)[cheapest_path(gits_costs(ref), steps, discount)[:-1]]


def gits_costs(ref: Reference) -> np.ndarray:
    """(N + 1, N + 1) costs: ``cost[i, j]`` (i < j) is the distance between the first-order (DDIM) step from the
    reference's point i to level j and the reference's point at j (the clean end for j = N), averaged over the
    noises; inf elsewhere.

    It is measured in x itself, not in x / a as GITS does in EDM's coordinates: an error in x made at a noisy
    level passes on to the sample about unchanged, while x / a weighs it by 1 / a (on the built-in mnist that put
    every call of 5 above sigma = 1.8).
    """
    plan, N = ref.plan, len(ref.plan)
    a, b = np.asarray(plan.a, np.float64), np.asarray(plan.b, np.float64)
    targets = ref.points[1:] + [ref.x0]  # the reference at levels 1 .. N
    cost = np.full((N + 1, N + 1), np.inf)
    for i in range(N):
        x, x0 = ref.points[i].double(), ref.x0s[i].double()
        eps = (x - a[i] * x0) / b[i]
        for j in range(i + 1, N + 1):
            jump = a[j] * x0 + b[j] * eps  # the DDIM step i -> j
            cost[i, j] = float((jump - targets[j - 1].double()).flatten(1).norm(dim=1).mean())
    return cost


def cheapest_path(cost: np.ndarray, steps: int, discount: float = 1.0) -> list[int]:
    """The nodes 0 = i_0 < i_1 < ... < i_S = N (N + 1 = len(cost)) minimizing sum_k discount^k cost[i_k, i_(k+1)]."""
    N = len(cost) - 1
    V = np.full((N + 1, steps + 1), np.inf)  # V[i, k]: the least cost from node i to N in k jumps
    nxt = np.zeros((N + 1, steps + 1), dtype=np.int64)
    V[N, 0] = 0.0
    for k in range(1, steps + 1):
        for i in range(N):
            c = cost[i, i + 1 :] + discount * V[i + 1 :, k - 1]
            j = int(np.argmin(c))
            V[i, k], nxt[i, k] = c[j], i + 1 + j
    path = [0]
    for k in range(steps, 0, -1):
        path.append(int(nxt[path[-1], k]))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Tuning


@dataclass
class TuneReport:
    """What :func:`tune_plan` did: the training RMS error of the initial plan and of the best one, which candidate
    started (``init``) and each candidate's error, the error per gradient iteration (of the plan before that
    iteration's update) and the model calls spent (a forward with its backward counts as one; the reference's
    calls and the candidates' evaluations are not counted)."""

    initial_error: float = math.nan
    best_error: float = math.nan
    init: str | None = None
    init_errors: dict[str, float] = field(default_factory=dict)
    best_iteration: int = -1
    losses: list[float] = field(default_factory=list)
    model_calls: int = 0


METHODS = ("ld3", "gits")
#: The plans LD3 may start from (the best on the training noises starts): GITS' choice among the reference's steps
#: and two untuned spacings. On a Gaussian-mixture oracle GITS starts best for some samplers and call counts,
#: trailing or logsnr for others (benchmarks/samplers.py).
DEFAULT_INITS = ("gits", "logsnr", "trailing")


def tune_plan(
    denoise: Denoise,
    schedule: Schedule,
    steps: int,
    sampler: str,
    noises: Tensor,
    reference: Reference | Tensor | None = None,
    method: str = "ld3",
    init: SamplingPlan | str | None = None,
    iterations: int = 20,
    lr: float = 0.05,
    batch_size: int = 64,
    callback: Callable[[dict[str, Any]], None] | None = None,
    report: TuneReport | None = None,
) -> SamplingPlan:
    """Learn the S = ``steps`` noise levels at which ``sampler`` should call ``denoise`` so that the samples of
    ``noises`` (K, ...) land on the reference; returns the plan (float64 arrays).

    ``reference``: a :class:`Reference` (samples and trajectory, :func:`reference_trajectory`), or the reference
    samples alone (K, ...); by default the trajectory of :data:`REFERENCE_SAMPLER` with :data:`REFERENCE_STEPS`
    calls is computed here. ``method``:

    * ``"gits"``: the best S of the reference's steps for first-order jumps (:func:`gits_lambdas`; needs the
      trajectory): no gradient and no model call beyond the reference's;
    * ``"ld3"``: Adam on theta (module notes) for ``iterations`` steps of learning rate ``lr``, the loss being the
      mean squared error over all values, its gradient taken through the S-call sampler (model times included);
      from ``init``: a spacing name, ``"gits"`` or a plan, or a list of them, of which the one with the lowest
      training error starts (default: :data:`DEFAULT_INITS`, GITS only where the trajectory is known). The plan
      with the lowest training error seen is returned, the initial one included, so the result is never worse on
      the training noises than any of the candidates.

    ``batch_size``: noises per forward/backward (gradients are summed over all K each iteration). ``callback``
    gets ``phase`` ("reference" or "tuning"), ``step`` and ``total``, and ``error`` while tuning. Freeze the
    model's own parameters (``model.requires_grad_(False)``) to spare their gradients.
    """
    if sampler not in SAMPLE_FUNCTIONS:
        raise ValueError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")
    if method not in METHODS:
        raise ValueError(f"unknown tuning method {method!r} (expected one of {', '.join(METHODS)})")
    report = report if report is not None else TuneReport()
    if reference is None:
        progress = None if callback is None else (lambda info: callback({**info, "phase": "reference"}))
        reference = reference_trajectory(denoise, schedule, noises, batch_size=batch_size, callback=progress)
    ref_x0 = reference.x0 if isinstance(reference, Reference) else reference
    has_trajectory = isinstance(reference, Reference) and len(reference.points) > 0
    if method == "gits":  # GITS' plan as it is: the only candidate, no gradient step
        init, iterations = "gits", 0
    if init is None:
        init = [c for c in DEFAULT_INITS if c != "gits" or has_trajectory]
    candidates = list(init) if isinstance(init, (list, tuple)) else [init]
    if not candidates:
        raise ValueError("tune_plan needs at least one initial plan")
    for i, cand in enumerate(candidates):
        if cand == "gits":
            if not has_trajectory:
                raise ValueError("GITS needs the reference's trajectory (a Reference from reference_trajectory)")
            plan = plan_from_lambdas(schedule, gits_lambdas(reference, steps))
        else:
            plan = make_plan(schedule, steps, cand) if isinstance(cand, str) else detach_plan(cand)
        if len(plan) != steps:
            raise ValueError(f"the initial plan has {len(plan)} calls, not {steps}")
        name = cand if isinstance(cand, str) else f"plan {i}"
        report.init_errors[name] = plan_error(denoise, plan, sampler, noises, ref_x0, batch_size)
        if report.init is None or report.init_errors[name] < report.initial_error:
            report.init, report.initial_error, best_plan = name, report.init_errors[name], plan
    report.best_error = report.initial_error
    params = PlanParameters(schedule, steps)
    if steps == 1:  # nothing to tune: one call at the start, one step to the clean end
        return best_plan
    theta = params.theta_from_lambdas(plan_lambdas(best_plan)).to(noises.device).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    n_values = noises.numel()
    for it in range(iterations):
        opt.zero_grad()
        total = 0.0
        for sl in _batches(len(noises), batch_size):
            plan = params.plan(theta)  # rebuilt per batch (cheap), so each backward frees its whole graph
            x0 = sample(denoise.select(sl) if hasattr(denoise, "select") else denoise, noises[sl], plan, sampler)
            loss = (x0.double() - ref_x0[sl].to(x0.device).double()).pow(2).sum() / n_values
            loss.backward()
            total += float(loss.detach())
            report.model_calls += steps
        error = math.sqrt(total)  # the training error of the plan before this update
        report.losses.append(error)
        if error < report.best_error:
            report.best_error, report.best_iteration = error, it
            best_plan = detach_plan(plan)
        opt.step()
        if callback is not None:
            callback({"phase": "tuning", "step": it + 1, "total": iterations, "error": error})
    return best_plan
