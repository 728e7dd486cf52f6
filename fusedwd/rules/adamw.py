"""AdamW (docs/math.md#adamw): its rule spec, reference and Triton helpers.

The C++ copy of the math: csrc/include/fusedwd/adamw.h.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import (
    DECOUPLED_KEY,
    check_adam_tensor_flags,
    check_betas,
    check_bool,
    check_common,
    check_decoupled_key,
    check_range,
    decay_factors,
    group_lr_max,
)
from ..reference import Precision, math_dtype, prologue, store
from ..reference import lerp as lerp_tensor  # (the Triton helper below uses the Triton lerp)
from ._rule import Rule, State, Switch

if TYPE_CHECKING:  # what fusedwd.triton compiles triton_update with (docs/adding-a-rule.md#triton)
    import triton.language as tl

    from ..triton._kernels import decayed_grad, div_rn, lerp, lerp_weight, maximum, pow_int, sqrt_rn

    COL: Any = None  # the rule's hyperparameter columns (COL.beta1: its index), bound by compile_rule


def check(group: Mapping[str, Any]) -> None:
    check_common(group)
    check_range("eps", group["eps"], 0.0)
    betas = group["betas"]
    check_betas(betas)
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        # torch.optim.Adam's rule (it also rejects ints; fusedwd takes any real number)
        raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}")
    check_adam_tensor_flags(group)
    check_bool("amsgrad", group["amsgrad"])
    if DECOUPLED_KEY in group:
        check_decoupled_key(group)


def values(group: Mapping[str, Any]) -> dict[str, float]:
    beta1, beta2 = (float(b) for b in group["betas"])
    return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]))


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
    precision: Precision = Precision(),
) -> None:
    """AdamW with an explicit decay mode (docs/math.md#adamw).

    ``steps`` holds each tensor's step count (a float32 scalar tensor, torch's
    layout); it is incremented in place before use, so the first step uses t=1.
    """
    decay_mult, l2 = decay_factors(decay, lr, weight_decay, lr if lr_max is None else lr_max)
    grad_sign = (-1.0 if maximize else 1.0) * precision.grad_mult
    for i, param in enumerate(params):
        steps[i] += 1
        t = float(steps[i])
        mt = math_dtype(param.dtype)
        p, g = prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2,
                        decay_mult=decay_mult)
        m = lerp_tensor(exp_avgs[i].to(mt), g, 1.0 - beta1)
        v = exp_avg_sqs[i].to(mt) * beta2 + (1.0 - beta2) * g * g
        v_hat = v
        if amsgrad:
            v_hat = torch.maximum(max_exp_avg_sqs[i].to(mt), v)
            store(max_exp_avg_sqs[i], v_hat)
        # per-tensor scalars in float64, from this tensor's own step count
        step_size = lr / (1.0 - beta1**t)
        bc2_sqrt = (1.0 - beta2**t) ** 0.5
        p = p - step_size * m / (v_hat.sqrt() / bc2_sqrt + eps)
        store(exp_avgs[i], m)
        store(exp_avg_sqs[i], v)
        precision.store(params, i, p, float(steps[i]))


def _reference(group, structure, params, grads, states, steps, precision) -> None:
    (amsgrad,) = structure
    beta1, beta2 = (float(b) for b in group["betas"])
    adamw(params, grads, states["exp_avg"], states["exp_avg_sq"], states.get("max_exp_avg_sq", [None] * len(params)),
          steps, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
          weight_decay=float(group["weight_decay"]), decay=group["decay"], lr_max=group_lr_max(group),
          amsgrad=amsgrad, maximize=group["maximize"], precision=precision)


# --------------------------------------------------------------------- Triton
def triton_update(p, g, m, v, vmax, hp, t, grad_mult, MATH: tl.constexpr, AMSGRAD: tl.constexpr):
    """One block of elements (fusedwd.triton compiles this: docs/adding-a-rule.md#triton).

    hp: the segment's hyper row; t: its 1-based step (float64); grad_mult: 1/grad_scale times
    the clip coefficient (float64). Scalars in float64, rounded once to the math type.
    """
    # docs/math.md#adamw; reference: fusedwd.reference.adamw; the order of csrc/include/fusedwd/adamw.h
    beta1 = tl.load(hp + COL.beta1)
    beta2 = tl.load(hp + COL.beta2)
    step_size = div_rn(tl.load(hp + COL.lr), 1.0 - pow_int(beta1, t.to(tl.int64))).to(MATH)
    bc2_sqrt = sqrt_rn(1.0 - pow_int(beta2, t.to(tl.int64))).to(MATH)
    grad_sign = (tl.load(hp + COL.grad_sign) * grad_mult).to(MATH)
    l2 = tl.load(hp + COL.l2)
    decay_mult = tl.load(hp + COL.decay_mult).to(MATH)
    m_coeff, m_small = lerp_weight(1.0 - beta1, MATH)
    eps = tl.load(hp + COL.eps).to(MATH)

    # the operations and their order are torch's (docs/math.md#non-finite-values)
    g = decayed_grad(g, p, grad_sign, l2.to(MATH), l2 != 0.0)
    p = p * decay_mult
    m = lerp(m, g, m_coeff, m_small)
    v = beta2.to(MATH) * v + ((1.0 - beta2).to(MATH) * g) * g
    v_used = v
    if AMSGRAD:
        vmax = maximum(vmax, v)
        v_used = vmax
    denom = div_rn(sqrt_rn(v_used), bc2_sqrt) + eps
    p = p - div_rn(step_size * m, denom)
    return p, m, v, vmax


RULE = Rule(
    name="adamw",
    states=(State("exp_avg", signed=True), State("exp_avg_sq", signed=False),
            State("max_exp_avg_sq", signed=False, when="amsgrad")),
    switches=(Switch("amsgrad", lambda group: group["amsgrad"]),),
    columns=("lr", "beta1", "beta2", "eps", "decay_mult", "l2", "grad_sign"),
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False),
    values=values,
    check=check,
    reference=_reference,
    triton_update=triton_update,
)
