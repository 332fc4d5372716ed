"""Model parameterizations in one place: every model output becomes ``(x0_hat, eps_hat)``.

With ``x_t = a x0 + b eps`` (see :mod:`ddimctl.schedule`) a network may predict

* ``epsilon``: the noise eps;
* ``sample``: the clean data x0;
* ``v_prediction``: ``v = a eps - b x0`` (Salimans & Ho 2022; for VP, ``a^2 + b^2 = 1``);
* ``flow``: the rectified-flow velocity ``v = eps - x0`` (``a = 1 - sigma``, ``b = sigma``).

:class:`Denoiser` wraps any callable ``model(x_t, t) -> output`` into a function
``(x_t, t, a, b) -> (x0_hat, eps_hat)``, applying clipping or dynamic thresholding to ``x0_hat`` exactly as
diffusers' DDIMScheduler does (eps_hat is left as the model gave it). Samplers only ever see a Denoiser.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

Model = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Thresholding:
    """Dynamic thresholding (Imagen, arXiv 2205.11487): per sample, s = quantile(|x0|, ratio) clamped to
    [1, max_value]; x0 is clamped to [-s, s] and divided by s."""

    ratio: float = 0.995
    max_value: float = 1.0


def to_x0_eps(output: Tensor, x: Tensor, a: float, b: float, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Turn a model output at ``x = a x0 + b eps`` into ``(x0_hat, eps_hat)``."""
    if prediction_type == "epsilon":
        eps = output
        return (x - b * eps) / a, eps
    if prediction_type == "sample":
        x0 = output
        if b == 0:  # at the clean end eps is undetermined; it is multiplied by b_to only when b_to > 0
            return x0, torch.zeros_like(x0)
        return x0, (x - a * x0) / b
    if prediction_type == "v_prediction":
        n = a * a + b * b  # 1 for VP schedules
        return (a * x - b * output) / n, (b * x + a * output) / n
    if prediction_type == "flow":
        n = a + b  # 1 for rectified flow
        return (x - b * output) / n, (x + a * output) / n
    raise ValueError(f"unknown prediction_type {prediction_type!r} (expected one of {', '.join(PREDICTION_TYPES)})")


def from_x0_eps(x0: Tensor, eps: Tensor, a: float, b: float, prediction_type: str) -> Tensor:
    """The output a model of ``prediction_type`` gives for ``(x0, eps)``: the inverse of :func:`to_x0_eps`.

    Used to express one oracle in every parameterization, and as the training target.
    """
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a * eps - b * x0
    if prediction_type == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction_type {prediction_type!r} (expected one of {', '.join(PREDICTION_TYPES)})")


def frozen_jacobian(prediction_type: str, a: float, b: float) -> tuple[float, float]:
    """``(d x0_hat / d x, d eps_hat / d x)`` at ``x = a x0 + b eps`` with the raw model output held fixed.

    Every parameterization makes (x0_hat, eps_hat) affine in x for a fixed output, with these scalar slopes.
    Exact inversion builds its Newton step from them (a step ``x_to = alpha x + beta x0_hat + gamma eps_hat`` has
    slope ``alpha + beta dx0 + gamma deps`` in x).
    """
    if prediction_type == "epsilon":
        return 1.0 / a, 0.0
    if prediction_type == "sample":
        return 0.0, 1.0 / b
    if prediction_type == "v_prediction":
        n = a * a + b * b
        return a / n, b / n
    if prediction_type == "flow":
        n = a + b
        return 1.0 / n, 1.0 / n
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def threshold(x0: Tensor, th: Thresholding) -> Tensor:
    """Dynamic thresholding of x0 (B, ...), per sample, as diffusers' ``_threshold_sample``."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)  # (B, C*H*W)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), th.ratio, dim=1).clamp(min=1.0, max=th.max_value).unsqueeze(1)  # (B, 1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


@dataclass(frozen=True)
class Denoiser:
    """Wraps a model function ``model(x_t, t) -> output`` (t a (1,) or (B,) tensor of model times) into
    ``(x_t, t, a, b) -> (x0_hat, eps_hat)``.

    ``clip_sample``: clamp x0_hat to [-r, r] (diffusers' ``clip_sample`` with ``clip_sample_range = r``).
    ``thresholding`` takes precedence over clipping, as in diffusers. eps_hat is not recomputed after either
    (diffusers' default, ``use_clipped_model_output=False``).

    A conditioned or guided model is one batch's network under its condition (:mod:`ddimctl.conditioning`:
    :class:`~ddimctl.conditioning.Conditioned`, :class:`~ddimctl.conditioning.ClassifierFreeGuidance`); the
    samplers and the exact inversion see only this denoiser, and use :meth:`select` to work on some images of a
    batch and :attr:`guidance_gain` to bound how far a guided output can move.
    """

    model: Model
    prediction_type: str = "epsilon"
    clip_sample: float | None = None
    thresholding: Thresholding | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r} (expected one of {', '.join(PREDICTION_TYPES)})"
            )

    def model_output(self, x: Tensor, t: Tensor) -> Tensor:
        """The raw model output at x (guided, when the model is)."""
        return self.model(x, t)

    def __call__(self, x: Tensor, t: Tensor, a: float, b: float) -> tuple[Tensor, Tensor]:
        x0, eps = to_x0_eps(self.model_output(x, t), x, a, b, self.prediction_type)
        if self.thresholding is not None:
            x0 = threshold(x0, self.thresholding)
        elif self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        return x0, eps

    def select(self, idx: Tensor) -> "Denoiser":
        """The same denoiser for the samples ``idx`` of its batch (its model's conditions sliced; itself when the
        model has none): solvers that keep working on some images of a batch only call it this way."""
        if not hasattr(self.model, "select"):
            return self
        return dataclasses.replace(self, model=self.model.select(idx))

    @property
    def guidance_gain(self) -> float:
        """How much a change of the network's output can change the model's: ``|w| + |1 - w|`` under
        classifier-free guidance of scale w, 1 otherwise."""
        return float(getattr(self.model, "gain", 1.0))

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance weight of the model (1: none)."""
        return float(getattr(self.model, "scale", 1.0))

    def with_guidance_scale(self, scale: float) -> "Denoiser":
        """The same denoiser with the model guided at another weight (a guided model only)."""
        if not hasattr(self.model, "with_scale"):
            raise ValueError("the model is not guided")
        return dataclasses.replace(self, model=self.model.with_scale(scale))

    def frozen_jacobian(self, a: float, b: float) -> tuple[float, float]:
        """``(d x0_hat / d x, d eps_hat / d x)`` with the model output held (see :func:`frozen_jacobian`); the
        interface exact inversion relies on. Guidance mixes outputs with weights that sum to 1, so it leaves this
        unchanged. (With clipping or thresholding the true slope differs where they act: inversion runs without
        them.)"""
        return frozen_jacobian(self.prediction_type, a, b)
