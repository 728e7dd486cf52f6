"""Pure-torch update rules: the executable specification.

Each function implements one section of docs/math.md line by line, one tensor
at a time, in place, with the math in float32 (float64 for fp64 storage) and
one rounding to the storage dtype per stored value. Every compiled backend is
tested against these functions, and these functions are tested against
``torch.optim`` where torch has the same rule. They favour clarity over speed.

The functional signature follows ``torch.optim``'s functional API: lists of
tensors for one param group, hyperparameters as keywords.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._spec import decay_factors

__all__ = ["adamw", "sgdw", "rmspropw", "math_dtype"]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in for a storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prologue(p: Tensor, g: Tensor, *, grad_sign: float, l2: float, decay_mult: float) -> tuple[Tensor, Tensor]:
    # docs/math.md#weight-decay-modes: g <- grad_sign*g + l2*p (old p); p <- decay_mult*p
    g = g * grad_sign + l2 * p
    p = p * decay_mult
    return p, g


def _store(dst: Tensor, value: Tensor) -> None:
    # round to the storage dtype once, to nearest-even
    dst.copy_(value)


@torch.no_grad()
def adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Optional[Tensor]],
    steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: Optional[float] = None,
    amsgrad: bool = False,
    maximize: bool = False,
) -> None:
    """AdamW with an explicit decay mode (docs/math.md#adamw).

    ``steps`` holds each tensor's step count (a float32 scalar tensor, torch's
    layout); it is incremented in place before use, so the first step uses t=1.
    """
    decay_mult, l2 = decay_factors(decay, lr, weight_decay, lr if lr_max is None else lr_max)
    grad_sign = -1.0 if maximize else 1.0
    for i, param in enumerate(params):
        steps[i] += 1
        t = float(steps[i])
        mt = math_dtype(param.dtype)
        p, g = _prologue(param.to(mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2, decay_mult=decay_mult)
        m = exp_avgs[i].to(mt) * beta1 + g * (1.0 - beta1)
        v = exp_avg_sqs[i].to(mt) * beta2 + g * g * (1.0 - beta2)
        v_hat = v
        if amsgrad:
            v_hat = torch.maximum(max_exp_avg_sqs[i].to(mt), v)
            _store(max_exp_avg_sqs[i], v_hat)
        # per-tensor scalars in float64, from this tensor's own step count
        step_size = lr / (1.0 - beta1**t)
        bc2_sqrt = (1.0 - beta2**t) ** 0.5
        p = p - step_size * m / (v_hat.sqrt() / bc2_sqrt + eps)
        _store(exp_avgs[i], m)
        _store(exp_avg_sqs[i], v)
        _store(param, p)


@torch.no_grad()
def sgdw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Optional[Tensor]],
    steps: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: Optional[float] = None,
    maximize: bool = False,
) -> None:
    """SGD with momentum and an explicit decay mode (docs/math.md#sgdw).

    ``steps`` counts steps per tensor; a count of 0 before the step marks the
    first step, when the momentum buffer takes the gradient itself (torch's rule).
    """
    decay_mult, l2 = decay_factors(decay, lr, weight_decay, lr if lr_max is None else lr_max)
    grad_sign = -1.0 if maximize else 1.0
    for i, param in enumerate(params):
        steps[i] += 1
        first = float(steps[i]) == 1.0
        mt = math_dtype(param.dtype)
        p, g = _prologue(param.to(mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2, decay_mult=decay_mult)
        d = g
        if momentum != 0:
            buf = g if first else momentum_buffers[i].to(mt) * momentum + g * (1.0 - dampening)
            _store(momentum_buffers[i], buf)
            d = g + momentum * buf if nesterov else buf
        p = p - lr * d
        _store(param, p)


@torch.no_grad()
def rmspropw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    grad_avgs: Sequence[Optional[Tensor]],
    momentum_buffers: Sequence[Optional[Tensor]],
    steps: Sequence[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    momentum: float,
    centered: bool,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: Optional[float] = None,
    maximize: bool = False,
) -> None:
    """RMSprop with an explicit decay mode (docs/math.md#rmspropw)."""
    decay_mult, l2 = decay_factors(decay, lr, weight_decay, lr if lr_max is None else lr_max)
    grad_sign = -1.0 if maximize else 1.0
    for i, param in enumerate(params):
        steps[i] += 1
        mt = math_dtype(param.dtype)
        p, g = _prologue(param.to(mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2, decay_mult=decay_mult)
        sq = square_avgs[i].to(mt) * alpha + g * g * (1.0 - alpha)
        if centered:
            ga = grad_avgs[i].to(mt) * alpha + g * (1.0 - alpha)
            avg = (sq - ga * ga).sqrt() + eps
            _store(grad_avgs[i], ga)
        else:
            avg = sq.sqrt() + eps
        if momentum > 0:
            buf = momentum_buffers[i].to(mt) * momentum + g / avg
            _store(momentum_buffers[i], buf)
            p = p - lr * buf
        else:
            p = p - lr * g / avg
        _store(square_avgs[i], sq)
        _store(param, p)
