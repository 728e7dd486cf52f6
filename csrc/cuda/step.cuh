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
// Storage (csrc/include/fusedwd/precision.h Layout): p and g are stored as P,
// the states as S; with MASTER p is read from its fp32 master copy and both are
// written (store_param), with SR a bf16 p is rounded stochastically. A chunk
// holds one 16-byte vector per thread of the widest buffer (kElemSize); the
// 16-bit buffers of a layout with fp32 ones move 8 bytes per thread.
//
// The control block (layout.h Ctl), when given: found_inf makes every block
// leave at once, so nothing is written, no block arrives and no count advances
// (the arrival counter stays zero); 1/grad_scale times the clip coefficient is
// folded into grad_sign by the rules' scalars.
//
// Device code only: the host side of a launch is in csrc/cuda/launch.cuh, so
// that tests/cuda_emulation/ can compile this file for the host.
#pragma once

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fusedwd/adamw.h"
#include "fusedwd/common.h"
#include "fusedwd/launch.h"
#include "fusedwd/layout.h"
#include "fusedwd/partition.h"
#include "fusedwd/precision.h"
#include "fusedwd/rmspropw.h"
#include "fusedwd/sgdw.h"

FUSEDWD_NS_BEGIN
namespace cuda_kernels {

constexpr int kWarps = kCudaThreads / 32;

// Each rule as the kernel sees it: its hyper width, which of S0, S1, S2 it
// reads and writes, and its two shared helpers. D is the parameters' dtype,
// whose math type the rule computes in.
template <DType D, bool AMSGRAD>
struct AdamWRule {
  using M = math_t<D>;
  using Scalars = AdamWScalars<M>;
  static constexpr int kHpCols = ADAMW_HP_COLS;
  static constexpr bool kS0 = true, kS1 = true, kS2 = AMSGRAD;
  __device__ static Scalars scalars(const double* hp, double t, double grad_mult) {
    return adamw_scalars<M>(hp, t, grad_mult);
  }
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
  __device__ static Scalars scalars(const double* hp, double t, double grad_mult) {
    return sgdw_scalars<M>(hp, t, grad_mult);
  }
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
  __device__ static Scalars scalars(const double* hp, double t, double grad_mult) {
    return rmspropw_scalars<M>(hp, t, grad_mult);
  }
  __device__ static void update(M& p, M g, M& s0, M& s1, M& s2, const Scalars& s) {
    rmspropw_update<CENTERED, HAS_MOMENTUM>(p, g, s0, s1, s2, s);
  }
};

template <typename T>
__device__ inline T* column(const int64_t* row, int col) {
  // the table stores raw device addresses as int64
  return reinterpret_cast<T*>(static_cast<uintptr_t>(row[col]));
}

// The element size a kernel's geometry is counted in: that of its widest
// buffer (p, g, the states it uses, the master), which moves one 16-byte vector
// per thread; narrower buffers move 8 bytes for the same elements. Vectors of
// the narrowest buffer would need two 16-byte words of every fp32 buffer per
// thread: 16-bit parameters with fp32 states and masters spilled that way even
// at 80 registers.
template <class L, class Rule>
constexpr int64_t kElemSize = [] {
  int64_t size = sizeof(storage_t<L::P>);
  if ((Rule::kS0 || Rule::kS1 || Rule::kS2) && sizeof(storage_t<L::S>) > size) size = sizeof(storage_t<L::S>);
  if (L::MASTER && sizeof(float) > size) size = sizeof(float);
  return size;
}();

// kVec elements of one buffer in registers. kElemSize makes those of every
// buffer the kernel uses 16 or 8 bytes: one 128-bit or 64-bit access (kWords
// is 1); an unused buffer's Vector may be larger and is never touched. The
// addresses come from memory, so the compiler cannot infer their alignment:
// the accesses go through uint4 / uint2.
template <typename T, int kVec>
struct Vector {
  static constexpr int kBytes = kVec * static_cast<int>(sizeof(T));
  using W = std::conditional_t<kBytes % 16 == 0, uint4, uint2>;
  static constexpr int kWords = kBytes / static_cast<int>(sizeof(W));
  union {
    W raw[kWords];
    T v[kVec];
  };
  __device__ void load_ca(const T* ptr) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) raw[w] = __ldca(reinterpret_cast<const W*>(ptr) + w);
  }
  // evict-first: for the gradient, read once per step
  __device__ void load_cs(const T* ptr) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) raw[w] = __ldcs(reinterpret_cast<const W*>(ptr) + w);
  }
  __device__ void store_wb(T* ptr) const {
#pragma unroll
    for (int w = 0; w < kWords; ++w) __stwb(reinterpret_cast<W*>(ptr) + w, raw[w]);
  }
};

// The segment a block is working on: its addresses and scalars, loaded once
// per visit (a block's consecutive chunks are often in the same segment). It
// lives in shared memory: every thread of a block works on the same segment,
// so one thread derives the scalars (two double pow's) and the registers stay
// free for the data in flight.
template <class L, class Rule>
struct Segment {
  using TP = storage_t<L::P>;
  using TS = storage_t<L::S>;
  using M = math_t<L::P>;
  int64_t index;
  int64_t n;
  TP* p;
  const TP* g;
  TS* s0;
  TS* s1;
  TS* s2;
  float* master;  // the fp32 master copy of p (MASTER)
  uint32_t key;   // the stochastic rounding key of this segment and step (SR)
  bool aligned;
  typename Rule::Scalars sc;

  __device__ void open(const int64_t* table, const double* hyper, int64_t s, const float* ctl,
                       uint64_t seed) {
    const int64_t* row = table + s * SEG_COLS;
    index = s;
    n = row[SEG_N];
    p = column<TP>(row, SEG_P);
    g = column<const TP>(row, SEG_G);
    // unused state and master columns hold 0 and are never dereferenced
    s0 = Rule::kS0 ? column<TS>(row, SEG_S0) : nullptr;
    s1 = Rule::kS1 ? column<TS>(row, SEG_S1) : nullptr;
    s2 = Rule::kS2 ? column<TS>(row, SEG_S2) : nullptr;
    master = L::MASTER ? column<float>(row, SEG_MASTER) : nullptr;
    aligned = vector_aligned(reinterpret_cast<uintptr_t>(p)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(g)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(s0)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(s1)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(s2)) &&
              vector_aligned(reinterpret_cast<uintptr_t>(master));
    // t0 is read here by every block touching the segment; it is advanced only
    // after all blocks have arrived (see the top of this file)
    const double t = static_cast<double>(*column<const float>(row, SEG_STEP)) + 1.0;
    key = L::SR ? sr_key(seed, row[SEG_SALT], t) : 0u;
    // 1/grad_scale times the clip coefficient (layout.h ctl_grad_mult, as the CPU kernel)
    sc = Rule::scalars(hyper + row[SEG_HP] * Rule::kHpCols, t, ctl_grad_mult(ctl));
  }

  // One element: storage -> math type, the rule, math -> storage (rounded once).
  __device__ void element(int64_t i) const {
    M pi = load_param<L::P, L::MASTER>(p, master, i);
    M a = Rule::kS0 ? load<L::S>(s0, i) : M(0);
    M b = Rule::kS1 ? load<L::S>(s1, i) : M(0);
    M c = Rule::kS2 ? load<L::S>(s2, i) : M(0);
    Rule::update(pi, load<L::P>(g, i), a, b, c, sc);
    store_param<L::P, L::MASTER, L::SR>(p, master, i, pi, key);
    if (Rule::kS0) store<L::S>(s0, i, a);
    if (Rule::kS1) store<L::S>(s1, i, b);
    if (Rule::kS2) store<L::S>(s2, i, c);
  }

  // kVec elements of every buffer starting at element i (all aligned): every
  // load issued before any math, so each thread has them all in flight.
  __device__ void vector(int64_t i) const {
    constexpr int kVec = static_cast<int>(vector_elems(kElemSize<L, Rule>));
    Vector<TP, kVec> pp, gg;
    Vector<float, kVec> mm;
    Vector<TS, kVec> aa, bb, cc;
    // with a master, p is only written
    if (L::MASTER) {
      mm.load_ca(master + i);
    } else {
      pp.load_ca(p + i);
    }
    gg.load_cs(g + i);
    if (Rule::kS0) aa.load_ca(s0 + i);
    if (Rule::kS1) bb.load_ca(s1 + i);
    if (Rule::kS2) cc.load_ca(s2 + i);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      M pe = load_param<L::P, L::MASTER>(pp.v, mm.v, e);
      M a = Rule::kS0 ? load<L::S>(aa.v, e) : M(0);
      M b = Rule::kS1 ? load<L::S>(bb.v, e) : M(0);
      M c = Rule::kS2 ? load<L::S>(cc.v, e) : M(0);
      Rule::update(pe, load<L::P>(gg.v, e), a, b, c, sc);
      if constexpr (L::SR) {
        // store_param's rounding, keyed by the element's index in its segment, i + e
        pp.v[e] = float_to_bf16_sr(pe, sr_bits(key, i + e));
      } else {
        store_param<L::P, L::MASTER, false>(pp.v, mm.v, e, pe, 0u);
      }
      if (Rule::kS0) store<L::S>(aa.v, e, a);
      if (Rule::kS1) store<L::S>(bb.v, e, b);
      if (Rule::kS2) store<L::S>(cc.v, e, c);
    }
    pp.store_wb(p + i);
    if (L::MASTER) mm.store_wb(master + i);
    if (Rule::kS0) aa.store_wb(s0 + i);
    if (Rule::kS1) bb.store_wb(s1 + i);
    if (Rule::kS2) cc.store_wb(s2 + i);
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
template <DType P>
constexpr int kMinBlocksPerSm = P == DType::F64 ? 3 : kCudaBlocksPerSm;

// ctl: the control block (layout.h Ctl), or nullptr; seed: the stochastic rounding seed.
template <class L, class Rule>
__global__ void __launch_bounds__(kCudaThreads, kMinBlocksPerSm<L::P>)
    step_kernel(const int64_t* __restrict__ table, int64_t nseg, const double* __restrict__ hyper,
                unsigned int* arrivals, const float* __restrict__ ctl, uint64_t seed) {
  // found_inf: the same value for every block, which leaves before anything is read or written
  if (ctl_skips(ctl)) return;
  constexpr int64_t kChunk = chunk_elems(kElemSize<L, Rule>);
  constexpr int64_t kVec = vector_elems(kElemSize<L, Rule>);
  __shared__ int64_t starts[kCudaThreads + 1];  // chunk prefix sums of the current tile
  __shared__ int64_t warp_sums[kWarps];
  // Each thread fetches its segment's size of the next tile while the block works
  // on the current one: an asynchronous copy into shared memory holds no register.
  // Two buffers, so that a copy never lands where a read may still be pending; a
  // thread issues a copy exactly when it has a segment in that tile (tid < count).
  __shared__ int64_t sizes[2][kCudaThreads];
  __shared__ Segment<L, Rule> seg;
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
        if (tid == 0) seg.open(table, hyper, base + i, ctl, seed);
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
