// The CPU step loops, compiled once per ISA variant: each loops_<isa>.cpp sets
// FUSEDWD_ISA_NS and includes this file, so every inline helper gets that
// variant's flags and its own symbols.
//
// One OpenMP parallel region per call covers every segment: the concatenated
// elements are split between threads by partition.h, each thread walks the
// segments its range touches and runs a vectorizable loop over its slice.
#pragma once

#include <omp.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "fusedwd/common.h"
#include "fusedwd/layout.h"
#include "fusedwd/partition.h"
#include "fusedwd/precision.h"
#include "fusedwd/quant.h"
#include "fusedwd/rules.h"
#include "kernels.h"

#ifndef FUSEDWD_ISA_NS
#error "loops.h is included by loops_<isa>.cpp, which defines FUSEDWD_ISA_NS"
#endif

FUSEDWD_NS_BEGIN
namespace cpu_loops {

using cpu::StepArgs;
using cpu::TrafficArgs;

inline int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
inline T* column_ptr(const int64_t* row, int col) {
  // the table stores raw addresses as int64
  return reinterpret_cast<T*>(static_cast<uintptr_t>(row[col]));
}

// GradScaler found an inf (or the clipping norm is not finite): the step is
// skipped and nothing is written, step counts included.
inline bool skipped(const StepArgs& a) { return ctl_skips(a.ctl); }

// What the gradient is multiplied by: unscaling and clipping, one product.
inline double grad_mult(const StepArgs& a) {
  return ctl_grad_mult(a.ctl);
}

// The walk shared by every rule. Seg(row, hyper_row, t, lo, hi) updates
// elements [lo, hi) of one segment (blocks [lo, hi) when the states are 8-bit:
// a block is never split between threads); t is the 1-based step being taken.
template <int HP_COLS, typename Seg>
void for_each_slice(const StepArgs& a, Seg seg) {
  if (skipped(a)) return;
#pragma omp parallel num_threads(a.num_threads) if (a.num_threads > 1)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t k = omp_get_thread_num();
    const int64_t* offs = a.offs;
    const int64_t begin = worker_begin(offs, a.nseg, k, nt);
    const int64_t end = worker_begin(offs, a.nseg, k + 1, nt);
    if (begin < end) {
      for (int64_t s = segment_of(offs, a.nseg, begin); s < a.nseg && offs[s] < end; ++s) {
        const int64_t lo = max_i64(begin, offs[s]) - offs[s];
        const int64_t hi = min_i64(end, offs[s + 1]) - offs[s];
        if (lo >= hi) continue;  // zero-length segment: nothing but its step count
        const int64_t* row = a.table + s * SEG_COLS;
        const double t = static_cast<double>(*column_ptr<const float>(row, SEG_STEP)) + 1.0;
        seg(row, a.hyper + row[SEG_HP] * HP_COLS, t, lo, hi);
      }
    }
    // every thread has read its segments' step counts: now each count is
    // advanced exactly once, segments split between threads by index
#pragma omp barrier
    for (int64_t s = a.nseg * k / nt; s < a.nseg * (k + 1) / nt; ++s) {
      float* step = column_ptr<float>(a.table + s * SEG_COLS, SEG_STEP);
      *step = *step + 1.0f;
    }
  }
}

// The element loop of the fp16/bf16/fp32/fp64 passes. elem(i, p, s0, s1, s2)
// loads element i and runs the rule's update into its four outputs (the
// parameter and up to three states); put(i, p, s0, s1, s2) stores them.
// With 16-bit states (STAGED) a chunk is first updated into fp32 scratch and
// then stored in a second loop: fused, the 16-bit loops slowed down by up to
// 2x depending only on where the buffers happen to lie, the pattern of 4 KiB
// aliasing between their stores and later loads of other streams (bf16
// AdamW on GPT-2 shapes: 66 to 140 ms on an Intel Xeon for the same bytes;
// staged: 75 to 82 ms). fp32 states stay fused, with 16-bit parameters too:
// staging cost fp32 GPT-2 8% and gained the master-weight layout nothing.
// Always inlined: compiled out of line, the update read the segment's scalars
// through the lambda's captured pointer and GCC left SGDW's fp16 loop scalar.
//
// The buffers are read and written through streams (In, Io, ParamIo below).
// An fp16 stream of a variant with F16C is chunked: each chunk of it is
// converted in bulk into fp32 scratch before the element loops (common.h
// f16_to_float_n) and back after them, since GCC leaves scalar fp16
// conversions one element per instruction and common.h's portable bit
// arithmetic cost ~11 vector operations per load and ~22 per store. Any
// chunked stream makes the loop run by chunks (fused, unless STAGED).
constexpr int64_t kStageChunk = 1024;

template <DType D>
constexpr bool chunked() {
#if defined(FUSEDWD_HW_F16)
  return D == DType::F16;
#else
  return false;
#endif
}

// A buffer the loop only reads (the gradient).
template <DType D, bool CHUNKED = chunked<D>()>
struct In {
  static constexpr bool kChunked = false;
  const storage_t<D>* __restrict__ ptr;
  explicit In(const storage_t<D>* p) : ptr(p) {}
  math_t<D> load(int64_t i) const { return fusedwd::load<D>(ptr, i); }
  void fill(int64_t, int64_t) {}
  void flush(int64_t, int64_t) {}
};

// A buffer the loop reads and writes (a state), or 0 when the rule has no such state.
template <DType D, bool CHUNKED = chunked<D>()>
struct Io {
  static constexpr bool kChunked = false;
  storage_t<D>* __restrict__ ptr;
  explicit Io(storage_t<D>* p) : ptr(p) {}
  math_t<D> load(int64_t i) const { return fusedwd::load<D>(ptr, i); }
  void store(int64_t i, math_t<D> x) { fusedwd::store<D>(ptr, i, x); }
  void fill(int64_t, int64_t, bool = true) {}
  void flush(int64_t, int64_t) {}
};

#if defined(FUSEDWD_HW_F16)
template <DType D>
struct In<D, true> {
  static constexpr bool kChunked = true;
  const uint16_t* __restrict__ ptr;
  int64_t base = 0;
  alignas(64) float buf[kStageChunk];  // left uninitialized: every chunk fills what it reads
  explicit In(const uint16_t* p) : ptr(p) {}
  float load(int64_t i) const { return buf[i - base]; }
  void fill(int64_t c, int64_t e) {
    base = c;
    if (ptr != nullptr) f16_to_float_n(ptr + c, buf, e - c);
  }
  void flush(int64_t, int64_t) {}
};

template <DType D>
struct Io<D, true> {
  static constexpr bool kChunked = true;
  uint16_t* __restrict__ ptr;
  int64_t base = 0;
  alignas(64) float buf[kStageChunk];  // left uninitialized: every chunk fills what it reads
  explicit Io(uint16_t* p) : ptr(p) {}
  float load(int64_t i) const { return buf[i - base]; }
  void store(int64_t i, float x) { buf[i - base] = x; }
  // chunk [c, e) starts: converted into buf unless the loop only writes it (read false)
  void fill(int64_t c, int64_t e, bool read = true) {
    base = c;
    if (read && ptr != nullptr) f16_to_float_n(ptr + c, buf, e - c);
  }
  void flush(int64_t c, int64_t e) {
    if (ptr != nullptr) float_to_f16_n(buf, ptr + c, e - c);
  }
};
#endif

// The parameter: read from its fp32 master copy when there is one (MASTER), written
// to both (common.h load_param / store_param), its own buffer through an Io.
template <DType P, bool MASTER, bool SR>
struct ParamIo {
  static constexpr bool kChunked = Io<P>::kChunked;
  Io<P> p;
  float* __restrict__ master;
  uint32_t key;  // stochastic rounding
  ParamIo(storage_t<P>* ptr, float* m, uint32_t k) : p(ptr), master(m), key(k) {}
  math_t<P> load(int64_t i) const {
    if constexpr (MASTER) {
      return master[i];
    } else {
      return p.load(i);
    }
  }
  void store(int64_t i, math_t<P> x) {
    if constexpr (MASTER) {
      master[i] = x;
      p.store(i, x);
    } else if constexpr (SR) {
      static_assert(!chunked<P>(), "stochastic rounding stores bf16 parameters");
      store_param<P, false, true>(p.ptr, nullptr, i, x, key);
    } else {
      p.store(i, x);
    }
  }
  void fill(int64_t c, int64_t e) { p.fill(c, e, !MASTER); }  // with a master, p is only written
  void flush(int64_t c, int64_t e) { p.flush(c, e); }
};

template <typename... Streams>
constexpr bool any_chunked() {
  return (Streams::kChunked || ...);
}

template <bool STAGED, typename M, typename Elem, typename Put, typename... Streams>
__attribute__((always_inline)) inline void element_loop(int64_t lo, int64_t hi, Elem elem, Put put,
                                                        Streams&... streams) {
  if constexpr (STAGED) {
    static_assert(sizeof(M) == 4, "16-bit storage computes in fp32");
    alignas(64) M x0[kStageChunk], x1[kStageChunk], x2[kStageChunk], x3[kStageChunk];
    for (int64_t c = lo; c < hi; c += kStageChunk) {
      const int64_t e = min_i64(c + kStageChunk, hi);
      (streams.fill(c, e), ...);
#pragma omp simd
      for (int64_t i = c; i < e; ++i) elem(i, x0[i - c], x1[i - c], x2[i - c], x3[i - c]);
#pragma omp simd
      for (int64_t i = c; i < e; ++i) put(i, x0[i - c], x1[i - c], x2[i - c], x3[i - c]);
      (streams.flush(c, e), ...);
    }
  } else if constexpr (any_chunked<Streams...>()) {
    // fused, by chunks: only the chunked streams (an fp16 parameter, gradient) go through scratch
    for (int64_t c = lo; c < hi; c += kStageChunk) {
      const int64_t e = min_i64(c + kStageChunk, hi);
      (streams.fill(c, e), ...);
#pragma omp simd
      for (int64_t i = c; i < e; ++i) {
        M x0, x1, x2, x3;
        elem(i, x0, x1, x2, x3);
        put(i, x0, x1, x2, x3);
      }
      (streams.flush(c, e), ...);
    }
  } else {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      M x0, x1, x2, x3;
      elem(i, x0, x1, x2, x3);
      put(i, x0, x1, x2, x3);
    }
  }
}

template <DType S>
constexpr bool staged() { return sizeof(storage_t<S>) == 2; }

// The pass of every rule (csrc/include/fusedwd/rule.h): over the storage layout L
// (precision.h: p and g stored as L::P, the states as L::S; the math in Rule::M,
// fp32 for 16-bit storage; L::MASTER reads and writes p through its fp32 master
// copy, L::SR rounds a bf16 p stochastically) and the rule's Rule<D, switches...>,
// which says which of S0..S2 it reads and writes. A state the rule does not keep
// is never touched (its column holds 0).
template <class L, class Rule>
void pass(const StepArgs& a) {
  using M = typename Rule::M;
  using TP = storage_t<L::P>;
  using TS = storage_t<L::S>;
  constexpr bool kStates = Rule::kS0 || Rule::kS1 || Rule::kS2;
  const double gm = grad_mult(a);
  const uint64_t seed = a.seed;
  for_each_slice<Rule::kHpCols>(a, [gm, seed](const int64_t* row, const double* hp, double t,
                                              int64_t lo, int64_t hi) {
    ParamIo<L::P, L::MASTER, L::SR> p(column_ptr<TP>(row, SEG_P), column_ptr<float>(row, SEG_MASTER),
                                      L::SR ? sr_key(seed, row[SEG_SALT], t) : 0u);
    In<L::P> g(column_ptr<const TP>(row, SEG_G));
    // a state the rule does not keep has a 0 column: never touched (its stream neither)
    Io<L::S> s0(column_ptr<TS>(row, SEG_S0)), s1(column_ptr<TS>(row, SEG_S1)), s2(column_ptr<TS>(row, SEG_S2));
    const typename Rule::Scalars sc = Rule::scalars(hp, t, gm);
    element_loop<staged<L::S>() && kStates, M>(
        lo, hi,
        [&](int64_t i, M& pi, M& x0, M& x1, M& x2) {
          pi = p.load(i);
          x0 = Rule::kS0 ? s0.load(i) : M(0);
          x1 = Rule::kS1 ? s1.load(i) : M(0);
          x2 = Rule::kS2 ? s2.load(i) : M(0);
          Rule::update(pi, g.load(i), x0, x1, x2, sc);
        },
        [&](int64_t i, const M& pi, const M& x0, const M& x1, const M& x2) {
          p.store(i, pi);
          if (Rule::kS0) s0.store(i, x0);
          if (Rule::kS1) s1.store(i, x1);
          if (Rule::kS2) s2.store(i, x2);
        },
        p, g, s0, s1, s2);
  });
}

// ------------------------------------------------------------ 8-bit states
// docs/quantization.md: per block, decode every state with its old absmax, run
// the rule's fp32 update (the weight is written from the unquantized new
// states), reduce each new state to its block absmax, re-encode. The slices of
// for_each_slice count blocks here.
// Elements [e0, e1) of block b of a segment of n elements.
inline void block_range(int64_t b, int64_t n, int64_t& e0, int64_t& e1) {
  e0 = b * kQuantBlock;
  e1 = min_i64(e0 + kQuantBlock, n);
}

// The 8-bit pass of every rule: as pass(), with uint8 codes and their block absmax
// (SEG_A0..SEG_A2) in place of L::S states; each state's code is signed or not as
// the rule says (Rule::kSigned0..2).
template <class L, class Rule>
void q8_pass(const StepArgs& a) {
  using M = typename Rule::M;
  using TP = storage_t<L::P>;
  static_assert(sizeof(M) == 4, "8-bit states compute in fp32");
  const double gm = grad_mult(a);
  const uint64_t seed = a.seed;
  for_each_slice<Rule::kHpCols>(a, [gm, seed](const int64_t* row, const double* hp, double t,
                                              int64_t lo, int64_t hi) {
    TP* __restrict__ p = column_ptr<TP>(row, SEG_P);
    const TP* __restrict__ g = column_ptr<const TP>(row, SEG_G);
    float* __restrict__ master = column_ptr<float>(row, SEG_MASTER);
    uint8_t* __restrict__ c0 = column_ptr<uint8_t>(row, SEG_S0);
    uint8_t* __restrict__ c1 = column_ptr<uint8_t>(row, SEG_S1);
    uint8_t* __restrict__ c2 = column_ptr<uint8_t>(row, SEG_S2);
    float* __restrict__ a0 = column_ptr<float>(row, SEG_A0);
    float* __restrict__ a1 = column_ptr<float>(row, SEG_A1);
    float* __restrict__ a2 = column_ptr<float>(row, SEG_A2);
    const uint32_t key = L::SR ? sr_key(seed, row[SEG_SALT], t) : 0u;
    const typename Rule::Scalars sc = Rule::scalars(hp, t, gm);
    alignas(64) float b0[kQuantBlock], b1[kQuantBlock], b2[kQuantBlock];
    for (int64_t b = lo; b < hi; ++b) {
      int64_t e0, e1;
      block_range(b, row[SEG_N], e0, e1);
      const float a0_old = Rule::kS0 ? a0[b] : 0.0f;
      const float a1_old = Rule::kS1 ? a1[b] : 0.0f;
      const float a2_old = Rule::kS2 ? a2[b] : 0.0f;
#pragma omp simd
      for (int64_t i = e0; i < e1; ++i) {
        M pi = load_param<L::P, L::MASTER>(p, master, i);
        M x0 = Rule::kS0 ? q_decode(c0[i], a0_old, Rule::kSigned0) : M(0);
        M x1 = Rule::kS1 ? q_decode(c1[i], a1_old, Rule::kSigned1) : M(0);
        M x2 = Rule::kS2 ? q_decode(c2[i], a2_old, Rule::kSigned2) : M(0);
        Rule::update(pi, load<L::P>(g, i), x0, x1, x2, sc);
        store_param<L::P, L::MASTER, L::SR>(p, master, i, pi, key);
        b0[i - e0] = x0;
        b1[i - e0] = x1;
        b2[i - e0] = x2;
      }
      if (Rule::kS0) q_encode_block<Rule::kSigned0>(b0, e1 - e0, c0 + e0, a0 + b);
      if (Rule::kS1) q_encode_block<Rule::kSigned1>(b1, e1 - e0, c1 + e0, a1 + b);
      if (Rule::kS2) q_encode_block<Rule::kSigned2>(b2, e1 - e0, c2 + e0, a2 + b);
    }
  });
}

// ------------------------------------------------------------ two-phase rules
// docs/design.md#per-tensor-reductions. One parallel region over the same
// partition as pass(): phase 1 updates the states and writes each 64-element
// chunk's sums (cpu::kSumChunk); after a barrier each segment's chunk sums are
// added in chunk order (segments split between threads by index); after a
// second barrier phase 2 reads its segment's sums and updates p. A chunk lies in
// one thread's range (the partition's boundaries are multiples of 64 elements
// from a segment's start) and its terms are added in one fixed order, so the sums,
// and the step, are the same bits for every thread count, every ISA variant and
// every grouping of tensors into buckets.
static_assert(cpu::kSumChunk == kPartitionQuantum, "a sum chunk must never straddle two threads");

// A segment that lies whole in one thread's range and whose buffers fit in
// this many bytes is stepped by that thread in one go when both phases run
// in the call: phase 1, its sums, phase 2, while its elements are still in
// the core's cache (a deep MLP's 800 tensors of at most 65,536 elements, for
// one: phase 2 then costs compute, not a second pass over memory). The same
// chunk sums added in the same order: the same bits as the two passes.
constexpr int64_t kLocalSegmentBytes = int64_t{1} << 20;

// The sum of a chunk's terms (zero-padded to kSumChunk): 16 lanes of 4 sequential
// adds, then a tree. Each lane is a sequential sum, so vectorizing changes nothing.
inline double chunk_sum(const double* x) {
  constexpr int kLanes = 16;
  static_assert(cpu::kSumChunk % kLanes == 0, "whole lanes");
  double lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = x[l];
  for (int q = 1; q < cpu::kSumChunk / kLanes; ++q) {
    for (int l = 0; l < kLanes; ++l) lane[l] += x[q * kLanes + l];
  }
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  }
  return lane[0];
}

template <class L, class Rule>
void two_phase_pass(const StepArgs& a) {
  using M = typename Rule::M;
  using TP = storage_t<L::P>;
  using TS = storage_t<L::S>;
  constexpr int K = Rule::kSums;
  constexpr int64_t C = cpu::kSumChunk;
  // bytes of one element over every buffer a two-phase step touches (p, g, the states, the master)
  constexpr int64_t kBytesPerElement = 2 * sizeof(TP) + (Rule::kS0 + Rule::kS1 + Rule::kS2) * sizeof(TS) +
                                       (L::MASTER ? sizeof(float) : 0);
  if (skipped(a)) return;
  const double gm = grad_mult(a);
  const int64_t* offs = a.offs;
#pragma omp parallel num_threads(a.num_threads) if (a.num_threads > 1)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t k = omp_get_thread_num();
    const int64_t begin = worker_begin(offs, a.nseg, k, nt);
    const int64_t end = worker_begin(offs, a.nseg, k + 1, nt);
    const int64_t s_lo = begin < end ? segment_of(offs, a.nseg, begin) : a.nseg;
    // stepped whole by this thread, both phases at once (kLocalSegmentBytes)
    const auto local = [&](int64_t s) {
      const int64_t n = offs[s + 1] - offs[s];
      return a.phases == 3 && offs[s] >= begin && offs[s + 1] <= end && n * kBytesPerElement <= kLocalSegmentBytes;
    };
    // what phase 1 keeps of a segment stepped whole here (rule.h kCachesUpdate), by element
    static thread_local std::vector<M> cache_store;
    M* cache = nullptr;
    if constexpr (kCachesUpdateOf<Rule>) {
      if (a.phases == 3) {
        cache_store.resize(static_cast<size_t>(kLocalSegmentBytes / kBytesPerElement + 1));
        cache = cache_store.data();
      }
    }
    // phase 2 of segment s over [lo, hi) with the segment's sums, from the states or, where phase
    // 1 kept it, from u
    const auto phase2 = [&](int64_t s, int64_t lo, int64_t hi, const double* sums, const M* kept) {
      const int64_t* row = a.table + s * SEG_COLS;
      const double t = static_cast<double>(*column_ptr<const float>(row, SEG_STEP)) + 1.0;
      const typename Rule::Apply ap =
          Rule::apply_scalars(a.hyper + row[SEG_HP] * Rule::kHpCols, t, gm, sums, row[SEG_N]);
      TP* __restrict__ p = column_ptr<TP>(row, SEG_P);
      float* __restrict__ master = column_ptr<float>(row, SEG_MASTER);
      const TS* __restrict__ s0 = column_ptr<const TS>(row, SEG_S0);
      const TS* __restrict__ s1 = column_ptr<const TS>(row, SEG_S1);
      const TS* __restrict__ s2 = column_ptr<const TS>(row, SEG_S2);
      const uint32_t key = L::SR ? sr_key(a.seed, row[SEG_SALT], t) : 0u;
      if constexpr (kCachesUpdateOf<Rule>) {
        if (kept != nullptr) {
#pragma omp simd
          for (int64_t i = lo; i < hi; ++i) {
            M pi = load_param<L::P, L::MASTER>(p, master, i);
            Rule::apply_update(pi, kept[i], ap);
            store_param<L::P, L::MASTER, L::SR>(p, master, i, pi, key);
          }
          return;
        }
      }
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        M pi = load_param<L::P, L::MASTER>(p, master, i);
        Rule::apply(pi, Rule::kS0 ? load<L::S>(s0, i) : M(0), Rule::kS1 ? load<L::S>(s1, i) : M(0),
                    Rule::kS2 ? load<L::S>(s2, i) : M(0), ap);
        store_param<L::P, L::MASTER, L::SR>(p, master, i, pi, key);
      }
    };
    // a segment's sums: its chunks' in chunk order
    const auto segment_sums = [&](int64_t s, double* out) {
      const double* part = a.partials + a.chunk_offs[s] * K;
      const int64_t chunks = a.chunk_offs[s + 1] - a.chunk_offs[s];
      for (int j = 0; j < K; ++j) {
        double total = 0.0;
        for (int64_t c = 0; c < chunks; ++c) total += part[c * K + j];
        out[j] = total;
      }
    };
    if (a.phases & 1) {
      for (int64_t s = s_lo; s < a.nseg && offs[s] < end; ++s) {
        const int64_t lo = max_i64(begin, offs[s]) - offs[s];
        const int64_t hi = min_i64(end, offs[s + 1]) - offs[s];
        if (lo >= hi) continue;
        const int64_t* row = a.table + s * SEG_COLS;
        const double t = static_cast<double>(*column_ptr<const float>(row, SEG_STEP)) + 1.0;
        const typename Rule::Scalars sc = Rule::scalars(a.hyper + row[SEG_HP] * Rule::kHpCols, t, gm);
        const TP* __restrict__ p = column_ptr<const TP>(row, SEG_P);
        const float* __restrict__ master = column_ptr<const float>(row, SEG_MASTER);
        const TP* __restrict__ g = column_ptr<const TP>(row, SEG_G);
        TS* __restrict__ s0 = column_ptr<TS>(row, SEG_S0);
        TS* __restrict__ s1 = column_ptr<TS>(row, SEG_S1);
        TS* __restrict__ s2 = column_ptr<TS>(row, SEG_S2);
        double* __restrict__ part = a.partials + a.chunk_offs[s] * K;
        // a rule whose phase 1 needs p only for some settings (StableAdamW: the L2 term) does not
        // read it otherwise: 4 of its 40 B per fp32 parameter
        // a segment stepped whole here keeps what phase 2 would recompute (rule.h kCachesUpdate)
        M* const kept = kCachesUpdateOf<Rule> && local(s) ? cache : nullptr;
        const auto phase1 = [&](auto reads_p, auto keeps) {
          constexpr bool kReadsP = decltype(reads_p)::value;
          constexpr bool kKeeps = decltype(keeps)::value;
          alignas(64) double terms[K][C];
          for (int64_t c0 = lo; c0 < hi; c0 += C) {  // lo is a multiple of C: chunks from the segment's start
            const int64_t c1 = min_i64(c0 + C, hi);
#pragma omp simd
            for (int64_t i = c0; i < c1; ++i) {
              M pi = kReadsP ? load_param<L::P, L::MASTER>(p, master, i) : M(0);
              M gi = load<L::P>(g, i);
              M x0 = Rule::kS0 ? load<L::S>(s0, i) : M(0);
              M x1 = Rule::kS1 ? load<L::S>(s1, i) : M(0);
              M x2 = Rule::kS2 ? load<L::S>(s2, i) : M(0);
              Rule::moments(pi, gi, x0, x1, x2, sc);
              if (Rule::kS0) store<L::S>(s0, i, x0);
              if (Rule::kS1) store<L::S>(s1, i, x1);
              if (Rule::kS2) store<L::S>(s2, i, x2);
              double out[K];
              // the sums see the states as phase 2 will read them
              Rule::terms(pi, gi, as_stored<L::S>(x0), as_stored<L::S>(x1), as_stored<L::S>(x2), sc, out);
              for (int j = 0; j < K; ++j) terms[j][i - c0] = out[j];
              if constexpr (kKeeps) {
                kept[i] = Rule::update(pi, gi, as_stored<L::S>(x0), as_stored<L::S>(x1), as_stored<L::S>(x2), sc);
              }
            }
            for (int j = 0; j < K; ++j) {
              for (int64_t i = c1 - c0; i < C; ++i) terms[j][i] = 0.0;
              part[(c0 / C) * K + j] = chunk_sum(terms[j]);
            }
          }
        };
        const auto run = [&](auto keeps) {
          if (Rule::moments_read_p(sc)) {
            phase1(std::true_type{}, keeps);
          } else {
            phase1(std::false_type{}, keeps);
          }
        };
        if (kept != nullptr) {
          run(std::bool_constant<kCachesUpdateOf<Rule>>{});
        } else {
          run(std::false_type{});
        }
        if (local(s)) {
          double sums[K];
          segment_sums(s, sums);
          phase2(s, lo, hi, sums, kept);
        }
      }
#pragma omp barrier
      // each segment's sums (the local segments' too: the caller may read them)
      for (int64_t s = a.nseg * k / nt; s < a.nseg * (k + 1) / nt; ++s) segment_sums(s, a.sums + s * K);
    }
    if (a.phases & 2) {
#pragma omp barrier
      for (int64_t s = s_lo; s < a.nseg && offs[s] < end; ++s) {
        const int64_t lo = max_i64(begin, offs[s]) - offs[s];
        const int64_t hi = min_i64(end, offs[s + 1]) - offs[s];
        if (lo >= hi || local(s)) continue;
        phase2(s, lo, hi, a.sums + s * K, nullptr);
      }
      // every thread has read its segments' step counts: advance each once
#pragma omp barrier
      for (int64_t s = a.nseg * k / nt; s < a.nseg * (k + 1) / nt; ++s) {
        float* step = column_ptr<float>(a.table + s * SEG_COLS, SEG_STEP);
        *step = *step + 1.0f;
      }
    }
  }
}

// One step of the rule R: its switch bits and the step's storage (validated by the
// bindings: precision.h check_layout / check_q8_layout) -> the pass instantiated for them.
template <class R>
void run(const StepArgs& a, unsigned switches) {
  if constexpr (kSumsOf<R> > 0) {  // two-phase: no 8-bit states (the bindings refuse them)
    with_layout(a.dtype, a.state_dtype, a.master, a.stochastic, [&](auto layout) {
      using L = decltype(layout);
      R::template with_switches<L::P>(switches, [&](auto rule) { two_phase_pass<L, decltype(rule)>(a); });
    });
  } else if (a.quantized) {
    with_q8_layout(a.dtype, a.master, a.stochastic, [&](auto layout) {
      using L = decltype(layout);
      R::template with_switches<L::P>(switches, [&](auto rule) { q8_pass<L, decltype(rule)>(a); });
    });
  } else {
    with_layout(a.dtype, a.state_dtype, a.master, a.stochastic, [&](auto layout) {
      using L = decltype(layout);
      R::template with_switches<L::P>(switches, [&](auto rule) { pass<L, decltype(rule)>(a); });
    });
  }
}

// The kernel table's entry: one step of the rule with this id (rules.h; the bindings checked it).
inline void step(int rule, const StepArgs& a, unsigned switches) {
  with_rule(rule, [&](auto r) { run<decltype(r)>(a, switches); });
}

// The sum of squares of every gradient of the table (max_grad_norm's one read
// pass), in double: each thread sums its share of the concatenated elements
// (the steps' partition), the threads' sums are added in thread order, so the
// result depends on the thread count and on the ISA variant (its number of
// double lanes in the simd reduction): the last bits of the double sum differ
// between variants, which the fp32 norm the step uses almost always absorbs.
template <DType G>
double sumsq_pass(const StepArgs& a) {
  double partial[256] = {0.0};
  const int nt_max = a.num_threads < 256 ? a.num_threads : 256;
  int nt_used = 1;
#pragma omp parallel num_threads(nt_max) if (nt_max > 1)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t k = omp_get_thread_num();
    if (k == 0) nt_used = static_cast<int>(nt);
    const int64_t* offs = a.offs;
    const int64_t begin = worker_begin(offs, a.nseg, k, nt);
    const int64_t end = worker_begin(offs, a.nseg, k + 1, nt);
    double acc = 0.0;
    if (begin < end) {
      for (int64_t s = segment_of(offs, a.nseg, begin); s < a.nseg && offs[s] < end; ++s) {
        const int64_t lo = max_i64(begin, offs[s]) - offs[s];
        const int64_t hi = min_i64(end, offs[s + 1]) - offs[s];
        const storage_t<G>* __restrict__ g = column_ptr<const storage_t<G>>(a.table + s * SEG_COLS, SEG_G);
#pragma omp simd reduction(+ : acc)
        for (int64_t i = lo; i < hi; ++i) {
          const double x = static_cast<double>(load<G>(g, i));
          acc += x * x;
        }
      }
    }
    partial[k] = acc;
  }
  double total = 0.0;
  for (int k = 0; k < nt_used; ++k) total += partial[k];
  return total;
}

inline double sumsq(const StepArgs& a) {
  switch (static_cast<DType>(a.dtype)) {
    case DType::F32: return sumsq_pass<DType::F32>(a);
    case DType::F16: return sumsq_pass<DType::F16>(a);
    case DType::BF16: return sumsq_pass<DType::BF16>(a);
    case DType::F64: return sumsq_pass<DType::F64>(a);
  }
  return 0.0;
}

// The memory-traffic floor: every read buffer read once, every write buffer
// written once with the (wrapping integer) sum of the reads, over the same
// partition and threading as the steps. Like the steps, one loop touches every
// stream at once (the hardware prefetchers see the same pattern), so the
// buffer counts are compile-time constants.
template <typename U, int R, int W>
void traffic_fixed(const TrafficArgs& a) {
  const int64_t offs[2] = {0, a.n};
#pragma omp parallel num_threads(a.num_threads) if (a.num_threads > 1)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t k = omp_get_thread_num();
    const int64_t begin = worker_begin(offs, 1, k, nt);
    const int64_t end = worker_begin(offs, 1, k + 1, nt);
    const U* src[R > 0 ? R : 1];
    U* dst[W > 0 ? W : 1];
    // the caller passes raw addresses of buffers of n elements
    for (int r = 0; r < R; ++r) src[r] = reinterpret_cast<const U*>(a.reads[r]);
    for (int w = 0; w < W; ++w) dst[w] = reinterpret_cast<U*>(a.writes[w]);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      U acc = 0;
      for (int r = 0; r < R; ++r) acc = static_cast<U>(acc + src[r][i]);
      for (int w = 0; w < W; ++w) dst[w][i] = acc;
    }
  }
}

// Runtime buffer counts -> template; the bindings checked both are at most
// kMaxTrafficBuffers.
template <typename U, int R = 0, int W = 0>
void traffic_counts(const TrafficArgs& a) {
  if constexpr (R <= cpu::kMaxTrafficBuffers && W <= cpu::kMaxTrafficBuffers) {
    if (a.n_reads != R) {
      traffic_counts<U, R + 1, W>(a);
    } else if (a.n_writes != W) {
      traffic_counts<U, R, W + 1>(a);
    } else {
      traffic_fixed<U, R, W>(a);
    }
  }
}

inline void traffic(const TrafficArgs& a) {
  if (a.elem_size == 4) {
    traffic_counts<uint32_t>(a);
  } else {
    traffic_counts<uint16_t>(a);
  }
}

// Every float32 y in [0, 1] through this variant's encode, against the definition:
// the count of thresholds reached. Both paths are tried: q_level's portable guess
// and, where the variant has one, the vector guess of q_encode_values. The
// thresholds are float32 values themselves and non-negative floats order as their
// bit patterns, so the count is j on the bit range [bits(thresholds[j - 1]),
// bits(thresholds[j])): no search per value.
inline int64_t q_level_errors(bool is_signed, const float* thresholds, uint32_t* first_bad) {
  const int levels = is_signed ? kSignedLevels : kUnsignedLevels;
  const uint32_t last = float_bits(1.0f);
  constexpr int64_t kChunk = 4096;
  // the bit range where the count is j
  auto range = [&](int j, uint32_t* lo, uint32_t* hi) {
    *lo = j == 0 ? 0u : float_bits(thresholds[j - 1]);
    *hi = j < levels ? float_bits(thresholds[j]) : last + 1;
  };
  int64_t errors = 0;
  uint32_t first = 0xFFFFFFFFu;
  for (int path = 0; path < 2; ++path) {
#pragma omp parallel for schedule(dynamic) reduction(+ : errors) reduction(min : first)
    for (int j = 0; j <= levels; ++j) {
      uint32_t lo, hi;
      range(j, &lo, &hi);
      alignas(64) float y[kChunk];
      alignas(64) int32_t k[kChunk];
      for (uint64_t c = lo; c < hi; c += kChunk) {
        const int64_t n = static_cast<int64_t>(hi - c < static_cast<uint64_t>(kChunk) ? hi - c : kChunk);
        for (int64_t i = 0; i < n; ++i) y[i] = bits_float(static_cast<uint32_t>(c + i));
        q_levels(y, n, k, is_signed, path == 1);
        for (int64_t i = 0; i < n; ++i) {
          if (k[i] != j) {
            ++errors;
            first = first < static_cast<uint32_t>(c + i) ? first : static_cast<uint32_t>(c + i);
          }
        }
      }
    }
  }
  *first_bad = errors == 0 ? 0u : first;
  return errors;
}

// The conversions a chunked fp16 stream makes (Io, In), or the element loops'
// portable ones where the variant has no F16C.
inline void f16_to_f32(const uint16_t* in, float* out, int64_t n) {
#if defined(FUSEDWD_HW_F16)
  f16_to_float_n(in, out, n);
#else
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = f16_to_float(in[i]);
#endif
}

inline void f32_to_f16(const float* in, uint16_t* out, int64_t n) {
#if defined(FUSEDWD_HW_F16)
  float_to_f16_n(in, out, n);
#else
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_f16(in[i]);
#endif
}

}  // namespace cpu_loops
FUSEDWD_NS_END

#define FUSEDWD_CAT2(a, b) a##b
#define FUSEDWD_CAT(a, b) FUSEDWD_CAT2(a, b)
#define FUSEDWD_STR2(a) #a
#define FUSEDWD_STR(a) FUSEDWD_STR2(a)

// This variant's table, named <isa>_kernels, read by dispatch.cpp.
#define FUSEDWD_DEFINE_KERNELS()                                                      \
  namespace fusedwd {                                                                 \
  namespace cpu {                                                                     \
  extern const Kernels FUSEDWD_CAT(FUSEDWD_ISA_NS, _kernels);                          \
  const Kernels FUSEDWD_CAT(FUSEDWD_ISA_NS, _kernels) = {                              \
      FUSEDWD_STR(FUSEDWD_ISA_NS), &cpu_loops::step, &cpu_loops::traffic,             \
      &cpu_loops::sumsq, &cpu_loops::q_level_errors, &cpu_loops::f16_to_f32,          \
      &cpu_loops::f32_to_f16};                                                        \
  }                                                                                   \
  }
