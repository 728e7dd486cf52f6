"""RMSpropW (docs/math.md#rmspropw): its rule spec, reference and Triton helpers.

The C++ copy of the math: csrc/include/fusedwd/rmspropw.h.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import check_bool, check_common, check_range, decay_factors, group_lr_max
from ..reference import Precision, math_dtype, prologue, store
from ..reference import lerp as lerp_tensor  # (the Triton helper below uses the Triton lerp)
from ._rule import Rule, State, Switch

if TYPE_CHECKING:  # what fusedwd.triton compiles triton_update with (docs/adding-a-rule.md#triton)
    import triton.language as tl

    from ..triton._kernels import decayed_grad, div_rn, lerp, lerp_weight, sqrt_rn

    COL: Any = None  # the rule's hyperparameter columns (COL.beta1: its index), bound by compile_rule


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
        sq = square_avgs[i].to(mt) * alpha + (1.0 - alpha) * g * g
        if centered:
            ga = lerp_tensor(grad_avgs[i].to(mt), g, 1.0 - alpha)
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


# --------------------------------------------------------------------- Triton
def triton_update(p, g, sq, ga, buf, hp, t, grad_mult, MATH: tl.constexpr, CENTERED: tl.constexpr,
                  HAS_MOMENTUM: tl.constexpr):
    """One block of elements (fusedwd.triton compiles this: docs/adding-a-rule.md#triton)."""
    # docs/math.md#rmspropw; reference: fusedwd.reference.rmspropw; the order of csrc/include/fusedwd/rmspropw.h
    grad_sign = (tl.load(hp + COL.grad_sign) * grad_mult).to(MATH)
    l2 = tl.load(hp + COL.l2)
    decay_mult = tl.load(hp + COL.decay_mult).to(MATH)
    lr = tl.load(hp + COL.lr).to(MATH)
    alpha = tl.load(hp + COL.alpha)
    one_minus_alpha = (1.0 - alpha).to(MATH)
    ga_coeff, ga_small = lerp_weight(1.0 - alpha, MATH)
    alpha = alpha.to(MATH)
    eps = tl.load(hp + COL.eps).to(MATH)
    momentum = tl.load(hp + COL.momentum).to(MATH)

    # the operations and their order are torch's (docs/math.md#non-finite-values)
    g = decayed_grad(g, p, grad_sign, l2.to(MATH), l2 != 0.0)
    p = p * decay_mult
    sq = alpha * sq + (one_minus_alpha * g) * g
    if CENTERED:
        ga = lerp(ga, g, ga_coeff, ga_small)
        avg = sqrt_rn(sq - ga * ga) + eps
    else:
        avg = sqrt_rn(sq) + eps
    if HAS_MOMENTUM:
        buf = momentum * buf + div_rn(g, avg)
        p = p - lr * buf
    else:
        p = p - div_rn(lr * g, avg)
    return p, sq, ga, buf


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
    triton_update=triton_update,
)
