"""Pure-torch update rules: the executable specification.

Each function implements one section of docs/math.md line by line, one tensor
at a time, in place, with the math in float32 (float64 for fp64 storage) and
one rounding to the storage dtype per stored value. Every compiled backend is
tested against these functions, and these functions are tested against
``torch.optim`` where torch has the same rule. They favour clarity over speed.

The functional signature follows ``torch.optim``'s functional API: lists of
tensors for one param group, hyperparameters as keywords.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._spec import decay_factors

__all__ = ["adamw", "sgdw", "rmspropw", "math_dtype", "Precision", "stochastic_round_bf16"]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in for a storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prologue(p: Tensor, g: Tensor, *, grad_sign: float, l2: float, decay_mult: float) -> tuple[Tensor, Tensor]:
    # docs/math.md#weight-decay-modes: g <- grad_sign*g + l2*p (old p); p <- decay_mult*p.
    # The L2 term only where there is L2 decay, as torch: 0*Inf would be NaN.
    g = g * grad_sign
    if l2 != 0:
        g = g + l2 * p
    p = p * decay_mult
    return p, g


def _lerp(a: Tensor, b: Tensor, weight: float) -> Tensor:
    """torch's lerp(a, b, weight) formula (aten/src/ATen/native/Lerp.h) without its FMA.

    a + w*(b - a) for |w| < 0.5, else b + (w - 1)*(b - a) (torch's b - (b - a)*(1 - w), the
    same bits), w rounded to a's dtype: NaN where a and b are the same infinity
    (docs/math.md#non-finite-values).
    """
    w = torch.tensor(weight, dtype=a.dtype)
    small = bool(w.abs() < 0.5)
    coeff = w if small else w - 1
    return (a if small else b) + coeff * (b - a)


def _store(dst: Tensor, value: Tensor) -> None:
    # round to the storage dtype once, to nearest-even
    dst.copy_(value)


# ------------------------------------------------------------ stochastic rounding
# docs/math.md#stochastic-rounding; csrc/include/fusedwd/common.h has the C++ copy.
_U32 = 0xFFFFFFFF


def _mix32(h):
    """murmur3's 32-bit finalizer, on a Python int or an int64 tensor of values < 2^32."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _U32  # int64 products wrap mod 2^64: the low 32 bits are exact
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _U32
    return h ^ (h >> 16)


def sr_key(seed: int, salt: int, t: float) -> int:
    """The key of one tensor's random bits at step ``t``."""
    k = _mix32((seed & _U32) ^ _mix32(((seed >> 32) + 0x9E3779B9) & _U32))
    k = _mix32(k ^ (salt & _U32))
    return _mix32((k + ((int(t) * 0x9E3779B9) & _U32)) & _U32)


def stochastic_round_bf16(x: Tensor, key: int, first: int = 0) -> Tensor:
    """Round fp32 ``x`` to bf16, up with probability (x - down)/(up - down).

    Element ``i`` (flat index, counted from ``first``: x may be a slice of its tensor from element
    ``first`` on) adds the low 16 bits of ``mix32(key ^ uint32(i ^ (i >> 32))*0x27d4eb2f)``
    below bf16's last kept bit and truncates; NaN (quieted) and Inf are kept.
    """
    u = x.detach().contiguous().view(torch.int32).to(torch.int64).reshape(-1) & _U32
    i = first + torch.arange(u.numel(), dtype=torch.int64, device=x.device)
    bits = _mix32(key ^ (((i ^ (i >> 32)) & _U32) * 0x27D4EB2F & _U32))
    magnitude = u & 0x7FFFFFFF
    rounded = (u + (bits & 0xFFFF)) >> 16
    special = torch.where(magnitude > 0x7F800000, (u >> 16) | 0x40, u >> 16)
    out = torch.where(magnitude >= 0x7F800000, special, rounded) & 0xFFFF
    out = torch.where(out >= 0x8000, out - 0x10000, out)  # as a signed 16-bit pattern
    return out.to(torch.int16).view(torch.bfloat16).reshape(x.shape)


@dataclass(frozen=True)
class Precision:
    """How a rule reads and writes parameters and gradients (docs/math.md#precision).

    Attributes:
        masters: per parameter, its fp32 master copy (or None): the update reads
            and writes the master, and the parameter receives it rounded to nearest even.
        grad_mult: multiplies every gradient (1/grad_scale times the clip coefficient),
            folded into grad_sign.
        stochastic_rounding: round bf16 parameters stochastically (no master).
        seed, salts: the seed, and per parameter its salt, of the rounding's random bits.
    """

    masters: Optional[Sequence[Optional[Tensor]]] = None
    grad_mult: float = 1.0
    stochastic_rounding: bool = False
    seed: int = 0
    salts: Sequence[int] = ()

    def load(self, params: Sequence[Tensor], i: int, mt: torch.dtype) -> Tensor:
        master = self.masters[i] if self.masters is not None else None
        return (master if master is not None else params[i]).to(mt)

    def store(self, params: Sequence[Tensor], i: int, p: Tensor, t: float) -> None:
        master = self.masters[i] if self.masters is not None else None
        if master is not None:
            _store(master, p)
            _store(params[i], p)
        elif self.stochastic_rounding and params[i].dtype == torch.bfloat16:
            params[i].copy_(stochastic_round_bf16(p, sr_key(self.seed, self.salts[i], t)))
        else:
            _store(params[i], p)


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
        p, g = _prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2,
                         decay_mult=decay_mult)
        m = _lerp(exp_avgs[i].to(mt), g, 1.0 - beta1)
        v = exp_avg_sqs[i].to(mt) * beta2 + (1.0 - beta2) * g * g
        v_hat = v
        if amsgrad:
            v_hat = torch.maximum(max_exp_avg_sqs[i].to(mt), v)
            _store(max_exp_avg_sqs[i], v_hat)
        # per-tensor scalars in float64, from this tensor's own step count
        step_size = lr / (1.0 - beta1**t)
        bc2_sqrt = (1.0 - beta2**t) ** 0.5
        p = p - step_size * m / (v_hat.sqrt() / bc2_sqrt + eps)
        _store(exp_avgs[i], m)
        _store(exp_avg_sqs[i], v)
        precision.store(params, i, p, float(steps[i]))


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
        p, g = _prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2,
                         decay_mult=decay_mult)
        d = g
        if momentum != 0:
            buf = g if first else momentum_buffers[i].to(mt) * momentum + g * (1.0 - dampening)
            _store(momentum_buffers[i], buf)
            d = g + momentum * buf if nesterov else buf
        p = p - lr * d
        precision.store(params, i, p, float(steps[i]))


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
        p, g = _prologue(precision.load(params, i, mt), grads[i].to(mt), grad_sign=grad_sign, l2=l2,
                         decay_mult=decay_mult)
        sq = square_avgs[i].to(mt) * alpha + (1.0 - alpha) * g * g
        if centered:
            ga = _lerp(grad_avgs[i].to(mt), g, 1.0 - alpha)
            avg = (sq - ga * ga).sqrt() + eps
            _store(grad_avgs[i], ga)
        else:
            avg = sq.sqrt() + eps
        if momentum > 0:
            buf = momentum_buffers[i].to(mt) * momentum + g / avg
            _store(momentum_buffers[i], buf)
            p = p - lr * buf
        else:
            p = p - lr * g / avg
        _store(square_avgs[i], sq)
        precision.store(params, i, p, float(steps[i]))
