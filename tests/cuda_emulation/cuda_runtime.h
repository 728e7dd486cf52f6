// Host stand-ins for the CUDA features csrc/cuda/step.cuh uses, so that its
// kernel compiles with g++ and runs on a CPU (tests/test_cuda_ext.py). Found
// before any real <cuda_runtime.h> because run.cpp is compiled with -I here.
//
// One block runs at a time, its threads as std::threads: __shared__ variables
// become statics (shared by the block's threads, reused by the next block),
// __syncthreads a std::barrier over the block, __shfl_up_sync an exchange
// through per-warp slots between two warp barriers. Asynchronous copies and
// cache hints become plain accesses. Warp divergence, the GPU memory model and
// the device's fp16/bf16 intrinsics are not modelled: this checks the kernel's
// control flow and index arithmetic, not the hardware.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 gridDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

namespace emulation {
constexpr int kWarpsPerBlock = 8;
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barriers[kWarpsPerBlock] = {};
inline int64_t warp_slots[kWarpsPerBlock][32];
inline float warp_float_slots[kWarpsPerBlock][32];
}  // namespace emulation

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }

inline int64_t __shfl_up_sync(unsigned /*mask: the kernel always passes all lanes*/, int64_t v, int d) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  emulation::warp_slots[warp][lane] = v;
  emulation::warp_barriers[warp]->arrive_and_wait();
  const int64_t r = lane >= d ? emulation::warp_slots[warp][lane - d] : v;
  emulation::warp_barriers[warp]->arrive_and_wait();
  return r;
}

inline float __shfl_xor_sync(unsigned /*mask: all lanes*/, float v, int d) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  emulation::warp_float_slots[warp][lane] = v;
  emulation::warp_barriers[warp]->arrive_and_wait();
  const float r = emulation::warp_float_slots[warp][lane ^ d];
  emulation::warp_barriers[warp]->arrive_and_wait();
  return r;
}

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t n) { std::memcpy(dst, src, n); }
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(int) {}

template <typename W>
inline W __ldca(const W* p) { return *p; }
template <typename W>
inline W __ldcs(const W* p) { return *p; }
template <typename W>
inline void __stwb(W* p, W v) { *p = v; }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename W>
inline W __ldcg(const W* p) { return *p; }
