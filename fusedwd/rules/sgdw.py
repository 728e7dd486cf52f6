"""SGDW (docs/math.md#sgdw): its rule spec, reference and Triton helpers.

The C++ copy of the math: csrc/include/fusedwd/sgdw.h.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import check_bool, check_common, check_range, decay_factors, group_lr_max
from ..reference import Precision, math_dtype, prologue, store
from ._rule import Rule, State, Switch

if TYPE_CHECKING:  # what fusedwd.triton compiles triton_update with (docs/adding-a-rule.md#triton)
    import triton.language as tl

    from ..triton._kernels import decayed_grad

    COL: Any = None  # the rule's hyperparameter columns (COL.beta1: its index), bound by compile_rule


def check(group: Mapping[str, Any]) -> None:
    check_common(group)
    momentum = check_range("momentum", group["momentum"], 0.0)
    dampening = check_range("dampening", group["dampening"], -math.inf)
    check_bool("nesterov", group["nesterov"])
    if group["nesterov"] and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")


def values(group: Mapping[str, Any]) -> dict[str, float]:
    return dict(momentum=float(group["momentum"]), dampening=float(group["dampening"]))


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
    precision: Precision = Precision(),
) -> None:
    """SGD with momentum and an explicit decay mode (docs/math.md#sgdw).

    ``steps`` counts steps per tensor; a count of 0 before the step marks the
    first step, when the momentum buffer takes the gradient itself (torch's rule).
    """
    decay_mult, l2 = decay_factors(decay, lr, weight_decay, lr if lr_max is None else lr_max)
    grad_sign = (-1.0 if maximize else 1.0) * precision.grad_mult
    for i, param in enumerate(params):
        steps[i] += 1
        first = float(steps[i]) == 1.0
        mt = math_dtype(param.dtype)
        p, g = prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2,
                        decay_mult=decay_mult)
        d = g
        if momentum != 0:
            buf = g if first else momentum_buffers[i].to(mt) * momentum + g * (1.0 - dampening)
            store(momentum_buffers[i], buf)
            d = g + momentum * buf if nesterov else buf
        p = p - lr * d
        precision.store(params, i, p, float(steps[i]))


def _reference(group, structure, params, grads, states, steps, precision) -> None:
    sgdw(params, grads, states.get("momentum_buffer", [None] * len(params)), steps,
         lr=float(group["lr"]), momentum=float(group["momentum"]), dampening=float(group["dampening"]),
         nesterov=group["nesterov"], weight_decay=float(group["weight_decay"]), decay=group["decay"],
         lr_max=group_lr_max(group), maximize=group["maximize"], precision=precision)


# --------------------------------------------------------------------- Triton
def triton_update(p, g, buf, _s1, _s2, hp, t, grad_mult, MATH: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr):
    """One block of elements (fusedwd.triton compiles this: docs/adding-a-rule.md#triton)."""
    # docs/math.md#sgdw; reference: fusedwd.reference.sgdw; the order of csrc/include/fusedwd/sgdw.h
    grad_sign = (tl.load(hp + COL.grad_sign) * grad_mult).to(MATH)
    l2 = tl.load(hp + COL.l2)
    decay_mult = tl.load(hp + COL.decay_mult).to(MATH)
    lr = tl.load(hp + COL.lr).to(MATH)
    momentum = tl.load(hp + COL.momentum).to(MATH)
    one_minus_dampening = (1.0 - tl.load(hp + COL.dampening)).to(MATH)

    g = decayed_grad(g, p, grad_sign, l2.to(MATH), l2 != 0.0)
    p = p * decay_mult
    d = g
    if HAS_MOMENTUM:
        # t == 1: the buffer starts as a copy of g (torch's clone)
        buf = tl.where(t == 1.0, g, momentum * buf + one_minus_dampening * g)
        if NESTEROV:
            d = g + momentum * buf
        else:
            d = buf
    p = p - lr * d
    return p, buf, _s1, _s2


RULE = Rule(
    name="sgdw",
    states=(State("momentum_buffer", signed=True, when="has_momentum"),),
    switches=(Switch("has_momentum", lambda group: float(group["momentum"]) != 0),
              Switch("nesterov", lambda group: group["nesterov"])),
    columns=("lr", "momentum", "dampening", "decay_mult", "l2", "grad_sign"),
    defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    values=values,
    check=check,
    reference=_reference,
    triton_update=triton_update,
    step_in_state=False,  # torch.optim.SGD keeps only momentum_buffer
)
