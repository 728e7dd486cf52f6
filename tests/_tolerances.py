"""The one tolerance table of the test suite.

Each entry is a few units in the last place (ulps) of its dtype, relative to
each element, plus an absolute floor of the same number of ulps of the
tensor's largest magnitude: a value that results from cancellation (a
momentum buffer near zero, say) keeps the absolute rounding error of its large
terms, which no elementwise relative bound can express. Two implementations of the same
equations differ only by operation order and FMA contraction, so agreement
within these bounds, every step for tens of steps, is what "the same rule"
means here.
"""

import torch

ULP = {  # distance from 1.0 to the next representable value
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}

ULPS = {
    # fp64 and fp32: room for a rounding difference per op over 50 steps
    torch.float64: 32,
    torch.float32: 32,
    # 16-bit storage: the fp32 results agree, but a rounding may land on the other
    # side of a boundary, which is one storage ulp; allow two.
    torch.bfloat16: 2,
    torch.float16: 2,
}

# Below fp16's normal range values are subnormal with a fixed spacing of 2^-24.
TINY = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-24}


def tol(dtype: torch.dtype, scale: float = 0.0) -> dict:
    """rtol/atol for comparing tensors of ``dtype`` whose largest magnitude is ``scale``."""
    ulps = ULPS[dtype] * ULP[dtype]
    return dict(rtol=ulps, atol=ulps * scale + ULPS[dtype] * TINY[dtype])
