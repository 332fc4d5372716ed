"""Noise schedules and timestep selection. Pure math, float64 on the host.

Every process ddimctl samples is written as ``x_t = a_t * x0 + b_t * eps``:

* variance-preserving (DDPM): ``a_t = sqrt(alphas_cumprod[t])``, ``b_t = sqrt(1 - alphas_cumprod[t])`` for the
  integer training timesteps ``t = 0 .. T-1``; the model is called with ``t``;
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
SPACINGS = ("leading", "trailing", "linspace", "quad", "logsnr")
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
        """(a_t, b_t) at a model time t: an integer timestep for VP; ``sigma * T`` (sigma already shifted) for flow."""
        if self.kind == "vp":
            abar = float(self.alphas_cumprod[int(round(t))])
            return math.sqrt(abar), math.sqrt(1.0 - abar)
        s = t / self.num_train_timesteps
        return 1.0 - s, s

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
    paper's quadratic spacing ``(linspace(0, sqrt(0.8 T), S))**2``; ``logsnr`` spaces the steps uniformly in
    ``lambda = log(a_t / b_t)`` (needs ``lambdas``, one per training timestep), nearest training timestep,
    duplicates removed. ``quad`` and ``logsnr`` may return fewer than S timesteps when S is close to T.
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
    """Timesteps whose log-SNR is closest to a uniform grid; an infinite end (zero SNR) is kept as it is."""
    finite = np.isfinite(lam)
    lo, hi = lam[finite].min(), lam[finite].max()
    targets = np.linspace(lo, hi, steps)
    ts = np.abs(np.where(finite, lam, np.inf)[None, :] - targets[:, None]).argmin(axis=1)
    if not finite[-1]:
        ts[0] = len(lam) - 1  # start from pure noise
    return np.unique(ts)[::-1]


@dataclass(frozen=True)
class SamplingPlan:
    """What the sampler walks through, from noise (k = 0) to data (k = S).

    ``timesteps``: the S model time inputs (float64, shape (S,)); ``a``, ``b``: the S + 1 noise levels
    (``x = a_k x0 + b_k eps``), where level k < S belongs to ``timesteps[k]`` and level S is the clean end.
    """

    timesteps: np.ndarray
    a: np.ndarray
    b: np.ndarray

    def __len__(self) -> int:
        return len(self.timesteps)

    def tail(self, k: int) -> "SamplingPlan":
        """The last ``k`` steps (1 <= k <= S): from level S - k, part-way noised, to the clean end."""
        if not 1 <= k <= len(self):
            raise ValueError(f"a plan of {len(self)} steps has no tail of {k}")
        return SamplingPlan(self.timesteps[-k:], self.a[-k - 1 :], self.b[-k - 1 :])


def make_plan(schedule: Schedule, steps: int, spacing: str = "leading", steps_offset: int = 0) -> SamplingPlan:
    """Choose ``steps`` timesteps with ``spacing`` and attach their noise levels.

    VP: levels come from ``alphas_cumprod``; the clean end uses ``final_alpha_cumprod``.
    Flow: integer timestep ``t`` maps to sigma ``(t + 1) / T`` (so ``trailing`` gives sigma 1, 1 - 1/S, ..., 1/S,
    exactly a uniform grid), then ``shift``; the clean end is sigma 0. The model sees ``sigma * T``.
    """
    T = schedule.num_train_timesteps
    ts = select_timesteps(T, steps, spacing, steps_offset, schedule.lambdas())
    if schedule.kind == "vp":
        abar = np.append(schedule.alphas_cumprod[ts], schedule.final_alpha_cumprod)
        return SamplingPlan(ts.astype(np.float64), np.sqrt(abar), np.sqrt(1.0 - abar))
    sigmas = np.array([shift_sigma((t + 1) / T, schedule.shift) for t in ts] + [0.0])
    return SamplingPlan(sigmas[:-1] * T, 1.0 - sigmas, sigmas)


def plan_from_levels(timesteps: Sequence[float], a: Sequence[float], b: Sequence[float]) -> SamplingPlan:
    """A plan from explicit model times and levels (for custom schedules and tests)."""
    plan = SamplingPlan(np.asarray(timesteps, np.float64), np.asarray(a, np.float64), np.asarray(b, np.float64))
    if not (len(plan.a) == len(plan.b) == len(plan.timesteps) + 1):
        raise ValueError("a plan needs S timesteps and S + 1 levels")
    return plan
