"""LAMB (docs/math.md#lamb): its rule spec and reference.

You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes" (arXiv 1904.00962), Algorithm 2, with apex FusedLAMB's and timm
Lamb's options. A two-phase rule (docs/design.md#per-tensor-reductions): phase 1
updates the moments and sums ``||p||^2`` and ``||u||^2`` over each tensor,
phase 2 steps by the trust ratio they give. The C++ copy of the math:
csrc/include/fusedwd/lamb.h. No Triton helper yet: the Triton and CUDA backends
refuse the rule.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import Decay, check_betas, check_bool, check_common, check_range, decay_factors, group_lr_max
from ..reference import Precision, math_dtype, prologue, store, tensor_sum
from ..reference import lerp as lerp_tensor
from ._rule import Rule, State


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
)
