"""A Triton kernel that runs fusedwd.triton's 8-bit encode guess (``_q8_level``) over an array.

Imported by tests/test_triton.py after it set TRITON_INTERPRET (or not): Triton decides at
definition time whether a kernel is interpreted, so this module is (re)loaded then.
"""

import triton
import triton.language as tl

from fusedwd.triton._kernels import _q8_level


@triton.jit
def level_kernel(y_ptr, k_ptr, n, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: n < 2^31 here
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)  # normalized magnitudes in [0, 1]
    tl.store(k_ptr + offs, _q8_level(y, SIGNED).to(tl.int32), mask=mask)  # their codes


def levels(y, signed: bool):
    """The code of every y (float32, [0, 1]) by the Triton helper, as an int32 tensor."""
    import torch

    k = torch.empty(y.shape, dtype=torch.int32, device=y.device)
    block = 1024
    level_kernel[(triton.cdiv(y.numel(), block),)](y, k, y.numel(), SIGNED=signed, BLOCK=block)
    return k
