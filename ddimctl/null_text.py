"""Null-text inversion (Mokady et al. 2022, arXiv 2211.09794): DDIM inversion that stays exact under
classifier-free guidance by optimising the null condition, one tensor per step.

Plain DDIM inversion at w = 1 (one model call per step, under the source condition) gives the *pivot* trajectory
x_0 -> x_T. Sampling from x_T with guidance w drifts off it; so, walking the sampler from x_T, at each step k the
null condition's float tensors are optimised with Adam so that the guided DDIM step from the current state lands on
the pivot's next state, then the step is taken with the optimised null. The result is x_T and the list of per-step
nulls; decoding x_T with them (:func:`decode_with_nulls`) retraces the walk exactly, since it runs the same step
function on the same inputs.

As the paper's notebook (and diffusers' community ``pipeline_null_text_inversion.py``): Adam with learning rate
``1e-2 * (1 - k / 100)`` at step k, at most 10 iterations per step, stopping once the loss (the MSE between the
step's result and the pivot state) is below ``1e-5 + k * 2e-5``; each step's optimisation starts from the
previous step's result (the model's own null at the first). The conditional output is computed once per step,
without gradients, and reused by every iteration.

The network is called ``network(x, t, **cond)`` with *continuous* conditions (:func:`continuous`): a
class-conditional UNet gets its class term as ``class_emb`` (its table's row of the label) instead of the label, so
the null class's row is what is optimised; text models' prompt embeddings are float already. Only floating
tensors are optimised; the network's parameters should be frozen by the caller, and the optimisation needs autograd
(run it outside ``torch.inference_mode``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .conditioning import Cond
from .prediction import Denoiser
from .sampler import ddim_step, model_times
from .schedule import SamplingPlan

Network = Callable[..., Tensor]

INNER_STEPS = 10
LEARNING_RATE = 1e-2
EPSILON = 1e-5
EPSILON_PER_STEP = 2e-5


def continuous(cond: Cond, module: Any) -> Cond:
    """``cond`` with every tensor in a form gradients can flow through: ``class_labels`` becomes ``class_emb``, the
    rows of ``module.class_embedding`` (an ``nn.Embedding``; a ValueError otherwise); float tensors stay as they
    are. The tensors are fresh (not inference tensors), without gradients."""
    out: dict[str, Tensor] = {}
    with torch.inference_mode(False), torch.no_grad():
        for name, v in cond.tensors.items():
            if name == "class_labels":
                table = getattr(module, "class_embedding", None)
                if not isinstance(table, torch.nn.Embedding):
                    raise ValueError("the network has no class table (nn.Embedding class_embedding) to optimise")
                out["class_emb"] = table.weight[v.to(table.weight.device).clone()].float().clone()
            else:
                out[name] = v.clone()
    return Cond(out)


def guided_step(network: Network, denoiser: Denoiser, plan: SamplingPlan, ts: Tensor, k: int, x: Tensor,
                cond_out: Tensor, null: Cond, scale: float) -> Tensor:
    """The eta = 0 DDIM step k from x under classifier-free guidance of weight ``scale``, with the conditional raw
    output ``cond_out`` (at x, given) and the null condition ``null`` (one forward of the network)."""
    uncond = network(x, ts[k : k + 1], **null.kwargs())
    out = uncond + scale * (cond_out - uncond)
    x0, eps = dataclasses.replace(denoiser, model=lambda _x, _t: out)(x, ts[k : k + 1], plan.a[k], plan.b[k])
    return ddim_step(x0, eps, plan.a[k + 1], plan.b[k + 1])


def decode_with_nulls(network: Network, denoiser: Denoiser, cond: Cond, nulls: Sequence[Cond], x_T: Tensor,
                      plan: SamplingPlan, scale: float, callback=None) -> Tensor:
    """The guided eta = 0 DDIM sample of x_T with step k's null condition ``nulls[k]`` (two forwards of the batch
    per step: the condition, then the null); the inverse of :func:`null_text_inversion`."""
    if len(nulls) != len(plan):
        raise ValueError(f"{len(nulls)} null conditions for a plan of {len(plan)} steps")
    ts = model_times(plan, x_T)
    x = x_T
    for k in range(len(plan)):
        c = network(x, ts[k : k + 1], **cond.kwargs())
        x = guided_step(network, denoiser, plan, ts, k, x, c, nulls[k], scale)
        if callback is not None:
            callback({"step": k + 1, "total": len(plan), "x": x})
    return x


@dataclass
class NullTextResult:
    """``x_T`` (the pivot's), the optimised ``nulls`` (one :class:`Cond` per step, plan order), the state the walk
    ``reached`` (what :func:`decode_with_nulls` gives back), per step and image the Adam ``iterations`` taken and
    the ``losses`` (MSE to the pivot state) of the step taken, and ``calls``: per image, the network forwards of a
    single image (pivot inversion, then per step the conditional output, each iteration's null forward and the
    step taken)."""

    x_T: Tensor
    nulls: list[Cond]
    reached: Tensor
    iterations: list[list[int]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    batched_calls: int = 0


def pivot_trajectory(denoise: Denoiser, x0: Tensor, plan: SamplingPlan) -> list[Tensor]:
    """Plain DDIM inversion of x0: the states at each level of ``plan``, noisiest (x_T) first, x0 last."""
    from .inversion import invert_ddim

    states: list[Tensor] = [None] * len(plan) + [x0]  # type: ignore[list-item]
    S = len(plan)

    def keep(info):
        states[S - info["step"]] = info["x"]

    invert_ddim(denoise, x0, plan, keep, exact=False)
    return states


def null_text_inversion(network: Network, denoiser: Denoiser, cond: Cond, null: Cond, x0: Tensor,
                        plan: SamplingPlan, scale: float, *, pivot_denoiser: Denoiser,
                        inner_steps: int = INNER_STEPS, lr: float = LEARNING_RATE, epsilon: float = EPSILON,
                        callback=None) -> NullTextResult:
    """Invert x0 (B, ...) for the guided DDIM sampler of weight ``scale``: the pivot trajectory by plain inversion
    with ``pivot_denoiser`` (the model under ``cond``, unguided), then per step the null condition optimised (from
    ``null``) so that the guided step lands on the pivot (see the module notes). ``cond`` and ``null``: continuous
    conditions (:func:`continuous`); ``denoiser``: supplies the prediction type (its model is not used).

    Each image is optimised on its own loss (the batch's losses are summed, and Adam is elementwise), and stops on
    its own: an image that reached its threshold keeps the null it had then while the others go on."""
    S, B = len(plan), x0.shape[0]
    with torch.inference_mode(False), torch.no_grad():
        pivots = [p.detach().clone().float() for p in pivot_trajectory(pivot_denoiser, x0, plan)]
        cond = Cond({k: v.detach().clone() for k, v in cond.tensors.items()})
        current = {k: v.detach().clone() for k, v in null.tensors.items()}
    ts = model_times(plan, pivots[0])
    result = NullTextResult(pivots[0], [], pivots[0], calls=[S] * B, batched_calls=S)
    x = pivots[0]
    with torch.inference_mode(False):
        for k in range(S):
            with torch.no_grad():
                c = network(x, ts[k : k + 1], **cond.kwargs())
            params = {n: v.detach().clone().requires_grad_(v.is_floating_point()) for n, v in current.items()}
            variables = [p for p in params.values() if p.requires_grad]
            opt = torch.optim.Adam(variables, lr=lr * (1.0 - k / 100.0))
            kept = {n: p.detach().clone() for n, p in params.items()}
            done = torch.zeros(B, dtype=torch.bool, device=x.device)
            its = torch.zeros(B, dtype=torch.long)
            threshold = epsilon + k * EPSILON_PER_STEP
            for _ in range(inner_steps):
                with torch.enable_grad():
                    x_next = guided_step(network, denoiser, plan, ts, k, x, c, Cond(params), scale)
                    loss = (x_next.float() - pivots[k + 1]).flatten(1).pow(2).mean(1)  # (B,)
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()
                opt.step()
                result.batched_calls += 1
                its += (~done).cpu().long()
                with torch.no_grad():
                    newly = ~done & (loss.detach() < threshold)
                    for n, p in params.items():
                        m = done.view(-1, *[1] * (p.ndim - 1))
                        p.copy_(torch.where(m, kept[n], p))  # an image that stopped keeps its null
                        kept[n] = torch.where(newly.view(-1, *[1] * (p.ndim - 1)), p, kept[n])
                    done |= newly
                if bool(done.all()):
                    break
            with torch.no_grad():
                final = Cond({n: torch.where(done.view(-1, *[1] * (p.ndim - 1)), kept[n], p.detach())
                              for n, p in params.items()})
                x = guided_step(network, denoiser, plan, ts, k, x, c, final, scale)
                miss = (x.float() - pivots[k + 1]).flatten(1).pow(2).mean(1)
            result.batched_calls += 2
            result.nulls.append(final)
            result.iterations.append([int(i) for i in its.tolist()])
            result.losses.append([float(v) for v in miss.tolist()])
            result.calls = [c_ + int(i) + 2 for c_, i in zip(result.calls, its.tolist())]
            current = dict(final.tensors)
            if callback is not None:
                callback({"step": k + 1, "total": S, "x": x})
    result.reached = x
    return result
