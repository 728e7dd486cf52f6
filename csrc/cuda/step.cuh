// The CUDA step kernel shared by every rule: one persistent grid-stride launch
// per bucket per step over the int64 segment table and the float64 hyper table
// the CPU kernel reads (docs/design.md), the element math from the shared
// __host__ __device__ helpers of csrc/include/fusedwd/<rule>.h.
//
// Geometry (csrc/include/fusedwd/launch.h): the grid is sized from the SM
// count, not from the work, and each block walks the table in tiles of
// kCudaThreads segments: a block-wide scan turns the tile's sizes into chunk
// prefix sums in shared memory, then the block updates the tile's chunks dealt
// to it. Nothing is precomputed on the host and nothing is passed by value, so
// there is no kernel-argument limit and the launch reads only device memory
// (CUDA-graph capturable).
//
// Step counts: every block reads a segment's count t0 and uses t = t0 + 1. A
// block must not advance a count another block may still read, so the counts
// are advanced by the last block to finish: each block, once done, increments
// an arrival counter after a __threadfence(); the block that brings it to
// gridDim.x knows every read has happened, advances every segment's count
// (empty segments included, as the CPU does) and resets the counter to zero
// for the next launch.
//
// Device code only: the host side of a launch is in csrc/cuda/launch.cuh, so
// that tests/cuda_emulation/ can compile this file for the host.
#pragma once

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedwd/adamw.h"
#include "fusedwd/common.h"
#include "fusedwd/launch.h"
#include "fusedwd/layout.h"
#include "fusedwd/partition.h"
#include "fusedwd/rmspropw.h"
#include "fusedwd/sgdw.h"

FUSEDWD_NS_BEGIN
namespace cuda_kernels {

constexpr int kWarps = kCudaThreads / 32;

// Each rule as the kernel sees it: its hyper width, which of S0, S1, S2 it
// reads and writes, and its two shared helpers.
template <DType D, bool AMSGRAD>
struct AdamWRule {
  using M = math_t<D>;
  using Scalars = AdamWScalars<M>;
  static constexpr int kHpCols = ADAMW_HP_COLS;
  static constexpr bool kS0 = true, kS1 = true, kS2 = AMSGRAD;
  __device__ static Scalars scalars(const double* hp, double t) { return adamw_scalars<M>(hp, t); }
  __device__ static void update(M& p, M g, M& s0, M& s1, M& s2, const Scalars& s) {
    adamw_update<AMSGRAD>(p, g, s0, s1, s2, s);
  }
};

template <DType D, bool HAS_MOMENTUM, bool NESTEROV>
struct SgdwRule {
  using M = math_t<D>;
  using Scalars = SgdwScalars<M>;
  static constexpr int kHpCols = SGDW_HP_COLS;
  static constexpr bool kS0 = HAS_MOMENTUM, kS1 = false, kS2 = false;
  __device__ static Scalars scalars(const double* hp, double t) { return sgdw_scalars<M>(hp, t); }
  __device__ static void update(M& p, M g, M& s0, M&, M&, const Scalars& s) {
    sgdw_update<HAS_MOMENTUM, NESTEROV>(p, g, s0, s);
  }
};

template <DType D, bool CENTERED, bool HAS_MOMENTUM>
struct RmspropwRule {
  using M = math_t<D>;
  using Scalars = RmspropwScalars<M>;
  static constexpr int kHpCols = RMSPROPW_HP_COLS;
  static constexpr bool kS0 = true, kS1 = CENTERED, kS2 = HAS_MOMENTUM;
  __device__ static Scalars scalars(const double* hp, double t) { return rmspropw_scalars<M>(hp, t); }
  __device__ static void update(M& p, M g, M& s0, M& s1, M& s2, const Scalars& s) {
    rmspropw_update<CENTERED, HAS_MOMENTUM>(p, g, s0, s1, s2, s);
  }
};

template <typename T>
__device__ inline T* column(const int64_t* row, int col) {
  // the table stores raw device addresses as int64
  return reinterpret_cast<T*>(static_cast<uintptr_t>(row[col]));
}

// The segment a block is working on: its addresses and scalars, loaded once
// per visit (a block's consecutive chunks are often in the same segment). It
// lives in shared memory: every thread of a block works on the same segment,
// so one thread derives the scalars (two double pow's) and the registers stay
// free for the data in flight.
template <DType D, class Rule>
struct Segment {
  using T = storage_t<D>;
  int64_t index;
  int64_t n;
  T* p;
  const T* g;
  T* s0;
  T* s1;
  T* s2;
  bool aligned;
  typename Rule::Scalars sc;

  __device__ void open(const int64_t* table, const double* hyper, int64_t s) {
    const int64_t* row = table + s * SEG_COLS;
    index = s;
    n = row[SEG_N];
    p = column<T>(row, SEG_P);
    g = column<const T>(row, SEG_G);
    // unused state columns hold 0 and are never dereferenced
    s0 = Rule::kS0 ? column<T>(row, SEG_S0) : nullptr;
    s1 = Rule::kS1 ? column<T>(row, SEG_S1) : nullptr;
    s2 = Rule::kS2 ? column<T>(row, SEG_S2) : nullptr;
    aligned = vector_aligned(reinterpret_cast<uintptr_t>(p)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(g)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(s0)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(s1)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(s2));
    // t0 is read here by every block touching the segment; it is advanced only
    // after all blocks have arrived (see the top of this file)
    const double t = static_cast<double>(*column<const float>(row, SEG_STEP)) + 1.0;
    sc = Rule::scalars(hyper + row[SEG_HP] * Rule::kHpCols, t);
  }

  // One element: storage -> math type, the rule, math -> storage (rounded once).
  __device__ void element(int64_t i) const {
    using M = math_t<D>;
    M pi = load<D>(p, i);
    M a = Rule::kS0 ? load<D>(s0, i) : M(0);
    M b = Rule::kS1 ? load<D>(s1, i) : M(0);
    M c = Rule::kS2 ? load<D>(s2, i) : M(0);
    Rule::update(pi, load<D>(g, i), a, b, c, sc);
    store<D>(p, i, pi);
    if (Rule::kS0) store<D>(s0, i, a);
    if (Rule::kS1) store<D>(s1, i, b);
    if (Rule::kS2) store<D>(s2, i, c);
  }

  // One 16-byte vector of every buffer starting at element i (aligned). The
  // accesses go through uint4 so that they are single 128-bit instructions in
  // the global space (the addresses come from memory, so the compiler cannot
  // infer either); the gradient is read once per step, hence evict-first.
  __device__ void vector(int64_t i) const {
    using M = math_t<D>;
    constexpr int kVec = static_cast<int>(vector_elems(sizeof(T)));
    union Pack {
      uint4 raw;
      T v[kVec];
    };
    static_assert(sizeof(Pack) == kCudaVectorBytes, "one vector is 16 bytes");
    // all loads issued before any math, so each thread has them all in flight
    Pack pp, gg, aa, bb, cc;
    pp.raw = __ldca(reinterpret_cast<const uint4*>(p + i));
    gg.raw = __ldcs(reinterpret_cast<const uint4*>(g + i));
    aa.raw = Rule::kS0 ? __ldca(reinterpret_cast<const uint4*>(s0 + i)) : uint4{};
    bb.raw = Rule::kS1 ? __ldca(reinterpret_cast<const uint4*>(s1 + i)) : uint4{};
    cc.raw = Rule::kS2 ? __ldca(reinterpret_cast<const uint4*>(s2 + i)) : uint4{};
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      M pe = load<D>(pp.v, e);
      M a = load<D>(aa.v, e);
      M b = load<D>(bb.v, e);
      M c = load<D>(cc.v, e);
      Rule::update(pe, load<D>(gg.v, e), a, b, c, sc);
      store<D>(pp.v, e, pe);
      store<D>(aa.v, e, a);
      store<D>(bb.v, e, b);
      store<D>(cc.v, e, c);
    }
    __stwb(reinterpret_cast<uint4*>(p + i), pp.raw);
    if (Rule::kS0) __stwb(reinterpret_cast<uint4*>(s0 + i), aa.raw);
    if (Rule::kS1) __stwb(reinterpret_cast<uint4*>(s1 + i), bb.raw);
    if (Rule::kS2) __stwb(reinterpret_cast<uint4*>(s2 + i), cc.raw);
  }
};

// Block-wide exclusive sum of x; every thread gets its own prefix and the total.
__device__ inline int64_t block_exclusive_sum(int64_t x, int64_t* warp_sums, int64_t* total) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t inclusive = x;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int64_t y = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += y;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < kWarps; d *= 2) {
      const int64_t y = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += y;
    }
    if (lane < kWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  *total = warp_sums[kWarps - 1];
  return (warp == 0 ? 0 : warp_sums[warp - 1]) + inclusive - x;
}

// Resident blocks per SM each kernel is compiled for: kCudaBlocksPerSm caps it
// at 64 registers per thread. fp64 holds every scalar and value in a register
// pair and spilled at 64 (up to 76 bytes per thread), so it gets up to 85
// registers and three blocks per SM: 768 threads still keep 48 KB of loads in
// flight per SM, three times what H100 needs to reach its bandwidth.
template <DType D>
constexpr int kMinBlocksPerSm = D == DType::F64 ? 3 : kCudaBlocksPerSm;

template <DType D, class Rule>
__global__ void __launch_bounds__(kCudaThreads, kMinBlocksPerSm<D>)
    step_kernel(const int64_t* __restrict__ table, int64_t nseg, const double* __restrict__ hyper,
                unsigned int* arrivals) {
  constexpr int64_t kChunk = chunk_elems(sizeof(storage_t<D>));
  constexpr int64_t kVec = vector_elems(sizeof(storage_t<D>));
  __shared__ int64_t starts[kCudaThreads + 1];  // chunk prefix sums of the current tile
  __shared__ int64_t warp_sums[kWarps];
  // Each thread fetches its segment's size of the next tile while the block works
  // on the current one: an asynchronous copy into shared memory holds no register.
  // Two buffers, so that a copy never lands where a read may still be pending; a
  // thread issues a copy exactly when it has a segment in that tile (tid < count).
  __shared__ int64_t sizes[2][kCudaThreads];
  __shared__ Segment<D, Rule> seg;
  __shared__ bool last;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t block = blockIdx.x;
  const int64_t grid = gridDim.x;

  if (tid == 0) seg.index = -1;  // published by the first barrier of the scan
  if (tid < nseg) __pipeline_memcpy_async(&sizes[0][tid], &table[tid * SEG_COLS + SEG_N], sizeof(int64_t));
  __pipeline_commit();
  int64_t running = 0;  // chunks of all earlier tiles
  for (int64_t base = 0; base < nseg; base += kCudaThreads) {
    const int64_t count = nseg - base < kCudaThreads ? nseg - base : kCudaThreads;
    const int buffer = static_cast<int>((base / kCudaThreads) % 2);
    __pipeline_wait_prior(0);
    const int64_t n = tid < count ? sizes[buffer][tid] : 0;
    const int64_t ahead = base + kCudaThreads + tid;
    if (ahead < nseg) {
      __pipeline_memcpy_async(&sizes[1 - buffer][tid], &table[ahead * SEG_COLS + SEG_N], sizeof(int64_t));
    }
    __pipeline_commit();
    int64_t total = 0;
    const int64_t prefix = block_exclusive_sum(chunks_of(n, kChunk), warp_sums, &total);
    starts[tid] = running + prefix;
    if (tid == 0) starts[kCudaThreads] = running + total;  // == starts[count]
    __syncthreads();
    for_each_owned_chunk(starts, count, block, grid, [&](int64_t i, int64_t j) {
      // (i, j) is the same for every thread of the block, so the barriers below
      // are reached by all of them
      if (seg.index != base + i) {
        __syncthreads();  // every thread is done with the previous segment
        if (tid == 0) seg.open(table, hyper, base + i);
        __syncthreads();
      }
      const ChunkRange r = chunk_range(seg.n, kChunk, j);
      if (seg.aligned) {
        const ChunkRange v = thread_vector(r, tid, kVec);
        if (v.end - v.begin == kVec) {
          seg.vector(v.begin);
        } else {
          // the segment's last, partial vector
          for (int64_t e = v.begin; e < v.end; ++e) seg.element(e);
        }
      } else {
#pragma unroll
        for (int64_t k = 0; k < kVec; ++k) {
          const int64_t e = thread_scalar(r, tid, k);
          if (e < r.end) seg.element(e);
        }
      }
    });
    running += total;
    __syncthreads();  // starts and warp_sums are rewritten by the next tile
  }

  // Every thread of this block has read its step counts (the barrier above).
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(arrivals, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {
    __threadfence();
    for (int64_t s = tid; s < nseg; s += kCudaThreads) {
      float* step = column<float>(table + s * SEG_COLS, SEG_STEP);
      *step = *step + 1.0f;
    }
    if (tid == 0) *arrivals = 0u;
  }
}

}  // namespace cuda_kernels
FUSEDWD_NS_END
