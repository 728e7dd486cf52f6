"""AdamW (docs/math.md#adamw): its rule spec, reference and Triton helpers.

The C++ copy of the math: csrc/include/fusedwd/adamw.h.
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
    check_range("eps", group["eps"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_range("betas[0]", betas[0], 0.0, 1.0)
    check_range("betas[1]", betas[1], 0.0, 1.0)
    check_bool("amsgrad", group["amsgrad"])


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
        m = exp_avgs[i].to(mt) * beta1 + g * (1.0 - beta1)
        v = exp_avg_sqs[i].to(mt) * beta2 + g * g * (1.0 - beta2)
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
)
