// The AdamW kernels, one per storage layout and switch combination: the kernel in
// csrc/cuda/step.cuh, its launch in csrc/cuda/launch.cuh, the math in
// csrc/include/fusedwd/adamw.h.
#include "cuda/launch.cuh"

FUSEDWD_CUDA_RULE(AdamW)
