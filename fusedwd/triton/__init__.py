"""Triton kernels for every update rule: one launch per bucket per step.

Importing this module imports Triton and defines the kernels. Triton decides
at that moment whether they are compiled for the GPU or run by its CPU
interpreter (``TRITON_INTERPRET=1``), so the variable must be set before the
first import; ``INTERPRETED`` records which it was. Interpreted kernels read
and write host memory and so take CPU tensors only; compiled ones take CUDA
tensors only.
"""

from __future__ import annotations

from typing import Callable

from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

from ._kernels import _adamw_kernel
from ._launch import BLOCK_SIZE, NUM_WARPS, adamw_step_triton, rmspropw_step_triton, sgdw_step_triton

__all__ = ["adamw_step_triton", "sgdw_step_triton", "rmspropw_step_triton", "LAUNCHERS", "INTERPRETED",
           "BLOCK_SIZE", "NUM_WARPS"]

# how triton.jit built the kernels (it reads TRITON_INTERPRET when they are defined)
INTERPRETED: bool = isinstance(_adamw_kernel, _InterpretedFunction)

# Each rule's launcher, keyed by the rule's name (fusedwd/rules). Every launcher is called
# as launcher(segments, hyper, device, dtype, *bucket.structure), plus the keyword-only
# precision options of the CPU kernel (state_dtype, master, stochastic_rounding, ctl, seed, quantized).
LAUNCHERS: dict[str, Callable[..., None]] = {
    "adamw": adamw_step_triton,
    "sgdw": sgdw_step_triton,
    "rmspropw": rmspropw_step_triton,
}
