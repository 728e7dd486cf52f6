"""The Triton kernel of every update rule: one launch per bucket per step (``step(rule, ...)``
from host tables, ``launch_image`` over tables kept on the device).

Importing this module imports Triton and defines the kernels. Triton decides
at that moment whether they are compiled for the GPU or run by its CPU
interpreter (``TRITON_INTERPRET=1``), so the variable must be set before the
first import; ``INTERPRETED`` records which it was. Interpreted kernels read
and write host memory and so take CPU tensors only; compiled ones take CUDA
tensors only.
"""

from __future__ import annotations

from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

from ._kernels import _step_kernel
from ._launch import (
    BLOCK_SIZE,
    NUM_WARPS,
    buffer_words,
    fill_image,
    image_words,
    launch_image,
    program_capacity,
    segment_rows,
    step,
    sums_view,
)

__all__ = ["step", "launch_image", "image_words", "buffer_words", "fill_image", "program_capacity", "segment_rows",
           "sums_view",
           "INTERPRETED", "BLOCK_SIZE", "NUM_WARPS"]

# how triton.jit built the kernels (it reads TRITON_INTERPRET when they are defined)
INTERPRETED: bool = isinstance(_step_kernel, _InterpretedFunction)
