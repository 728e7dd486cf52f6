"""StableAdamW (docs/math.md#stableadamw): its rule spec and reference.

Wortsman et al. 2023, "Stable and low-precision training for large-scale
vision-language models" (arXiv 2304.13013), Algorithm 2: AdamW whose learning
rate is divided, per tensor, by max(1, RMS(g^2 / v_hat)) (Adafactor's update
clipping). A two-phase rule (docs/design.md#per-tensor-reductions): phase 1
updates the moments and sums ``g^2 / max(v_hat, eps^2)`` over each tensor,
phase 2 takes AdamW's step (and its lr-coupled decay) with the clipped lr. The
states are torch.optim.AdamW's. The C++ copy of the math:
csrc/include/fusedwd/stableadamw.h. No Triton helper yet.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._spec import Decay, check_betas, check_common, check_range, decay_factors, group_lr_max
from ..reference import Precision, math_dtype, prologue, store, tensor_sum
from ..reference import lerp as lerp_tensor
from ._rule import Rule, State


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
)
