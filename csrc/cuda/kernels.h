// The interface between the pybind11 bindings (compiled by the host compiler)
// and the CUDA kernels (compiled by nvcc). Plain types only. The kernels are one
// per storage layout, each running every elementwise rule of
// csrc/include/fusedwd/rules.h (the rule's id and switch bits are launch arguments),
// compiled in a fixed set of translation units, one per KernelGroup: none per rule.
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
  // two-phase rules (kSums > 0; phases.cuh phases_kernel): phases 3 (two launches), 1 or 2
  int phases = 3;
  double* sums = nullptr;  // device: float64 [nseg, kSums], written by phase 1, read by phase 2
  void* scratch = nullptr; // device: phases.cuh's scratch (two_phase_scratch_bytes); arrivals: 1 + nseg words
};

// The bytes of a two-phase launch's scratch over nseg segments of at most `elements` elements in
// all, for a rule of `sums` sums (phases.cuh phase_scratch): the sums when no sums buffer is given
// (float64 [nseg, sums]), then float64 partials, `sums` per 64 elements of every 1024-element
// chunk. (The segments' arrival counters are the arrivals buffer's words 1..nseg.)
FUSEDWD_HD constexpr int64_t two_phase_scratch_bytes(int64_t nseg, int64_t elements, int sums) {
  return nseg * sums * 8 + ((elements + 1023) / 1024 + nseg) * 16 * sums * 8;
}

// The translation units the kernels are split into, so that nvcc builds them in parallel:
// the layouts of each parameter dtype (csrc/cuda/{f32,f16,bf16,f64}.cu) and every layout
// of 8-bit states (csrc/cuda/q8.cu). X(group) for each.
#define FUSEDWD_KERNEL_GROUPS(X) X(F32) X(F16) X(BF16) X(F64) X(Q8)

enum class KernelGroup : int {
#define FUSEDWD_GROUP_ID(G) G,
  FUSEDWD_KERNEL_GROUPS(FUSEDWD_GROUP_ID)
#undef FUSEDWD_GROUP_ID
};

// The group holding the kernel of parameters of dtype p (q8: with 8-bit states).
FUSEDWD_HD constexpr KernelGroup kernel_group(DType p, bool q8) {
  return q8 ? KernelGroup::Q8
            : (p == DType::F32 ? KernelGroup::F32
                               : (p == DType::F16 ? KernelGroup::F16
                                                  : (p == DType::BF16 ? KernelGroup::BF16 : KernelGroup::F64)));
}

// The parameter dtype of the kernel each group's probe reads (Q8: fp32 parameters).
constexpr DType kGroupDType[] = {DType::F32, DType::F16, DType::BF16, DType::F64, DType::F32};

// step_<group>: one launch of the rule with this id (rules.h) and switch bits (bit k:
// switch k) over every segment, with the group's kernel for the step's layout; returns the
// launch's error (cudaSuccess when queued). Callers validated the rule (elementwise), the
// layout (precision.h check_layout, or check_q8_layout for 8-bit states) and the addresses.
// probe_<group>: whether `device` can run the group's kernels: cudaFuncGetAttributes on one of
// them, which fails (cudaErrorNoKernelImageForDevice, cudaErrorInvalidDeviceFunction) when the
// module holds neither machine code for the device's architecture nor PTX it can compile;
// restores the current device. Both defined by csrc/cuda/<group>.cu (launch.cuh
// FUSEDWD_CUDA_KERNELS).
#define FUSEDWD_DECLARE_GROUP(G)                                          \
  cudaError_t step_##G(const LaunchArgs& a, int rule, unsigned switches); \
  cudaError_t probe_##G(int device);
FUSEDWD_KERNEL_GROUPS(FUSEDWD_DECLARE_GROUP)
#undef FUSEDWD_DECLARE_GROUP

// One launch of the rule with this id.
inline cudaError_t step(int rule, const LaunchArgs& a, unsigned switches) {
  const KernelGroup group = kernel_group(static_cast<DType>(a.dtype), a.quantized);
#define FUSEDWD_STEP_CASE(G) \
  if (group == KernelGroup::G) return step_##G(a, rule, switches);
  FUSEDWD_KERNEL_GROUPS(FUSEDWD_STEP_CASE)
#undef FUSEDWD_STEP_CASE
  return cudaErrorInvalidValue;
}

// Whether `device` can run the kernels: one kernel of each group (each group's translation
// unit is its own device module; all are built for the same architectures).
inline cudaError_t probe(int device) {
  cudaError_t err = cudaSuccess;
#define FUSEDWD_PROBE(G) \
  if (err == cudaSuccess) err = probe_##G(device);
  FUSEDWD_KERNEL_GROUPS(FUSEDWD_PROBE)
#undef FUSEDWD_PROBE
  return err;
}

}  // namespace cuda
}  // namespace fusedwd
