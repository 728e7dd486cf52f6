"""StableAdamW (docs/math.md#stableadamw): its rule spec and reference.

Wortsman et al. 2023, "Stable and low-precision training for large-scale
vision-language models" (arXiv 2304.13013), Algorithm 2: AdamW whose learning
rate is divided, per tensor, by max(1, RMS(g^2 / v_hat)) (Adafactor's update
clipping). A two-phase rule (docs/design.md#per-tensor-reductions): phase 1
updates the moments and sums ``g^2 / max(v_hat, eps^2)`` over each tensor,
phase 2 takes AdamW's step (and its lr-coupled decay) with the clipped lr. The
states are torch.optim.AdamW's. The C++ copy of the math:
csrc/include/fusedwd/stableadamw.h; the Triton helpers are ``triton_*`` below.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import Decay, check_betas, check_common, check_range, decay_factors, group_lr_max
from ..reference import Precision, math_dtype, prologue, store, tensor_sum
from ..reference import lerp as lerp_tensor
from ._rule import PhaseHelpers, Rule, State

if TYPE_CHECKING:  # what fusedwd.triton compiles the triton_* helpers with (docs/adding-a-rule.md#triton)
    import triton.language as tl

    from ..triton._kernels import adam_moments, div_rn, maximum, pow_int, sqrt_rn

    COL: Any = None  # the rule's hyperparameter columns (COL.beta1: its index), bound by compile_rule


def check(group: Mapping[str, Any]) -> None:
    check_common(group)
    check_range("eps", group["eps"], 0.0)
    check_betas(group["betas"])


def values(group: Mapping[str, Any]) -> dict[str, float]:
    beta1, beta2 = (float(b) for b in group["betas"])
    decay, wd = group["decay"], float(group["weight_decay"])
    # the decay is applied in phase 2 with the clipped lr: 1 - (lr_t/wd_lr_max)*wd, wd_lr_max = 1 for
    # "decoupled" (1 - lr_t*wd), lr_max for "independent", and wd = 0 for "l2" (its term is in g)
    return dict(beta1=beta1, beta2=beta2, eps=float(group["eps"]), decay_mult=1.0,
                wd=0.0 if decay == Decay.L2 else wd,
                wd_lr_max=group_lr_max(group) if decay == Decay.INDEPENDENT else 1.0)


def clipped_lr(lr: float, ratio_sum: float, n: int) -> float:
    """lr / max(1, RMS): RMS = sqrt(ratio_sum / n), in float64 (a NaN RMS leaves lr: max(1, NaN) is
    taken as 1, as Python's max and the kernels' comparison do)."""
    rms = math.sqrt(ratio_sum / n) if n > 0 else 0.0
    return lr / rms if rms > 1.0 else lr


@torch.no_grad()
def stableadamw(
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
    maximize: bool = False,
    precision: Precision = Precision(),
) -> None:
    """StableAdamW with an explicit decay mode (docs/math.md#stableadamw), one tensor at a time.

    ``steps`` holds each tensor's step count (float32 scalar tensors), incremented in place
    before use. The step reads ``m`` and ``v`` as stored (rounded to the state dtype), as the
    kernels' second phase does: with fp32 states, and an RMS <= 1, this is AdamW's step.
    """
    lr_max = lr if lr_max is None else lr_max
    _, l2 = decay_factors(decay, lr, weight_decay, lr_max)
    grad_sign = (-1.0 if maximize else 1.0) * precision.grad_mult
    for i, param in enumerate(params):
        steps[i] += 1
        t = float(steps[i])
        mt = math_dtype(param.dtype)
        # phase 1: AdamW's moments, and the ratio g^2 / max(v_hat, eps^2) with this step's v
        p, g = prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2, decay_mult=1.0)
        store(exp_avgs[i], lerp_tensor(exp_avgs[i].to(mt), g, 1.0 - beta1))
        store(exp_avg_sqs[i], exp_avg_sqs[i].to(mt) * beta2 + (1.0 - beta2) * g * g)
        m, v = exp_avgs[i].to(mt), exp_avg_sqs[i].to(mt)
        bc2 = 1.0 - beta2**t
        eps_sq = torch.tensor(eps * eps, dtype=mt)
        ratio_sum = tensor_sum((g * g) / torch.maximum(v / bc2, eps_sq))
        # phase 2: AdamW's step and decay with lr_t = lr / max(1, RMS)
        lr_t = clipped_lr(lr, ratio_sum, p.numel())
        decay_mult, _ = decay_factors(decay, lr_t, weight_decay, lr_max)
        step_size = lr_t / (1.0 - beta1**t)
        p = p * decay_mult - (step_size * m) / (v.sqrt() / bc2**0.5 + eps)
        precision.store(params, i, p, t)


def _reference(group, structure, params, grads, states, steps, precision) -> None:
    beta1, beta2 = (float(b) for b in group["betas"])
    stableadamw(params, grads, states["exp_avg"], states["exp_avg_sq"], steps, lr=float(group["lr"]), beta1=beta1,
                beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), decay=group["decay"],
                lr_max=group_lr_max(group), maximize=group["maximize"], precision=precision)


# --------------------------------------------------------------------- Triton
# docs/math.md#stableadamw; reference: fusedwd.reference.stableadamw; the functions and order of
# csrc/include/fusedwd/stableadamw.h.
def triton_reads_p(hp):
    """Phase 1 reads p only for the L2 term (p is decayed in phase 2)."""
    return tl.load(hp + COL.l2) != 0.0


def triton_moments(p, g, m, v, hp, t, grad_mult, MATH: tl.constexpr):
    """stableadamw.h moments: AdamW's (p is decayed in phase 2, with the clipped lr)."""
    grad_sign = (tl.load(hp + COL.grad_sign) * grad_mult).to(MATH)
    g, m, v = adam_moments(g, p, m, v, tl.load(hp + COL.beta1), tl.load(hp + COL.beta2), tl.load(hp + COL.l2),
                           grad_sign, MATH)
    return p, g, m, v


def triton_terms(p, g, m, v, hp, t, MATH: tl.constexpr):
    """stableadamw.h terms: g^2 / max(v / bc2, eps^2) in MATH, widened (v as stored); one sum,
    so the second term is a 0 the kernel never combines."""
    bc2 = (1.0 - pow_int(tl.load(hp + COL.beta2), t.to(tl.int64))).to(MATH)
    eps = tl.load(hp + COL.eps)
    # a block, as maximum's operands must be (tl.full: a builtin, where tl.zeros_like is a jit
    # function of Triton's own, defined compiled or interpreted once per process: fusedwd/triton/_phases.py)
    eps_sq = tl.full(v.shape, eps * eps, MATH)
    ratio = div_rn(g * g, maximum(div_rn(v, bc2), eps_sq)).to(tl.float64)
    return ratio, tl.full(ratio.shape, 0.0, tl.float64)


def triton_apply_scalars(hp, t, ratio_sum, unused, n, MATH: tl.constexpr):
    """stableadamw.h apply_scalars: AdamW's scalars with lr_t = lr / max(1, RMS), RMS = sqrt(ratio_sum / n)
    (a NaN RMS leaves lr), as a tuple for triton_apply."""
    lr = tl.load(hp + COL.lr)
    rms = tl.where(n > 0, tl.sqrt(ratio_sum / tl.maximum(n, 1).to(tl.float64)), 0.0)
    lr_t = tl.where(rms > 1.0, lr / tl.where(rms > 1.0, rms, 1.0), lr)
    lr_max = tl.load(hp + COL.wd_lr_max)
    # "independent" with lr_max == 0 (a group built with lr=0): the full rate only if lr_t > 0
    mult = tl.where(lr_max > 0.0, lr_t / tl.where(lr_max > 0.0, lr_max, 1.0), tl.where(lr_t > 0.0, 1.0, 0.0))
    decay_mult = (1.0 - mult * tl.load(hp + COL.wd)).to(MATH)
    step = t.to(tl.int64)
    step_size = div_rn(lr_t, 1.0 - pow_int(tl.load(hp + COL.beta1), step)).to(MATH)
    bc2_sqrt = sqrt_rn(1.0 - pow_int(tl.load(hp + COL.beta2), step)).to(MATH)
    return decay_mult, step_size, bc2_sqrt, tl.load(hp + COL.eps).to(MATH)


def triton_apply(p, m, v, scalars):
    """stableadamw.h apply: AdamW's step and decay with the clipped lr."""
    decay_mult, step_size, bc2_sqrt, eps = scalars
    p = p * decay_mult
    denom = div_rn(sqrt_rn(v), bc2_sqrt) + eps
    return p - div_rn(step_size * m, denom)


RULE = Rule(
    name="stableadamw",
    states=(State("exp_avg", signed=True), State("exp_avg_sq", signed=False)),
    switches=(),
    columns=("lr", "beta1", "beta2", "eps", "decay_mult", "l2", "grad_sign", "wd", "wd_lr_max"),
    defaults=dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2),
    values=values,
    check=check,
    reference=_reference,
    sums=("ratio_sum",),
    means=("ratio_sum",),  # RMS = sqrt(ratio_sum / numel)
    triton_phases=PhaseHelpers(triton_reads_p, triton_moments, triton_terms, triton_apply_scalars, triton_apply),
)
