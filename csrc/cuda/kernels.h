// The interface between the pybind11 bindings (compiled by the host compiler)
// and the CUDA kernels (compiled by nvcc, one translation unit per rule).
// Plain types only, and one entry point per rule of csrc/include/fusedwd/rules.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "fusedwd/rules.h"

namespace fusedwd {
namespace cuda {

struct LaunchArgs {
  const int64_t* table;    // device: nseg rows of SEG_COLS int64 (layout.h)
  int64_t nseg;            // number of segments (> 0)
  const double* hyper;     // device: hyperparameter rows of the rule
  int dtype;               // DType of p and g
  int state_dtype;         // DType of every state
  bool master;             // SEG_MASTER holds an fp32 master copy of each 16-bit p
  bool stochastic;         // round bf16 p stochastically (no master)
  const float* ctl;        // device: the control block (layout.h Ctl), or nullptr: no AMP, no clipping
  uint64_t seed;           // stochastic rounding seed
  bool quantized;          // 8-bit states: uint8 codes at SEG_S*, fp32 block absmax at SEG_A* (state_dtype unused)
  unsigned int* arrivals;  // device: one zero word, used and reset to zero by the launch
  int64_t grid;            // blocks; 0 sizes the persistent grid from the device
  cudaStream_t stream;
};

// step_<Rule>: one launch of the rule over every segment, its switches as bits (bit k:
// switch k); returns the launch's error (cudaSuccess when queued). Callers validated the
// layout (precision.h check_layout, or check_q8_layout for 8-bit states) and the
// addresses. Defined by csrc/cuda/<rule>.cu (launch.cuh FUSEDWD_CUDA_RULE).
#define FUSEDWD_DECLARE_STEP(R) cudaError_t step_##R(const LaunchArgs& a, unsigned switches);
FUSEDWD_RULES(FUSEDWD_DECLARE_STEP)
#undef FUSEDWD_DECLARE_STEP

// One launch of the rule with this id (rules.h).
inline cudaError_t step(int rule, const LaunchArgs& a, unsigned switches) {
  cudaError_t err = cudaErrorInvalidValue;
#define FUSEDWD_STEP_CASE(R) \
  if (rule == static_cast<int>(RuleId::R)) err = step_##R(a, switches);
  FUSEDWD_RULES(FUSEDWD_STEP_CASE)
#undef FUSEDWD_STEP_CASE
  return err;
}

// probe_<Rule>: whether `device` can run the rule's kernels: cudaFuncGetAttributes on one
// of them, which fails (cudaErrorNoKernelImageForDevice, cudaErrorInvalidDeviceFunction)
// when the module holds neither machine code for the device's architecture nor PTX it can
// compile. Restores the current device.
#define FUSEDWD_DECLARE_PROBE(R) cudaError_t probe_##R(int device);
FUSEDWD_RULES(FUSEDWD_DECLARE_PROBE)
#undef FUSEDWD_DECLARE_PROBE

// Whether `device` can run the kernels: one kernel of each rule (each rule's translation unit
// is its own device module; all are built for the same architectures).
inline cudaError_t probe(int device) {
  cudaError_t err = cudaSuccess;
#define FUSEDWD_PROBE(R) \
  if (err == cudaSuccess) err = probe_##R(device);
  FUSEDWD_RULES(FUSEDWD_PROBE)
#undef FUSEDWD_PROBE
  return err;
}

}  // namespace cuda
}  // namespace fusedwd
