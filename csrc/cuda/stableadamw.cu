// The StableAdamW entry point: a two-phase rule, with no CUDA kernel yet (launch.cuh launch_rule
// returns cudaErrorNotSupported; the bindings refuse it first). The math: csrc/include/fusedwd/stableadamw.h.
#include "cuda/launch.cuh"

FUSEDWD_CUDA_RULE(StableAdamW)
