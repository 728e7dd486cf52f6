"""LAMB (docs/math.md#lamb): its rule spec and reference.

You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes" (arXiv 1904.00962), Algorithm 2, with apex FusedLAMB's and timm
Lamb's options. A two-phase rule (docs/design.md#per-tensor-reductions): phase 1
updates the moments and sums ``||p||^2`` and ``||u||^2`` over each tensor,
phase 2 steps by the trust ratio they give. The C++ copy of the math:
csrc/include/fusedwd/lamb.h; the Triton helpers are ``triton_*`` below.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import Decay, check_betas, check_bool, check_common, check_range, decay_factors, group_lr_max
from ..reference import Precision, math_dtype, prologue, store, tensor_sum
from ..reference import lerp as lerp_tensor
from ._rule import PhaseHelpers, Rule, State

if TYPE_CHECKING:  # what fusedwd.triton compiles the triton_* helpers with (docs/adding-a-rule.md#triton)
    import triton.language as tl

    from ..triton._kernels import adam_moments, div_rn, pow_int, sqrt_rn

    COL: Any = None  # the rule's hyperparameter columns (COL.beta1: its index), bound by compile_rule


def check(group: Mapping[str, Any]) -> None:
    check_common(group)
    check_range("eps", group["eps"], 0.0)
    check_betas(group["betas"])
    check_bool("bias_correction", group["bias_correction"])
    check_bool("always_adapt", group["always_adapt"])
    if group["max_trust_ratio"] is not None:
        if check_range("max_trust_ratio", group["max_trust_ratio"], 0.0) <= 0.0:
            raise ValueError(f"Invalid max_trust_ratio: {group['max_trust_ratio']!r} (expected > 0, or None)")


def lamb_decay(decay: str, lr: Any, weight_decay: float, lr_max: float) -> tuple[Any, float, float]:
    """``(decay_mult, l2, wd_update)`` of a decay mode (docs/math.md#lamb): "decoupled" puts
    ``wd*p`` in the update the trust ratio scales (the paper's, apex ``adam_w_mode=True``), "l2"
    in the gradient (apex ``adam_w_mode=False``), "independent" decays ``p`` first, as in every
    other rule, and leaves the update alone (timm ``decoupled_decay=True``, with lr/lr_max)."""
    if decay == Decay.DECOUPLED:
        return 1.0, 0.0, weight_decay
    decay_mult, l2 = decay_factors(decay, lr, weight_decay, lr_max)
    return decay_mult, l2, 0.0


def values(group: Mapping[str, Any]) -> dict[str, float]:
    beta1, beta2 = (float(b) for b in group["betas"])
    wd = float(group["weight_decay"])
    max_trust = group["max_trust_ratio"]
    out = dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), wd=wd if group["decay"] == Decay.DECOUPLED else 0.0,
               bias_correction=1.0 if group["bias_correction"] else 0.0,
               adapt=1.0 if (group["always_adapt"] or wd != 0.0) else 0.0,
               max_trust=math.inf if max_trust is None else float(max_trust))
    if group["decay"] == Decay.DECOUPLED:
        out.update(decay_mult=1.0, l2=0.0)  # the decay is wd*p inside the update
    return out


def trust_ratio(param_sq: float, update_sq: float, adapt: bool, max_trust: float) -> float:
    """||p|| / ||u|| from the sums of squares (float64), 1 where either norm is 0 (or NaN) or
    where the tensor does not adapt; at most ``max_trust``."""
    if not adapt:
        return 1.0
    p_norm, u_norm = math.sqrt(param_sq), math.sqrt(update_sq)
    trust = p_norm / u_norm if p_norm > 0.0 and u_norm > 0.0 else 1.0
    return min(trust, max_trust)


def sum_sq(x: Tensor) -> float:
    """The sum of squares of x in float64 (each square exact for fp32 x), in the kernel's order."""
    return tensor_sum(x.double().square())


@torch.no_grad()
def lamb(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: str = "decoupled",
    lr_max: Optional[float] = None,
    bias_correction: bool = True,
    always_adapt: bool = False,
    max_trust_ratio: Optional[float] = None,
    maximize: bool = False,
    precision: Precision = Precision(),
) -> None:
    """LAMB with an explicit decay mode (docs/math.md#lamb), one tensor at a time.

    ``steps`` holds each tensor's step count (float32 scalar tensors), incremented in place
    before use. The update reads ``m`` and ``v`` as stored (rounded to the state dtype), as
    the kernels' second phase does.
    """
    decay_mult, l2, wd = lamb_decay(decay, lr, weight_decay, lr if lr_max is None else lr_max)
    grad_sign = (-1.0 if maximize else 1.0) * precision.grad_mult
    adapt = always_adapt or weight_decay != 0.0
    max_trust = math.inf if max_trust_ratio is None else float(max_trust_ratio)
    for i, param in enumerate(params):
        steps[i] += 1
        t = float(steps[i])
        mt = math_dtype(param.dtype)
        # phase 1: the moments, as AdamW's
        p, g = prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2,
                        decay_mult=decay_mult)
        store(exp_avgs[i], lerp_tensor(exp_avgs[i].to(mt), g, 1.0 - beta1))
        store(exp_avg_sqs[i], exp_avg_sqs[i].to(mt) * beta2 + (1.0 - beta2) * g * g)
        m, v = exp_avgs[i].to(mt), exp_avg_sqs[i].to(mt)
        # the Adam direction r and the update u; per-tensor scalars in float64
        inv_bc1 = 1.0 / (1.0 - beta1**t) if bias_correction else 1.0
        bc2_sqrt = (1.0 - beta2**t) ** 0.5 if bias_correction else 1.0
        r = (m * inv_bc1) / (v.sqrt() / bc2_sqrt + eps)
        u = r + wd * p if wd != 0.0 else r
        # phase 2: the trust ratio of the whole tensor scales its step
        trust = trust_ratio(sum_sq(p), sum_sq(u), adapt, max_trust)
        precision.store(params, i, p - (lr * trust) * u, t)


def _reference(group, structure, params, grads, states, steps, precision) -> None:
    beta1, beta2 = (float(b) for b in group["betas"])
    lamb(params, grads, states["exp_avg"], states["exp_avg_sq"], steps, lr=float(group["lr"]), beta1=beta1,
         beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), decay=group["decay"],
         lr_max=group_lr_max(group), bias_correction=group["bias_correction"], always_adapt=group["always_adapt"],
         max_trust_ratio=group["max_trust_ratio"], maximize=group["maximize"], precision=precision)


# --------------------------------------------------------------------- Triton
# docs/math.md#lamb; reference: fusedwd.reference.lamb; the functions and order of csrc/include/fusedwd/lamb.h.
def triton_direction(hp, t, MATH: tl.constexpr):
    """lamb.h direction: (decay_mult, inv_bc1, bc2_sqrt, eps, wd, has_wd), float64 rounded once to MATH."""
    bc = tl.load(hp + COL.bias_correction) != 0.0
    step = t.to(tl.int64)
    inv_bc1 = tl.where(bc, div_rn(tl.full((), 1.0, tl.float64), 1.0 - pow_int(tl.load(hp + COL.beta1), step)), 1.0)
    bc2_sqrt = tl.where(bc, sqrt_rn(1.0 - pow_int(tl.load(hp + COL.beta2), step)), 1.0)
    wd = tl.load(hp + COL.wd)
    return (tl.load(hp + COL.decay_mult).to(MATH), inv_bc1.to(MATH), bc2_sqrt.to(MATH), tl.load(hp + COL.eps).to(MATH),
            wd.to(MATH), wd != 0.0)


def triton_update_of(p, m, v, inv_bc1, bc2_sqrt, eps, wd, has_wd):
    """lamb.h update_of: u = (m * inv_bc1) / (sqrt(v) / bc2_sqrt + eps), plus wd*p where wd != 0."""
    r = div_rn(m * inv_bc1, div_rn(sqrt_rn(v), bc2_sqrt) + eps)
    return tl.where(has_wd, r + wd * p, r)


def triton_reads_p(hp):
    """Phase 1 always reads p: its norm is one of the sums."""
    return tl.full((), 1, tl.int1)


def triton_moments(p, g, m, v, hp, t, grad_mult, MATH: tl.constexpr):
    """lamb.h moments: AdamW's; p decayed as phase 2 will decay it."""
    grad_sign = (tl.load(hp + COL.grad_sign) * grad_mult).to(MATH)
    g, m, v = adam_moments(g, p, m, v, tl.load(hp + COL.beta1), tl.load(hp + COL.beta2), tl.load(hp + COL.l2),
                           grad_sign, MATH)
    return p * tl.load(hp + COL.decay_mult).to(MATH), g, m, v


def triton_terms(p, g, m, v, hp, t, MATH: tl.constexpr):
    """lamb.h terms: p^2 and u^2, exact squares of MATH values in float64 (m, v as stored)."""
    _, inv_bc1, bc2_sqrt, eps, wd, has_wd = triton_direction(hp, t, MATH)
    u = triton_update_of(p, m, v, inv_bc1, bc2_sqrt, eps, wd, has_wd)
    p64 = p.to(tl.float64)
    u64 = u.to(tl.float64)
    return p64 * p64, u64 * u64


def triton_apply_scalars(hp, t, param_sq, update_sq, n, MATH: tl.constexpr):
    """lamb.h apply_scalars: lr*trust, trust = ||p|| / ||u|| (1 where either is 0 or NaN, or the tensor
    does not adapt), at most max_trust; and the direction's scalars (a tuple for triton_apply)."""
    p_norm = tl.sqrt(param_sq)  # float64: correctly rounded
    u_norm = tl.sqrt(update_sq)
    trust = tl.where((p_norm > 0.0) & (u_norm > 0.0), p_norm / tl.where(u_norm > 0.0, u_norm, 1.0), 1.0)
    max_trust = tl.load(hp + COL.max_trust)
    trust = tl.where(max_trust < trust, max_trust, trust)
    trust = tl.where(tl.load(hp + COL.adapt) != 0.0, trust, 1.0)
    lr_trust = (tl.load(hp + COL.lr) * trust).to(MATH)
    decay_mult, inv_bc1, bc2_sqrt, eps, wd, has_wd = triton_direction(hp, t, MATH)
    return lr_trust, decay_mult, inv_bc1, bc2_sqrt, eps, wd, has_wd


def triton_apply(p, m, v, scalars):
    """lamb.h apply: p*decay_mult - lr*trust*u."""
    lr_trust, decay_mult, inv_bc1, bc2_sqrt, eps, wd, has_wd = scalars
    p = p * decay_mult
    return p - lr_trust * triton_update_of(p, m, v, inv_bc1, bc2_sqrt, eps, wd, has_wd)


RULE = Rule(
    name="lamb",
    states=(State("exp_avg", signed=True), State("exp_avg_sq", signed=False)),
    switches=(),
    columns=("lr", "beta1", "beta2", "eps", "decay_mult", "l2", "grad_sign", "wd", "bias_correction", "adapt",
             "max_trust"),
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2, bias_correction=True,
                  always_adapt=False, max_trust_ratio=None),
    values=values,
    check=check,
    reference=_reference,
    sums=("param_sq", "update_sq"),
    triton_phases=PhaseHelpers(triton_reads_p, triton_moments, triton_terms, triton_apply_scalars, triton_apply),
)
