// The CUDA kernels of the storage layouts in kernel group F16 (csrc/cuda/kernels.h
// KernelGroup): one step_kernel per layout, each running every elementwise rule of
// csrc/include/fusedwd/rules.h (the kernel in csrc/cuda/step.cuh, its launch in launch.cuh).
#include "cuda/launch.cuh"

FUSEDWD_CUDA_KERNELS(F16)
