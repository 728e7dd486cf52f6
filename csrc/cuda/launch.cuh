// The host side of a launch: grid size, device, error. Included by each
// rule's translation unit (csrc/cuda/<rule>.cu), which instantiates it with
// FUSEDWD_CUDA_RULE.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cuda/kernels.h"
#include "cuda/step.cuh"

FUSEDWD_NS_BEGIN
namespace cuda_kernels {

// The persistent grid of step_kernel<L, Rule, Q8> on `device`, cached per kernel
// and device: occupancy and SM count do not change while the process runs.
template <class L, class Rule, bool Q8>
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
  *error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_kernel<L, Rule, Q8>, kCudaThreads, 0);
  if (*error != cudaSuccess) return -1;
  const int64_t g = persistent_grid(sms, per_sm);
  if (cached) cache[device].store(g, std::memory_order_relaxed);
  return g;
}

// Launches step_kernel<L, Rule, Q8> on a.stream, on the stream's device.
template <class L, class Rule, bool Q8>
cudaError_t launch(const cuda::LaunchArgs& a) {
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
  int64_t grid = a.grid;
  if (grid == 0) grid = persistent_grid_for<L, Rule, Q8>(device, &err);
  if (err == cudaSuccess) {
    const auto blocks = static_cast<unsigned int>(grid);
    step_kernel<L, Rule, Q8><<<blocks, kCudaThreads, 0, a.stream>>>(a.table, a.nseg, a.hyper, a.arrivals,
                                                                    a.ctl, a.seed);
    err = cudaGetLastError();
  }
  if (current != device) {
    const cudaError_t restored = cudaSetDevice(current);
    if (err == cudaSuccess) err = restored;
  }
  return err;
}

// One step of rule R: the step's storage (precision.h lists the layouts, and
// q8_layout_supported those of 8-bit states; the bindings validated this one) and
// the rule's switch bits -> the kernel instantiated for them.
template <class R>
cudaError_t launch_rule(const cuda::LaunchArgs& a, unsigned switches) {
  if constexpr (kSumsOf<R> > 0) {
    // a two-phase rule has no CUDA kernel yet (the bindings refuse it first)
    (void)a;
    (void)switches;
    return cudaErrorNotSupported;
  } else if (a.quantized) {
    return with_q8_layout(a.dtype, a.master, a.stochastic, [&](auto layout) {
      using L = decltype(layout);
      return R::template with_switches<L::P>(switches, [&](auto rule) { return launch<L, decltype(rule), true>(a); });
    });
  } else {
    return with_layout(a.dtype, a.state_dtype, a.master, a.stochastic, [&](auto layout) {
      using L = decltype(layout);
      return R::template with_switches<L::P>(switches, [&](auto rule) { return launch<L, decltype(rule), false>(a); });
    });
  }
}

// Whether `device` runs rule R's kernels (kernels.h probe): the attributes of its kernel for
// fp32 storage and the switches off, on `device`; the current device is restored.
template <class R>
cudaError_t probe_kernels(int device) {
  int current = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (device != current && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  cudaFuncAttributes attributes;
  using L = Layout<DType::F32, DType::F32, false, false>;
  err = R::template with_switches<DType::F32>(
      0u, [&](auto rule) { return cudaFuncGetAttributes(&attributes, step_kernel<L, decltype(rule), false>); });
  if (device != current) {
    const cudaError_t restored = cudaSetDevice(current);
    if (err == cudaSuccess) err = restored;
  }
  return err;
}

template <class R>
cudaError_t probe_rule(int device) {
  if constexpr (kSumsOf<R> > 0) {
    (void)device;
    return cudaSuccess;  // a two-phase rule has no CUDA kernel yet: nothing to probe
  } else {
    return probe_kernels<R>(device);
  }
}

}  // namespace cuda_kernels
FUSEDWD_NS_END

// The body of csrc/cuda/<rule>.cu: rule R's kernels (every storage layout and switch
// combination) and the entry points kernels.h declares for it.
#define FUSEDWD_CUDA_RULE(R)                                                  \
  namespace fusedwd {                                                         \
  namespace cuda {                                                            \
  cudaError_t step_##R(const LaunchArgs& a, unsigned switches) {              \
    return cuda_kernels::launch_rule<R>(a, switches);                         \
  }                                                                           \
  cudaError_t probe_##R(int device) {                                         \
    return cuda_kernels::probe_rule<R>(device);                               \
  }                                                                           \
  }                                                                           \
  }
