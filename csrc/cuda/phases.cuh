// The CUDA kernel of the two-phase rules (LAMB, StableAdamW; docs/design.md#per-tensor-reductions):
// one phases_kernel<L> per storage layout without 8-bit states, launched twice per bucket step
// (phase 1, then phase 2), the rule's id a launch argument as in step_kernel<L, Q8>. The
// per-element math is the rule's __host__ __device__ header (moments, terms, apply_scalars,
// apply; csrc/include/fusedwd/rule.h), the CPU kernel's (csrc/cpu/loops.h two_phase_pass).
//
// Geometry: the step kernel's persistent grid-stride walk over the segment table (tile scans of
// chunk prefix sums, chunks dealt round robin; csrc/include/fusedwd/launch.h; a segment opened by
// the block's first thread when the block moves to it), in chunks of
// kPhaseChunk = 1024 elements: 16 sum chunks of 64 elements (cpu::kSumChunk), one per group of
// 16 threads. Lane l of a group owns the elements l, l + 16, l + 32, l + 48 of its sum chunk
// (coalesced scalar accesses), so it adds its lane of loops.h chunk_sum (4 sequential adds) in
// registers; the tree over the 16 lanes is added by the group's first thread through shared
// memory, in chunk_sum's order.
//
// Phase 1 updates the states and writes each sum chunk's float64 sums into the scratch's
// partials, at (global chunk * 16 + sum chunk) * K: a segment's sum chunks are consecutive. Each
// chunk done, the block arrives on its segment's counter (arrivals[1 + segment]) (a __threadfence() after the stores,
// then atomicAdd, as the step count arrival); the block that brings it to the segment's chunk
// count fences again and adds the segment's sum chunks in chunk order (loops.h: total += part
// one at a time) into the sums buffer [nseg, K], and resets the counter. The last block of the
// launch (the launch's arrival word) writes the sums of empty segments (0, as the CPU kernel)
// and advances no step count.
//
// Phase 2 reads each segment's sums (Rule::apply_scalars once per opened segment), steps p
// (Rule::apply, stochastic rounding keyed by the element's index), and the last block of the
// launch advances every step count, as step_kernel.
//
// A found_inf step (the control block) leaves every block at once in both phases: nothing is
// written, nothing arrives.
#pragma once

#include "cuda/step.cuh"

FUSEDWD_NS_BEGIN
namespace cuda_kernels {

constexpr int kSumChunk = 64;  // csrc/cpu/kernels.h kSumChunk
constexpr int kSumLanes = 16;  // loops.h chunk_sum: 16 lanes of 4 sequential adds, then a tree
constexpr int kSumChunksPerChunk = kCudaThreads / kSumLanes;
constexpr int64_t kPhaseChunk = int64_t{kSumChunksPerChunk} * kSumChunk;
static_assert(kPhaseChunk == kCudaThreads * (kSumChunk / kSumLanes), "each thread owns one lane of 4 elements");
constexpr int kMaxSums = 2;

// Whether the rule with this id has a two-phase path (kSums > 0) in phases_kernel.
FUSEDWD_HD constexpr bool has_phases_path(int rule) {
#define FUSEDWD_RULE_HAS_PHASES(R) (rule == static_cast<int>(RuleId::R) && kSumsOf<R> > 0) ||
  return FUSEDWD_RULES(FUSEDWD_RULE_HAS_PHASES) false;
#undef FUSEDWD_RULE_HAS_PHASES
}

// The rule with this id -> f(Rule<D>{}), for a two-phase rule (the launch's rule picks the path).
template <DType D, typename F>
__device__ __forceinline__ void with_two_phase_rule(int rule, unsigned switches, F&& f) {
#define FUSEDWD_PHASES_PATH(R)                                                          \
  if constexpr (kSumsOf<R> > 0) {                                                       \
    static_assert(kSumsOf<R> <= kMaxSums, "phases_kernel holds at most kMaxSums sums"); \
    if (rule == static_cast<int>(RuleId::R)) R::template with_switches<D>(switches, f); \
  }
  FUSEDWD_RULES(FUSEDWD_PHASES_PATH)
#undef FUSEDWD_PHASES_PATH
}

// The per-segment scalars of any two-phase rule: phase 1's Scalars and phase 2's Apply.
// (an elementwise rule has no Apply: char)
template <class R, typename M, bool = (kSumsOf<R> > 0)>
struct PhaseTypes {
  using Scalars = char;
  using Apply = char;
};
template <class R, typename M>
struct PhaseTypes<R, M, true> {
  using Scalars = typename R::template Scalars<M>;
  using Apply = typename R::template Apply<M>;
};
template <class R, typename M>
using PhaseScalars = typename PhaseTypes<R, M>::Scalars;
template <class R, typename M>
using PhaseApply = typename PhaseTypes<R, M>::Apply;

template <typename M>
union AnyPhaseScalars {
#define FUSEDWD_PHASE_MEMBERS(R) \
  PhaseScalars<R, M> R##_s;      \
  PhaseApply<R, M> R##_a;
  FUSEDWD_RULES(FUSEDWD_PHASE_MEMBERS)
#undef FUSEDWD_PHASE_MEMBERS
};  // a member is read through member<T>() (step.cuh)

// A segment as phases_kernel's threads use it (see Segment in step.cuh), in shared memory: its
// addresses, its first global chunk (where its sum chunks start in the partials) and the scalars
// of the launch's phase.
template <class L>
struct PhaseSegment {
  using TP = storage_t<L::P>;
  using TS = storage_t<L::S>;
  using M = math_t<L::P>;
  int64_t index;
  int64_t n;
  int64_t chunk0;  // the segment's first chunk in the launch's numbering
  TP* p;
  const TP* g;
  TS* s0;
  TS* s1;
  float* master;
  uint32_t key;  // the stochastic rounding key of this segment and step (SR, phase 2)
  bool reads_p;  // phase 1: Rule::moments_read_p
  AnyPhaseScalars<M> any;

  template <class Rule, int PHASE>
  __device__ void open(const int64_t* table, const double* hyper, int64_t s, int64_t first_chunk,
                       const float* ctl, uint64_t seed, const double* sums) {
    static_assert(!Rule::kS2, "the two-phase kernels update S0 and S1");
    const int64_t* row = table + s * SEG_COLS;
    index = s;
    n = row[SEG_N];
    chunk0 = first_chunk;
    p = column<TP>(row, SEG_P);
    g = column<const TP>(row, SEG_G);
    s0 = Rule::kS0 ? column<TS>(row, SEG_S0) : nullptr;
    s1 = Rule::kS1 ? column<TS>(row, SEG_S1) : nullptr;
    master = L::MASTER ? column<float>(row, SEG_MASTER) : nullptr;
    // t0 is read here by every block touching the segment; phase 2's last block advances it
    const double t = static_cast<double>(*column<const float>(row, SEG_STEP)) + 1.0;
    const double* hp = hyper + row[SEG_HP] * Rule::kHpCols;
    const double gm = ctl_grad_mult(opaque(ctl));
    if constexpr (PHASE == 1) {
      key = 0u;
      const typename Rule::Scalars sc = Rule::scalars(hp, t, gm);
      reads_p = Rule::moments_read_p(sc);
      member<typename Rule::Scalars>(any) = sc;
    } else {
      key = L::SR ? sr_key(seed, row[SEG_SALT], t) : 0u;
      reads_p = true;
      member<typename Rule::Apply>(any) = Rule::apply_scalars(hp, t, gm, sums + s * Rule::kSums, n);
    }
  }

  // Phase 1, element i (< n): the states updated and stored, its terms returned.
  template <class Rule>
  __device__ void moments(int64_t i, double (&out)[Rule::kSums]) const {
    const auto& sc = member<typename Rule::Scalars>(any);
    M pi = reads_p ? load_param<L::P, L::MASTER>(p, master, i) : M(0);
    M gi = load<L::P>(g, i);
    M x0 = Rule::kS0 ? load<L::S>(s0, i) : M(0);
    M x1 = Rule::kS1 ? load<L::S>(s1, i) : M(0);
    M x2 = M(0);
    Rule::moments(pi, gi, x0, x1, x2, sc);
    if (Rule::kS0) store<L::S>(s0, i, x0);
    if (Rule::kS1) store<L::S>(s1, i, x1);
    // the sums see the states as phase 2 will read them
    Rule::terms(pi, gi, as_stored<L::S>(x0), as_stored<L::S>(x1), as_stored<L::S>(x2), sc, out);
  }

  // Phase 2, element i (< n).
  template <class Rule>
  __device__ void apply(int64_t i) const {
    const auto& ap = member<typename Rule::Apply>(any);
    M pi = load_param<L::P, L::MASTER>(p, master, i);
    Rule::apply(pi, Rule::kS0 ? load<L::S>(s0, i) : M(0), Rule::kS1 ? load<L::S>(s1, i) : M(0), M(0), ap);
    store_param<L::P, L::MASTER, L::SR>(p, master, i, pi, key);
  }
};

// The scratch of a two-phase launch (device memory the caller owns; csrc/cuda/kernels.h
// two_phase_scratch_bytes): room for the sums [nseg, K] (used when the caller gives no sums
// buffer), then the partials, float64 [chunks * kSumChunksPerChunk, K] (chunks: the launch's
// chunks of kPhaseChunk). Both are written before they are read in every step, so their places
// may move with nseg. The segments' arrival counters, which must stay zero between launches, are
// the words after the launch's arrival word (arrivals[1 + s]): their places never move.
struct PhaseScratch {
  double* own_sums;
  double* partials;
};
FUSEDWD_HD inline PhaseScratch phase_scratch(void* scratch, int64_t nseg, int k) {
  double* base = static_cast<double*>(scratch);
  return {base, base + nseg * k};
}

// ctl, seed, rule, switches: as step_kernel's; arrivals: 1 + nseg zero words (the launch's, then
// each segment's), left zero; phase: 1 or 2; sums: float64 [nseg, K], written by phase 1 and read
// by phase 2 (nullptr: in the scratch); scratch: see phase_scratch.
// Resident blocks per SM the two-phase kernels are compiled for: three (85 registers), as the fp64
// and 8-bit kernels (step.cuh kMinBlocksPerSm): at 64 registers the bf16 kernels spilled 44 bytes
// (phase 1 keeps a lane's 4 elements and its float64 sums in flight).
constexpr int kPhasesMinBlocksPerSm = 3;

template <class L>
__global__ void __launch_bounds__(kCudaThreads, kPhasesMinBlocksPerSm)
    phases_kernel(const int64_t* __restrict__ table, int64_t nseg, const double* __restrict__ hyper,
                  unsigned int* arrivals, const float* __restrict__ ctl, uint64_t seed, int rule,
                  unsigned switches, int phase, double* sums, void* scratch) {
  if (ctl_skips(ctl) || !has_phases_path(rule) || (phase != 1 && phase != 2)) return;
  __shared__ int64_t starts[kCudaThreads + 1];
  __shared__ int64_t warp_sums[kWarps];
  // The segment the block is working on, opened by its first thread when the block moves to it
  // (no slot per tile position, as step_kernel's: 256 of fp64 LAMB's would not fit in 48 KB).
  __shared__ PhaseSegment<L> seg;
  // phase 1: each thread's lane sums of its sum chunk, per sum
  __shared__ double lanes[kMaxSums][kCudaThreads];
  __shared__ bool last;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t block = blockIdx.x;
  const int64_t grid = gridDim.x;

  with_two_phase_rule<L::P>(rule, switches, [&](auto rule_tag) {
    using Rule = decltype(rule_tag);
    constexpr int K = Rule::kSums;
    const PhaseScratch sc = phase_scratch(scratch, nseg, K);
    unsigned int* counters = arrivals + 1;
    double* partials = sc.partials;
    if (sums == nullptr) sums = sc.own_sums;
    const int group = tid / kSumLanes;  // the thread's sum chunk in a chunk
    const int lane = tid % kSumLanes;
    if (tid == 0) seg.index = -1;
    for (int64_t base = 0; base < nseg; base += kCudaThreads) {
      const int64_t count = nseg - base < kCudaThreads ? nseg - base : kCudaThreads;
      const int64_t running = base == 0 ? 0 : starts[kCudaThreads];
      const int64_t n = tid < count ? table[(base + tid) * SEG_COLS + SEG_N] : 0;
      int64_t total = 0;
      const int64_t prefix = block_exclusive_sum(chunks_of(n, kPhaseChunk), warp_sums, &total);
      starts[tid] = running + prefix;
      if (tid == 0) starts[kCudaThreads] = running + total;
      __syncthreads();
      for_each_owned_chunk(starts, count, block, grid, [&](int64_t i, int64_t j) {
        // (i, j) is the same for every thread of the block, so the barriers below are reached by all
        if (seg.index != base + i) {
          __syncthreads();  // every thread is done with the previous segment
          if (tid == 0) {
            if (phase == 1) {
              seg.template open<Rule, 1>(table, hyper, base + i, starts[i], ctl, seed, sums);
            } else {
              seg.template open<Rule, 2>(table, hyper, base + i, starts[i], ctl, seed, sums);
            }
          }
          __syncthreads();
        }
        const ChunkRange r = chunk_range(seg.n, kPhaseChunk, j);
        if (phase == 2) {
#pragma unroll
          for (int k = 0; k < static_cast<int>(kPhaseChunk / kCudaThreads); ++k) {
            const int64_t e = r.begin + tid + k * kCudaThreads;
            if (e < r.end) seg.template apply<Rule>(e);
          }
          return;
        }
        // phase 1: this thread's lane of its sum chunk, 4 sequential adds (chunk_sum's lanes;
        // elements past the segment's end are its zero padding)
        const int64_t e0 = r.begin + group * kSumChunk + lane;
        double lane_sum[K];
#pragma unroll
        for (int q = 0; q < kSumChunk / kSumLanes; ++q) {
          const int64_t e = e0 + q * kSumLanes;
          double out[K];
#pragma unroll
          for (int k = 0; k < K; ++k) out[k] = 0.0;
          if (e < r.end) seg.template moments<Rule>(e, out);
#pragma unroll
          for (int k = 0; k < K; ++k) lane_sum[k] = q == 0 ? out[k] : lane_sum[k] + out[k];
        }
#pragma unroll
        for (int k = 0; k < K; ++k) lanes[k][tid] = lane_sum[k];
        __syncthreads();
        // the group's first thread: chunk_sum's tree, lane[l] += lane[l + w] for w = 8, 4, 2, 1
        const int64_t sum_chunks = chunks_of(r.end - r.begin, kSumChunk);
        if (lane == 0 && group < sum_chunks) {
#pragma unroll
          for (int k = 0; k < K; ++k) {
            double x[kSumLanes];
#pragma unroll
            for (int l = 0; l < kSumLanes; ++l) x[l] = lanes[k][tid + l];
            // (each w its own loop, so that every index is a constant and x stays in registers)
            static_assert(kSumLanes == 16, "the tree below is chunk_sum's for 16 lanes");
#pragma unroll
            for (int l = 0; l < 8; ++l) x[l] += x[l + 8];
#pragma unroll
            for (int l = 0; l < 4; ++l) x[l] += x[l + 4];
#pragma unroll
            for (int l = 0; l < 2; ++l) x[l] += x[l + 2];
            x[0] += x[1];
            partials[((seg.chunk0 + j) * kSumChunksPerChunk + group) * K + k] = x[0];
          }
          __threadfence();  // each writer's own fence, before the barrier and the block's arrival
        }
        // every thread's reads of lanes, and the partials' stores, before the arrival
        __syncthreads();
        if (tid == 0) {
          __threadfence();
          last = atomicAdd(&counters[seg.index], 1u) == chunks_of(seg.n, kPhaseChunk) - 1;
        }
        __syncthreads();
        if (last) {
          // every chunk of the segment has stored its sums: add them in chunk order (loops.h)
          if (tid < K) {
            __threadfence();
            const double* part = partials + seg.chunk0 * kSumChunksPerChunk * K;
            const int64_t m = chunks_of(seg.n, kSumChunk);
            double sum = 0.0;
            for (int64_t c = 0; c < m; ++c) sum += __ldcg(part + c * K + tid);
            sums[seg.index * K + tid] = sum;
          }
          if (tid == 0) counters[seg.index] = 0u;
        }
        // lanes and last are rewritten by the next chunk
        __syncthreads();
      });
      __syncthreads();  // starts and warp_sums are rewritten by the next tile
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
    if (phase == 1) {
      // an empty segment has no chunk: its sums are 0, as the CPU kernel's
      with_two_phase_rule<L::P>(rule, switches, [&](auto rule_tag) {
        constexpr int K = decltype(rule_tag)::kSums;
        if (sums == nullptr) sums = phase_scratch(scratch, nseg, K).own_sums;
        for (int64_t s = tid; s < nseg; s += kCudaThreads) {
          if (table[s * SEG_COLS + SEG_N] == 0) {
            for (int k = 0; k < K; ++k) sums[s * K + k] = 0.0;
          }
        }
      });
    } else {
      for (int64_t s = tid; s < nseg; s += kCudaThreads) {
        float* step = column<float>(table + s * SEG_COLS, SEG_STEP);
        *step = *step + 1.0f;
      }
    }
    if (tid == 0) *arrivals = 0u;
  }
}

}  // namespace cuda_kernels
FUSEDWD_NS_END
