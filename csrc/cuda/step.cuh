// The CUDA step kernel shared by every rule: one persistent grid-stride launch
// per bucket per step over the int64 segment table and the float64 hyper table
// the CPU kernel reads (docs/design.md), the element math from the shared
// __host__ __device__ helpers of csrc/include/fusedwd/<rule>.h: a Segment<L>'s
// element and vector functions run any Rule<D, switches...> of
// csrc/include/fusedwd/rule.h. One kernel per storage layout L: the rule's id
// and switch bits are launch arguments, and the kernel runs the path compiled
// for them (with_elementwise_rule; docs/backends.md#one-kernel-per-layout).
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
// 8-bit states (Q8; docs/quantization.md, quant.h): the states are uint8 codes with
// one fp32 absmax per 256-element quant block of each tensor (SEG_A0..SEG_A2).
// Chunks are kQ8Blocks whole quant blocks counted from the segment's start, so a
// quant block is never split between thread blocks; thread tid updates element
// tid of each of the chunk's quant blocks (coalesced, one element per quant block),
// decoding with the old absmax, writing the weight from the unquantized new
// states, and then the whole block reduces each new state's quant-block absmax
// (warp shuffles, one barrier through shared memory) and encodes it.
//
// Device code only: the host side of a launch is in csrc/cuda/launch.cuh, so
// that tests/cuda_emulation/ can compile this file for the host.
#pragma once

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "fusedwd/common.h"
#include "fusedwd/launch.h"
#include "fusedwd/layout.h"
#include "fusedwd/partition.h"
#include "fusedwd/precision.h"
#include "fusedwd/quant.h"
#include "fusedwd/rules.h"

FUSEDWD_NS_BEGIN
namespace cuda_kernels {

constexpr int kWarps = kCudaThreads / 32;
// 8-bit states: quant blocks per chunk, and the chunk in elements. A thread keeps one
// element of each in flight (two loads per buffer): four spilled (see kMinBlocksPerSm).
constexpr int kQ8Blocks = 2;
constexpr int64_t kQ8Chunk = kQ8Blocks * kQuantBlock;
static_assert(kQuantBlock == kCudaThreads, "a thread updates one element of each quant block");

// The control block's address, opaque to the compiler: read where a segment is opened, so
// that no test of it (ctl != nullptr) is hoisted to the kernel's entry and held across
// every rule's path (ptxas spilled that predicate, 4 bytes, in the bf16 SR kernel).
__device__ inline const float* opaque(const float* ctl) {
#if defined(__CUDA_ARCH__)
  asm volatile("mov.b64 %0, %0;" : "+l"(ctl));
#endif
  return ctl;
}

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

// The per-segment scalars of any elementwise rule of rules.h (a two-phase rule has no
// CUDA kernel yet and no member): a segment holds those of the launch's rule, so its size,
// and the kernels' shared memory, is the same for every rule (that of the largest Scalars).
template <class R, typename M>
using ElementwiseScalars = std::conditional_t<kSumsOf<R> == 0, typename R::template Scalars<M>, char>;

template <typename M>
union AnyScalars {
#define FUSEDWD_SCALARS_MEMBER(R) ElementwiseScalars<R, M> R##_;
  FUSEDWD_RULES(FUSEDWD_SCALARS_MEMBER)
#undef FUSEDWD_SCALARS_MEMBER
};

// The member of type T of a union of every rule's scalars (AnyScalars, phases.cuh
// AnyPhaseScalars): every member starts at the union's address.
template <class T, class U>
__device__ T& member(U& any) {
  static_assert(sizeof(T) <= sizeof(U) && alignof(T) <= alignof(U), "not a member");
  return *reinterpret_cast<T*>(&any);
}
template <class T, class U>
__device__ const T& member(const U& any) {
  static_assert(sizeof(T) <= sizeof(U) && alignof(T) <= alignof(U), "not a member");
  return *reinterpret_cast<const T*>(&any);
}

// A segment as the block's threads use it: its addresses and scalars, in
// shared memory. The kernel opens the segments of a table tile that the block
// will visit in parallel, each by the thread of its tile position (row, step
// count, hyper row, two double pow's), into one slot per position; when the
// block moves to a segment, its first threads copy the slot into the block's
// current segment, one 8-byte word each, between two barriers. The data path
// then reads the current segment at a fixed shared address, so it holds no
// more registers than it would with one segment.
template <class L>
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
  AnyScalars<M> any;  // the scalars of the launch's rule

  template <class Rule>
  __device__ const typename Rule::Scalars& sc() const {
    return member<typename Rule::Scalars>(any);
  }

  template <class Rule>
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
    member<typename Rule::Scalars>(any) =
        Rule::scalars(hyper + row[SEG_HP] * Rule::kHpCols, t, ctl_grad_mult(opaque(ctl)));
  }

  // One element: storage -> math type, the rule, math -> storage (rounded once).
  template <class Rule>
  __device__ void element(int64_t i) const {
    M pi = load_param<L::P, L::MASTER>(p, master, i);
    M a = Rule::kS0 ? load<L::S>(s0, i) : M(0);
    M b = Rule::kS1 ? load<L::S>(s1, i) : M(0);
    M c = Rule::kS2 ? load<L::S>(s2, i) : M(0);
    Rule::update(pi, load<L::P>(g, i), a, b, c, sc<Rule>());
    store_param<L::P, L::MASTER, L::SR>(p, master, i, pi, key);
    if (Rule::kS0) store<L::S>(s0, i, a);
    if (Rule::kS1) store<L::S>(s1, i, b);
    if (Rule::kS2) store<L::S>(s2, i, c);
  }

  // kVec elements of every buffer starting at element i (all aligned): every
  // load issued before any math, so each thread has them all in flight.
  template <class Rule>
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
      Rule::update(pe, load<L::P>(gg.v, e), a, b, c, sc<Rule>());
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

// The 8-bit form of Segment: codes and block absmax instead of S-typed states.
// L::S is unused (the q8 layouts carry S == P).
template <class L>
struct Q8Segment {
  using TP = storage_t<L::P>;
  using M = math_t<L::P>;
  static_assert(sizeof(M) == 4, "8-bit states compute in fp32");
  int64_t index;
  int64_t n;
  TP* p;
  const TP* g;
  uint8_t* s0;
  uint8_t* s1;
  uint8_t* s2;
  float* a0;  // block absmax of state 0, one per kQuantBlock elements
  float* a1;
  float* a2;
  float* master;
  uint32_t key;
  AnyScalars<M> any;  // the scalars of the launch's rule

  template <class Rule>
  __device__ const typename Rule::Scalars& sc() const {
    return member<typename Rule::Scalars>(any);
  }

  template <class Rule>
  __device__ void open(const int64_t* table, const double* hyper, int64_t s, const float* ctl,
                       uint64_t seed) {
    const int64_t* row = table + s * SEG_COLS;
    index = s;
    n = row[SEG_N];
    p = column<TP>(row, SEG_P);
    g = column<const TP>(row, SEG_G);
    // unused state, absmax and master columns hold 0 and are never dereferenced
    s0 = Rule::kS0 ? column<uint8_t>(row, SEG_S0) : nullptr;
    s1 = Rule::kS1 ? column<uint8_t>(row, SEG_S1) : nullptr;
    s2 = Rule::kS2 ? column<uint8_t>(row, SEG_S2) : nullptr;
    a0 = Rule::kS0 ? column<float>(row, SEG_A0) : nullptr;
    a1 = Rule::kS1 ? column<float>(row, SEG_A1) : nullptr;
    a2 = Rule::kS2 ? column<float>(row, SEG_A2) : nullptr;
    master = L::MASTER ? column<float>(row, SEG_MASTER) : nullptr;
    // t0 is read here by every block touching the segment (see the top of this file)
    const double t = static_cast<double>(*column<const float>(row, SEG_STEP)) + 1.0;
    key = L::SR ? sr_key(seed, row[SEG_SALT], t) : 0u;
    member<typename Rule::Scalars>(any) =
        Rule::scalars(hyper + row[SEG_HP] * Rule::kHpCols, t, ctl_grad_mult(opaque(ctl)));
  }

  // One chunk [r.begin, r.end) of up to kQ8Blocks quant blocks (r.begin a multiple of
  // kQuantBlock); red: kWarps partial maxima per state and quant block, in shared memory
  // not read since the block's previous barrier; held: this thread's new states across
  // the barrier, in shared memory so they take no registers (each thread reads only
  // what it wrote, so no barrier guards them).
  template <class Rule>
  __device__ void chunk(ChunkRange r, int tid, float (*red)[kWarps], float (*held)[kCudaThreads]) const {
    const int64_t qb0 = r.begin / kQuantBlock;
    // every load of the chunk first, so each thread has them all in flight
    M pv[kQ8Blocks], gv[kQ8Blocks];
    uint8_t c0[kQ8Blocks], c1[kQ8Blocks], c2[kQ8Blocks];
#pragma unroll
    for (int q = 0; q < kQ8Blocks; ++q) {
      const int64_t i = r.begin + q * kQuantBlock + tid;
      if (i < r.end) {
        pv[q] = load_param<L::P, L::MASTER>(p, master, i);
        gv[q] = load<L::P>(g, i);
        if (Rule::kS0) c0[q] = s0[i];
        if (Rule::kS1) c1[q] = s1[i];
        if (Rule::kS2) c2[q] = s2[i];
      }
    }
    // decode with the old absmax, update, store the weight from the unquantized states;
    // elements past the end hold 0, which changes no block's max. Then each new state's
    // absmax per quant block: warp maxima now, the block's through red after the barrier.
    const int lane = tid % 32;
    const int warp = tid / 32;
#pragma unroll
    for (int q = 0; q < kQ8Blocks; ++q) {
      const int64_t i = r.begin + q * kQuantBlock + tid;
      M a = M(0), b = M(0), c = M(0);
      if (i < r.end) {
        const int64_t qb = qb0 + q;
        if (Rule::kS0) a = q_decode(c0[q], a0[qb], Rule::kSigned0);
        if (Rule::kS1) b = q_decode(c1[q], a1[qb], Rule::kSigned1);
        if (Rule::kS2) c = q_decode(c2[q], a2[qb], Rule::kSigned2);
        M pi = pv[q];
        Rule::update(pi, gv[q], a, b, c, sc<Rule>());
        store_param<L::P, L::MASTER, L::SR>(p, master, i, pi, key);
      }
      if (Rule::kS0) held[0 * kQ8Blocks + q][tid] = a;
      if (Rule::kS1) held[1 * kQ8Blocks + q][tid] = b;
      if (Rule::kS2) held[2 * kQ8Blocks + q][tid] = c;
      float k0 = q_absmax_key(a), k1 = q_absmax_key(b), k2 = q_absmax_key(c);
#pragma unroll
      for (int d = 16; d > 0; d /= 2) {
        if (Rule::kS0) k0 = fmaxf(k0, __shfl_xor_sync(0xffffffffu, k0, d));
        if (Rule::kS1) k1 = fmaxf(k1, __shfl_xor_sync(0xffffffffu, k1, d));
        if (Rule::kS2) k2 = fmaxf(k2, __shfl_xor_sync(0xffffffffu, k2, d));
      }
      if (lane == 0) {
        if (Rule::kS0) red[0 * kQ8Blocks + q][warp] = k0;
        if (Rule::kS1) red[1 * kQ8Blocks + q][warp] = k1;
        if (Rule::kS2) red[2 * kQ8Blocks + q][warp] = k2;
      }
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kQ8Blocks; ++q) {
      const int64_t e0 = r.begin + q * kQuantBlock;
      if (e0 >= r.end) break;  // the chunk's quant blocks end here (the same for every thread)
      const int64_t i = e0 + tid;
      const int64_t qb = qb0 + q;
      if (Rule::kS0) encode<Rule::kSigned0>(held[0 * kQ8Blocks + q][tid], red[0 * kQ8Blocks + q], s0, a0, i, i < r.end, qb, tid);
      if (Rule::kS1) encode<Rule::kSigned1>(held[1 * kQ8Blocks + q][tid], red[1 * kQ8Blocks + q], s1, a1, i, i < r.end, qb, tid);
      if (Rule::kS2) encode<Rule::kSigned2>(held[2 * kQ8Blocks + q][tid], red[2 * kQ8Blocks + q], s2, a2, i, i < r.end, qb, tid);
    }
  }

  // Element i's byte from the block's new absmax (the max of the warps' partial maxima);
  // thread 0 stores the absmax (every thread read the old one before the barrier).
  template <bool SIGNED>
  __device__ static void encode(float x, const float* warp_max, uint8_t* codes, float* absmax, int64_t i,
                                bool in_range, int64_t qb, int tid) {
    float key_max = warp_max[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) key_max = fmaxf(key_max, warp_max[w]);
    float scale, inv;
    const bool ok = q_block_scale(key_max, &scale, &inv);
    if (in_range) codes[i] = ok ? q_encode(x, inv, SIGNED) : q_zero_code(SIGNED);
    if (tid == 0) absmax[qb] = scale;
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
// The 8-bit kernels load a chunk's p, g and codes first and keep 2 addresses per
// state: AdamW spilled 8-40 bytes at 64 registers (with four quant blocks per chunk,
// and 16-24 with two, its new states held in shared memory), and 16 bytes at 80 with
// four. So they take the fp64 budget and two quant blocks per chunk: no spills, 768
// threads per SM with two elements each in flight.
template <DType P, bool Q8 = false>
constexpr int kMinBlocksPerSm = P == DType::F64 || Q8 ? 3 : kCudaBlocksPerSm;

// Whether the rule with this id (rules.h) has a path in the kernels: an elementwise rule (a
// two-phase rule, kSums > 0, has no CUDA kernel yet).
FUSEDWD_HD constexpr bool has_cuda_path(int rule) {
#define FUSEDWD_RULE_HAS_PATH(R) (rule == static_cast<int>(RuleId::R) && kSumsOf<R> == 0) ||
  return FUSEDWD_RULES(FUSEDWD_RULE_HAS_PATH) false;
#undef FUSEDWD_RULE_HAS_PATH
}

// The rule with this id (rules.h) and switch bits -> f(Rule<D, switches...>{}), for a rule
// with has_cuda_path: the launch's rule, a runtime-uniform value, picks one of the compiled
// paths once per launch (each path the whole walk over the segment table, specialized for its
// rule and switches, so the data path holds no test of the rule). Nothing the caller uses
// after the call is computed in it, so no register is held across the path (a flag returned
// from here was: ptxas spilled it, 2 bytes per path, in 20 of the 22 kernels).
template <DType D, typename F>
__device__ __forceinline__ void with_elementwise_rule(int rule, unsigned switches, F&& f) {
#define FUSEDWD_RULE_PATH(R)                                                  \
  if constexpr (kSumsOf<R> == 0) {                                            \
    if (rule == static_cast<int>(RuleId::R)) R::template with_switches<D>(switches, f); \
  }
  FUSEDWD_RULES(FUSEDWD_RULE_PATH)
#undef FUSEDWD_RULE_PATH
}

// ctl: the control block (layout.h Ctl), or nullptr; seed: the stochastic rounding seed;
// rule, switches: the rule's id (rules.h) and its switch bits (bit k: switch k), the same
// for every thread. One kernel per storage layout L (and Q8: 8-bit states, Q8Segment, in
// chunks of kQ8Blocks quant blocks) runs every elementwise rule: adding a rule adds a path
// to each kernel and no kernel (docs/backends.md#one-kernel-per-layout).
template <class L, bool Q8>
__global__ void __launch_bounds__(kCudaThreads, kMinBlocksPerSm<L::P, Q8>)
    step_kernel(const int64_t* __restrict__ table, int64_t nseg, const double* __restrict__ hyper,
                unsigned int* arrivals, const float* __restrict__ ctl, uint64_t seed, int rule,
                unsigned switches) {
  // found_inf: the same value for every block, which leaves before anything is read or written;
  // likewise an id the host did not validate: no block arrives, no count advances
  if (ctl_skips(ctl) || !has_cuda_path(rule)) return;
  __shared__ int64_t starts[kCudaThreads + 1];  // chunk prefix sums of the current tile
  __shared__ int64_t warp_sums[kWarps];
  // Each thread fetches its segment's size of the next tile while the block works
  // on the current one: an asynchronous copy into shared memory holds no register.
  // Two buffers, so that a copy never lands where a read may still be pending; a
  // thread issues a copy exactly when it has a segment in that tile (tid < count).
  __shared__ int64_t sizes[2][kCudaThreads];
  // The tile's segments this block visits, opened in parallel (one thread each) after the scan,
  // and the one the block is working on, copied from its slot. Their size does not depend on
  // the rule (AnyScalars), so neither does the kernel's shared memory.
  using Seg = std::conditional_t<Q8, Q8Segment<L>, Segment<L>>;
  static_assert(sizeof(Seg) % sizeof(int64_t) == 0 && sizeof(Seg) / sizeof(int64_t) <= kCudaThreads,
                "a segment is copied one 8-byte word per thread");
  constexpr int kSegWords = static_cast<int>(sizeof(Seg) / sizeof(int64_t));
  __shared__ Seg slots[kCudaThreads];
  __shared__ Seg seg;
  // 8-bit states: per state and quant block the warps' partial maxima; two buffers, so a
  // chunk's writes never land where the previous chunk's reads may still be pending
  __shared__ float red[Q8 ? 2 : 1][Q8 ? 3 * kQ8Blocks : 1][kWarps];
  // 8-bit states: each thread's new states of the chunk (6 KB), held across the reduction
  __shared__ float held[Q8 ? 3 * kQ8Blocks : 1][Q8 ? kCudaThreads : 1];
  __shared__ bool last;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t block = blockIdx.x;
  const int64_t grid = gridDim.x;

  with_elementwise_rule<L::P>(rule, switches, [&](auto rule_tag) {
    using Rule = decltype(rule_tag);
    // 8-bit chunks are whole quant blocks from the segment's start (a multiple of kQuantBlock)
    constexpr int64_t kChunk = Q8 ? kQ8Chunk : chunk_elems(kElemSize<L, Rule>);
    constexpr int64_t kVec = vector_elems(kElemSize<L, Rule>);
    [[maybe_unused]] int parity = 0;  // 8-bit states: which red buffer this chunk uses
    if (tid == 0) seg.index = -1;  // published by the first barrier of the scan
    if (tid < nseg) __pipeline_memcpy_async(&sizes[0][tid], &table[tid * SEG_COLS + SEG_N], sizeof(int64_t));
    __pipeline_commit();
    for (int64_t base = 0; base < nseg; base += kCudaThreads) {
      const int64_t count = nseg - base < kCudaThreads ? nseg - base : kCudaThreads;
      // chunks of all earlier tiles: where the previous tile's prefix sums ended (read before the
      // scan's barriers, rewritten after them), so no register holds it across the chunk loop
      const int64_t running = base == 0 ? 0 : starts[kCudaThreads];
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
      // Each thread opens the segment of its tile position if the block owns one of its chunks
      // [starts[tid], starts[tid + 1]): row, step count, hyper row and the scalars (two double
      // pow's) of every segment the block will visit, in parallel, behind one barrier.
      if (tid < count && first_owned_chunk(starts[tid], block, grid) < starts[tid + 1]) {
        slots[tid].template open<Rule>(table, hyper, base + tid, ctl, seed);
      }
      __syncthreads();
      for_each_owned_chunk(starts, count, block, grid, [&](int64_t i, int64_t j) {
        // (i, j) is the same for every thread of the block, so the barriers below
        // are reached by all of them
        if (seg.index != base + i) {
          __syncthreads();  // every thread is done with the previous segment
          if (tid < kSegWords) {
            reinterpret_cast<int64_t*>(&seg)[tid] = reinterpret_cast<const int64_t*>(&slots[i])[tid];
          }
          __syncthreads();
        }
        const ChunkRange r = chunk_range(seg.n, kChunk, j);
        if constexpr (Q8) {
          seg.template chunk<Rule>(r, tid, red[parity], held);
          parity ^= 1;
        } else if (seg.aligned) {
          const ChunkRange v = thread_vector(r, tid, kVec);
          if (v.end - v.begin == kVec) {
            seg.template vector<Rule>(v.begin);
          } else {
            // the segment's last, partial vector
            for (int64_t e = v.begin; e < v.end; ++e) seg.template element<Rule>(e);
          }
        } else {
#pragma unroll
          for (int64_t k = 0; k < kVec; ++k) {
            const int64_t e = thread_scalar(r, tid, k);
            if (e < r.end) seg.template element<Rule>(e);
          }
        }
      });
      __syncthreads();  // starts, warp_sums and slots are rewritten by the next tile
    }
  });

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
