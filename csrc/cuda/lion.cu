// The Lion kernels, one per storage layout: the kernel in csrc/cuda/step.cuh, its launch in
// csrc/cuda/launch.cuh, the math in csrc/include/fusedwd/lion.h.
#include "cuda/launch.cuh"

FUSEDWD_CUDA_RULE(Lion)
