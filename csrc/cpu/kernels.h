// The interface between the bindings and the CPU loops. The loops are compiled
// once per ISA variant (loops_*.cpp); each variant exports one Kernels table
// and dispatch.cpp picks one at import. Plain types only: the variants' C++
// types live in per-ISA namespaces and must not cross this boundary.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fusedwd {
namespace cpu {

struct StepArgs {
  const int64_t* table;  // nseg rows of SEG_COLS int64 (layout.h)
  int64_t nseg;          // number of segments (> 0)
  const double* hyper;   // hyperparameter rows of the rule
  const int64_t* offs;   // prefix sums of the segment sizes, nseg + 1 entries
  int dtype;             // DType of p and g
  int num_threads;       // >= 1
  int state_dtype;       // DType of every state
  bool master;           // SEG_MASTER holds an fp32 master copy of each 16-bit p
  bool stochastic;       // round bf16 p stochastically (no master)
  const float* ctl;      // the control block (layout.h Ctl), or nullptr: no AMP, no clipping
  uint64_t seed;         // stochastic rounding seed
  bool quantized;        // 8-bit blockwise states (quant.h): offs and slices count blocks
  // two-phase rules (rule.h kSums > 0) only:
  int phases = 3;                     // bit 0: phase 1 (fills sums), bit 1: phase 2 (reads them)
  double* sums = nullptr;             // nseg rows of kSums: each segment's sums
  double* partials = nullptr;         // scratch: kSums per chunk of kSumChunk elements
  const int64_t* chunk_offs = nullptr;  // prefix sums of the segments' chunk counts, nseg + 1
};

// Two-phase rules sum each segment by chunks of this many elements, a chunk's
// terms in a fixed order and the chunks in segment order: the partition between
// threads (partition.h) never splits a chunk, so the sums do not depend on it.
constexpr int64_t kSumChunk = 64;

// traffic_pass takes at most this many read and this many write buffers.
constexpr int kMaxTrafficBuffers = 8;

struct TrafficArgs {
  const uintptr_t* reads;   // addresses of the buffers read
  int64_t n_reads;
  const uintptr_t* writes;  // addresses of the buffers written
  int64_t n_writes;
  int64_t n;                // elements per buffer
  int elem_size;            // bytes per element: 4 or 2
  int num_threads;          // >= 1
};

struct Kernels {
  const char* name;
  // one step of rule `rule` (its id in csrc/include/fusedwd/rules.h) with these switch bits
  void (*step)(int rule, const StepArgs&, unsigned switches);
  void (*traffic)(const TrafficArgs&);
  double (*sumsq)(const StepArgs&);  // sum of squares of every segment's gradient
  // For the tests, this variant's own compiled 8-bit encode: how many float32 y in
  // [0, 1] q_level codes differently from the number of the given K thresholds (the
  // spec's, increasing) that y reaches (every such y is tried), and the bit pattern of
  // the first (0 when none).
  int64_t (*q_level_errors)(bool is_signed, const float* thresholds, uint32_t* first_bad);
  // For the tests: this variant's fp16 conversions as its loops run them (bulk F16C /
  // AVX-512 where it has them, common.h's bit arithmetic elsewhere), over n values.
  void (*f16_to_f32)(const uint16_t* in, float* out, int64_t n);
  void (*f32_to_f16)(const float* in, uint16_t* out, int64_t n);
};

// The variant in use; chosen at first use from the CPU features unless
// FUSEDWD_CPU_ISA names one.
const Kernels& active();
// Names of the variants built into this module and runnable on this CPU,
// slowest first.
std::vector<std::string> supported_isas();
// Selects a variant by name; throws std::invalid_argument if unknown or unsupported.
void set_isa(const std::string& name);

// Exclusive prefix sums of the SEG_N column, in units of `unit` elements (a
// segment's count rounded up): nseg + 1 entries.
std::vector<int64_t> segment_offsets(const int64_t* table, int64_t nseg, int64_t unit = 1);

}  // namespace cpu
}  // namespace fusedwd
