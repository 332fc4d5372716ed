"""Noise schedules and timestep selection. Pure math, float64 on the host.

Every process ddimctl samples is written as ``x_t = a_t * x0 + b_t * eps``:

* variance-preserving (DDPM): ``a_t = sqrt(alphas_cumprod[t])``, ``b_t = sqrt(1 - alphas_cumprod[t])`` for the
  integer training timesteps ``t = 0 .. T-1``; the model is called with ``t``. Between two training timesteps
  ``log a_t`` is interpolated linearly in t (DPM-Solver's continuous-time view of a discrete model), so a plan may
  call the model at a fractional time;
* rectified flow: ``a = 1 - sigma``, ``b = sigma`` for ``sigma`` in [0, 1]; the model is called with
  ``sigma * T`` (diffusers' flow convention, ``T = num_train_timesteps``, 1000 by default).

:func:`make_plan` turns a schedule and a number of steps into a :class:`SamplingPlan`: the S model times to call
and the S + 1 noise levels ``(a_k, b_k)`` that the sampler walks through, the last one being the clean end.
The sampler core only ever sees a plan, so it never branches on the model family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

Kind = Literal["vp", "flow"]
SPACINGS = ("leading", "trailing", "linspace", "quad", "logsnr", "pipeline")
#: The spacing a model family defines itself (the time steps of its own diffusers pipeline); :func:`make_plan`
#: has no schedule-only form of it, the family's ``LoadedModel.plan_for_shape`` makes it.
FAMILY_SPACING = "pipeline"
#: How each spacing places its S model calls (S = steps; the (S+1)-th level is always the clean end):
SPACING_DOCS = {
    "leading": "t = k * (T // S) + offset, k = S-1 .. 0 (diffusers); the last call is at t = offset",
    "trailing": "t = round(T - k T / S) - 1, k = 0 .. S-1 (diffusers); starts at t = T-1, the last call at t ~ T/S - 1",
    "linspace": "S times evenly spaced over [0, T-1], both ends included (diffusers); the last call at t = 0",
    "quad": "t = floor((k sqrt(0.8 T) / (S-1))^2) (the DDIM paper); the last call at t = 0",
    "logsnr": "S+1 nodes uniform in log-SNR from the noisiest to the least noisy training time; the model is called "
              "at the first S (fractional times), the last step goes to the clean end instead of the last node",
    "pipeline": "the sigmas of the model's own diffusers pipeline, for the families that define them (SD3, Flux: "
                "their default); a family-independent schedule has none",
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class Schedule:
    """A noise schedule.

    ``kind="vp"``: ``alphas_cumprod`` holds the T cumulative products (float64, shape (T,)).
    ``kind="flow"``: rectified flow, ``shift`` warps sigma as ``shift*s / (1 + (shift-1)*s)``.
    ``final_alpha_cumprod`` is the alpha-bar of the clean end that the last step lands on (1.0 when
    ``set_alpha_to_one``; ``alphas_cumprod[0]`` otherwise, as in diffusers' DDIMScheduler).
    """

    kind: Kind
    num_train_timesteps: int = 1000
    alphas_cumprod: np.ndarray | None = field(default=None, repr=False)
    final_alpha_cumprod: float = 1.0
    shift: float = 1.0

    def ab(self, t: float) -> tuple[float, float]:
        """(a_t, b_t) at a model time t: an integer timestep for VP; ``sigma * T`` (sigma already shifted) for flow.

        VP at a fractional t interpolates ``log a`` linearly between the two training timesteps around it (as
        DPM-Solver's ``NoiseScheduleVP('discrete')``); an integer t reads the table, exactly as before.
        """
        if self.kind == "vp":
            T = len(self.alphas_cumprod)
            if not -1e-9 <= t <= T - 1 + 1e-9:
                raise ValueError(f"model time {t} is outside the training range 0..{T - 1}")
            i = int(round(t))
            if abs(t - i) <= 1e-9:
                abar = float(self.alphas_cumprod[i])
                return math.sqrt(abar), math.sqrt(1.0 - abar)
            i = min(int(math.floor(t)), T - 2)
            w = t - i
            log_a = self._log_a()
            la = (1.0 - w) * float(log_a[i]) + w * float(log_a[i + 1])
            return math.exp(la), math.sqrt(-math.expm1(2.0 * la))
        s = t / self.num_train_timesteps
        return 1.0 - s, s

    def _log_a(self) -> np.ndarray:
        """log a_t = log(alphas_cumprod) / 2 at each training timestep (VP), float64 (T,); -inf at zero SNR."""
        with np.errstate(divide="ignore"):
            return 0.5 * np.log(self.alphas_cumprod)

    def time_of_lambda(self, lam: float) -> float:
        """The model time whose level has ``log(a / b) = lam`` (the inverse of :meth:`ab` through lambda).

        VP: inverts the piecewise-linear ``log a`` of :meth:`ab`; lam must lie within the training range.
        Flow: ``sigma = 1 / (1 + exp(lam))``, time ``sigma * T`` (pure noise at lam = -inf).
        """
        if self.kind == "vp":
            log_a = -0.5 * math.log1p(math.exp(-2.0 * lam)) if lam > -350 else lam  # a^2 = sigmoid(2 lam)
            table = self._log_a()  # decreasing in t
            if not table[-1] - 1e-12 <= log_a <= table[0] + 1e-12:
                raise ValueError(f"log-SNR {lam:.4g} is outside the model's training range")
            return float(np.interp(log_a, table[::-1], np.arange(len(table), dtype=np.float64)[::-1]))
        sigma = 1.0 / (1.0 + math.exp(lam)) if lam < 700 else 0.0
        return sigma * self.num_train_timesteps

    def lambda_range(self) -> tuple[float, float]:
        """(noisiest, least noisy) log-SNR the model was trained on; the first may be -inf (zero terminal SNR, flow)."""
        if self.kind == "vp":
            lam = self.lambdas()
            return float(lam[-1]), float(lam[0])
        T = self.num_train_timesteps
        hi = shift_sigma(1.0 / T, self.shift)
        return -math.inf, math.log1p(-hi) - math.log(hi)

    def lambdas(self) -> np.ndarray:
        """log(a_t / b_t) for each integer training timestep (flow: at sigma = (t + 1) / T); float64, (T,)."""
        with np.errstate(divide="ignore"):
            if self.kind == "vp":
                return 0.5 * (np.log(self.alphas_cumprod) - np.log1p(-self.alphas_cumprod))
            T = self.num_train_timesteps
            s = np.array([shift_sigma((t + 1) / T, self.shift) for t in range(T)])
            return np.log1p(-s) - np.log(s)


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
) -> np.ndarray:
    """Betas (float64, shape (T,)) as diffusers builds them for each ``beta_schedule``."""
    T = num_train_timesteps
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float64)
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine schedule, betas capped at 0.999 (diffusers' betas_for_alpha_bar).
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r} (expected one of {', '.join(BETA_SCHEDULES)})")
    if betas.ndim != 1 or len(betas) == 0 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a non-empty 1-D sequence of values in (0, 1]")
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, arXiv 2305.08891, Algorithm 1)."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)  # shift the end to 0, keep the start
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def vp_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
    set_alpha_to_one: bool = True,
) -> Schedule:
    """A variance-preserving (DDPM) schedule; arguments and defaults follow diffusers' DDIMScheduler."""
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
    return Schedule("vp", len(betas), alphas_cumprod, final)


def flow_schedule(num_train_timesteps: int = 1000, shift: float = 1.0) -> Schedule:
    """A rectified-flow schedule ``x_t = (1 - s) x0 + s eps`` with optional sigma ``shift``."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return Schedule("flow", num_train_timesteps, None, 1.0, float(shift))


def shift_sigma(sigma: float, shift: float) -> float:
    """``shift*s / (1 + (shift-1)*s)``: the resolution shift of SD3 / diffusers' FlowMatchEuler scheduler."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def select_timesteps(
    num_train_timesteps: int,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    lambdas: np.ndarray | None = None,
) -> np.ndarray:
    """The S integer training timesteps to visit, in decreasing order (int64, shape (S,)).

    ``leading``, ``trailing`` and ``linspace`` equal diffusers' DDIMScheduler.set_timesteps; ``quad`` is the DDIM
    paper's quadratic spacing ``(linspace(0, sqrt(0.8 T), S))**2``; ``logsnr`` gives the training timesteps nearest
    to the S calls of :func:`logsnr_nodes` (needs ``lambdas``, one per training timestep), duplicates removed
    (:func:`make_plan` calls the model at the exact fractional times instead). ``quad`` and ``logsnr`` may return
    fewer than S timesteps when S is close to T.
    """
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and the {T} training timesteps, got {steps}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    elif spacing == "quad":
        # The DDIM paper's code casts to int, which repeats t = 0 for large S; repeats are dropped.
        ts = np.unique(np.floor((np.linspace(0, math.sqrt(T * 0.8), steps)) ** 2) + steps_offset)[::-1]
    elif spacing == "logsnr":
        if lambdas is None:
            raise ValueError("logsnr spacing needs the schedule's log-SNR per timestep")
        ts = _logsnr_timesteps(np.asarray(lambdas, np.float64), steps)
    else:
        raise ValueError(f"unknown spacing {spacing!r} (expected one of {', '.join(SPACINGS)})")
    ts = ts.astype(np.int64)
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(f"spacing {spacing!r} with steps_offset {steps_offset} leaves the range 0..{T - 1}")
    return ts.copy()


def _logsnr_timesteps(lam: np.ndarray, steps: int) -> np.ndarray:
    """The training timesteps nearest to :func:`logsnr_nodes`' S model calls (duplicates removed)."""
    finite = np.isfinite(lam)
    targets = _uniform_nodes(float(lam[finite].min()), float(lam[finite].max()), steps, not finite[-1])[:-1]
    ts = np.abs(np.where(finite, lam, np.inf)[None, :] - targets[:, None]).argmin(axis=1)
    if not finite[-1]:
        ts[0] = len(lam) - 1  # start from pure noise
    return np.unique(ts)[::-1]


def _uniform_nodes(lo: float, hi: float, steps: int, infinite_start: bool) -> np.ndarray:
    """S + 1 log-SNR nodes uniform on [lo, hi]; the first is -inf when the process starts at pure noise."""
    nodes = np.linspace(lo, hi, steps + 1)
    if infinite_start:
        nodes[0] = -math.inf
    return nodes


def logsnr_nodes(schedule: Schedule, steps: int) -> np.ndarray:
    """The log-SNR of the S model calls of ``logsnr`` spacing (float64, (S,), increasing).

    S + 1 nodes uniform in lambda from the noisiest training time (t = T-1) to the least noisy (t = 0); the model
    is called at the first S and the last step goes to the clean end instead of the last node, so no call is spent
    at t = 0, where almost no noise is left (DPM-Solver's ``logSNR`` time steps end at the least noisy time the
    same way). Where the noisiest level is pure noise (zero terminal SNR, rectified flow at sigma = 1), the first
    node sits there and the others are uniform from the next training time on.
    """
    T = schedule.num_train_timesteps
    if schedule.kind == "vp":
        lam = schedule.lambdas()
        finite = np.isfinite(lam)
        return _uniform_nodes(float(lam[finite].min()), float(lam[finite].max()), steps, not finite[-1])[:-1]
    _, hi = schedule.lambda_range()
    s_lo = shift_sigma((T - 1) / T, schedule.shift)
    return _uniform_nodes(math.log1p(-s_lo) - math.log(s_lo), hi, steps, True)[:-1]


@dataclass(frozen=True)
class SamplingPlan:
    """What the sampler walks through, from noise (k = 0) to data (k = S).

    ``timesteps``: the S model time inputs (float64, shape (S,)); ``a``, ``b``: the S + 1 noise levels
    (``x = a_k x0 + b_k eps``), where level k < S belongs to ``timesteps[k]`` and level S is the clean end.
    ``schedule``: the schedule the plan was made from, where known (:func:`make_plan`, :func:`plan_from_lambdas`):
    a sampler that calls the model between the plan's levels (``fireflow``) reads the model time of any level
    from it.
    """

    timesteps: np.ndarray
    a: np.ndarray
    b: np.ndarray
    schedule: Schedule | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.timesteps)

    def tail(self, k: int) -> "SamplingPlan":
        """The last ``k`` steps (1 <= k <= S): from level S - k, part-way noised, to the clean end."""
        if not 1 <= k <= len(self):
            raise ValueError(f"a plan of {len(self)} steps has no tail of {k}")
        return SamplingPlan(self.timesteps[-k:], self.a[-k - 1 :], self.b[-k - 1 :], self.schedule)


def make_plan(schedule: Schedule, steps: int, spacing: str = "leading", steps_offset: int = 0) -> SamplingPlan:
    """Choose ``steps`` timesteps with ``spacing`` and attach their noise levels.

    VP: levels come from ``alphas_cumprod``; the clean end uses ``final_alpha_cumprod``.
    Flow: integer timestep ``t`` maps to sigma ``(t + 1) / T`` (so ``trailing`` gives sigma 1, 1 - 1/S, ..., 1/S,
    exactly a uniform grid), then ``shift``; the clean end is sigma 0. The model sees ``sigma * T``.
    ``logsnr`` calls the model at the exact fractional times of :func:`logsnr_nodes` (see :data:`SPACING_DOCS`).
    """
    T = schedule.num_train_timesteps
    if spacing == FAMILY_SPACING:
        raise ValueError("the pipeline spacing is the time steps of a model family's own pipeline (SD3, Flux); "
                         "this model has none")
    if spacing == "logsnr":
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and the {T} training timesteps, got {steps}")
        return plan_from_lambdas(schedule, logsnr_nodes(schedule, steps))
    ts = select_timesteps(T, steps, spacing, steps_offset, schedule.lambdas())
    if schedule.kind == "vp":
        abar = np.append(schedule.alphas_cumprod[ts], schedule.final_alpha_cumprod)
        return SamplingPlan(ts.astype(np.float64), np.sqrt(abar), np.sqrt(1.0 - abar), schedule)
    sigmas = np.array([shift_sigma((t + 1) / T, schedule.shift) for t in ts] + [0.0])
    return SamplingPlan(sigmas[:-1] * T, 1.0 - sigmas, sigmas, schedule)


def plan_from_lambdas(schedule: Schedule, lambdas: Sequence[float]) -> SamplingPlan:
    """A plan that calls the model at the levels of log-SNR ``lambdas`` ((S,), increasing; -inf = pure noise),
    then steps to the schedule's clean end. Model times come from :meth:`Schedule.time_of_lambda` and the levels
    from :meth:`Schedule.ab` at those times, so levels and times agree exactly."""
    lambdas = np.asarray(lambdas, np.float64)
    if lambdas.ndim != 1 or len(lambdas) == 0 or np.any(np.diff(lambdas) <= 0):
        raise ValueError("a plan needs one or more log-SNR values, strictly increasing")
    T = schedule.num_train_timesteps
    start = float(T - 1) if schedule.kind == "vp" else float(T)
    ts = np.array([start if lam == -math.inf else schedule.time_of_lambda(float(lam)) for lam in lambdas])
    levels = [schedule.ab(float(t)) for t in ts]
    if schedule.kind == "vp":
        end = (math.sqrt(schedule.final_alpha_cumprod), math.sqrt(1.0 - schedule.final_alpha_cumprod))
    else:
        end = (1.0, 0.0)
    a, b = zip(*levels, end)
    return SamplingPlan(ts, np.array(a, np.float64), np.array(b, np.float64), schedule)


def plan_from_levels(timesteps: Sequence[float], a: Sequence[float], b: Sequence[float]) -> SamplingPlan:
    """A plan from explicit model times and levels (for custom schedules and tests)."""
    plan = SamplingPlan(np.asarray(timesteps, np.float64), np.asarray(a, np.float64), np.asarray(b, np.float64))
    if not (len(plan.a) == len(plan.b) == len(plan.timesteps) + 1):
        raise ValueError("a plan needs S timesteps and S + 1 levels")
    return plan
