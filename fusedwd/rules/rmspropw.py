"""RMSpropW (docs/math.md#rmspropw): its rule spec, reference and Triton helpers.

The C++ copy of the math: csrc/include/fusedwd/rmspropw.h.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import check_bool, check_common, check_range, decay_factors, group_lr_max
from ..reference import Precision, math_dtype, prologue, store
from ._rule import Rule, State, Switch


def check(group: Mapping[str, Any]) -> None:
    check_common(group)
    check_range("alpha", group["alpha"], 0.0)
    check_range("eps", group["eps"], 0.0)
    check_range("momentum", group["momentum"], 0.0)
    check_bool("centered", group["centered"])


def values(group: Mapping[str, Any]) -> dict[str, float]:
    return dict(alpha=float(group["alpha"]), eps=float(group["eps"]), momentum=float(group["momentum"]))


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
    precision: Precision = Precision(),
) -> None:
    """RMSprop with an explicit decay mode (docs/math.md#rmspropw)."""
    decay_mult, l2 = decay_factors(decay, lr, weight_decay, lr if lr_max is None else lr_max)
    grad_sign = (-1.0 if maximize else 1.0) * precision.grad_mult
    for i, param in enumerate(params):
        steps[i] += 1
        mt = math_dtype(param.dtype)
        p, g = prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2,
                        decay_mult=decay_mult)
        sq = square_avgs[i].to(mt) * alpha + g * g * (1.0 - alpha)
        if centered:
            ga = grad_avgs[i].to(mt) * alpha + g * (1.0 - alpha)
            avg = (sq - ga * ga).sqrt() + eps
            store(grad_avgs[i], ga)
        else:
            avg = sq.sqrt() + eps
        if momentum > 0:
            buf = momentum_buffers[i].to(mt) * momentum + g / avg
            store(momentum_buffers[i], buf)
            p = p - lr * buf
        else:
            p = p - lr * g / avg
        store(square_avgs[i], sq)
        precision.store(params, i, p, float(steps[i]))


def _reference(group, structure, params, grads, states, steps, precision) -> None:
    centered, _ = structure
    none = [None] * len(params)
    rmspropw(params, grads, states["square_avg"], states.get("grad_avg", none), states.get("momentum_buffer", none),
             steps, lr=float(group["lr"]), alpha=float(group["alpha"]), eps=float(group["eps"]),
             momentum=float(group["momentum"]), centered=centered, weight_decay=float(group["weight_decay"]),
             decay=group["decay"], lr_max=group_lr_max(group), maximize=group["maximize"], precision=precision)


RULE = Rule(
    name="rmspropw",
    states=(State("square_avg", signed=False), State("grad_avg", signed=True, when="centered"),
            State("momentum_buffer", signed=True, when="has_momentum")),
    switches=(Switch("centered", lambda group: group["centered"]),
              Switch("has_momentum", lambda group: float(group["momentum"]) > 0)),
    columns=("lr", "alpha", "eps", "momentum", "decay_mult", "l2", "grad_sign"),
    defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False),
    values=values,
    check=check,
    reference=_reference,
)
