"""Pure-torch update rules: the executable specification.

Each function implements one section of docs/math.md line by line, one tensor
at a time, in place, with the math in float32 (float64 for fp64 storage) and
one rounding to the storage dtype per stored value. Every compiled backend is
tested against these functions, and these functions are tested against
``torch.optim`` where torch has the same rule. They favour clarity over speed.

The functional signature follows ``torch.optim``'s functional API: lists of
tensors for one param group, hyperparameters as keywords. Each rule's function
lives with its rule spec (fusedwd/rules/<rule>.py) and is found here by name:
``fusedwd.reference.adamw`` is ``fusedwd.rules.adamw.adamw``. This module holds
what they share: the decay prologue, torch's lerp, rounding, master weights and
stochastic rounding.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["math_dtype", "Precision", "stochastic_round_bf16", "tensor_sum"]  # and every rule's function (below)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the update is computed in for a storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prologue(p: Tensor, g: Tensor, *, grad_sign: float, l2: float, decay_mult: float) -> tuple[Tensor, Tensor]:
    # docs/math.md#weight-decay-modes: g <- grad_sign*g + l2*p (old p); p <- decay_mult*p.
    # The L2 term only where there is L2 decay, as torch: 0*Inf would be NaN.
    g = g * grad_sign
    if l2 != 0:
        g = g + l2 * p
    p = p * decay_mult
    return p, g


def lerp(a: Tensor, b: Tensor, weight: float) -> Tensor:
    """torch's lerp(a, b, weight) formula (aten/src/ATen/native/Lerp.h) without its FMA.

    a + w*(b - a) for |w| < 0.5, else b + (w - 1)*(b - a) (torch's b - (b - a)*(1 - w), the
    same bits), w rounded to a's dtype: NaN where a and b are the same infinity
    (docs/math.md#non-finite-values).
    """
    w = torch.tensor(weight, dtype=a.dtype)
    small = bool(w.abs() < 0.5)
    coeff = w if small else w - 1
    return (a if small else b) + coeff * (b - a)


def tensor_sum(terms: Tensor) -> float:
    """The sum of a tensor's terms (float64) in the CPU kernel's fixed order
    (docs/design.md#per-tensor-reductions), so the two-phase rules' sums are the kernel's bits:
    chunks of 64 zero-padded terms, each 16 lanes of 4 sequential adds then a tree; the chunks'
    sums added in order (a sequential cumsum)."""
    x = terms.reshape(-1).double()
    if x.numel() == 0:
        return 0.0
    x = torch.cat([x, x.new_zeros((-x.numel()) % 64)]).view(-1, 4, 16)
    lanes = ((x[:, 0] + x[:, 1]) + x[:, 2]) + x[:, 3]
    for width in (8, 4, 2, 1):
        lanes = lanes[:, :width] + lanes[:, width : 2 * width]
    return float(torch.cumsum(lanes[:, 0], 0)[-1])


def store(dst: Tensor, value: Tensor) -> None:
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
            store(master, p)
            store(params[i], p)
        elif self.stochastic_rounding and params[i].dtype == torch.bfloat16:
            params[i].copy_(stochastic_round_bf16(p, sr_key(self.seed, self.salts[i], t)))
        else:
            store(params[i], p)


def __getattr__(name: str):
    # fusedwd.reference.<rule>: the rule's reference function, from the registry
    from . import rules

    if name in rules.RULES:
        return getattr(importlib.import_module(f"{rules.__name__}.{name}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    from . import rules

    return sorted(set(globals()) | set(rules.RULES))
