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
from ._launch import (BLOCK_SIZE, NUM_WARPS, adamw_step_triton, buffer_words, fill_image, image_words, launch_image,
                      rmspropw_step_triton, sgdw_step_triton)

__all__ = ["adamw_step_triton", "sgdw_step_triton", "rmspropw_step_triton", "LAUNCHERS", "INTERPRETED",
           "BLOCK_SIZE", "NUM_WARPS", "image_words", "buffer_words", "fill_image", "launch_image"]

# how triton.jit built the kernels (it reads TRITON_INTERPRET when they are defined)
INTERPRETED: bool = isinstance(_adamw_kernel, _InterpretedFunction)

# Each optimizer's launcher, keyed like the C++ module's hyperparameter tables
# (FusedOptimizer._HP_TABLE_NAME): one entry per rule. Every launcher is called
# as launcher(segments, hyper, device, dtype, *bucket.structure), plus the keyword-only
# precision options of the CPU kernel (state_dtype, master, stochastic_rounding, ctl, seed, quantized).
LAUNCHERS: dict[str, Callable[..., None]] = {
    "ADAMW_HP": adamw_step_triton,
    "SGDW_HP": sgdw_step_triton,
    "RMSPROPW_HP": rmspropw_step_triton,
}
