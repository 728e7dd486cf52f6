"""Lion (docs/math.md#lion): its rule spec, reference and Triton helper.

Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms" (arXiv 2302.06675),
Program 1. The C++ copy of the math: csrc/include/fusedwd/lion.h.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import check_betas, check_common, decay_factors, group_lr_max
from ..reference import Precision, math_dtype, prologue, store
from ..reference import lerp as lerp_tensor  # (the Triton helper below uses the Triton lerp)
from ._rule import Rule, State

if TYPE_CHECKING:  # what fusedwd.triton compiles triton_update with (docs/adding-a-rule.md#triton)
    import triton.language as tl

    from ..triton._kernels import decayed_grad, lerp, lerp_weight

    COL: Any = None  # the rule's hyperparameter columns (COL.beta1: its index), bound by compile_rule


def check(group: Mapping[str, Any]) -> None:
    check_common(group)
    check_betas(group["betas"])


def values(group: Mapping[str, Any]) -> dict[str, float]:
    beta1, beta2 = (float(b) for b in group["betas"])
    return dict(beta1=beta1, beta2=beta2)


def sign(c: Tensor) -> Tensor:
    """+1 or -1 by the sign of c; c itself where it is +-0 (no step) or NaN (propagated)."""
    return torch.where(c > 0, 1.0, torch.where(c < 0, -1.0, c))


@torch.no_grad()
def lion(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: Optional[float] = None,
    maximize: bool = False,
    precision: Precision = Precision(),
) -> None:
    """Lion with an explicit decay mode (docs/math.md#lion).

    ``steps`` counts steps per tensor (the rule does not use it; stochastic rounding does).
    """
    decay_mult, l2 = decay_factors(decay, lr, weight_decay, lr if lr_max is None else lr_max)
    grad_sign = (-1.0 if maximize else 1.0) * precision.grad_mult
    for i, param in enumerate(params):
        steps[i] += 1
        mt = math_dtype(param.dtype)
        p, g = prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2,
                        decay_mult=decay_mult)
        m = exp_avgs[i].to(mt)
        # torch's lerp, as optimi and lion-pytorch write Lion (docs/math.md#non-finite-values)
        c = lerp_tensor(m, g, 1.0 - beta1)  # the update's direction: interpolated with beta1
        p = p - lr * sign(c)
        store(exp_avgs[i], lerp_tensor(m, g, 1.0 - beta2))  # the momentum kept: with beta2
        precision.store(params, i, p, float(steps[i]))


def _reference(group, structure, params, grads, states, steps, precision) -> None:
    beta1, beta2 = (float(b) for b in group["betas"])
    lion(params, grads, states["exp_avg"], steps, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
         weight_decay=float(group["weight_decay"]), decay=group["decay"], lr_max=group_lr_max(group),
         maximize=group["maximize"], precision=precision)


# --------------------------------------------------------------------- Triton
def triton_update(p, g, m, _s1, _s2, hp, t, grad_mult, MATH: tl.constexpr):
    """One block of elements (fusedwd.triton compiles this: docs/adding-a-rule.md#triton)."""
    # docs/math.md#lion; reference: fusedwd.reference.lion; the order of csrc/include/fusedwd/lion.h
    grad_sign = (tl.load(hp + COL.grad_sign) * grad_mult).to(MATH)
    l2 = tl.load(hp + COL.l2)
    decay_mult = tl.load(hp + COL.decay_mult).to(MATH)
    lr = tl.load(hp + COL.lr).to(MATH)
    c_coeff, c_small = lerp_weight(1.0 - tl.load(hp + COL.beta1), MATH)
    m_coeff, m_small = lerp_weight(1.0 - tl.load(hp + COL.beta2), MATH)

    # the operations and their order are torch's (docs/math.md#non-finite-values)
    g = decayed_grad(g, p, grad_sign, l2.to(MATH), l2 != 0.0)
    p = p * decay_mult
    c = lerp(m, g, c_coeff, c_small)
    p = p - lr * tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, c))
    m = lerp(m, g, m_coeff, m_small)
    return p, m, _s1, _s2


RULE = Rule(
    name="lion",
    states=(State("exp_avg", signed=True),),
    switches=(),
    columns=("lr", "beta1", "beta2", "decay_mult", "l2", "grad_sign"),
    defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0),
    values=values,
    check=check,
    reference=_reference,
    triton_update=triton_update,
)
