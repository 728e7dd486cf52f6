// The interface between the pybind11 bindings (compiled by the host compiler)
// and the CUDA kernels (compiled by nvcc, one translation unit per rule).
// Plain types only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

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

// One launch over every segment; returns the launch's error (cudaSuccess when
// queued). Callers validated the layout (precision.h check_layout, or check_q8_layout
// for 8-bit states) and the addresses.
cudaError_t adamw(const LaunchArgs& a, bool amsgrad);
cudaError_t sgdw(const LaunchArgs& a, bool has_momentum, bool nesterov);
cudaError_t rmspropw(const LaunchArgs& a, bool centered, bool has_momentum);

// Whether `device` can run the kernels: cudaFuncGetAttributes on one of them, which fails
// (cudaErrorNoKernelImageForDevice, cudaErrorInvalidDeviceFunction) when the module holds
// neither machine code for the device's architecture nor PTX it can compile. Every kernel
// is built for the same architectures, so one answers for all. Restores the current device.
cudaError_t probe(int device);

}  // namespace cuda
}  // namespace fusedwd
