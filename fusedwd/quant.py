"""8-bit blockwise optimizer states: the executable specification (issue 6).

docs/quantization.md has the measurements behind the choices; this module is
what every backend must reproduce bit for bit.

Layout: a state tensor is flattened (row-major) and cut into blocks of
``BLOCK_SIZE`` = 256 consecutive elements, the last block partial. Each block
stores one float32 ``absmax`` (the largest magnitude in the block) and one
uint8 code per element. Blocks never straddle tensors: a fused kernel starts a
new block at every tensor's first element, so the bytes of a tensor do not
depend on how tensors are bucketed (a shard boundary must fall on a block
boundary for the same reason).

The code: a quartic power law. A normalized magnitude ``y = |x|/absmax`` in
[0, 1] is stored as ``k = rint(K * y^(1/4))`` and decoded as ``(k/K)^4``, where
the rounding is defined without a root: k is the number of decision thresholds
``T_j = ((j - 1/2)/K)^4`` (j = 1..K, each computed like a decoded value) that y
reaches, so a kernel needs no square root to find it exactly:

- signed (m, momentum_buffer, grad_avg): K = 127, byte = 127 + sign(x)*k,
  bytes 0..254 (0 at byte 127; byte 255 is never written and decodes to 1.0);
- unsigned (v, exp_avg_sq, square_avg): K = 255, byte = k, with the rule that
  keeps Adam's denominator away from zero: a positive value never takes the
  zero code (k = 0 becomes k = 1), so a decoded v is 0 only where v is.

Quantizing v with the quartic code is quantizing sqrt(v) with a square law:
the square root halves the dynamic range the code must span, which with the
zero rule removes the m/eps blow-ups bitsandbytes' map causes (0.1-0.7% of v
elements decoded as 0 per step, measured in docs/quantization.md).

Encode of one block, every operation an IEEE float32 operation rounded to
nearest-even (no FMA contraction, no approximate division or square root):

    a   = max_i |x_i|                  NaN if any x_i is NaN
    if a is NaN or +inf:               absmax = NaN, every byte = the zero code
    elif a < 2^-126 (incl. 0):         absmax = 0,   every byte = the zero code
    else:
        inv = 1 / a                    (correctly rounded division)
        y_i = min(|x_i| * inv, 1)      signed; unsigned: min(max(x_i, 0) * inv, 1)
        k_i = #{j in 1..K : y_i >= T_j}      0 <= k_i <= K
        unsigned: if x_i > 0 and k_i == 0: k_i = 1
        byte_i = 127 + k_i if x_i > 0 else 127 - k_i    (signed; -0.0 and 0 give 127)
        byte_i = k_i                                    (unsigned)
        absmax = a

The thresholds: ``T_j`` is the float32 product chain of the decode applied to the
half code ``j - 1/2``: ``t = (j - 1/2) * RCP``, ``t2 = t * t``, ``T_j = t2 * t2``
(``thresholds`` builds them; increasing in j, T_1 = 2.4e-10 signed, 1.5e-11
unsigned). Against ``rint(sqrt(sqrt(y)) * K)`` with two correctly rounded roots
(this module's definition until issue 17) the code differs only for y within a
few float32 ulps of a threshold, by one: docs/quantization.md counts them.

Decode: ``x_i = table[byte_i] * absmax`` (one float32 multiply), where
``table[byte] = sign * t4``, ``t = k * RCP``, ``t2 = t * t``, ``t4 = t2 * t2``,
each a float32 product rounded to nearest-even, and RCP = float32(1/K)
(0x3C010204 for K = 127, 0x3B808081 for K = 255; K * RCP rounds to exactly
1.0 for both, so the top code is 1.0 and the absmax element decodes exactly).
``code_map`` builds the table; a kernel may load it or compute it, the bits
are the same. A block with
a NaN or infinite element decodes to NaN everywhere: the state is poisoned
visibly, as an fp32 state would be (by element there, by block here).

Here each float32 operation is evaluated in float64 and rounded to float32,
which gives the correctly rounded float32 result for +, -, *, / and sqrt
(53 >= 2*24 + 2: double rounding is innocuous), so the spec does not depend on
how torch implements its float32 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE", "MIN_ABSMAX", "code_map", "thresholds", "zero_code", "quantize_blockwise", "dequantize_blockwise",
    "QuantizedState", "requantized_step",
]

BLOCK_SIZE = 256  # elements per block, one fp32 absmax each
MIN_ABSMAX = 2.0**-126  # smallest normal float32: blocks below it are stored as zero
SIGNED_LEVELS = 127  # K of the signed code: magnitudes k = 0..127
UNSIGNED_LEVELS = 255  # K of the unsigned code: k = 0..255
_SIGNED_ZERO = 127  # the byte of 0 in the signed code


def _f32(x: Tensor) -> Tensor:
    """Round a float64 tensor to float32 (and hold it as float64): one IEEE fp32 rounding."""
    return x.to(torch.float32).to(torch.float64)


def zero_code(signed: bool) -> int:
    """The byte that decodes to 0: 127 (signed) or 0 (unsigned)."""
    return _SIGNED_ZERO if signed else 0


def _magnitude(k: Tensor, levels: int) -> Tensor:
    """(k/K)^4 as three float32 products: t = k * RCP, t2 = t*t, t4 = t2*t2, RCP = float32(1/K)
    (float64 holding float32). Products, not a division: a kernel decodes without dividing."""
    t = _f32(k.to(torch.float64) * _f32(torch.tensor(1.0 / levels, dtype=torch.float64)))
    t2 = _f32(t * t)
    return _f32(t2 * t2)


def thresholds(signed: bool) -> Tensor:
    """The K decision thresholds T_1 < ... < T_K of the code, float32: a normalized magnitude y
    takes the code k = #{j : y >= T_j}. T_j = ((j - 1/2)/K)^4 as the decode's three float32
    products of the half code j - 1/2 (see the module docstring)."""
    levels = SIGNED_LEVELS if signed else UNSIGNED_LEVELS
    half = torch.arange(1, levels + 1, dtype=torch.float64) - 0.5
    return _magnitude(half, levels).to(torch.float32)


def code_map(signed: bool) -> Tensor:
    """The 256 decoded values of the code, float32, indexed by byte; non-decreasing.

    signed: byte b holds sign(s) * (|s|/127)^4 (as float32 products, see the module
    docstring) with s = min(b - 127, 127):
    table[0] = -1, table[127] = 0, table[254] = table[255] = 1 (255 is never written).
    unsigned: byte b holds (b/255)^4: table[0] = 0, table[255] = 1.
    """
    b = torch.arange(256, dtype=torch.int64)
    if signed:
        s = (b - _SIGNED_ZERO).clamp(max=SIGNED_LEVELS)
        return (torch.sign(s).to(torch.float64) * _magnitude(s.abs(), SIGNED_LEVELS)).to(torch.float32)
    return _magnitude(b, UNSIGNED_LEVELS).to(torch.float32)


def _blocks(x: Tensor, block_size: int) -> tuple[Tensor, int]:
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % block_size
    # padding with 0 changes no block's absmax and is dropped after encoding
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size), n


def quantize_blockwise(x: Tensor, signed: bool, *, block_size: int = BLOCK_SIZE,
                       keep_positive: bool = True) -> tuple[Tensor, Tensor]:
    """Encode a float tensor as 8-bit codes with one float32 absmax per block.

    Args:
        x: any shape, any float dtype (converted to float32 first, as the kernels
            hold states in float32 between decode and encode).
        signed: the signed code (m, momentum, grad_avg) or the unsigned one (v, square_avg).
        block_size: elements per block along the flattened tensor; the kernels use 256.
        keep_positive: unsigned only: a positive value never takes the zero code (the
            v -> 0 remedy). ``False`` is plain round-to-nearest, for experiments only.

    Returns:
        (codes, absmax): codes uint8 of shape (x.numel(),), absmax float32 of shape
        (ceil(x.numel() / block_size),).
    """
    if x.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), torch.empty(0, dtype=torch.float32, device=x.device)
    blocks, n = _blocks(x, block_size)
    b64 = blocks.to(torch.float64)
    absmax = b64.abs().amax(1)  # max is exact; amax propagates NaN
    absmax = torch.where(blocks.isnan().any(1), torch.full_like(absmax, float("nan")), absmax)
    bad = ~torch.isfinite(absmax)
    tiny = absmax < MIN_ABSMAX
    ok = ~(bad | tiny)
    inv = _f32(1.0 / torch.where(ok, absmax, torch.ones_like(absmax)))
    mag = b64.abs() if signed else b64.clamp(min=0.0)
    y = _f32(mag * inv[:, None]).clamp(max=1.0)
    y = torch.where(ok[:, None], y, torch.zeros_like(y))  # NaN and inf elements of bad blocks too
    # the number of thresholds each y reaches (exact comparisons of float32 values held in float64)
    k = torch.searchsorted(thresholds(signed).to(torch.float64).to(y.device), y.contiguous(), right=True)
    if signed:
        codes = torch.where(b64 > 0, _SIGNED_ZERO + k, _SIGNED_ZERO - k)
    else:
        codes = k
        if keep_positive:
            codes = torch.where((b64 > 0) & (k == 0) & ok[:, None], torch.ones_like(k), k)
    stored = torch.where(bad, torch.full_like(absmax, float("nan")),
                         torch.where(tiny, torch.zeros_like(absmax), absmax))
    return codes.reshape(-1)[:n].to(torch.uint8), stored.to(torch.float32)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, shape: Sequence[int] | torch.Size, signed: bool, *,
                         block_size: int = BLOCK_SIZE) -> Tensor:
    """Decode: ``table[byte] * absmax`` of its block, float32, reshaped to ``shape``."""
    flat = codes.reshape(-1)
    n = flat.numel()
    table = code_map(signed).to(codes.device)
    scale = absmax.to(torch.float32).repeat_interleave(block_size)[:n]
    out = (table[flat.long()].to(torch.float64) * scale.to(torch.float64)).to(torch.float32)
    return out.reshape(shape)


@dataclass
class QuantizedState:
    """One 8-bit state tensor: its codes, block absmax, shape and code."""

    codes: Tensor  # uint8, (numel,)
    absmax: Tensor  # float32, (ceil(numel / BLOCK_SIZE),)
    shape: torch.Size
    signed: bool

    @classmethod
    def quantize(cls, x: Tensor, signed: bool) -> "QuantizedState":
        codes, absmax = quantize_blockwise(x, signed)
        return cls(codes, absmax, x.shape, signed)

    @classmethod
    def zeros(cls, shape: Sequence[int], signed: bool, device=None) -> "QuantizedState":
        """The state of a fresh optimizer: every element 0."""
        shape = torch.Size(shape)
        n = shape.numel()
        codes = torch.full((n,), zero_code(signed), dtype=torch.uint8, device=device)
        return cls(codes, torch.zeros(-(-n // BLOCK_SIZE), dtype=torch.float32, device=device), shape, signed)

    def dequantize(self) -> Tensor:
        return dequantize_blockwise(self.codes, self.absmax, self.shape, self.signed)


def requantized_step(update: Callable[..., Sequence[Tensor]], *states: QuantizedState) -> list[QuantizedState]:
    """One optimizer step on 8-bit states, in the order the fused kernels follow.

    1. decode every state with its OLD absmax (float32);
    2. ``new = update(*decoded)``: the rule's float32 math on the decoded states
       and the gradient; it also updates the weight, from these UNQUANTIZED new
       states (never from their 8-bit round trip);
    3. per block, the NEW absmax of each new state;
    4. re-encode each new state with its new absmax.

    In a kernel, 2 to 4 happen per block of 256 in one pass: the block's new
    states are held (registers, shared memory or a 1 KB stack buffer per state)
    while the weight is written, reduced to their absmax, then encoded and stored.

    Args:
        update: takes the decoded float32 states in order, returns the new float32
            states in the same order (and steps the parameter as a side effect).
        states: the quantized states, e.g. (exp_avg, exp_avg_sq).

    Returns:
        The new quantized states, in order.

    Example (AdamW, torch's order: decay, moments, step)::

        def adamw(m, v):
            p.mul_(1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p.sub_(lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps))
            return m, v

        exp_avg, exp_avg_sq = requantized_step(adamw, exp_avg, exp_avg_sq)
    """
    decoded = [s.dequantize() for s in states]
    new = update(*decoded)
    if len(new) != len(states):
        raise ValueError(f"update returned {len(new)} states for {len(states)}")
    return [QuantizedState.quantize(x, s.signed) for x, s in zip(new, states)]
