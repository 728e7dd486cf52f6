// The host side of a launch: grid size, device, error. Included by the translation units
// csrc/cuda/{f32,f16,bf16,f64,q8}.cu, each of which instantiates the kernels of one group
// of storage layouts with FUSEDWD_CUDA_KERNELS; none of them names a rule.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cuda/kernels.h"
#include "cuda/phases.cuh"

FUSEDWD_NS_BEGIN
namespace cuda_kernels {

// The persistent grid of step_kernel<L, Q8> (PHASES: phases_kernel<L>) on `device`, cached per
// kernel and device: occupancy and SM count do not change while the process runs.
template <class L, bool Q8, bool PHASES = false>
int64_t persistent_grid_for(int device, cudaError_t* error) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices];
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int64_t g = cache[device].load(std::memory_order_relaxed);
    if (g > 0) return g;
  }
  int sms = 0;
  int per_sm = 0;
  *error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (*error != cudaSuccess) return -1;
  if constexpr (PHASES) {
    *error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, phases_kernel<L>, kCudaThreads, 0);
  } else {
    *error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_kernel<L, Q8>, kCudaThreads, 0);
  }
  if (*error != cudaSuccess) return -1;
  const int64_t g = persistent_grid(sms, per_sm);
  if (cached) cache[device].store(g, std::memory_order_relaxed);
  return g;
}

// Launches step_kernel<L, Q8> for the rule with this id and switch bits on a.stream, on
// the stream's device.
template <class L, bool Q8>
cudaError_t launch(const cuda::LaunchArgs& a, int rule, unsigned switches) {
  int current = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  int device = current;
#if CUDART_VERSION >= 12080
  // cudaStreamGetDevice is CUDA 12.8's; older toolkits launch on the current device
  err = cudaStreamGetDevice(a.stream, &device);
  if (err != cudaSuccess) return err;
#endif
  // a launch goes to the current device; torch's stream may belong to another
  if (current != device && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  // a two-phase rule (the bindings validated it): phase 1, then phase 2, on the same stream
  const bool phases = a.scratch != nullptr;
  int64_t grid = a.grid;
  if (grid == 0) {
    if constexpr (!Q8) {
      grid = phases ? persistent_grid_for<L, false, true>(device, &err) : persistent_grid_for<L, Q8>(device, &err);
    } else {
      grid = persistent_grid_for<L, Q8>(device, &err);
    }
  }
  if (err == cudaSuccess) {
    const auto blocks = static_cast<unsigned int>(grid);
    if constexpr (!Q8) {
      if (phases) {
        for (int phase = 1; phase <= 2 && err == cudaSuccess; ++phase) {
          if ((a.phases & phase) == 0) continue;
          phases_kernel<L><<<blocks, kCudaThreads, 0, a.stream>>>(a.table, a.nseg, a.hyper, a.arrivals, a.ctl,
                                                                  a.seed, rule, switches, phase, a.sums, a.scratch);
          err = cudaGetLastError();
        }
      }
    }
    if constexpr (Q8) {
      if (phases) err = cudaErrorInvalidValue;  // no 8-bit states for a two-phase rule (the bindings refuse it)
    }
    if (!phases) {
      step_kernel<L, Q8><<<blocks, kCudaThreads, 0, a.stream>>>(a.table, a.nseg, a.hyper, a.arrivals, a.ctl,
                                                                a.seed, rule, switches);
      err = cudaGetLastError();
    }
  }
  if (current != device) {
    const cudaError_t restored = cudaSetDevice(current);
    if (err == cudaSuccess) err = restored;
  }
  return err;
}

// One step in a storage layout of group G (kernels.h KernelGroup): the step's storage
// (precision.h lists the layouts, and q8_layout_supported those of 8-bit states; the
// bindings validated this one) -> its kernel, if G holds it.
template <cuda::KernelGroup G>
cudaError_t launch_group(const cuda::LaunchArgs& a, int rule, unsigned switches) {
  if (a.quantized) {
    return with_q8_layout(a.dtype, a.master, a.stochastic, [&](auto layout) {
      using L = decltype(layout);
      if constexpr (cuda::kernel_group(L::P, true) == G) return launch<L, true>(a, rule, switches);
      return cudaErrorInvalidValue;
    });
  }
  return with_layout(a.dtype, a.state_dtype, a.master, a.stochastic, [&](auto layout) {
    using L = decltype(layout);
    if constexpr (cuda::kernel_group(L::P, false) == G) return launch<L, false>(a, rule, switches);
    return cudaErrorInvalidValue;
  });
}

// Whether `device` runs group G's kernels (kernels.h probe): the attributes of one of them,
// on `device`; the current device is restored.
template <cuda::KernelGroup G>
cudaError_t probe_group(int device) {
  int current = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (device != current && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  cudaFuncAttributes attributes;
  constexpr DType P = cuda::kGroupDType[static_cast<int>(G)];
  constexpr bool kQ8 = G == cuda::KernelGroup::Q8;
  err = cudaFuncGetAttributes(&attributes, step_kernel<Layout<P, P, false, false>, kQ8>);
  if (device != current) {
    const cudaError_t restored = cudaSetDevice(current);
    if (err == cudaSuccess) err = restored;
  }
  return err;
}

}  // namespace cuda_kernels
FUSEDWD_NS_END

// The body of csrc/cuda/<group>.cu: the kernels of one group of storage layouts (every
// elementwise rule in each) and the entry points kernels.h declares for it.
#define FUSEDWD_CUDA_KERNELS(G)                                                \
  namespace fusedwd {                                                          \
  namespace cuda {                                                             \
  cudaError_t step_##G(const LaunchArgs& a, int rule, unsigned switches) {     \
    return cuda_kernels::launch_group<KernelGroup::G>(a, rule, switches);      \
  }                                                                            \
  cudaError_t probe_##G(int device) {                                          \
    return cuda_kernels::probe_group<KernelGroup::G>(device);                  \
  }                                                                            \
  }                                                                            \
  }
