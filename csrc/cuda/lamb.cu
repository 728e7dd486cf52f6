// The Lamb entry point: a two-phase rule, with no CUDA kernel yet (launch.cuh launch_rule
// returns cudaErrorNotSupported; the bindings refuse it first). The math: csrc/include/fusedwd/lamb.h.
#include "cuda/launch.cuh"

FUSEDWD_CUDA_RULE(Lamb)
