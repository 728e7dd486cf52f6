// The Sgdw kernels, one per storage layout and switch combination: the kernel in
// csrc/cuda/step.cuh, its launch in csrc/cuda/launch.cuh, the math in
// csrc/include/fusedwd/sgdw.h.
#include "cuda/launch.cuh"

FUSEDWD_CUDA_RULE(Sgdw)
